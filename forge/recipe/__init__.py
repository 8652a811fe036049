"""Recipes: the YAML schema, loading with located errors, completion, and the resolution stage (one frozen
``Resolved`` per variant: backend, format, engine, base image, capability and fit, derived once).

May import: forge.core, forge.model, forge.evaluation, forge.gpu, forge.engines, forge.backends, forge.image.
"""
