"""Images: the base catalog, the Containerfile, container tools, the weights layer, the smoke test, Trivy
and the scan policy.

May import: forge.core, forge.oci, forge.gpu, forge.engines.
"""
