"""The eval gate's statistics: paired per-sample differences, a seeded bootstrap, a hard verdict.

Each gate rule turns baseline and candidate into one *degradation* number, larger = worse, with a
limit:
    max_abs_drop      baseline - candidate            limit = threshold      (higher-is-better metrics)
    max_rel_increase  candidate / baseline - 1        limit = threshold      (perplexities)
    min_recovery      1 - candidate / baseline        limit = 1 - threshold  (higher-is-better metrics)

The bootstrap resamples documents, the same documents for both models (paired), and recomputes the
aggregate (a mean, or for perplexities exp(-Σ loglik / Σ units)), giving a 95 % interval for the
degradation. The minimum detectable effect (MDE; 5 % two-sided, 80 % power: 2.8 × the standard error for
many documents, Student's t for few, ``_mde``) says whether the task is large enough to resolve the limit
at all: when it is not, the metric is *underpowered*. For a mean metric the standard error is never taken
below what one document's worth of change allows (``_se_floor``): a sample in which no document changed
(a bootstrap SE of 0) cannot exclude that up to ~3 in n would (the rule of three), so a tiny task whose
answers happen to agree is underpowered, not proven equal.

Decision, fail-closed. A metric passes only when the interval's upper end is within the limit *and* the
task is not underpowered (the 97.5th percentile below the limit is a one-sided 2.5 % test; a task that
cannot resolve the limit passes only by luck). Otherwise it fails as *beyond* (the whole interval is past
the limit), *likely beyond* (the estimate is past it) or *inconclusive* (the estimate is within, but the
task cannot show it). A rule whose evidence is not numbers fails as *invalid*: no documents, a NaN or ±inf
per-document value on either side (for perplexities either column of a (loglik, units) pair), a
non-finite aggregate or degradation, or a bootstrap resample whose degradation is not finite. Its numbers
that could not be computed are None (null in verdict.json).

Calibration (tests/test_gate_stats.py, 200 seeds on synthetic paired data): with the true degradation at
the limit a rule passes in at most 5 % of the seeds; with none and enough documents, in at least 80 %;
with too few documents it is flagged underpowered. The measured rates are in the README ("Eval gate").

``rejudge`` re-derives pass/fail from a verdict as written (verdict.json): the gate step's reader and the
registry decide from the file with it, never from what a manifest says about the file.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from forge.evaluation.tasks import PERPLEXITY_FAMILY

from forge.core.errors import EvidenceError
if TYPE_CHECKING:
    import numpy as np

LN2 = math.log(2)
KINDS = ("max_abs_drop", "max_rel_increase", "min_recovery")
DECISIONS = ("pass", "beyond", "likely beyond", "inconclusive", "invalid")
RULE_OF_THREE = math.sqrt(3)   # no change seen in n documents: up to ~3/n of them changing is not excluded
SHOWN_IDS = 5                  # an invalid rule names this many of its bad documents


@dataclass
class RuleResult:
    task: str
    metric: str
    kind: str
    threshold: float
    limit: float
    n: int
    baseline: float | None
    candidate: float | None
    delta: float | None          # candidate - baseline, in the metric's units
    degradation: float | None    # in the rule's units, larger = worse
    ci_low: float | None
    ci_high: float | None
    mde: float | None
    underpowered: bool
    passed: bool
    decision: str                # pass | beyond | likely beyond | inconclusive | invalid
    reason: str = ""             # invalid: what could not be computed, and where

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        return f"{self.task}.{self.metric}"

    def describe(self) -> str:
        return describe_rule(self.to_json())


def num(x, spec: str = ".4g") -> str:
    """A number for people: ``n/a`` where it could not be computed (None, NaN, ±inf)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    return format(x, spec)


def describe_rule(r: dict) -> str:
    """One line for a rule as verdict.json records it (any field may be missing or null)."""
    name = f"{r.get('task')}.{r.get('metric')}"
    if r.get("decision") == "invalid":
        return f"{name}: {r.get('kind')} {num(r.get('threshold'), 'g')} -> invalid: {r.get('reason') or 'no numbers'}"
    line = (f"{name}: baseline {num(r.get('baseline'))}, candidate {num(r.get('candidate'))}, "
            f"delta {num(r.get('delta'), '+.4g')}; {r.get('kind')} {num(r.get('threshold'), 'g')}: degradation "
            f"{num(r.get('degradation'), '+.4g')} (95% CI {num(r.get('ci_low'), '+.4g')} .. "
            f"{num(r.get('ci_high'), '+.4g')}, limit {num(r.get('limit'), '+.4g')}) -> {r.get('decision')}")
    if r.get("underpowered"):
        line += f"; underpowered (n={r.get('n')}, minimum detectable {num(r.get('mde'))})"
    return line


def aggregate(metric: str, values: "np.ndarray") -> "np.ndarray":
    """Aggregate along the last axis. Perplexity-family values are (loglik, units) pairs: shape (..., n, 2)."""
    import numpy as np

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


def _se_floor(metric: str, kind: str, base: "np.ndarray", cand: "np.ndarray", b_agg: float) -> float:
    """The least standard error a mean metric's degradation is credited with: one document's worth of change
    (the per-document span, or 1 when every value is equal) times the rule of three, over n; in the rule's
    units. Perplexities (sums of log-likelihoods) are continuous: no floor."""
    if metric in PERPLEXITY_FAMILY:
        return 0.0
    span = float(max(base.max(), cand.max()) - min(base.min(), cand.min())) or 1.0
    step = RULE_OF_THREE * span / len(base)
    return step if kind == "max_abs_drop" else step / abs(b_agg)


def _mde(n: int, boot_sd: float, floor: float) -> float:
    """The minimum detectable effect (5 % two-sided, 80 % power) from the bootstrap's standard deviation: as
    a standard error it is short by sqrt((n-1)/n), and from n documents it is itself an estimate, so the
    multiplier is Student's t with n-1 degrees of freedom (2.80 for many documents, 4.2 for 4)."""
    from scipy.stats import t

    if n < 2:
        return math.inf
    se = max(boot_sd * math.sqrt(n / (n - 1)), floor)
    return float(t.ppf(0.975, n - 1) + t.ppf(0.80, n - 1)) * se


def judge_rule(task: str, metric: str, kind: str, threshold: float, base, cand, *,
               doc_ids=None, seed: int = 0, resamples: int = 2000) -> RuleResult:
    """Judge one rule on paired per-document values (same order, same documents; ``doc_ids`` names them in
    an invalid verdict). Fails closed: see the module docstring."""
    import numpy as np

    base, cand = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if base.shape != cand.shape:
        raise ValueError(f"{task}.{metric}: baseline and candidate must have the same documents")
    n, limit = len(base), _limit(kind, threshold)

    def invalid(reason: str, b_agg=None, c_agg=None, point=None) -> RuleResult:
        b_agg, c_agg, point = (_finite(x) for x in (b_agg, c_agg, point))
        delta = c_agg - b_agg if b_agg is not None and c_agg is not None else None
        return RuleResult(task=task, metric=metric, kind=kind, threshold=threshold, limit=limit, n=n, baseline=b_agg,
                          candidate=c_agg, delta=delta, degradation=point, ci_low=None, ci_high=None, mde=None,
                          underpowered=False, passed=False, decision="invalid", reason=reason)

    if n == 0:
        return invalid("no documents to compare")
    bad = ~(np.isfinite(base) & np.isfinite(cand))
    if bad.ndim > 1:
        bad = bad.reshape(n, -1).any(axis=1)
    if bad.any():
        ids = list(doc_ids) if doc_ids is not None else list(range(n))
        where = np.flatnonzero(bad)
        shown = ", ".join(str(ids[i]) for i in where[:SHOWN_IDS]) + (", …" if len(where) > SHOWN_IDS else "")
        return invalid(f"{len(where)} of {n} documents have a NaN or infinite value (baseline or candidate): "
                       f"doc_id {shown}")
    with np.errstate(all="ignore"):
        b_agg, c_agg = float(aggregate(metric, base)), float(aggregate(metric, cand))
        point = float(_degradation(kind, np.float64(b_agg), np.float64(c_agg)))   # x / 0: inf or nan, not a raise
    if not (math.isfinite(b_agg) and math.isfinite(c_agg)):
        return invalid(f"the aggregate is not finite (baseline {b_agg}, candidate {c_agg})", b_agg, c_agg)
    if not math.isfinite(point):
        return invalid(f"the degradation cannot be computed from baseline {b_agg:.4g} and candidate {c_agg:.4g}",
                       b_agg, c_agg)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with np.errstate(all="ignore"):
        boot = _degradation(kind, aggregate(metric, base[idx]), aggregate(metric, cand[idx]))
    if not np.isfinite(boot).all():
        k = int((~np.isfinite(boot)).sum())
        return invalid(f"{k} of {resamples} bootstrap resamples give a non-finite degradation (e.g. a resample "
                       "whose baseline is 0): the interval cannot be computed", b_agg, c_agg, point)
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    mde = _mde(n, float(boot.std(ddof=1)) if resamples > 1 else math.inf, _se_floor(metric, kind, base, cand, b_agg))
    resolved = not (mde > abs(limit) if limit else mde > 0)
    if hi <= limit and resolved:
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
                      underpowered=not resolved and decision != "beyond",
                      passed=decision == "pass", decision=decision)


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


# ------------------------------------------------------------------ a verdict as written, re-judged


@dataclass(frozen=True)
class Judged:
    """What a verdict file supports: how many gated rules it holds, and each one that does not pass."""
    rules: int
    failed: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """At least one rule, and every rule passed on finite numbers within its limit."""
        return self.rules > 0 and not self.failed


_NUMBERS = ("threshold", "limit", "baseline", "candidate", "degradation", "ci_low", "ci_high", "mde")


def rule_failure(r) -> str | None:
    """Why a rule as recorded does not pass (None: it does). A pass is believed only when its decision and
    flag say so, every number is finite, its limit is its rule's, the interval's upper end is within it,
    and it is not underpowered: a verdict edited to say *pass* over numbers that do not is not a pass."""
    if not isinstance(r, dict):
        return "not a rule"
    if r.get("decision") != "pass" or r.get("passed") is not True:
        return str(r.get("decision") or "no decision")
    if bad := [k for k in _NUMBERS if _finite(r.get(k)) is None or isinstance(r.get(k), bool)]:
        return f"recorded as pass, but {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a finite number"
    if r.get("kind") not in KINDS:
        return f"recorded as pass, but {r.get('kind')!r} is not a rule kind"
    if r["limit"] != _limit(r["kind"], r["threshold"]):
        return f"recorded as pass, but its limit {r['limit']:+.4g} is not that of {r['kind']} {r['threshold']:g}"
    if not r["ci_high"] <= r["limit"]:
        return f"recorded as pass, but the interval's upper end {r['ci_high']:+.4g} is past the limit {r['limit']:+.4g}"
    if r.get("underpowered") is not False:
        return "recorded as pass, but underpowered"
    if not isinstance(r.get("n"), int) or isinstance(r.get("n"), bool) or r["n"] < 1:
        return "recorded as pass, but over no documents"
    return None


def rejudge(verdict) -> Judged:
    """Re-derive the verdict from its rules (its own ``passed`` field is not read). Raises ValueError when
    it holds no list of rules."""
    rules = verdict.get("rules") if isinstance(verdict, dict) else None
    if not isinstance(rules, list):
        raise ValueError("it holds no list of rules")
    failed = []
    for i, r in enumerate(rules):
        why = rule_failure(r)
        if why is None:
            continue
        if isinstance(r, dict) and r.get("decision") in DECISIONS and r.get("decision") != "pass":
            failed.append(describe_rule(r))
        else:
            name = f"{r.get('task')}.{r.get('metric')}" if isinstance(r, dict) else f"rules[{i}]"
            failed.append(f"{name}: {why}")
    return Judged(len(rules), tuple(failed))


def parse_verdict(data: bytes, where: str) -> dict:
    """verdict.json's bytes as a dict; an EvidenceError (exit 5) naming ``where`` when they are not one."""
    hint = "Rebuild the gate (forge build --force gate) and publish again; a verdict is never guessed."
    if not data.strip():
        raise EvidenceError(f"{where} is empty: there is no eval verdict to decide from", hint=hint)
    try:
        verdict = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise EvidenceError(f"{where} is not JSON ({e}): there is no eval verdict to decide from", hint=hint) from None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("rules"), list):
        raise EvidenceError(f"{where} is not an eval verdict (no list of rules)", hint=hint)
    return verdict


# ------------------------------------------------------------------ reports


def markdown(results: list[RuleResult], reported: list[dict], passed: bool, *, batching: dict | None = None) -> str:
    if not results:
        head = "⚠️ Nothing gated: eval.gate has no rules (recorded as ungated, never validated)"
    else:
        head = "✅ Eval gate passed" if passed else "❌ Eval gate failed"
    lines = [f"### {head}", "", "| metric | rule | baseline | candidate | degradation (95% CI) | n | decision |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        flag = " ⚠️ underpowered" if r.underpowered else ""
        decision = f"invalid: {r.reason}" if r.decision == "invalid" else r.decision
        lines.append(f"| {r.name} | {r.kind} {r.threshold:g} | {num(r.baseline)} | {num(r.candidate)} | "
                     f"{num(r.degradation, '+.4g')} ({num(r.ci_low, '+.4g')} .. {num(r.ci_high, '+.4g')}) | {r.n} | "
                     f"{decision}{flag} |")
    if reported:
        lines += ["", "Not gated (reported):", "", "| metric | baseline | candidate | delta |", "|---|---|---|---|"]
        for m in reported:
            b, c = m.get("baseline"), m.get("candidate")
            delta = c - b if _finite(b) is not None and _finite(c) is not None else None
            lines.append(f"| {m['task']}.{m['metric']} | {num(b)} | {num(c)} | {num(delta, '+.4g')} |")
    if batching and all(batching.values()):
        lines += ["", "Evaluated at batch size " + ", ".join(
            f"{side} {b['batch_size']}" + (f" ({b['reason']})" if b["batch_size"] != b["requested"] else "")
            for side, b in batching.items()) + "."]
    if any(r.underpowered for r in results):
        lines += ["", "⚠️ underpowered: the task is too small to detect a change the size of its limit "
                      "(minimum detectable effect above the limit), so it cannot pass; add documents for a verdict "
                      "that means something."]
    if any(r.decision == "invalid" for r in results):
        lines += ["", "❌ invalid: a rule's evidence is not numbers (no documents, a NaN or infinite score, or an "
                      "aggregate that cannot be computed); it never passes."]
    return "\n".join(lines) + "\n"


def junit(results: list[RuleResult], suite: str = "forge-eval-gate") -> str:
    import xml.etree.ElementTree as ET

    if not results:   # nothing gated is not a pass: one skipped case says so
        root = ET.Element("testsuite", name=suite, tests="1", failures="0", errors="0", skipped="1")
        case = ET.SubElement(root, "testcase", classname=suite, name="eval.gate", time="0")
        ET.SubElement(case, "skipped", message="ungated").text = \
            "eval.gate has no rules: nothing was gated (the artifact is recorded as ungated, never validated)"
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
    root = ET.Element("testsuite", name=suite, tests=str(len(results)),
                      failures=str(sum(not r.passed for r in results)), errors="0")
    for r in results:
        case = ET.SubElement(root, "testcase", classname=f"{suite}.{r.task}", name=r.name, time="0")
        if not r.passed:
            ET.SubElement(case, "failure", message=r.decision, type="EvalGate").text = r.describe()
        ET.SubElement(case, "system-out").text = r.describe()
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
