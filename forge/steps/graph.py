"""The step graph: every step of forge, in dependency order. Adding a step = its module + one line here."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from forge.steps import StepSpec, compile, evaluate, gate, package, quantize, reference, resolve, scan

if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved

__all__ = ["STEPS", "step_names", "active_steps", "spec_named", "volatile"]

STEPS: list[StepSpec] = [resolve.SPEC, reference.SPEC, quantize.SPEC, compile.SPEC, evaluate.BASELINE, evaluate.CANDIDATE,
                         gate.SPEC, package.BASE, package.SPEC, scan.SPEC]


def step_names() -> list[str]:
    return [s.name for s in STEPS]


def volatile(name: str) -> tuple[str, ...]:
    """The output files of step ``name`` that are not part of its output digest (none for an unknown name)."""
    return next((s.volatile for s in STEPS if s.name == name), ())


def active_steps(loaded: "Resolved") -> list[StepSpec]:
    """The steps of this recipe's graph, in dependency order; dependencies on disabled steps drop out."""
    active = [s for s in STEPS if s.enabled(loaded)]
    names = {s.name for s in active}
    return [replace(s, depends=tuple(d for d in s.depends if d in names)) for s in active]


def spec_named(loaded: "Resolved", name: str) -> StepSpec:
    """The active spec of one step (as a worker that was handed only the step's name needs it)."""
    for s in active_steps(loaded):
        if s.name == name:
            return s
    raise KeyError(f"step {name!r} is not part of recipe {loaded.recipe.name}'s graph")
