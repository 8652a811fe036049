"""The one scheduler: plan a step graph and drive it through an executor, for every kind of build.

A build is a list of resolved recipes (``forge.recipe.resolve.Resolved``): a recipe without variants is a list of
one, a recipe with variants one per variant, and a ``method: auto`` trial is one recipe cut at the gate
(``until="gate"``: the gate and the steps it needs, nothing after it). Each recipe has the usual step graph; its
nodes are (recipe, step). Two nodes whose key material is the same -- the BF16 snapshot, its baseline eval, and
whatever else the variants do not reach -- are one node, run once and handed to every recipe that needs it.

A node's identity is its cache key when the driver can compute it without probing the host (``no_probes()``, as
``forge plan``). Otherwise (a key that waits for an upstream output, or for a fact probed where the step runs) it is
the digest of what is known: the step, its config and data, its upstream nodes, and -- when the host facts are
unknown -- the recipe's target, so two variants for different GPUs are never merged on a guess.

Downstream keys need the upstream *output* digests, so a step below a MISS is PENDING in a plan: if the upstream
step rebuilds to identical bytes, the downstream step is still a HIT (early cut-off). A plan starts no external
tool. The executor decides where and how many nodes run at once. A recipe whose gate (eval or scan) fails stops
alone; the others go on. A step's own error (a ForgeError) stops the build after the executor was closed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from forge.core.digests import digest_of
from forge.core.errors import EvalGateError, ScanGateError, StepError, UsageError
from forge.executors import Event, Executor, StepDone, StepRequest
from forge.executors.runner import key_material, key_of
from forge.steps import StepSpec, Unprobed, no_probes
from forge.steps.graph import active_steps, step_names
from forge.store.local import Entry, Store
from forge.executors.local import LocalExecutor

if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved
    from forge.store.remote import RemoteCache

__all__ = ["plan", "execute", "execute_one", "build", "check_force", "result_of", "request_for", "label", "graph_of", "PlanNode",
           "StepResult", "BuildOutcome", "HIT", "MISS", "PENDING", "FORCED"]

HIT, MISS, PENDING, FORCED = "HIT", "MISS", "PENDING", "FORCED"
_PARTIAL = ("step", "step_version", "config", "inputs", "data")   # key material known without probing the host
Reporter = Callable[..., None]


def check_force(force: set[str]) -> None:
    unknown = set(force) - set(step_names()) - {"*"}
    if unknown:
        raise UsageError(f"--force names unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(step_names())}")


def graph_of(resolved: "Resolved", until: str | None = None) -> list[StepSpec]:
    """The recipe's steps in dependency order; with ``until``, only that step and the steps it needs."""
    specs = active_steps(resolved)
    if until is None:
        return specs
    by_name = {s.name: s for s in specs}
    if until not in by_name:
        raise UsageError(f"step {until!r} is not part of recipe {resolved.recipe.name}'s graph")
    needed, todo = set(), [until]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].depends
    return [s for s in specs if s.name in needed]


def label(step: str, variants: Sequence[str | None]) -> str:
    """How a node is named on screen: the step, and its variant (or that it is shared)."""
    if len(variants) > 1:
        return f"{step} (shared: {len(variants)})"
    return step if variants[0] is None else f"{step} · {variants[0]}"


# ---------------------------------------------------------------------- signatures


def _partial(spec: StepSpec, resolved: "Resolved", store: Store, upstream: dict[str, str]) -> dict:
    """The key material that needs no host probe (identity and tool versions left out)."""
    material = key_material(replace(spec, identity=lambda _: {}, tools=()), resolved, store, upstream)
    return {k: material[k] for k in _PARTIAL}


def _pending_signature(spec: StepSpec, resolved: "Resolved", store: Store, upstream: dict[str, str]) -> str:
    known = _partial(spec, resolved, store, upstream)
    try:
        with no_probes():
            known["identity"] = spec.identity(resolved)
    except Unprobed:   # facts probed where it runs (device, GPU type): never merge two targets on a guess
        known["target"] = resolved.recipe.target.model_dump(mode="json")
    return "pending:" + digest_of(known)


def _material(spec: StepSpec, resolved: "Resolved", store: Store, upstream: dict[str, str]) -> tuple[dict | None, str]:
    """(key material, "") when the driver can compute it without probing; else (None, what it waits for)."""
    try:
        with no_probes():
            return key_material(spec, resolved, store, upstream), ""
    except Unprobed as e:
        return None, f"needs {e.what}, probed when the build runs"


# ---------------------------------------------------------------------- plan


@dataclass
class PlanNode:
    """One node of the graph: a step, the recipes (variants) that share it and the nodes it waits for."""
    id: str
    spec: StepSpec
    status: str                          # HIT, MISS, FORCED or PENDING
    key: str | None
    reason: str | None                   # PENDING: what the key still waits for
    variants: list[str | None] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)   # ids of upstream nodes
    entry: Entry | None = None
    material: dict | None = field(default=None, repr=False)

    @property
    def step(self) -> str:
        return self.spec.name

    @property
    def summary(self) -> str:
        return self.spec.summary

    @property
    def shared(self) -> bool:
        return len(self.variants) > 1


def plan(builds: "Resolved | Sequence[Resolved]", store: Store, force: set[str] = frozenset(),
         until: str | None = None) -> list[PlanNode]:
    """Each node's key and whether it is cached, shared nodes merged, in dependency order. Runs nothing."""
    check_force(set(force))
    nodes: dict[str, PlanNode] = {}
    for resolved in _listed(builds):
        ids: dict[str, str] = {}
        digests: dict[str, str] = {}
        for spec in graph_of(resolved, until):
            deps = [ids[d] for d in spec.depends]
            waiting = [d for d in spec.depends if d not in digests]
            if waiting:
                status, key, entry, material, reason = PENDING, None, None, None, f"after {', '.join(waiting)}"
            else:
                material, reason = _material(spec, resolved, store, digests)
                key = key_of(material) if material is not None else None
                entry = store.get(key) if key else None
                if key is None:
                    status = PENDING
                elif entry is not None and not ({"*", spec.name} & set(force)):
                    status, reason = HIT, None
                    digests[spec.name] = entry.output_digest
                else:
                    status, reason, entry = (FORCED if entry is not None else MISS), None, None
            nid = key or _pending_signature(spec, resolved, store, dict(zip(spec.depends, deps)))
            node = nodes.setdefault(nid, PlanNode(nid, spec, status, key, reason, depends=deps, entry=entry,
                                                  material=material))
            node.variants.append(resolved.variant)
            ids[spec.name] = nid
    return list(nodes.values())


# ---------------------------------------------------------------------- build


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
    """What a build of one recipe did: one result per step that ran or was reused, in graph order, and the gate
    (eval or scan) whose failing verdict stopped it, if one did. Steps below it did not run."""
    results: list[StepResult]
    stopped_by: EvalGateError | ScanGateError | None = None
    warnings: list[str] = field(default_factory=list)   # what the executor warned about (the remote cache was down, …)

    @property
    def by_name(self) -> dict[str, StepResult]:
        return {r.name: r for r in self.results}

    @property
    def passed(self) -> bool:
        return self.stopped_by is None


@dataclass
class _Node:
    step: str
    key: str | None                 # known before it runs (else the executor's worker computes it)
    partial: str                    # digest of the key material known without probes: matches its answer
    variants: list[str | None]
    result: StepResult | None = None


@dataclass
class _Recipe:
    resolved: "Resolved"
    specs: dict[str, StepSpec]
    waiting: list[str]
    results: dict[str, StepResult] = field(default_factory=dict)
    stopped: EvalGateError | ScanGateError | None = None


def execute(builds: "Resolved | Sequence[Resolved]", store: Store, *, force: set[str] = frozenset(),
            executor: Executor | None = None, until: str | None = None,
            on_start: Callable[[str, StepSpec, str], Reporter] | None = None,
            on_done: Callable[[str, StepResult, list], None] | None = None,
            remote: "RemoteCache | None" = None) -> dict[str | None, BuildOutcome]:
    """Build every recipe through one executor; a node shared by several runs once. Returns each recipe's outcome
    by variant name (None for a recipe without variants): its step results in graph order, and the failed gate
    that stopped it, if one did. ``remote``: the remote step cache the executor's workers layer behind their local
    one (``forge.store.layered``); it travels in every request."""
    check_force(set(force))
    listed = _listed(builds)
    if executor is None:
        executor = LocalExecutor(store)
    state = {r.variant: _Recipe(r, {s.name: s for s in graph_of(r, until)}, [s.name for s in graph_of(r, until)])
             for r in listed}
    nodes: dict[str, _Node] = {}
    in_flight: list[_Node] = []
    warnings: list[str] = []

    def deliver(name, result: StepResult) -> None:
        v = state[name]
        v.results[result.name] = result
        if (check := v.specs[result.name].checker()) is not None:
            try:
                check(result.entry)   # the gate's verdict is cached either way; a failing one stops this recipe
            except (EvalGateError, ScanGateError) as e:
                v.stopped = v.stopped or e

    def events_for(node: _Node, spec: StepSpec):
        reporter: list[Reporter] = []

        def events(e: Event) -> None:
            if e.kind == "warning":
                if e.message not in warnings:
                    warnings.append(e.message)
            elif e.kind == "start":
                reporter.append(on_start(label(node.step, node.variants), spec, e.key) if on_start
                                else (lambda *a, **k: None))
            elif reporter:
                reporter[0](e.message, completed=e.completed, total=e.total, unit=e.unit)
        return events

    def schedule() -> None:
        """Hand out every node whose upstream nodes are committed; join nodes already handed out."""
        progress = True
        while progress:
            progress = False
            for name, v in state.items():
                for step in list(v.waiting):
                    spec = v.specs[step]
                    if v.stopped or not all(d in v.results for d in spec.depends):   # a failed gate stops it
                        continue
                    digests = {d: v.results[d].output_digest for d in spec.depends}
                    material, _ = _material(spec, v.resolved, store, digests)
                    key = key_of(material) if material is not None else None
                    nid = key or _pending_signature(spec, v.resolved, store, digests)
                    node = nodes.get(nid)
                    if node is None:
                        partial = digest_of(_partial(spec, v.resolved, store, digests))
                        if key is None and any(n.step == step and n.key is None and n.partial == partial
                                               for n in in_flight):
                            continue   # its answer could not be told from that one's: hand it out after
                        node = nodes[nid] = _Node(step, key, partial, [])
                        request = request_for(step, v.resolved, store, {d: v.results[d].key for d in spec.depends},
                                              force=force, remote=remote)
                        executor.submit(request, events_for(node, spec), v.resolved)
                        in_flight.append(node)
                    v.waiting.remove(step)
                    node.variants.append(name)
                    if node.result is not None:
                        deliver(name, node.result)
                        progress = True

    try:
        while True:
            schedule()
            if not in_flight:
                break
            done = executor.next_done()
            node = _answered(in_flight, done, store)
            in_flight.remove(node)
            node.result = result_of(done, store)
            if on_done:
                on_done(label(node.step, node.variants), node.result, list(node.variants))
            for name in node.variants:
                deliver(name, node.result)
    except BaseException:
        executor.close()
        raise
    return {name: BuildOutcome([v.results[s] for s in v.specs if s in v.results], v.stopped, warnings)
            for name, v in state.items()}


def execute_one(resolved: "Resolved", store: Store, **kw) -> BuildOutcome:
    """``execute`` of one recipe: its outcome."""
    (outcome,) = execute(resolved, store, **kw).values()
    return outcome


def build(resolved: "Resolved", store: Store, **kw) -> list[StepResult]:
    """One recipe's ``execute``, raising the failed gate's error (for library callers and tests)."""
    outcome = execute_one(resolved, store, **kw)
    if outcome.stopped_by is not None:
        raise outcome.stopped_by
    return outcome.results


def request_for(step: str, resolved: "Resolved", store: Store, upstream: dict[str, str], *,
                force: set[str] = frozenset(), remote: "RemoteCache | None" = None) -> StepRequest:
    """What an executor needs to run one step of this recipe (variant, overrides and remote cache included);
    ``upstream``: upstream step -> key of its committed entry."""
    return StepRequest(
        step=step, recipe_path=str(resolved.path), recipe_digest=resolved.digest, ci=resolved.ci,
        cache_root=str(store.root), upstream=upstream, force=bool({"*", step} & set(force)),
        variant=resolved.variant, overrides=dict(resolved.overrides),
        cache_remote=remote.url if remote else None, cache_remote_mode=remote.mode if remote else "readwrite")


def result_of(done: StepDone, store: Store) -> StepResult:
    """The result an executor's answer names, read from the cache (its committed entry and log)."""
    entry = store.get(done.key)
    if entry is None:
        raise StepError(f"the executor reported step {done.step} committed as {done.key[:12]}, "
                        f"but the cache {store.root} has no such entry")
    log = store.log_path(done.step, done.key)
    return StepResult(done.step, done.status, done.key, entry.output_digest, done.seconds, entry,
                      log if log.exists() else None)


def _answered(in_flight: list[_Node], done: StepDone, store: Store) -> _Node:
    """The node an executor's answer is for: by its key, else by the key material known before it ran."""
    candidates = [n for n in in_flight if n.step == done.step]
    for n in candidates:
        if n.key == done.key:
            return n
    entry = store.get(done.key)
    if entry is not None:
        material = entry.manifest.get("inputs", {})
        partial = digest_of({k: material.get(k) for k in _PARTIAL})
        for n in candidates:
            if n.key is None and n.partial == partial:
                return n
    if len(candidates) == 1:
        return candidates[0]
    raise StepError(f"the executor answered step {done.step} with key {done.key[:12]}, which no submitted node "
                    "of the build expected", hint="Rerun with the local executor; report it if it happens again.")


def _listed(builds) -> list["Resolved"]:
    listed = list(builds) if isinstance(builds, (list, tuple)) else [builds]
    names = [r.variant for r in listed]
    if len(set(names)) != len(names):
        raise UsageError("a build lists the same variant twice: " + ", ".join(map(str, names)))
    return listed
