"""The step cache: a local content-addressed store and the remote (OCI registry) layer behind one interface.

May import: forge.core, forge.oci, forge.steps.
"""
