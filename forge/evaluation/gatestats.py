"""The eval gate's statistics: paired per-sample differences, a seeded bootstrap, a hard verdict.

Each gate rule turns baseline and candidate into one *degradation* number, larger = worse, with a
limit:
    max_abs_drop      baseline - candidate            limit = threshold      (higher-is-better metrics)
    max_rel_increase  candidate / baseline - 1        limit = threshold      (perplexities)
    min_recovery      1 - candidate / baseline        limit = 1 - threshold  (higher-is-better metrics)

The bootstrap resamples documents, the same documents for both models (paired), and recomputes the
aggregate (a mean, or for perplexities exp(-Σ loglik / Σ units)), giving a 95 % interval for the
degradation. Decision, fail-closed: a metric passes only when the interval's upper end is within
the limit. Otherwise it fails as *beyond* (the whole interval is past the limit), *likely beyond*
(the estimate is past it) or *inconclusive* (the estimate is within, but the task cannot show it).
The minimum detectable effect, 2.8 × the bootstrap standard error (5 % two-sided, 80 % power), says
whether the task is large enough to resolve the limit at all: when it is not (and the interval does not
lie wholly beyond the limit, which would show it could), the metric is flagged *underpowered*.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from forge.evaluation.tasks import PERPLEXITY_FAMILY

Z_MDE = 1.959964 + 0.841621  # two-sided 5 %, 80 % power
LN2 = math.log(2)


@dataclass
class RuleResult:
    task: str
    metric: str
    kind: str
    threshold: float
    limit: float
    n: int
    baseline: float
    candidate: float
    delta: float                 # candidate - baseline, in the metric's units
    degradation: float           # in the rule's units, larger = worse
    ci_low: float
    ci_high: float
    mde: float
    underpowered: bool
    passed: bool
    decision: str                # pass | beyond | likely beyond | inconclusive

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        return f"{self.task}.{self.metric}"

    def describe(self) -> str:
        return (f"{self.name}: baseline {self.baseline:.4g}, candidate {self.candidate:.4g}, delta {self.delta:+.4g}; "
                f"{self.kind} {self.threshold:g}: degradation {self.degradation:+.4g} "
                f"(95% CI {self.ci_low:+.4g} .. {self.ci_high:+.4g}, limit {self.limit:+.4g}) -> {self.decision}"
                + (f"; underpowered (n={self.n}, minimum detectable {self.mde:.4g})" if self.underpowered else ""))


def aggregate(metric: str, values: np.ndarray) -> np.ndarray:
    """Aggregate along the last axis. Perplexity-family values are (loglik, units) pairs: shape (..., n, 2)."""
    if metric in PERPLEXITY_FAMILY:
        ll, units = values[..., 0].sum(axis=-1), values[..., 1].sum(axis=-1)
        if metric == "bits_per_byte":
            return -ll / units / LN2
        return np.exp(-ll / units)
    return values.mean(axis=-1)


def _degradation(kind: str, base, cand):
    if kind == "max_abs_drop":
        return base - cand
    if kind == "max_rel_increase":
        return cand / base - 1
    return 1 - cand / base  # min_recovery


def _limit(kind: str, threshold: float) -> float:
    return 1 - threshold if kind == "min_recovery" else threshold


def judge_rule(task: str, metric: str, kind: str, threshold: float, base: np.ndarray, cand: np.ndarray,
               *, seed: int = 0, resamples: int = 2000) -> RuleResult:
    """Judge one rule on paired per-document values (same order, same documents)."""
    base, cand = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if base.shape != cand.shape or len(base) == 0:
        raise ValueError(f"{task}.{metric}: baseline and candidate must have the same non-empty documents")
    n = len(base)
    b_agg, c_agg = float(aggregate(metric, base)), float(aggregate(metric, cand))
    point = float(_degradation(kind, b_agg, c_agg))
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = _degradation(kind, aggregate(metric, base[idx]), aggregate(metric, cand[idx]))
    boot = boot[np.isfinite(boot)]
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    mde = Z_MDE * float(boot.std(ddof=1)) if len(boot) > 1 else math.inf
    limit = _limit(kind, threshold)
    if hi <= limit:
        decision = "pass"
    elif lo > limit:
        decision = "beyond"
    elif point > limit:
        decision = "likely beyond"
    else:
        decision = "inconclusive"
    return RuleResult(task=task, metric=metric, kind=kind, threshold=threshold, limit=limit, n=n, baseline=b_agg,
                      candidate=c_agg, delta=c_agg - b_agg, degradation=point, ci_low=lo, ci_high=hi, mde=mde,
                      # an interval wholly past the limit shows the task resolved it, whatever the SE
                      underpowered=(mde > abs(limit) if limit else mde > 0) and decision != "beyond",
                      passed=decision == "pass",
                      decision=decision)


# ------------------------------------------------------------------ reports


def markdown(results: list[RuleResult], reported: list[dict], passed: bool, *, batching: dict | None = None) -> str:
    head = "✅ Eval gate passed" if passed else "❌ Eval gate failed"
    lines = [f"### {head}", "", "| metric | rule | baseline | candidate | degradation (95% CI) | n | decision |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        flag = " ⚠️ underpowered" if r.underpowered else ""
        lines.append(f"| {r.name} | {r.kind} {r.threshold:g} | {r.baseline:.4g} | {r.candidate:.4g} | "
                     f"{r.degradation:+.4g} ({r.ci_low:+.4g} .. {r.ci_high:+.4g}) | {r.n} | {r.decision}{flag} |")
    if reported:
        lines += ["", "Not gated (reported):", "", "| metric | baseline | candidate | delta |", "|---|---|---|---|"]
        for m in reported:
            lines.append(f"| {m['task']}.{m['metric']} | {m['baseline']:.4g} | {m['candidate']:.4g} | "
                         f"{m['candidate'] - m['baseline']:+.4g} |")
    if batching and all(batching.values()):
        lines += ["", "Evaluated at batch size " + ", ".join(
            f"{side} {b['batch_size']}" + (f" ({b['reason']})" if b["batch_size"] != b["requested"] else "")
            for side, b in batching.items()) + "."]
    if any(r.underpowered for r in results):
        lines += ["", "⚠️ underpowered: the task is too small to detect a change the size of its limit "
                      "(minimum detectable effect above the limit); add documents for a verdict that means something."]
    return "\n".join(lines) + "\n"


def junit(results: list[RuleResult], suite: str = "forge-eval-gate") -> str:
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuite", name=suite, tests=str(len(results)),
                      failures=str(sum(not r.passed for r in results)), errors="0")
    for r in results:
        case = ET.SubElement(root, "testcase", classname=f"{suite}.{r.task}", name=r.name, time="0")
        if not r.passed:
            ET.SubElement(case, "failure", message=r.decision, type="EvalGate").text = r.describe()
        ET.SubElement(case, "system-out").text = r.describe()
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
