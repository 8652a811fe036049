"""The ground floor: errors, options (the environment, read in one place), digests, linking, step logs,
plugin registries and host probes.

May import: nothing of forge.
"""
