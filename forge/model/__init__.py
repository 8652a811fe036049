"""The model and its files: sources, config shape, safetensors checks, calibration data.

May import: forge.core.
"""
