"""The pipeline steps. Each step is a module with a ``SPEC`` and a ``run(ctx)``; data flows one way.

A StepSpec says what the step's cache key is made of: the recipe sections it reads, the data files
it reads, its upstream steps (their output digests), and the distributions it calls (their versions).
``run`` is named as "module:function" and imported only when the step actually runs, so planning
and no-op rebuilds never import torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from forge.recipe.load import LoadedRecipe

__all__ = ["StepSpec", "StepContext", "STEPS", "step_names", "active_steps"]


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
    recipe: "LoadedRecipe"
    inputs: dict[str, Path]          # upstream step name -> its committed output dir (read-only)
    input_manifests: dict[str, dict]
    out: Path                        # empty staging dir to write outputs into
    downloads: Path                  # shared download cache (content pinned by the source itself)
    report: Reporter


@dataclass(frozen=True)
class StepSpec:
    name: str
    summary: str
    depends: tuple[str, ...]
    tools: tuple[str, ...]                                   # distributions whose versions enter the key
    version: int                                             # bump when the step's output format changes
    config: Callable[["LoadedRecipe"], Any]                  # the recipe section(s) the step reads
    run: str                                                 # "module:function", imported lazily
    data: Callable[["LoadedRecipe"], dict[str, Path]] = field(default=lambda _: {})  # files/dirs it reads
    identity: Callable[["LoadedRecipe"], dict] = field(default=lambda _: {})         # extra key material
    enabled: Callable[["LoadedRecipe"], bool] = field(default=lambda _: True)        # part of this recipe's graph?
    check: str | None = None  # "module:function"(entry) run on a built or reused output; raises to stop the build
    volatile: tuple[str, ...] = ()  # output files that record how the build went (timings): kept and hashed,
                                    # but not part of the output digest, so identical results cut off downstream

    def runner(self) -> Callable[[StepContext], dict | None]:
        module, _, func = self.run.partition(":")
        return getattr(importlib.import_module(module), func)


    def checker(self) -> Callable | None:
        if self.check is None:
            return None
        module, _, func = self.check.partition(":")
        return getattr(importlib.import_module(module), func)


def _specs() -> list[StepSpec]:
    from forge.steps import compile, evaluate, gate, package, quantize, resolve, scan

    return [resolve.SPEC, quantize.SPEC, compile.SPEC, evaluate.BASELINE, evaluate.CANDIDATE, gate.SPEC, package.BASE, package.SPEC,
            scan.SPEC]


STEPS: list[StepSpec] = _specs()


def step_names() -> list[str]:
    return [s.name for s in STEPS]


def active_steps(loaded: "LoadedRecipe") -> list[StepSpec]:
    """The steps of this recipe's graph, in dependency order; dependencies on disabled steps drop out."""
    from dataclasses import replace

    active = [s for s in STEPS if s.enabled(loaded)]
    names = {s.name for s in active}
    return [replace(s, depends=tuple(d for d in s.depends if d in names)) for s in active]
