"""Registries of named, lazily imported entries: quantization backends and serving engines.

An entry is "module:attr", imported on first use, so `forge --help`, `forge plan` and no-op rebuilds never
import torch. Three sources, in this order (a later one may not shadow an earlier name):

1. forge's own table (``builtin``);
2. installed distributions' entry points, groups ``forge.backends`` and ``forge.engines``
   (``[project.entry-points."forge.engines"] myengine = "mypkg.engine:ENGINE"``);
3. the ``FORGE_PLUGINS`` environment variable: space- or comma-separated ``KIND:NAME=module:attr``
   (KIND is ``backend`` or ``engine``), the module importable from ``sys.path``/``PYTHONPATH``.
"""
from __future__ import annotations

from functools import lru_cache

import difflib
import importlib
import re
from typing import Generic, TypeVar
from forge.core import options as env

__all__ = ["Registry", "UnknownName"]

T = TypeVar("T")
_PLUGIN = re.compile(r"^(?P<kind>[a-z]+):(?P<name>[a-z0-9][a-z0-9_-]*)=(?P<target>[\w.]+:[\w.]+)$")


class UnknownName(ValueError):
    """A name no registry source provides; the message lists what is available."""


@lru_cache(maxsize=None)
def _entry_points(group: str) -> tuple[tuple[str, str], ...]:
    """The installed distributions' entry points of ``group``, read once per process: scanning every
    distribution's metadata costs milliseconds a call, and a build asks for its backends and engines often."""
    from importlib.metadata import entry_points

    return tuple((ep.name, ep.value) for ep in entry_points(group=group))


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str, builtin: dict[str, str]) -> None:
        self.kind, self.group, self.builtin = kind, group, dict(builtin)
        self._loaded: dict[str, T] = {}

    def entries(self) -> dict[str, str]:
        """name -> "module:attr", every source merged (nothing imported)."""
        out = dict(self.builtin)
        for name, value in _entry_points(self.group):
            out.setdefault(name, value)
        for item in re.split(r"[\s,]+", env.current().plugins):
            if not item:
                continue
            m = _PLUGIN.match(item)
            if m is None:
                raise UnknownName(f"FORGE_PLUGINS entry {item!r} is not KIND:NAME=module:attr "
                                  "(e.g. engine:echo=my_engine:ENGINE)")
            if m["kind"] == self.kind:
                out.setdefault(m["name"], m["target"])
        return out

    def names(self) -> list[str]:
        return list(self.entries())

    def check(self, name: str) -> str:
        """The name itself when some source provides it, else UnknownName with a suggestion."""
        names = self.names()
        if name in names:
            return name
        guess = difflib.get_close_matches(name, names, n=1)
        raise UnknownName(f"Unknown {self.kind} {name!r}." + (f" Did you mean {guess[0]!r}?" if guess else "")
                          + f" Available: {', '.join(names)}")

    def get(self, name: str) -> T:
        target = self.entries()[self.check(name)]
        if target not in self._loaded:
            module, _, attr = target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._loaded[target] = obj
        return self._loaded[target]

    def all(self) -> list[T]:
        return [self.get(n) for n in self.names()]
