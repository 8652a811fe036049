"""The step graph: every step of forge, in dependency order. Adding a step = its module + one line here."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from forge.steps import StepSpec, compile, evaluate, gate, package, quantize, reference, resolve, scan, serving_image

if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved

__all__ = ["STEPS", "step_names", "active_steps", "spec_named", "volatile"]

STEPS: list[StepSpec] = [resolve.SPEC, reference.SPEC, quantize.SPEC, compile.SPEC, evaluate.BASELINE, evaluate.CANDIDATE,
                         gate.SPEC, package.BASE, serving_image.SPEC, package.SPEC, scan.SPEC]


def step_names() -> list[str]:
    return [s.name for s in STEPS]


def volatile(name: str) -> tuple[str, ...]:
    """The output files of step ``name`` that are not part of its output digest (none for an unknown name)."""
    return next((s.volatile for s in STEPS if s.name == name), ())


def active_steps(loaded: "Resolved") -> list[StepSpec]:
    """The steps of this recipe's graph, in dependency order; dependencies on disabled steps drop out. A step whose
    upstream depends on the recipe (``StepSpec.needs``: with eval.candidate: image the candidate is evaluated after
    the image is built, and the gate follows it) is wired for this recipe, and the order follows the wiring."""
    active = [s for s in STEPS if s.enabled(loaded)]
    names = {s.name for s in active}
    wired = [replace(s, depends=tuple(d for d in (s.needs(loaded) if s.needs else s.depends) if d in names))
             for s in active]
    return _in_dependency_order(wired)


def _in_dependency_order(specs: list[StepSpec]) -> list[StepSpec]:
    """Each step after the steps it depends on, otherwise in STEPS order (stable)."""
    done: set[str] = set()
    ordered: list[StepSpec] = []
    todo = list(specs)
    while todo:
        ready = next((s for s in todo if set(s.depends) <= done), None)
        if ready is None:
            raise ValueError("step graph has a cycle: " + ", ".join(f"{s.name} <- {', '.join(s.depends)}" for s in todo))
        todo.remove(ready)
        ordered.append(ready)
        done.add(ready.name)
    return ordered


def spec_named(loaded: "Resolved", name: str) -> StepSpec:
    """The active spec of one step (as a worker that was handed only the step's name needs it)."""
    for s in active_steps(loaded):
        if s.name == name:
            return s
    raise KeyError(f"step {name!r} is not part of recipe {loaded.recipe.name}'s graph")
