"""gate: baseline + candidate per-sample results -> verdict.json, summary.md, junit.xml.

The verdict is cached like any output (a failing verdict too, so a rerun fails fast without
re-evaluating); ``check`` stops the build with exit 3 when it failed, naming each failing metric.

Fail closed: a recipe whose eval has no gate rules gets a verdict with no rules and ``passed: false``
(the build goes on, recorded as ``ungated``, never validated; under --ci such a recipe is refused at
validate). ``Output.read`` decides from verdict.json itself, re-judged (``forge.evaluation.gatestats.rejudge``), after
checking its bytes against the digest the step manifest recorded: an edited, unreadable or empty verdict
is an EvidenceError (exit 5), and the manifest's facts are never what decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from forge.steps import StepContext, StepSpec, evaluate
from forge.core.errors import EvalGateError, StepError
from forge.core.jsonsafe import dumps
from forge.evaluation.gatestats import judge_rule, junit, markdown, parse_verdict, rejudge
from forge.evaluation.tasks import PERPLEXITY_FAMILY
from forge.store.local import read_committed

VERDICT, SUMMARY, JUNIT = "verdict.json", "summary.md", "junit.xml"
RESAMPLES = 2000


def _config(loaded) -> dict:
    ev = loaded.recipe.eval
    return {"gate": [r.model_dump(mode="json") for r in ev.gate], "seed": ev.seed, "resamples": RESAMPLES}


SPEC = StepSpec(
    name="gate",
    summary="paired bootstrap verdict against the BF16 baseline",
    depends=("eval_baseline", "eval_candidate"),
    tools=("numpy", "scipy"),
    # 2: no "underpowered" flag on intervals wholly beyond the limit; 3: eval batching recorded; 4: fail closed
    # (non-finite evidence is "invalid", an underpowered rule cannot pass, no rules is not a pass); 5: where each
    # side was evaluated (evaluated_on: the registry tells a proxy's gate from one on the shipped engine)
    version=5,
    config=_config,
    enabled=lambda loaded: loaded.recipe.eval is not None,
    run="forge.steps.gate:run",
    check="forge.steps.gate:check",
)


def _paired(base: dict, cand: dict, task: str, metric: str):
    """(doc ids, baseline values, candidate values) in one order. A value that is missing or not a number is
    NaN (a perplexity's (loglik, units) pair: both), which the gate judges invalid: never a pass."""
    import numpy as np

    if set(base) != set(cand):
        raise StepError(f"{task}: baseline and candidate were evaluated on different documents "
                        f"({len(base)} vs {len(cand)}); they must share eval settings")
    docs = sorted(base, key=lambda d: (len(str(d)), str(d)))
    pair = metric in PERPLEXITY_FAMILY
    shape = (len(docs), 2) if pair else (len(docs),)
    return (docs, np.array([_value(base[d], metric, pair) for d in docs], dtype=np.float64).reshape(shape),
            np.array([_value(cand[d], metric, pair) for d in docs], dtype=np.float64).reshape(shape))


def _value(values, metric: str, pair: bool):
    v = values.get(metric) if isinstance(values, dict) else None
    if pair:
        ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v)
        return [float(x) for x in v] if ok else [math.nan, math.nan]
    return float(v) if _number(v) else math.nan


def _number(x) -> bool:
    return isinstance(x, (int, float))   # bool is an int: a correct/incorrect flag is 1/0


def _samples(out, task: str) -> dict:
    try:
        return out.samples(task)
    except FileNotFoundError:
        return {}   # no per-document evidence: the rule is judged on no documents, which is invalid


def run(ctx: StepContext) -> dict:
    ev = ctx.recipe.recipe.eval
    base = evaluate.Output.read(ctx.upstream["eval_baseline"])
    cand = evaluate.Output.read(ctx.upstream["eval_candidate"])
    base_results, cand_results = base.results, cand.results
    batching = {"baseline": base.batching, "candidate": cand.batching}
    results = []
    gated = set()
    for rule in ev.gate:
        kind, threshold = next((k, getattr(rule, k)) for k in ("max_abs_drop", "max_rel_increase", "min_recovery")
                               if getattr(rule, k) is not None)
        docs, b, c = _paired(_samples(base, rule.task), _samples(cand, rule.task), rule.task, rule.metric)
        ctx.report(f"bootstrap {rule.task}.{rule.metric} (n={len(docs)})")
        results.append(judge_rule(rule.task, rule.metric, kind, threshold, b, c, doc_ids=docs, seed=ev.seed,
                                  resamples=RESAMPLES))
        gated.add((rule.task, rule.metric))
    reported = [{"task": t, "metric": m, "baseline": v, "candidate": cand_results.get(t, {}).get(m)}
                for t, metrics in base_results.items() for m, v in metrics.items()
                if (t, m) not in gated and _number(v) and _number(cand_results.get(t, {}).get(m))]
    passed = bool(results) and all(r.passed for r in results)   # no rule is no pass
    verdict = {"passed": passed, "rules": [r.to_json() for r in results], "reported": reported,
               "evaluated_on": {"baseline": base.evaluated_on, "candidate": cand.evaluated_on},
               "settings": {"seed": ev.seed, "resamples": RESAMPLES, "confidence": 0.95, "eval_batching": batching}}
    (ctx.out / VERDICT).write_text(dumps(verdict, indent=2) + "\n")   # numbers not computed: null, never NaN
    (ctx.out / SUMMARY).write_text(markdown(results, reported, passed, batching=batching))
    (ctx.out / JUNIT).write_text(junit(results))
    return {"passed": passed, "rules": len(results), "failed": [r.describe() for r in results if not r.passed],
            "underpowered": [r.name for r in results if r.underpowered]}


def check(entry) -> None:
    out = Output.read(entry)
    if out.rules and not out.passed:   # no rules: recorded as ungated by publish, the build goes on
        raise EvalGateError("eval gate failed:\n  " + "\n  ".join(out.failed),
                            hint=f"Full report: {out.summary} (JUnit: {out.junit}).")


@dataclass(frozen=True)
class Output:
    """The gate's verdict as the registry and the pipeline read it: decided from verdict.json, re-judged."""
    passed: bool                      # at least one rule, and every rule passed on finite numbers
    failed: tuple[str, ...]           # one line per rule that does not pass
    rules: int                        # gated rules in the verdict (0: ungated)
    verdict: Path                     # verdict.json (evidence)
    summary: Path
    junit: Path
    data: bytes = b""                 # verdict.json's bytes, as checked against the step manifest

    @classmethod
    def read(cls, entry) -> "Output":
        data = read_committed(entry, VERDICT)
        judged = rejudge(parse_verdict(data, str(entry.out / VERDICT)))
        return cls(judged.passed, judged.failed, judged.rules, entry.out / VERDICT, entry.out / SUMMARY,
                   entry.out / JUNIT, data)

    @property
    def gated(self) -> bool:
        return self.rules > 0

    def facts(self) -> dict:
        return {"passed": self.passed, "rules": self.rules, "failed": list(self.failed)}
