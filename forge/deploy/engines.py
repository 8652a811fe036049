"""What a cluster needs to know about a serving engine, by engine and engine version.

``serving(engine, version)`` is the one place forge/deploy asks for engine facts (health route, the
Prometheus metrics it exposes, whether the root filesystem can be read-only, how long it takes to
start). Each engine module declares them (``forge/engines/<engine>.py``, ``serving(version)``), with the
sources of each fact beside it.
"""
from __future__ import annotations

from forge.engines import QueueMetric, Serving, get

__all__ = ["QueueMetric", "Serving", "serving"]


def serving(engine: str, version: str | None) -> Serving:
    """The facts for ``engine`` at ``version`` (the base image's engine version, from the record)."""
    return get(engine).serving(version)
