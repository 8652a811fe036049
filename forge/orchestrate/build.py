"""Plan the step graph and drive a build of it through an executor.

A step's key is computed from its key material (``forge.executors.runner.key_material``). Downstream
keys need the upstream *output* digests, so a step below a MISS is PENDING in a plan: if the
upstream step rebuilds to identical bytes, the downstream step is still a HIT (early cut-off). A
plan starts no external tool: a key that needs an unprobed host fact (a tool's version) is PENDING
with that reason.

``execute`` hands every step whose upstream steps are committed to an executor (LocalExecutor by
default) and returns a ``BuildOutcome``: the step results and, when a gate's check stopped the build,
that verdict. ``build`` is the same for library callers that want the failed gate raised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from forge.store.remote import RemoteCache
from forge.core.errors import EvalGateError, ScanGateError, UsageError
from forge.executors import Event, Executor, StepDone, StepRequest
from forge.executors.runner import key_material, key_of
from forge.recipe.load import LoadedRecipe
from forge.steps import StepSpec, Unprobed, no_probes, tool_versions
from forge.steps.graph import active_steps, step_names
from forge.store.local import Entry, Store

__all__ = ["plan", "execute", "build", "check_force", "result_of", "PlannedStep", "StepResult", "BuildOutcome", "tool_versions",
           "HIT", "MISS", "PENDING", "FORCED"]

HIT, MISS, PENDING, FORCED = "HIT", "MISS", "PENDING", "FORCED"


@dataclass
class PlannedStep:
    spec: StepSpec
    status: str
    key: str | None = None
    entry: Entry | None = None
    material: dict | None = field(default=None, repr=False)
    reason: str | None = None          # PENDING: what the key still waits for


def check_force(force: set[str]) -> None:
    unknown = force - set(step_names()) - {"*"}
    if unknown:
        raise UsageError(f"--force names unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(step_names())}")


def plan(loaded: LoadedRecipe, store: Store, force: set[str] = frozenset()) -> list[PlannedStep]:
    """Each step's key and whether it is cached. Runs nothing: no step, no external tool."""
    check_force(set(force))
    digests: dict[str, str] = {}
    out: list[PlannedStep] = []
    for spec in active_steps(loaded):
        waiting = [d for d in spec.depends if d not in digests]
        if waiting:
            out.append(PlannedStep(spec, PENDING, reason=f"after {', '.join(waiting)}"))
            continue
        try:
            with no_probes():
                material = key_material(spec, loaded, store, digests)
        except Unprobed as e:
            out.append(PlannedStep(spec, PENDING, reason=f"needs {e.what}, probed when the build runs"))
            continue
        key = key_of(material)
        entry = store.get(key)
        if entry is not None and not ({"*", spec.name} & set(force)):
            digests[spec.name] = entry.output_digest
            out.append(PlannedStep(spec, HIT, key, entry, material))
        else:
            out.append(PlannedStep(spec, FORCED if entry is not None else MISS, key, None, material))
    return out


@dataclass
class StepResult:
    name: str
    status: str          # HIT (reused), REMOTE (pulled from the remote step cache) or BUILT
    key: str
    output_digest: str
    seconds: float
    entry: Entry
    log: Path | None = None  # the step's log file (library output while it ran), when it was ever built here


@dataclass
class BuildOutcome:
    """What a build did: one result per step that ran or was reused, in graph order, and the
    gate (eval or scan) whose failing verdict stopped it, if one did. Steps below it did not run."""
    results: list[StepResult]
    stopped_by: EvalGateError | ScanGateError | None = None
    warnings: list[str] = field(default_factory=list)   # what the executor warned about (the remote cache was down, …)

    @property
    def by_name(self) -> dict[str, StepResult]:
        return {r.name: r for r in self.results}

    @property
    def passed(self) -> bool:
        return self.stopped_by is None


Reporter = Callable[..., None]


def execute(loaded: LoadedRecipe, store: Store, *, force: set[str] = frozenset(), executor: Executor | None = None,
            on_start: Callable[[StepSpec, str], Reporter] | None = None,
            on_done: Callable[[StepResult], None] | None = None,
            cache_remote: RemoteCache | None = None) -> BuildOutcome:
    """Run the graph: hand every step whose upstream steps are committed to the executor (independent
    ones together), reuse HITs, and stop scheduling when a step's check (the eval or scan gate) fails.
    ``cache_remote`` travels in every request: the executor's workers pull MISSes from it and push what they build.
    A step's own failure (ForgeError) propagates after the executor was closed."""
    check_force(set(force))
    specs = {s.name: s for s in active_steps(loaded)}
    reporters: dict[str, Reporter] = {}
    warnings: list[str] = []

    def events(e: Event) -> None:
        if e.kind == "warning":
            if e.message not in warnings:
                warnings.append(e.message)
        elif e.kind == "start":
            reporters[e.step] = on_start(specs[e.step], e.key) if on_start else (lambda *a, **k: None)
        elif e.step in reporters:
            reporters[e.step](e.message, completed=e.completed, total=e.total, unit=e.unit)

    if executor is None:
        from forge.executors.local import LocalExecutor

        executor = LocalExecutor(loaded, store)
    results: dict[str, StepResult] = {}
    waiting, in_flight = list(specs), 0
    stopped: EvalGateError | ScanGateError | None = None
    try:
        while True:
            ready = [] if stopped else [n for n in waiting if all(d in results for d in specs[n].depends)]
            for name in ready:
                waiting.remove(name)
                executor.submit(request_for(name, loaded, store, {d: results[d].key for d in specs[name].depends},
                                            force=force, cache_remote=cache_remote), events)
                in_flight += 1
            if not in_flight:
                break
            done = executor.next_done()
            in_flight -= 1
            result = result_of(done, store)
            entry = result.entry
            results[done.step] = result
            if on_done:
                on_done(result)
            if (check := specs[done.step].checker()) is not None:
                try:
                    check(entry)  # e.g. the gate: its verdict is cached either way; a failing one stops the build
                except (EvalGateError, ScanGateError) as e:
                    stopped = stopped or e
    except BaseException:
        executor.close()
        raise
    return BuildOutcome([results[n] for n in specs if n in results], stopped, warnings)


def request_for(step: str, loaded: LoadedRecipe, store: Store, upstream: dict[str, str], *,
                force: set[str] = frozenset(), cache_remote: RemoteCache | None = None) -> StepRequest:
    """What an executor needs to run one step of this recipe (variant, overrides and remote cache included);
    ``upstream``: upstream step -> key of its committed entry."""
    return StepRequest(
        step=step, recipe_path=str(loaded.path), recipe_digest=loaded.digest, ci=loaded.ci,
        cache_root=str(store.root), upstream=upstream, force=bool({"*", step} & set(force)),
        variant=loaded.variant, overrides=dict(loaded.overrides),
        cache_remote=cache_remote.url if cache_remote else None,
        cache_remote_mode=cache_remote.mode if cache_remote else "readwrite")


def result_of(done: StepDone, store: Store) -> StepResult:
    """The result an executor's answer names, read from the cache (its committed entry and log)."""
    entry = store.get(done.key)
    if entry is None:
        from forge.core.errors import StepError

        raise StepError(f"the executor reported step {done.step} committed as {done.key[:12]}, "
                        f"but the cache {store.root} has no such entry")
    log = store.log_path(done.step, done.key)
    return StepResult(done.step, done.status, done.key, entry.output_digest, done.seconds, entry,
                      log if log.exists() else None)


def build(loaded: LoadedRecipe, store: Store, **kw) -> list[StepResult]:
    """``execute``, raising the failed gate's error (for library callers and tests). Returns one result per step."""
    outcome = execute(loaded, store, **kw)
    if outcome.stopped_by is not None:
        raise outcome.stopped_by
    return outcome.results


