"""OCI plumbing: image layouts on disk and the Distribution registry client.

May import: forge.core.
"""
