"""The step contract. Each step is a module with a ``SPEC``, a ``run(ctx)`` and an ``Output`` reader.

A StepSpec says what the step's cache key is made of: the recipe sections it reads, the data files
it reads, its upstream steps (their output digests), and the distributions it calls (their versions).
``run`` is named as "module:function" and imported only when the step actually runs, so planning
and no-op rebuilds never import torch. A step hands its output downstream through its own
``Output.read(entry)``: no module reads another step's file names.

The graph (which steps, in which order) is ``forge.steps.graph``; this module imports no step, so a
step importing its contract from here closes no import circle.

Host probes that enter key material (a tool's ``--version``, the GPUs present) go through ``probe``:
``forge plan`` runs under ``no_probes()``, where a probe answers from what was remembered or raises
``Unprobed`` (the step is then PENDING with that reason): a plan never starts an external tool.

May import: forge.core, forge.model, forge.evaluation, forge.gpu, forge.engines, forge.backends, forge.image,
forge.recipe, forge.store.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from forge.core.host import (Unprobed, device, no_probes, probe, probes_allowed,  # host probes: forge.core.host,
                             tool_versions)                                    # re-exported for the step modules

if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved
    from forge.store.local import Entry

__all__ = ["StepSpec", "StepContext", "Reporter", "tool_versions", "device", "Unprobed", "no_probes", "probe",
           "probes_allowed"]


class Reporter(Protocol):
    """How a step tells the user what it is doing: a phase ``message``, and for long work how far it got.

    ``completed``/``total`` measure the work in ``unit``: None counts items (layers, windows), "B" counts
    bytes (the CLI then shows size done/total, MB/s and ETA). A call without ``total`` starts a new phase.
    Reporters written for the older (message, completed, total) form keep working when they take ``**kw``.
    """

    def __call__(self, message: str, *, completed: float | None = None, total: float | None = None,
                 unit: str | None = None) -> None: ...


@dataclass(frozen=True)
class StepContext:
    recipe: "Resolved"
    inputs: dict[str, Path]          # upstream step name -> its committed output dir (read-only)
    input_manifests: dict[str, dict]
    out: Path                        # empty staging dir to write outputs into
    downloads: Path                  # shared download cache (content pinned by the source itself)
    report: Reporter
    upstream: dict[str, "Entry"] = field(default_factory=dict)  # upstream step -> its committed entry: read
                                                                # it with that step's ``Output.read(entry)``


@dataclass(frozen=True)
class StepSpec:
    name: str
    summary: str
    depends: tuple[str, ...]
    tools: tuple[str, ...]                                   # distributions whose versions enter the key
    version: int                                             # bump when the step's output format changes
    config: Callable[["Resolved"], Any]                  # the recipe section(s) the step reads
    run: str                                                 # "module:function", imported lazily
    data: Callable[["Resolved"], dict[str, Path]] = field(default=lambda _: {})  # files/dirs it reads
    identity: Callable[["Resolved"], dict] = field(default=lambda _: {})         # extra key material (host probes)
    enabled: Callable[["Resolved"], bool] = field(default=lambda _: True)        # part of this recipe's graph?
    check: str | None = None  # "module:function"(entry) run on a built or reused output; raises to stop the build
    volatile: tuple[str, ...] = ()  # output files that record how the build went (timings): kept and hashed,
                                    # but not part of the output digest, so identical results cut off downstream
    gpu: bool = False         # runs on the recipe's target GPU (when it is not CPU): a distributed executor asks for it
    needs: Callable[["Resolved"], tuple[str, ...]] | None = None  # upstream steps when they depend on the recipe
                                                                  # (eval.candidate: image); None: ``depends``

    def runner(self) -> Callable[[StepContext], dict | None]:
        return _attr(self.run)

    def checker(self) -> Callable | None:
        return None if self.check is None else _attr(self.check)


def _attr(ref: str) -> Callable:
    module, _, func = ref.partition(":")
    return getattr(importlib.import_module(module), func)
