"""The gate's statistics on synthetic per-sample data with known answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from forge.evaluation.gatestats import aggregate, judge_rule, junit, markdown


def _acc(n, p, seed):
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def _ppl_docs(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    words = rng.integers(60, 120, n).astype(float)
    ll = -words * (4.5 + rng.normal(0, 0.3, n))  # about exp(4.5) = 90 word perplexity
    return np.stack([ll - shift * words, words], axis=1)


def test_identical_models_pass_with_zero_interval():
    base = _acc(400, 0.7, 1)
    r = judge_rule("t", "acc", "max_abs_drop", 0.05, base, base.copy())
    assert r.passed and r.decision == "pass"
    assert r.degradation == 0 and r.ci_low == 0 and r.ci_high == 0
    ppl = _ppl_docs(200, 2)
    r2 = judge_rule("t", "word_perplexity", "max_rel_increase", 0.1, ppl, ppl.copy())
    assert r2.passed and r2.degradation == pytest.approx(0)


def test_shift_beyond_threshold_fails():
    base = _ppl_docs(300, 3)
    cand = base.copy()
    cand[:, 0] -= 0.3 * cand[:, 1]  # loglik per word down 0.3 -> perplexity × e^0.3 = +35 %
    r = judge_rule("heldout", "word_perplexity", "max_rel_increase", 0.10, base, cand)
    assert not r.passed and r.decision == "beyond"
    assert r.degradation == pytest.approx(np.exp(0.3) - 1, rel=1e-6)
    assert r.ci_low > 0.10


def test_small_consistent_shift_within_threshold_passes():
    base = _ppl_docs(300, 4)
    cand = base.copy()
    cand[:, 0] -= 0.05 * cand[:, 1]  # +5.1 % perplexity, the same on every document
    r = judge_rule("heldout", "word_perplexity", "max_rel_increase", 0.10, base, cand)
    assert r.passed and r.ci_high < 0.10 and r.degradation == pytest.approx(np.exp(0.05) - 1)


def test_accuracy_drop_beyond_threshold_fails():
    base = np.ones(500)
    cand = base.copy()
    cand[:60] = 0  # 12 points lost
    r = judge_rule("mc", "acc", "max_abs_drop", 0.05, base, cand)
    assert r.decision == "beyond" and r.delta == pytest.approx(-0.12)
    assert not r.underpowered  # it detected a drop beyond the limit: large enough by demonstration


def test_tiny_task_is_flagged_underpowered_and_cannot_pass_on_noise():
    base = _acc(20, 0.6, 5)
    cand = base.copy()
    cand[[0, 3]] = 1 - cand[[0, 3]]  # two flips: a noisy difference on 20 items
    r = judge_rule("mc", "acc", "max_abs_drop", 0.05, base, cand)
    assert r.underpowered and r.mde > 0.05
    assert not r.passed  # a 20-item task cannot show a drop is within 5 points
    big = judge_rule("mc", "acc", "max_abs_drop", 0.05, _acc(5000, 0.6, 6), _acc(5000, 0.6, 6))
    assert not big.underpowered


def test_recovery_rule():
    base = np.ones(1000) * 0.8
    cand = np.ones(1000) * 0.78   # recovery 0.975
    assert judge_rule("t", "acc", "min_recovery", 0.95, base, cand).passed
    assert judge_rule("t", "acc", "min_recovery", 0.99, base, cand).decision == "beyond"


def test_bootstrap_is_seeded_and_paired():
    base, cand = _acc(300, 0.6, 7), _acc(300, 0.58, 8)
    a = judge_rule("t", "acc", "max_abs_drop", 0.05, base, cand, seed=11)
    b = judge_rule("t", "acc", "max_abs_drop", 0.05, base, cand, seed=11)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    # pairing: the same per-document noise on both sides cancels, so the interval is tight
    noisy = _acc(300, 0.5, 9)
    paired = judge_rule("t", "acc", "max_abs_drop", 0.05, noisy, noisy.copy())
    assert paired.ci_high - paired.ci_low == 0


def test_perplexity_aggregation_matches_lm_eval_definitions():
    docs = np.array([[-100.0, 50], [-300.0, 100]])
    assert aggregate("word_perplexity", docs) == pytest.approx(np.exp(400 / 150))
    assert aggregate("bits_per_byte", docs) == pytest.approx(400 / 150 / np.log(2))
    assert aggregate("acc", np.array([1.0, 0.0, 1.0, 1.0])) == 0.75


def test_reports_name_every_metric():
    r = judge_rule("mc", "acc", "max_abs_drop", 0.05, np.ones(100), np.zeros(100))
    md = markdown([r], [{"task": "x", "metric": "em", "baseline": 0.5, "candidate": 0.4}], passed=False)
    assert "❌ Eval gate failed" in md and "| mc.acc | max_abs_drop 0.05 |" in md and "| x.em |" in md
    xml = junit([r])
    assert 'tests="1"' in xml and 'failures="1"' in xml and 'name="mc.acc"' in xml and "beyond" in xml


# ---------------------------------------------------------------------- fail closed: evidence that is not numbers

def _strict_json(r) -> dict:
    """The rule as verdict.json holds it, parsed back by a strict reader (NaN/Infinity are not JSON)."""
    from forge.core.jsonsafe import dumps

    def refuse(token):
        raise ValueError(f"{token} in verdict JSON")
    return json.loads(dumps(r.to_json()), parse_constant=refuse)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("side", ["baseline", "candidate"])
@pytest.mark.parametrize("metric,kind,column", [("acc", "max_abs_drop", None),
                                                ("word_perplexity", "max_rel_increase", 0),   # the loglik
                                                ("word_perplexity", "max_rel_increase", 1)])  # the units
def test_a_non_finite_document_value_makes_the_rule_invalid(bad, side, metric, kind, column):
    if metric == "acc":
        base = np.ones(500)
    else:
        base = _ppl_docs(500, 21)
    cand = base.copy()
    target = base if side == "baseline" else cand
    for i in (7, 42, 300):
        if column is None:
            target[i] = bad
        else:
            target[i, column] = bad
    ids = [f"doc-{i}" for i in range(500)]
    r = judge_rule("t", metric, kind, 0.05, base, cand, doc_ids=ids)
    assert r.decision == "invalid" and not r.passed and not r.underpowered
    assert "3 of 500 documents" in r.reason and "doc-7, doc-42, doc-300" in r.reason
    assert r.ci_low is None and r.ci_high is None and r.degradation is None and r.mde is None
    assert "invalid" in r.describe() and "doc-7" in r.describe()
    doc = _strict_json(r)       # JSON-valid: null where nothing could be computed
    assert doc["decision"] == "invalid" and doc["ci_high"] is None
    from forge.evaluation.gatestats import rejudge

    assert not rejudge({"rules": [doc]}).passed


def test_many_bad_documents_name_the_first_few():
    base = np.ones(100)
    base[::10] = np.nan
    r = judge_rule("t", "acc", "max_abs_drop", 0.05, base, np.ones(100))
    assert r.decision == "invalid" and "10 of 100 documents" in r.reason and "doc_id 0, 10, 20, 30, 40, …" in r.reason


def test_no_documents_is_invalid_not_an_error():
    r = judge_rule("t", "acc", "max_abs_drop", 0.05, np.array([]), np.array([]))
    assert r.decision == "invalid" and not r.passed and "no documents" in r.reason


def test_an_aggregate_or_resample_that_is_not_finite_is_invalid():
    # min_recovery against a baseline of 0: the degradation 1 - candidate / 0 cannot be computed
    r = judge_rule("t", "acc", "min_recovery", 0.95, np.zeros(200), np.zeros(200))
    assert r.decision == "invalid" and "cannot be computed" in r.reason and r.baseline == 0
    # perplexity over documents with no units: exp(-ll / 0)
    docs = np.stack([np.full(50, -10.0), np.zeros(50)], axis=1)
    r = judge_rule("t", "word_perplexity", "max_rel_increase", 0.1, docs, docs.copy())
    assert r.decision == "invalid" and "aggregate is not finite" in r.reason
    # one correct document in five: a third of the resamples have a baseline of 0; none is dropped
    base = np.array([1.0, 0, 0, 0, 0])
    r = judge_rule("t", "acc", "min_recovery", 0.5, base, base.copy(), resamples=300)
    assert r.decision == "invalid" and "bootstrap resamples give a non-finite degradation" in r.reason
    assert r.degradation == 0 and r.ci_high is None


def test_rejudge_decides_from_the_rules_not_the_passed_field():
    from forge.evaluation.gatestats import rejudge

    ok = judge_rule("t", "acc", "max_abs_drop", 0.05, np.ones(400), np.ones(400)).to_json()
    failing = judge_rule("mc", "acc", "max_abs_drop", 0.05, np.ones(100), np.zeros(100)).to_json()
    assert rejudge({"passed": False, "rules": [ok]}).passed
    assert not rejudge({"passed": True, "rules": []}).passed                   # no rule, no pass
    assert not rejudge({"passed": True, "rules": [ok, failing]}).passed
    # a rule edited to say pass over numbers that do not
    flipped = {**failing, "decision": "pass", "passed": True}
    judged = rejudge({"passed": True, "rules": [flipped]})
    assert not judged.passed and "upper end +1 is past the limit +0.05" in judged.failed[0]
    for edit in ({"ci_high": None}, {"ci_high": float("nan")}, {"limit": 0.5}, {"underpowered": True},
                 {"n": 0}, {"kind": "max_whatever"}, {"decision": "pass", "passed": "yes"}):
        assert not rejudge({"rules": [{**ok, **edit}]}).passed, edit
    with pytest.raises(ValueError):
        rejudge({"passed": True})


@pytest.mark.parametrize("data,message", [(b"", "is empty"), (b"{not json", "is not JSON"),
                                          (b'{"passed": true}', "no list of rules"), (b"[]", "no list of rules")])
def test_an_unparseable_verdict_is_an_evidence_error(data, message):
    from forge.core.errors import EvidenceError
    from forge.evaluation.gatestats import parse_verdict

    with pytest.raises(EvidenceError, match=message) as e:
        parse_verdict(data, "/cache/steps/x/out/verdict.json")
    assert e.value.exit_code == 5 and "/cache/steps/x/out/verdict.json" in e.value.message


def test_reports_show_an_invalid_rule_as_a_failure():
    from forge.cli import console

    base = np.ones(100)
    base[3] = np.nan
    r = judge_rule("mc", "acc", "max_abs_drop", 0.05, base, np.ones(100))
    md = markdown([r], [], passed=False)
    assert "| mc.acc | max_abs_drop 0.05 | n/a | " in md and "invalid: 1 of 100 documents" in md
    xml = junit([r])
    assert 'failures="1"' in xml and 'message="invalid"' in xml and "doc_id 3" in xml
    import io

    from rich.console import Console

    buf = io.StringIO()
    console.gate_table({"passed": True, "rules": [_strict_json(r)], "reported": []},
                       console=Console(file=buf, width=300, color_system=None))
    text = buf.getvalue()
    assert "eval gate failed" in text and "invalid: 1 of 100 documents" in text and "n/a" in text
    # no rule at all: said, not passed
    assert "Nothing gated" in markdown([], [], passed=False) and 'skipped="1"' in junit([])


# ---------------------------------------------------------------------- calibration

SEEDS = 200
RESAMPLES = 400   # per seed; the gate itself uses 2,000


def _acc_pair(n, drop, seed, p=0.7, q0=0.05):
    """Paired correct/incorrect per document: the candidate loses a correct answer with probability q1 and gains
    a wrong one with q0, so that the true accuracy drop is exactly ``drop``."""
    rng = np.random.default_rng(seed)
    base = (rng.random(n) < p).astype(float)
    q1 = (drop + (1 - p) * q0) / p
    u = rng.random(n)
    return base, np.where(base == 1, (u >= q1).astype(float), (u < q0).astype(float))


def _ppl_pair(n, rel, seed, sd=0.15):
    """(loglik, words) per document; the candidate's log-perplexity per word is the baseline's plus
    log(1 + rel) plus document noise, so the true relative perplexity increase is exactly ``rel``."""
    rng = np.random.default_rng(seed)
    words = rng.integers(60, 120, n).astype(float)
    ll = -words * (4.5 + rng.normal(0, 0.3, n))
    shift = np.log1p(rel) + rng.normal(0, sd, n)
    return np.stack([ll, words], axis=1), np.stack([ll - shift * words, words], axis=1)


def _rates(make, metric, kind, limit, n, true):
    runs = [judge_rule("t", metric, kind, limit, *make(n, true, 10_000 * (true > 0) + s), seed=s, resamples=RESAMPLES)
            for s in range(SEEDS)]
    return np.mean([r.passed for r in runs]), np.mean([r.underpowered for r in runs])


@pytest.mark.parametrize("make,metric,kind,limit,few,enough", [
    (_acc_pair, "acc", "max_abs_drop", 0.05, 40, 300),
    (_ppl_pair, "word_perplexity", "max_rel_increase", 0.10, 6, 60),
], ids=["accuracy", "perplexity"])
def test_the_gate_is_calibrated(make, metric, kind, limit, few, enough):
    """At the limit a rule passes at most 5 % of the time (the 97.5th percentile within the limit is a one-sided
    2.5 % test); with no degradation and enough documents at least 80 %; with too few it is underpowered."""
    at_limit, _ = _rates(make, metric, kind, limit, enough, limit)
    assert at_limit <= 0.05, at_limit
    small_at_limit, _ = _rates(make, metric, kind, limit, few, limit)
    assert small_at_limit <= 0.05, small_at_limit
    null, null_underpowered = _rates(make, metric, kind, limit, enough, 0.0)
    assert null >= 0.80 and null_underpowered <= 0.05, (null, null_underpowered)
    small, small_underpowered = _rates(make, metric, kind, limit, few, 0.0)
    assert small < 0.80 and small_underpowered >= 0.90, (small, small_underpowered)
    print(f"\n{metric} {kind} {limit}: at the limit passes {at_limit:.1%} (n={enough}), {small_at_limit:.1%} "
          f"(n={few}); no degradation passes {null:.1%} (n={enough}), {small:.1%} (n={few}, underpowered "
          f"{small_underpowered:.0%})")
