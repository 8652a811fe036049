"""The GPU catalog, the method table, the capability check and the fit model.

May import: forge.core, forge.model, forge.engines.
"""
