"""``quantize: {method: auto}``: the cheapest scheme for the recipe's GPU and engine that passes its eval gate.

A *trial* is the recipe resolved with ``overrides={"quantize": {...}}`` (one candidate's method and parameters,
plus any layers kept in BF16 through ``quantize.ignore``: ``Resolved.trial``) and built by the one scheduler
(``forge.orchestrate.build.execute``) as a graph cut at the gate (``until="gate"``: no compile, package or scan): every trial is a normal cached step graph, so a rerun costs nothing and a trial that equals another
recipe's build (same quantize section) reuses its steps.

The walk:
1. candidates: the recipe's ``candidates:``, or every method (and bits) of forge.gpu.methods; each is loaded as a
   trial recipe, so the capability table, the engine's formats, the backends and the fit check decide what
   is legal (an illegal default is skipped with its reason; an illegal explicit candidate is an error);
2. order: the fit model's $/1M output tokens at the recipe's concurrency (``forge fit``), ties by weight
   bytes (on the CPU target, which has no price, by weight bytes alone);
3. walk from the cheapest: build the trial to the gate, stop at the first that passes;
4. a scheme that just fails (degradation within ``JUST_FAILS`` × the limit; for a limit <= 0, the rule's 95%
   interval reaching it: ``_just_fails``) is retried with the layers its per-layer error report shows most
   damaged kept in BF16 (``quantize.ignore``: llm-compressor matches exact module names), 1, 2, 4 … layers
   (``MIX_STEPS`` steps), while its cost (fit model with those layers in BF16) stays at or below the next scheme's;
5. the winner continues to package → scan → publish as a normal build (``forge.orchestrate.pipeline.run``); with no
   winner, the closest trial is published as rejected and the walk fails with exit 3 naming it.

The decision report (JSON + Markdown) lists every trial and why the winner won; it is attached to the
registry record as evidence ``auto-decision``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from forge.core.errors import EvalGateError, RecipeError
from forge.gpu.methods import AUTO, METHODS, NAMES, scheme
from forge.core.jsonsafe import dumps
from forge.evaluation.gatestats import num
from forge.gpu import fit
from forge.orchestrate import pipeline
from forge.orchestrate.build import BuildOutcome, HIT, execute_one, plan as plan_steps
from forge.steps import gate, quantize

if TYPE_CHECKING:
    from forge.orchestrate.pipeline import Outcome
    from forge.recipe.resolve import Resolved
    from forge.store.local import Store

__all__ = ["Scheme", "Trial", "Decision", "is_auto", "schemes", "check_recipe", "plan", "walk", "run", "EVIDENCE_KIND"]

MIX_STEPS = 3            # mixed-precision retries of one scheme: the top 1, 2, 4 damaged layers kept in BF16
JUST_FAILS = 4.0         # a scheme "just fails" when its worst degradation is within this many times its limit
EVIDENCE_KIND = "auto-decision"
DECISION_JSON, DECISION_MD = "auto-decision.json", "auto-decision.md"
_GROUPED_KEYS = ("group_size", "symmetric", "actorder")   # shared by the auto section and grouped candidates


def is_auto(loaded: "Resolved") -> bool:
    return loaded.recipe.quantize.method == AUTO


@dataclass(frozen=True)
class Scheme:
    """One candidate as the walk builds it: its quantize overrides, the trial recipe and its fit cost."""
    label: str                      # e.g. "gptq W4A16 g128"
    overrides: dict                 # the quantize keys the trial sets
    loaded: "Resolved"
    usd_per_mtok: float | None      # the fit model's $/1M output tokens (None on the CPU target)
    weight_bytes: float

    @property
    def cost(self) -> tuple[float, float]:
        return (self.usd_per_mtok or 0.0, self.weight_bytes)


@dataclass
class Trial:
    scheme: str
    kept: tuple[str, ...]           # layers kept in BF16 beyond the recipe's own quantize.ignore
    overrides: dict
    usd_per_mtok: float | None
    weight_bytes: float             # fit model (config only)
    size_bytes: int | None = None   # the checkpoint's safetensors bytes, as written
    passed: bool = False
    rules: list[dict] = field(default_factory=list)   # per gate rule: metric, degradation, CI, limit, decision
    seconds: float = 0.0            # this walk's wall time for the trial
    build_seconds: float = 0.0      # the steps' recorded build times (what the trial cost when it was built)
    cached: bool = False            # every step was a cache hit
    steps: dict = field(default_factory=dict)
    note: str = ""
    loaded: "Resolved | None" = field(default=None, repr=False)
    layer_errors: list[tuple[str, float]] = field(default_factory=list, repr=False)
    warnings: list[str] = field(default_factory=list, repr=False)   # what the trial's build warned about

    @property
    def name(self) -> str:
        return self.scheme + (f" + {len(self.kept)} BF16 layer(s)" if self.kept else "")

    @property
    def excess(self) -> float:
        """How far past its limits the trial is (largest over rules, relative to the limit): the closest is least."""
        return max((_excess(r) for r in self.rules), default=float("inf"))

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "kept_bf16": list(self.kept), "overrides": self.overrides,
                "usd_per_million_tokens": self.usd_per_mtok, "fit_weight_bytes": round(self.weight_bytes),
                "size_bytes": self.size_bytes, "passed": self.passed, "gate": self.rules,
                "seconds": round(self.seconds, 2), "build_seconds": round(self.build_seconds, 2),
                "cached": self.cached, "steps": self.steps, "note": self.note}


def _excess(rule: dict) -> float:
    """How far past its limit a rule is; a rule without a degradation (invalid) is the farthest."""
    if not isinstance(rule.get("degradation"), (int, float)):
        return float("inf")
    return (rule["degradation"] - rule["limit"]) / max(abs(rule["limit"]), 1e-9)


@dataclass
class Decision:
    recipe: str
    gpu: str
    engine: str
    order: list[Scheme]
    skipped: list[tuple[str, str]]       # (candidate, why it is not legal here)
    trials: list[Trial] = field(default_factory=list)
    winner: Trial | None = None
    why: str = ""
    files: tuple[Path, ...] = ()         # the decision report (JSON, Markdown)

    @property
    def warnings(self) -> list[str]:
        """What the trials' builds warned about (the remote step cache was down, ...), once each."""
        return list(dict.fromkeys(w for t in self.trials for w in t.warnings))

    @property
    def closest(self) -> Trial | None:
        gated = [t for t in self.trials if t.rules]
        return min(gated, key=lambda t: t.excess) if gated else None

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "target": {"gpu": self.gpu, "engine": self.engine},
                "order": [{"scheme": s.label, "usd_per_million_tokens": s.usd_per_mtok,
                           "fit_weight_bytes": round(s.weight_bytes)} for s in self.order],
                "skipped": [{"candidate": c, "why": w} for c, w in self.skipped],
                "trials": [t.to_json() for t in self.trials],
                "winner": self.winner.to_json() if self.winner else None,
                "closest": self.closest.name if self.winner is None and self.closest else None, "why": self.why}

    def markdown(self) -> str:
        head = f"winner: **{self.winner.name}**" if self.winner else "**no candidate passed the gate**"
        lines = [f"### method: auto for {self.gpu} / {self.engine}: {head}", "", self.why, "",
                 "| # | scheme | kept in BF16 | size | $/1M tok | gate | time | cached |", "|---|---|---|---|---|---|---|---|"]
        for i, t in enumerate(self.trials, 1):
            gate = "; ".join(f"{r['metric']} {num(r['degradation'], '+.3g')} (95% CI {num(r['ci_low'], '+.3g')} .. "
                             f"{num(r['ci_high'], '+.3g')}, limit {num(r['limit'], '+.3g')}) {r['decision']}"
                             for r in t.rules) or t.note
            lines.append(f"| {i} | {t.scheme} | {', '.join(t.kept) or '-'} | "
                         f"{(t.size_bytes or 0) / 1e6:.1f} MB | {_usd(t.usd_per_mtok)} | {gate} | "
                         f"{t.seconds:.1f} s (built in {t.build_seconds:.1f} s) | {'yes' if t.cached else 'no'} |")
        if self.skipped:
            lines += ["", "Not legal here: " + "; ".join(f"{c} ({w})" for c, w in self.skipped)]
        return "\n".join(lines) + "\n"


def _usd(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


# ------------------------------------------------------------------ candidates, in cost order


def _label(overrides: dict) -> str:
    m = overrides["method"]
    grouped = METHODS[m].group == "recipe"
    return f"{m} {scheme(m, overrides.get('bits'))}" + (f" g{overrides.get('group_size') or 128}" if grouped else "")


def _requested(loaded: "Resolved") -> list[tuple[dict, bool]]:
    """(quantize overrides, explicit?) per candidate: the recipe's list, or every method and bits."""
    q = loaded.recipe.quantize
    if q.candidates:
        return [(c.overrides(), True) for c in q.candidates]
    shared = {k: getattr(q, k) for k in _GROUPED_KEYS if getattr(q, k) is not None}
    out = []
    for name in NAMES[1:]:   # "none" (BF16) only when listed: auto means quantized
        for bits in METHODS[name].bits_options or (None,):
            o = {"method": name, **({"bits": bits} if len(METHODS[name].bits_options) > 1 else {})}
            if METHODS[name].group == "recipe":
                o.update(shared)
            out.append((o, False))
    return out


def _trial(resolved: "Resolved", overrides: dict) -> "Resolved":
    """The recipe with one trial's quantize overrides (the auto-only keys cleared), resolved; a method that
    calibrates nothing drops the calibration data, so its trial is the same build as a plain recipe of that method."""
    q = {**overrides, "candidates": [], "max_trials": None}
    trial = resolved.trial(q)
    if trial.recipe.quantize.calibration is not None and not trial.calibrates:
        trial = resolved.trial({**q, "calibration": None})
    return trial


def _cost(trial: "Resolved") -> tuple[float | None, float]:
    """$/1M output tokens and weight bytes of a trial, from the fit model (config only)."""
    if trial.shape is None:
        raise RecipeError([f"{trial.where('model', 'source')}: config.json not available offline: method: auto "
                           "orders candidates by the fit model, which needs it"])
    report = trial.fit or fit.fit(trial.shape, trial.gpu, fit.plan_from_recipe(trial.recipe))
    return report.usd_per_million_tokens, report.weights_gb * 1e9


def schemes(loaded: "Resolved") -> tuple[list[Scheme], list[tuple[str, str]]]:
    """The legal candidates in cost order, and the skipped ones with why. Raises RecipeError when an explicit
    candidate is not legal, when none is, or when the recipe has no eval gate to decide with."""
    if loaded.recipe.eval is None or not loaded.recipe.eval.gate:
        raise RecipeError([f"{loaded.where('quantize', 'method')}: method: auto picks the cheapest candidate that "
                           "passes the eval gate; the recipe has no eval.gate rules"],
                          hint="Add eval.tasks and eval.gate (see recipes/smollm2-135m-auto.yaml), or name a method.")
    legal, skipped, problems = [], [], []
    for i, (overrides, explicit) in enumerate(_requested(loaded)):
        label = _label(overrides)
        try:
            trial = _trial(loaded, overrides)
        except RecipeError as e:
            why = "; ".join(p.split(": ", 2)[-1] for p in e.problems)
            if explicit:
                problems.append(f"{loaded.where('quantize', 'candidates', i)}: candidate {label} is not legal for "
                                f"{loaded.recipe.target.gpu}/{loaded.recipe.target.engine}: {why}")
            skipped.append((label, why))
            continue
        usd, size = _cost(trial)
        legal.append((Scheme(label, overrides, trial, usd, size), i))
    if problems:
        raise RecipeError(problems, hint="Remove the candidate or fix it (forge fit --list shows what each GPU runs).")
    if not legal:
        raise RecipeError([f"{loaded.where('quantize', 'method')}: no candidate is legal for "
                           f"{loaded.recipe.target.gpu}/{loaded.recipe.target.engine}: "
                           + "; ".join(f"{c}: {w}" for c, w in skipped)],
                          hint="Add quantize.calibration for calibrated methods, or choose another target.")
    legal.sort(key=lambda s: (*s[0].cost, s[1]))
    return [s for s, _ in legal], skipped


def check_recipe(loaded: "Resolved") -> list[str]:
    """The resolution of an auto recipe's candidates (raises RecipeError); warnings name the listed candidates that
    are skipped."""
    order, skipped = schemes(loaded)
    return [f"{loaded.where('quantize', 'method')}: method: auto skips {c}: {w}" for c, w in skipped
                  if loaded.recipe.quantize.candidates]


# ------------------------------------------------------------------ plan


def plan(loaded: "Resolved", store: "Store") -> dict:
    """The trials a walk may need, in cost order, and which are cached (runs nothing)."""
    order, skipped = schemes(loaded)
    rows = []
    for s in order:
        steps = plan_steps(s.loaded, store, until="gate")
        verdict = None
        g = next((p for p in steps if p.step == "gate"), None)
        if g is not None and g.status == HIT:
            verdict = "pass" if gate.Output.read(g.entry).passed else "fail"
        rows.append({"scheme": s.label, "overrides": s.overrides, "usd_per_million_tokens": s.usd_per_mtok,
                     "fit_weight_bytes": round(s.weight_bytes), "cached": all(p.status == HIT for p in steps),
                     "steps": {p.step: p.status for p in steps}, "gate": verdict})
    return {"recipe": loaded.recipe.name, "gpu": loaded.recipe.target.gpu, "engine": loaded.recipe.target.engine,
            "trials": rows, "skipped": [{"candidate": c, "why": w} for c, w in skipped],
            "mix_steps": MIX_STEPS, "max_trials": loaded.recipe.quantize.max_trials}


# ------------------------------------------------------------------ the walk


def _run_trial(s: Scheme, kept: tuple[str, ...], trial: "Resolved", overrides: dict, usd, size, store, *,
               executor=None, on_start=None, on_done=None, remote=None) -> Trial:
    t0 = time.monotonic()
    outcome = execute_one(trial, store, until="gate", executor=executor, on_start=on_start, on_done=on_done,
                          remote=remote)
    res = outcome.by_name
    t = Trial(s.label, kept, overrides, usd, size, loaded=trial, seconds=time.monotonic() - t0,
              steps={r.name: r.status for r in outcome.results},
              cached=all(r.status == HIT for r in outcome.results),
              build_seconds=sum(float(r.entry.manifest.get("seconds", 0.0)) for r in outcome.results),
              warnings=list(outcome.warnings))
    q = quantize.Output.read(res["quantize"].entry)
    t.size_bytes = q.facts.get("bytes")
    report = next((p for p in q.reports if p.suffix == ".json"), None)
    if report is not None:
        rows = json.loads(report.read_text()).get("layers", [])
        t.layer_errors = sorted(((r["layer"], r.get("weight_rel_error") or r.get("backend_error") or 0.0)
                                 for r in rows), key=lambda x: -x[1])
    g = gate.Output.read(res["gate"].entry)   # decided from the verdict file, re-judged
    verdict = json.loads(g.data)
    t.passed = g.passed
    t.rules = [{k: r[k] for k in ("task", "metric", "kind", "threshold", "limit", "baseline", "candidate",
                                  "degradation", "ci_low", "ci_high", "decision")} for r in verdict["rules"]]
    return t


def _just_fails(t: Trial) -> bool:
    """Every failed rule is within reach, so keeping a few layers in BF16 may pass it: with a positive limit, the
    degradation is at most ``JUST_FAILS`` times the limit; with a limit of 0 or below (``max_abs_drop: 0``,
    ``min_recovery`` >= 1), which gives no scale to multiply, the rule's 95% interval reaches the limit
    (``ci_low <= limit``: the gate did not find it wholly beyond). A rule shown to be past such a limit is not
    retried."""
    def within(r: dict) -> bool:
        if r["limit"] > 0:
            return isinstance(r["degradation"], (int, float)) and r["degradation"] <= JUST_FAILS * r["limit"]
        return isinstance(r["ci_low"], (int, float)) and r["ci_low"] <= r["limit"]   # null: an invalid rule

    return all(within(r) for r in t.rules if r["decision"] != "pass")


def walk(loaded: "Resolved", store: "Store", *, executor=None, on_start=None, on_done=None,
         on_trial: Callable[[Trial], None] | None = None, remote=None) -> Decision:
    """Build trials from the cheapest scheme up to the gate until one passes (see the module docstring)."""
    order, skipped = schemes(loaded)
    r = loaded.recipe
    d = Decision(r.name, r.target.gpu, r.target.engine, order, skipped)
    budget = r.quantize.max_trials or len(order) * (1 + MIX_STEPS)
    base_ignore = tuple(r.quantize.ignore)

    def attempt(s: Scheme, kept: tuple[str, ...], trial, overrides, usd, size) -> Trial:
        t = _run_trial(s, kept, trial, overrides, usd, size, store, executor=executor, on_start=on_start,
                       on_done=on_done, remote=remote)
        d.trials.append(t)
        if on_trial:
            on_trial(t)
        return t

    for i, s in enumerate(order):
        if len(d.trials) >= budget:
            break
        t = attempt(s, (), s.loaded, s.overrides, s.usd_per_mtok, s.weight_bytes)
        if t.passed:
            d.winner = t
            break
        nxt = order[i + 1] if i + 1 < len(order) else None
        if not _just_fails(t):
            t.note = (f"fails beyond reach of a limit (more than {JUST_FAILS:g}× it, or wholly past a limit of 0 or "
                      "below): no mixed precision tried")
            continue
        ranked = [name for name, _ in t.layer_errors if name not in base_ignore]
        for step in range(MIX_STEPS):
            kept = tuple(ranked[:2 ** step])
            if not kept or len(d.trials) >= budget or (step and len(kept) == len(d.trials[-1].kept)):
                break
            overrides = {**s.overrides, "ignore": [*base_ignore, *kept]}
            trial = _trial(loaded, overrides)
            usd, size = _cost(trial)
            if nxt is not None and (usd or 0.0, size) > nxt.cost:
                t.note = (f"{len(kept)} BF16 layer(s) would cost more than {nxt.label} "
                          f"({_usd(usd)} vs {_usd(nxt.usd_per_mtok)} $/1M tokens, {size / 1e6:.1f} vs "
                          f"{nxt.weight_bytes / 1e6:.1f} MB): next scheme")
                break
            mixed = attempt(s, kept, trial, overrides, usd, size)
            if mixed.passed:
                d.winner = mixed
                break
        if d.winner:
            break
    d.why = _why(d, budget)
    return d


def _why(d: Decision, budget: int) -> str:
    w = d.winner
    if w is None:
        c = d.closest
        ran = f"{len(d.trials)} trial(s)" + (f" (max_trials {budget} reached)" if len(d.trials) >= budget else "")
        return f"No candidate passed the gate in {ran}." + (f" Closest: {c.name}." if c else "")
    cheaper = [t for t in d.trials if t is not w]
    cost = f"{_usd(w.usd_per_mtok)} $/1M tokens, {w.weight_bytes / 1e6:.1f} MB of weights (fit model)"
    return (f"{w.name} is the cheapest trial that passed the gate ({cost}); "
            + (f"every cheaper one failed it: {', '.join(t.name for t in cheaper)}." if cheaper
               else "it was the cheapest legal scheme."))


def write_decision(d: Decision, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / DECISION_JSON, out_dir / DECISION_MD
    j.write_text(dumps(d.to_json(), indent=2) + "\n")   # a number that could not be computed: null
    m.write_text(d.markdown())
    return j, m


def run(loaded: "Resolved", store: "Store", *, report_dir: Path | None = None,
        on_trial: Callable[[Trial], None] | None = None, **kw) -> "Outcome":
    """The walk, then the winner (or, with none, the closest trial) through ``forge.orchestrate.pipeline.run`` with the
    decision report as evidence. Without a winner the outcome's error is an EvalGateError naming the closest.
    The outcome's build warnings are the trials' and then the chosen build's (once each), winner or not."""
    d = walk(loaded, store, executor=kw.get("executor"), on_start=kw.get("on_start"), on_done=kw.get("on_done"),
             on_trial=on_trial, remote=kw.get("remote"))
    files = d.files = write_decision(d, (report_dir or store.root / "reports" / loaded.recipe.name) / "auto")
    chosen = d.winner or d.closest
    if chosen is None:   # no trial reached the gate (max_trials 0 cannot happen; kept for safety)
        raise EvalGateError("method: auto ran no trial", hint="Raise quantize.max_trials.")
    outcome = pipeline.run(chosen.loaded, store, report_dir=report_dir, evidence={EVIDENCE_KIND: files}, **kw)
    warnings = list(dict.fromkeys([*d.warnings, *outcome.build.warnings]))
    outcome = replace(outcome, decision=d, build=replace(outcome.build, warnings=warnings))
    if d.winner is None:
        err = EvalGateError(f"method: auto: no candidate passed the eval gate; the closest trial was {chosen.name} "
                            f"(recorded as rejected):\n  " + "\n  ".join(outcome.error.message.splitlines()[1:]
                                                                         if outcome.error else []),
                            hint=f"Decision report: {files[1]}. Loosen the gate, add candidates (e.g. none for BF16) "
                                 "or raise quantize.max_trials.")
        outcome = replace(outcome, build=BuildOutcome(outcome.build.results, err, warnings))
    return outcome
