"""Several variants of one recipe as one graph: shared steps run once, each variant goes on alone after.

A recipe's ``variants:`` each merge their overrides (target, quantize, container) over the shared sections
(``forge.recipe.load``). Every variant has the usual step graph; its nodes are (variant, step). Two nodes
whose key material is the same -- the BF16 snapshot, its baseline eval, and whatever else the overrides
do not reach -- are one node, run once and handed to every variant that needs it.

A node's identity (its *signature*) is its cache key when the driver can compute it without probing the
host (``no_probes()``, as ``forge plan``). Otherwise (a key that waits for an upstream output, or for a fact
probed where the step runs) it is the digest of what is known: the step, its config and data, its upstream
nodes, and -- when the host facts are unknown -- the variant's target, so two variants for different GPUs
are never merged on a guess. The executor decides where and how many nodes run at once.

A variant whose gate (eval or scan) fails stops alone; the others go on. A step's own error stops the build.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from forge.orchestrate.build import BuildOutcome, Reporter, StepResult, check_force, plan as plan_one, request_for, result_of
from forge.core.digests import digest_of
from forge.core.errors import EvalGateError, ForgeError, RecipeError, ScanGateError, StepError, UsageError
from forge.executors import Event, Executor, StepDone
from forge.executors.runner import key_material, key_of
from forge.recipe.load import LoadedRecipe, load_recipe
from forge.steps import StepSpec, Unprobed, no_probes
from forge.steps.graph import active_steps
from forge.store.local import Store

if TYPE_CHECKING:
    from forge.store.remote import RemoteCache

__all__ = ["check", "load_variants", "has_variants", "plan", "execute", "label", "PlanNode", "Checked"]

_PARTIAL = ("step", "step_version", "config", "inputs", "data")   # key material known without probing the host


# ---------------------------------------------------------------------- signatures

def _partial(spec: StepSpec, loaded: LoadedRecipe, store: Store, upstream: dict[str, str]) -> dict:
    """The key material that needs no host probe (identity and tool versions left out)."""
    material = key_material(replace(spec, identity=lambda loaded, store: {}, tools=()), loaded, store, upstream)
    return {k: material[k] for k in _PARTIAL}


def _pending_signature(spec: StepSpec, loaded: LoadedRecipe, store: Store, upstream: dict[str, str]) -> str:
    known = _partial(spec, loaded, store, upstream)
    try:
        with no_probes():
            known["identity"] = spec.identity(loaded, store)
    except Unprobed:   # facts probed where it runs (device, GPU type): never merge two targets on a guess
        known["target"] = loaded.recipe.target.model_dump(mode="json")
    return "pending:" + digest_of(known)


def _key(spec: StepSpec, loaded: LoadedRecipe, store: Store, upstream: dict[str, str]) -> str | None:
    try:
        with no_probes():
            return key_of(key_material(spec, loaded, store, upstream))
    except Unprobed:
        return None


# ---------------------------------------------------------------------- plan

@dataclass
class PlanNode:
    """One node of the variants' graph: a step, the variants that share it and the nodes it waits for."""
    id: str
    step: str
    status: str                          # HIT, MISS, FORCED or PENDING (forge.orchestrate.build)
    key: str | None
    reason: str | None
    summary: str
    variants: list[str] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)   # ids of upstream nodes

    @property
    def shared(self) -> bool:
        return len(self.variants) > 1


def plan(variants: list[LoadedRecipe], store: Store, force: set[str] = frozenset()) -> list[PlanNode]:
    """The graph over all variants, shared nodes merged, in dependency order. Runs nothing."""
    nodes: dict[str, PlanNode] = {}
    for loaded in variants:
        ids: dict[str, str] = {}
        for p in plan_one(loaded, store, force):
            deps = [ids[d] for d in p.spec.depends]
            nid = p.key or _pending_signature(p.spec, loaded, store, dict(zip(p.spec.depends, deps)))
            node = nodes.setdefault(nid, PlanNode(nid, p.spec.name, p.status, p.key, p.reason, p.spec.summary,
                                                  depends=deps))
            node.variants.append(loaded.variant)
            ids[p.spec.name] = nid
    return list(nodes.values())


# ---------------------------------------------------------------------- build

@dataclass
class _Node:
    step: str
    key: str | None                 # known before it runs (else the executor's worker computes it)
    partial: str                    # digest of the key material known without probes: matches its answer
    variants: list[str]
    result: StepResult | None = None


@dataclass
class _Variant:
    loaded: LoadedRecipe
    specs: dict[str, StepSpec]
    waiting: list[str]
    results: dict[str, StepResult] = field(default_factory=dict)
    stopped: EvalGateError | ScanGateError | None = None


def label(step: str, variants: list[str]) -> str:
    """How a node is named on screen: the step, and its variant (or that it is shared)."""
    return f"{step} (shared: {len(variants)})" if len(variants) > 1 else f"{step} · {variants[0]}"


def execute(variants: list[LoadedRecipe], store: Store, *, force: set[str] = frozenset(),
            executor: Executor | None = None,
            on_start: Callable[[str, StepSpec, str], Reporter] | None = None,
            on_done: Callable[[str, StepResult, list[str]], None] | None = None,
            cache_remote: "RemoteCache | None" = None) -> dict[str, BuildOutcome]:
    """Build every variant through one executor; a node shared by several variants runs once. Returns each
    variant's outcome (its step results in graph order; the failed gate that stopped it, if one did)."""
    check_force(set(force))
    if executor is None:
        from forge.executors.local import LocalExecutor

        executor = LocalExecutor(variants[0], store)
    state = {v.variant: _Variant(v, {s.name: s for s in active_steps(v)}, [s.name for s in active_steps(v)])
             for v in variants}
    nodes: dict[str, _Node] = {}
    in_flight: list[_Node] = []
    warnings: list[str] = []   # what the executor warned about (the remote cache was down, ...)

    def deliver(name: str, result: StepResult) -> None:
        v = state[name]
        v.results[result.name] = result
        if (check := v.specs[result.name].checker()) is not None:
            try:
                check(result.entry)   # the gate's verdict is cached either way; a failing one stops this variant
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
                    key = _key(spec, v.loaded, store, digests)
                    nid = key or _pending_signature(spec, v.loaded, store, digests)
                    node = nodes.get(nid)
                    if node is None:
                        partial = digest_of(_partial(spec, v.loaded, store, digests))
                        if key is None and any(n.step == step and n.key is None and n.partial == partial
                                               for n in in_flight):
                            continue   # its answer could not be told from that one's: hand it out after
                        node = nodes[nid] = _Node(step, key, partial, [])
                        executor.submit(request_for(step, v.loaded, store,
                                                    {d: v.results[d].key for d in spec.depends},
                                                    force=force, cache_remote=cache_remote), events_for(node, spec))
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


# ---------------------------------------------------------------------- validate

@dataclass(frozen=True)
class Checked:
    """One variant checked against the GPU it names: loaded (with its fit report and warnings), or its error."""
    name: str
    loaded: LoadedRecipe | None = None
    fit: object | None = None              # forge.gpu.fit.FitReport, or None (CPU, or no config.json offline)
    warnings: tuple[str, ...] = ()
    error: ForgeError | None = None


def check(path, downloads, *, ci: bool = False, selected: list[str] | None = None) -> list[Checked]:
    """Load every (selected) variant and check it against its GPU: capability of its method on that GPU and
    engine, and fit. Every variant is checked; problems are returned per variant, not raised."""
    from forge.gpu.fit import check_recipe

    out = []
    for name in _names(path, ci, selected):
        try:
            loaded = load_recipe(path, ci=ci, variant=name)
            if loaded.recipe.quantize.method == "auto":
                raise RecipeError([f"{loaded.where('quantize', 'method')}: method: auto cannot be used in a recipe with "
                                   f"variants yet (in variant {name!r})"],
                                  hint="Run the auto walk on a recipe without variants, then write the winning "
                                       "scheme into the variant (its decision report names it).")
            report, warnings = check_recipe(loaded, downloads)
        except ForgeError as e:
            out.append(Checked(name, error=e))
            continue
        out.append(Checked(name, loaded, report, (*loaded.warnings, *warnings)))
    return out


def load_variants(path, downloads, *, ci: bool = False, selected: list[str] | None = None) -> list[Checked]:
    """``check``, raising one RecipeError (exit 2) with every variant's problems when any variant is invalid."""
    checked = check(path, downloads, ci=ci, selected=selected)
    if bad := [c for c in checked if c.error is not None]:
        problems = [p for c in bad for p in _problems(c)]
        raise RecipeError(problems, hint=bad[0].error.hint or "Fix the variant, or leave it out with --variant.")
    return checked


def _problems(c: Checked) -> list[str]:
    if isinstance(c.error, RecipeError):
        return [p if "(in variant" in p else f"{p} (in variant {c.name!r})" for p in c.error.problems]
    return [f"variant {c.name!r}: {c.error.message}"]


def _names(path, ci: bool, selected: list[str] | None) -> list[str]:
    """The recipe's variant names (``selected`` ones, in the recipe's order); unknown names are exit 2."""
    names = [v.name for v in load_recipe(path, ci=ci).recipe.variants]
    if unknown := [n for n in dict.fromkeys(selected or ()) if n not in names]:
        listed = f"its variants: {', '.join(names)}" if names else "the recipe declares no variants"
        raise UsageError(f"{path}: no variant named {', '.join(map(repr, unknown))}; {listed}",
                         hint="Pass one of the recipe's variant names to --variant, or leave --variant out to "
                              "build them all.")
    return [n for n in names if not selected or n in selected]


def has_variants(path, *, ci: bool = False) -> bool:
    return bool(load_recipe(path, ci=ci).recipe.variants)
