"""Plans and runs step graphs: the scheduler, variants, method: auto and the build-to-record pipeline.

May import: forge.core, forge.oci, forge.evaluation, forge.gpu, forge.recipe, forge.steps, forge.store,
forge.registry, forge.report, forge.executors.
"""
