"""The gate's statistics on synthetic per-sample data with known answers."""
from __future__ import annotations

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
