"""Eval task packs and the gate's statistics.

May import: forge.core.
"""
