"""JSON that is JSON: non-finite floats written as null.

``json.dumps`` writes ``NaN``/``Infinity`` by default, which no JSON parser but Python's accepts. Evidence
files (the gate's verdict, an eval's results and samples, step manifests) go through ``dumps`` here, so a
number that could not be computed is ``null`` and a reader can never mistake it for a value.
"""
from __future__ import annotations

import json
import math

__all__ = ["finite", "dumps"]


def finite(obj):
    """``obj`` with every non-finite float (NaN, ±inf; numpy floats included) replaced by None."""
    if isinstance(obj, float):   # numpy.float64 is a float subclass
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:   # numpy scalars (float32, bool_)
        return finite(obj.item())
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of ``finite(obj)``, refusing any NaN that got past it (``allow_nan=False``)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
