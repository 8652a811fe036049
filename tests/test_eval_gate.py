"""Eval gate end to end on a tiny model: shared baseline, verdict files, exit 3; bad gate configs exit 2."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.orchestrate.build import build, plan
from forge.core.errors import EvalGateError
from conftest import resolved
from forge.store.local import Store

TASKS = REPO / "evals" / "tasks"
CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"


def _eval(gate, tasks=("heldout_ppl", "capitals_mc"), limit=6, relative_to=None):
    import os

    paths = [TASKS / f"{t}.yaml" for t in tasks]
    names = [os.path.relpath(p, relative_to) if relative_to else str(p) for p in paths]
    return {"tasks": names, "limit": limit, "gate": gate}


@pytest.fixture
def gated(tmp_path, tiny_llama):
    def make(name, quantize, gate, subdir=None):
        d = tmp_path / subdir if subdir else tmp_path
        d.mkdir(exist_ok=True)
        return write_recipe(d / f"{name}.yaml", str(tiny_llama), name=name, quantize=quantize,
                            eval=_eval(gate, relative_to=d if subdir else None))
    return make


def test_second_recipe_reuses_the_baseline_and_gate_failure_is_cached(gated, cache_dir):
    store = Store(cache_dir)
    loose = [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 5.0}]
    a = gated("a", {"method": "fp8"}, loose)
    results = {r.name: r for r in build(resolved(a), store)}
    assert results["eval_baseline"].status == "BUILT" and results["gate"].status == "BUILT"
    verdict = json.loads((results["gate"].entry.out / "verdict.json").read_text())
    assert verdict["passed"] and verdict["rules"][0]["metric"] == "word_perplexity"
    # FP8 W8A8 has dynamic activation scales: its eval ran one document per pass, the BF16 baseline batched
    assert [verdict["settings"]["eval_batching"][k]["batch_size"] for k in ("baseline", "candidate")] == [8, 1]
    assert {(m["task"], m["metric"]) for m in verdict["reported"]} >= {("capitals_mc", "acc"), ("heldout_ppl", "bits_per_byte")}
    assert (results["gate"].entry.out / "junit.xml").read_text().count("<testcase") == 1

    strict = [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 0.0}]
    # the second recipe lives elsewhere and names the same task files by relative paths
    b = gated("b", {"method": "gptq", "group_size": 32,
                    "calibration": {"data": str(CALIB), "samples": 2, "max_seq_len": 64}}, strict, subdir="elsewhere")
    steps = {p.spec.name: p.status for p in plan(resolved(b), store)}
    assert steps["eval_baseline"] == "HIT"  # a different recipe on the same base model
    with pytest.raises(EvalGateError, match=r"heldout_ppl.word_perplexity: baseline .* candidate .* delta"):
        build(resolved(b), store)
    # the failing verdict is cached: a rerun fails again at once, from the cache
    steps = {p.spec.name: p.status for p in plan(resolved(b), store)}
    assert set(steps.values()) == {"HIT"}
    proc = forge_cli("build", str(b), cache=cache_dir)
    assert proc.returncode == 3
    assert "eval gate failed" in proc.stderr and "max_rel_increase 0" in proc.stderr and "95% CI" in proc.stderr
    assert "BUILT" not in proc.stdout
    # the registry records the failed build as rejected, with the reason, and nothing to promote
    assert "publish    rejected" in proc.stdout
    rejected = json.loads(forge_cli("registry", "ls", "--json", "--status", "rejected", check=0).stdout)
    assert len(rejected) == 1 and rejected[0]["tag"] is None and rejected[0]["image_digest"] is None
    assert rejected[0]["reason"].startswith("eval gate failed: heldout_ppl.word_perplexity")
    proc = forge_cli("registry", "promote", rejected[0]["id"][:12], "--to", "prod")
    assert proc.returncode == 2 and "is rejected: eval gate failed" in proc.stderr


@pytest.mark.parametrize("gate,message", [
    ([{"task": "nope", "metric": "acc", "max_abs_drop": 0.1}], "task 'nope' is not in eval.tasks"),
    ([{"task": "capitals_mc", "metric": "f1", "max_abs_drop": 0.1}], "task capitals_mc does not produce metric 'f1'"),
    ([{"task": "heldout_ppl", "metric": "word_perplexity", "max_abs_drop": 1.0}], "max_abs_drop fits metrics where higher is better"),
    ([{"task": "capitals_mc", "metric": "acc", "max_rel_increase": 0.1}], "max_rel_increase fits metrics where lower is better"),
])
def test_bad_gate_configs_exit_2_before_any_model(tmp_path, gate, message):
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(REPO / "tests" / "data" / "configs" / "smollm2-135m.json", d / "config.json")  # no weights at all
    write_recipe(tmp_path / "r.yaml", "./model", eval=_eval(gate))
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "eval.gate[0]" in proc.stderr


def test_unknown_task_file_and_registered_name(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(REPO / "tests" / "data" / "configs" / "smollm2-135m.json", d / "config.json")
    write_recipe(tmp_path / "r.yaml", "./model", eval={"tasks": ["evals/missing.yaml"]})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "eval.tasks[0]: task file" in proc.stderr and "does not exist" in proc.stderr
    write_recipe(tmp_path / "r.yaml", "./model", eval={"tasks": ["hellaswagg"]})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown task 'hellaswagg'; did you mean hellaswag" in proc.stderr


def test_task_yaml_data_files_resolved_and_string_form_fixed(tmp_path):
    from forge.evaluation.tasks import load_task

    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "t.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files: d.jsonl\n"
                                     "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                                     "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    spec = load_task("t.yaml", tmp_path, "r.yaml:1:1: eval.tasks[0]")
    assert spec.config["dataset_kwargs"]["data_files"] == {"test": str((tmp_path / "d.jsonl").resolve())}
    assert spec.metrics == {"word_perplexity": False}
    (tmp_path / "f.yaml").write_text("task: x\nprocess_docs: !function utils.process\n")
    from forge.core.errors import RecipeError

    with pytest.raises(RecipeError, match="cannot read the task YAML.*'!function'") as e:
        load_task("f.yaml", tmp_path, "r.yaml:1:1: eval.tasks[0]")
    assert "`!function` and other tags are not supported" in e.value.hint
