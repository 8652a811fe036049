"""gate: baseline + candidate per-sample results -> verdict.json, summary.md, junit.xml.

The verdict is cached like any output (a failing verdict too, so a rerun fails fast without
re-evaluating); ``check`` stops the build with exit 3 when it failed, naming each failing metric.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from forge.steps import StepContext, StepSpec

VERDICT, SUMMARY, JUNIT = "verdict.json", "summary.md", "junit.xml"
RESAMPLES = 2000


def _config(loaded) -> dict:
    ev = loaded.recipe.eval
    return {"gate": [r.model_dump(mode="json") for r in ev.gate], "seed": ev.seed, "resamples": RESAMPLES}


SPEC = StepSpec(
    name="gate",
    summary="paired bootstrap verdict against the BF16 baseline",
    depends=("eval_baseline", "eval_candidate"),
    tools=("numpy",),
    version=3,  # 2: no "underpowered" flag on intervals wholly beyond the limit; 3: eval batching recorded
    config=_config,
    enabled=lambda loaded: loaded.recipe.eval is not None,
    run="forge.steps.gate:run",
    check="forge.steps.gate:check",
)


def _paired(base: dict, cand: dict, task: str, metric: str):
    import numpy as np

    docs = sorted(set(base) & set(cand), key=lambda d: (len(str(d)), str(d)))
    if set(base) != set(cand):
        from forge.core.errors import StepError

        raise StepError(f"{task}: baseline and candidate were evaluated on different documents "
                        f"({len(base)} vs {len(cand)}); they must share eval settings")
    return (np.array([base[d][metric] for d in docs], dtype=np.float64),
            np.array([cand[d][metric] for d in docs], dtype=np.float64))


def run(ctx: StepContext) -> dict:
    from forge.evaluation.gatestats import judge_rule, junit, markdown
    from forge.steps import evaluate

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
        b, c = _paired(base.samples(rule.task), cand.samples(rule.task), rule.task, rule.metric)
        ctx.report(f"bootstrap {rule.task}.{rule.metric} (n={len(b)})")
        results.append(judge_rule(rule.task, rule.metric, kind, threshold, b, c, seed=ev.seed, resamples=RESAMPLES))
        gated.add((rule.task, rule.metric))
    reported = [{"task": t, "metric": m, "baseline": v, "candidate": cand_results.get(t, {}).get(m)}
                for t, metrics in base_results.items() for m, v in metrics.items()
                if (t, m) not in gated and isinstance(v, (int, float)) and
                isinstance(cand_results.get(t, {}).get(m), (int, float))]
    passed = all(r.passed for r in results)
    verdict = {"passed": passed, "rules": [r.to_json() for r in results], "reported": reported,
               "settings": {"seed": ev.seed, "resamples": RESAMPLES, "confidence": 0.95, "eval_batching": batching}}
    (ctx.out / VERDICT).write_text(json.dumps(verdict, indent=2) + "\n")
    (ctx.out / SUMMARY).write_text(markdown(results, reported, passed, batching=batching))
    (ctx.out / JUNIT).write_text(junit(results))
    return {"passed": passed, "failed": [r.describe() for r in results if not r.passed],
            "underpowered": [r.name for r in results if r.underpowered]}


def check(entry) -> None:
    out = Output.read(entry)
    if not out.passed:
        from forge.core.errors import EvalGateError

        raise EvalGateError("eval gate failed:\n  " + "\n  ".join(out.failed),
                            hint=f"Full report: {out.summary} (JUnit: {out.junit}).")


@dataclass(frozen=True)
class Output:
    """The gate's verdict as the registry and the pipeline read it."""
    passed: bool
    failed: tuple[str, ...]           # one line per failing rule
    verdict: Path                     # verdict.json (evidence)
    summary: Path
    junit: Path

    @classmethod
    def read(cls, entry) -> "Output":
        facts = entry.manifest["facts"]
        return cls(bool(facts["passed"]), tuple(facts.get("failed") or ()), entry.out / VERDICT,
                   entry.out / SUMMARY, entry.out / JUNIT)

    def facts(self) -> dict:
        return {"passed": self.passed, "failed": list(self.failed)}
