"""Fail closed where the gate decides (issue #26): per-document scores that are not finite numbers make a rule
``invalid`` (exit 3), an eval without gate rules is never validated (an error under --ci), and a committed
verdict edited in the step cache is refused (exit 5). The gate step runs for real (``run_step``) on eval
outputs committed here; one test builds a tiny model whose weights are NaN through the real CLI."""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

from conftest import REPO, forge_cli, resolved, write_recipe

from forge.core.digests import tree_digest
from forge.core.errors import EvalGateError, EvidenceError
from forge.executors.runner import run_step
from forge.steps import gate
from forge.store.layered import Stores
from forge.store.local import Store

TASKS = REPO / "evals" / "tasks"
PPL = {"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 0.10}
ACC = {"task": "capitals_mc", "metric": "acc", "max_abs_drop": 0.05}


def _recipe(tmp_path, rules, **extra):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    shutil.copy(REPO / "tests" / "data" / "configs" / "smollm2-135m.json", model / "config.json")  # no weights needed
    return write_recipe(tmp_path / "r.yaml", "./model", eval={
        "tasks": [str(TASKS / "heldout_ppl.yaml"), str(TASKS / "capitals_mc.yaml")], "gate": rules}, **extra)


def _commit(store: Store, step: str, write) -> object:
    """A committed step output whose manifest records its files, as the runner writes it."""
    key = hashlib.sha256(f"{step}{store.root}".encode()).hexdigest()
    with store.staging(key) as staged:
        write(staged / "out")
        files = store.memo.tree(staged / "out")
        return store.commit(key, staged, {"step": step, "facts": {}, "output": {
            "digest": tree_digest(files), "files": {r: {"size": e.size, "sha256": e.sha256} for r, e in files.items()}}})


def _eval(store: Store, step: str, rows: dict[str, list], *, nan_as: str = "NaN"):
    """An eval step's output: per-document values for heldout_ppl ((loglik, words)) and capitals_mc (acc).
    ``nan_as``: how a non-finite value is written (a pre-#26 eval wrote NaN, one now writes null)."""
    def write(out):
        (out / "samples").mkdir()
        for task, metric in (("heldout_ppl", "word_perplexity"), ("capitals_mc", "acc")):
            with open(out / "samples" / f"{task}.jsonl", "w") as f:
                for i, value in enumerate(rows[task]):
                    line = json.dumps({"doc_id": i, "values": {metric: value}})
                    f.write((line.replace("NaN", "null") if nan_as == "null" else line) + "\n")
        (out / "results.json").write_text(json.dumps({"backend": "hf", "device": "cpu", "batching": None,
                                                      "results": {}}))
    return _commit(store, step, write)


def _docs(n_ppl=40, n_acc=300):
    return {"heldout_ppl": [[-4.5 * (60 + i), 60.0 + i] for i in range(n_ppl)],
            "capitals_mc": [float(i % 3 != 0) for i in range(n_acc)]}


def _gate(tmp_path, rules, base, cand, **kw):
    loaded = resolved(_recipe(tmp_path, rules))
    store = Store(tmp_path / "cache")
    upstream = {"eval_baseline": _eval(store, "eval_baseline", base, **kw),
                "eval_candidate": _eval(store, "eval_candidate", cand, **kw)}
    done = run_step(gate.SPEC, loaded, Stores(store), upstream)
    return store.get(done.key)


@pytest.mark.parametrize("bad,nan_as", [(math.nan, "NaN"), (math.nan, "null"), (math.inf, "NaN"), (-math.inf, "NaN")],
                         ids=["NaN", "null", "Infinity", "-Infinity"])   # as the eval's samples file holds it
@pytest.mark.parametrize("side", ["baseline", "candidate"])
@pytest.mark.parametrize("rule", [PPL, ACC], ids=["perplexity", "accuracy"])
def test_a_non_finite_document_score_fails_the_gate_invalid_exit_3(tmp_path, rule, side, bad, nan_as):
    base, cand = _docs(), _docs()
    rows = (base if side == "baseline" else cand)[rule["task"]]
    for i in (5, 17):
        if rule is PPL:
            rows[i] = [bad, rows[i][1]]
        else:
            rows[i] = bad
    entry = _gate(tmp_path, [rule], base, cand, nan_as=nan_as)
    with pytest.raises(EvalGateError) as e:
        gate.check(entry)
    assert e.value.exit_code == 3
    assert f"{rule['task']}.{rule['metric']}" in e.value.message and "-> invalid: 2 of" in e.value.message
    assert "doc_id 5, 17" in e.value.message
    raw = (entry.out / "verdict.json").read_text()
    verdict = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in verdict.json"))   # strict JSON
    (r,) = verdict["rules"]
    assert r["decision"] == "invalid" and r["passed"] is False and r["ci_high"] is None and not verdict["passed"]
    assert "invalid: 2 of" in (entry.out / "summary.md").read_text()
    assert 'message="invalid"' in (entry.out / "junit.xml").read_text()
    out = gate.Output.read(entry)
    assert not out.passed and out.rules == 1 and "invalid" in out.failed[0]


def test_a_passing_gate_and_the_same_verdict_edited_in_the_cache(tmp_path):
    entry = _gate(tmp_path, [PPL, ACC], _docs(), _docs())
    out = gate.Output.read(entry)
    assert out.passed and out.rules == 2
    gate.check(entry)   # passes: no exception
    # a rule flipped to failed in the committed verdict: refused as evidence, exit 5, naming the file
    path = entry.out / "verdict.json"
    verdict = json.loads(path.read_text())
    verdict["rules"][0].update(decision="beyond", passed=False)
    path.write_text(json.dumps(verdict, indent=2))
    for read in (gate.Output.read, gate.check):
        with pytest.raises(EvidenceError) as e:
            read(entry)
        assert e.value.exit_code == 5 and str(path) in e.value.message and "modified after the gate step" in e.value.message
    path.write_text("")
    with pytest.raises(EvidenceError, match="modified after"):
        gate.Output.read(entry)
    path.unlink()
    with pytest.raises(EvidenceError, match="cannot read"):
        gate.Output.read(entry)


def test_a_verdict_whose_file_matches_its_manifest_but_is_not_a_verdict_is_exit_5(tmp_path):
    store = Store(tmp_path / "cache")
    for data, message in ((b"", "is empty"), (b"NaN", "not an eval verdict"), (b'{"passed": true}', "no list of rules")):
        entry = _commit(store, f"gate-{len(data)}", lambda out: (out / "verdict.json").write_bytes(data))
        with pytest.raises(EvidenceError, match=message) as e:
            gate.Output.read(entry)
        assert e.value.exit_code == 5 and str(entry.out / "verdict.json") in e.value.message


def test_no_gate_rules_is_no_pass_and_the_build_goes_on_ungated(tmp_path):
    entry = _gate(tmp_path, [], _docs(), _docs())
    out = gate.Output.read(entry)
    assert out.rules == 0 and not out.passed and not out.gated
    verdict = json.loads((entry.out / "verdict.json").read_text())
    assert verdict["passed"] is False and verdict["rules"] == []
    assert "Nothing gated" in (entry.out / "summary.md").read_text()
    gate.check(entry)   # without --ci a warning at validate; publish records it as ungated (tests/test_registry.py)


def test_an_eval_without_gate_rules_is_exit_2_under_ci_and_a_warning_without(tmp_path):
    _recipe(tmp_path, [])
    proc = forge_cli("validate", "r.yaml", "--ci", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert "r.yaml:" in err and "eval.gate: eval has tasks but no gate rules" in err and "never validated" in err
    assert "`gate: [{task: heldout_ppl, metric: word_perplexity, max_rel_increase: 0.10}]`" in err
    assert "Traceback" not in proc.stderr
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0 and "eval has tasks but no gate rules" in " ".join((proc.stdout + proc.stderr).split())


def test_method_auto_refuses_a_recipe_without_gate_rules(tmp_path):
    _recipe(tmp_path, [], quantize={"method": "auto", "calibration": {
        "data": str(REPO / "evals" / "data" / "calib-pydoc.jsonl"), "samples": 4, "max_seq_len": 64}})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "method: auto picks the cheapest candidate that passes the eval gate" in proc.stderr
    assert "no eval.gate rules" in proc.stderr


def test_a_model_that_scores_nan_fails_the_gate_through_the_cli(tmp_path, tiny_llama, cache_dir):
    """A checkpoint whose weights are NaN (method none: nothing verifies it before the eval) scores NaN per
    document on both sides: the gate is invalid, the build exits 3, the record is rejected."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-llama"
    shutil.copytree(tiny_llama, model)
    weights = load_file(model / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "nan.yaml", str(model), name="nan",
                          eval={"tasks": [str(TASKS / "heldout_ppl.yaml")], "limit": 4, "gate": [PPL]})
    proc = forge_cli("build", str(recipe), cache=cache_dir)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "eval gate failed" in out and "invalid: 4 of 4 documents have a NaN or infinite value" in out
    assert "publish rejected" in out and "Traceback" not in proc.stderr
    rec = json.loads(forge_cli("registry", "ls", "--json", "--status", "rejected", check=0).stdout)[0]
    assert rec["reason"].startswith("eval gate failed: heldout_ppl.word_perplexity") and "invalid" in rec["reason"]
