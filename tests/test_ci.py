"""forge as a CI step: GitHub Actions annotations at the recipe's file:line, the job summary, and the shipped
action and example workflows checked by actionlint (with a negative control that proves it checks the action)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.cli import ci
from forge.evaluation.gatestats import judge_rule
from conftest import resolved
from forge.image.scanpolicy import judge
from forge.image.trivy import parse_report

BAD_GPU = (REPO / "tests" / "bad_recipes" / "unknown-gpu" / "recipe.yaml").read_text()


def _gha(tmp_path: Path) -> dict:
    return {"PYTHONPATH": str(REPO), "GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
            "GITHUB_WORKSPACE": str(tmp_path)}


@pytest.mark.parametrize("command", ["validate", "build"])
def test_ci_annotates_a_bad_recipe_at_its_file_and_line(tmp_path, command):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "bad.yaml").write_text(BAD_GPU)
    proc = forge_cli(command, "recipes/bad.yaml", "--ci", cwd=tmp_path, env=_gha(tmp_path))
    assert proc.returncode == 2
    # the unknown GPU is on line 4, column 10 of the recipe (tests/bad_recipes/unknown-gpu/expected.txt)
    want = ("::error file=recipes/bad.yaml,line=4,col=10,title=forge%3A invalid recipe::"
            "target.gpu: unknown GPU 'H100-SMX'. Did you mean 'H100-SXM'?")
    assert any(line.startswith(want) for line in proc.stdout.splitlines()), proc.stdout
    assert "recipes/bad.yaml:4:10: target.gpu: unknown GPU" in proc.stderr      # the plain message is unchanged
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("## ❌ forge: invalid recipe") and "recipes/bad.yaml:4:10: target.gpu" in summary


def test_absolute_recipe_paths_are_made_relative_to_the_workspace(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_GPU)
    proc = forge_cli("validate", str(tmp_path / "bad.yaml"), cwd=REPO, env={**_gha(tmp_path), "FORGE_CI": "1"})
    assert proc.returncode == 2 and "::error file=bad.yaml,line=4,col=10," in proc.stdout


@pytest.mark.parametrize("env,args", [({"GITHUB_ACTIONS": "true"}, []), ({}, ["--ci"])], ids=["no --ci", "not on GitHub"])
def test_no_annotation_without_ci_mode_on_github_actions(tmp_path, env, args):
    (tmp_path / "bad.yaml").write_text(BAD_GPU)
    proc = forge_cli("validate", "bad.yaml", *args, cwd=tmp_path, env={"GITHUB_STEP_SUMMARY": str(tmp_path / "s.md"),
                                                                        "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 2 and "::error" not in proc.stdout + proc.stderr
    assert not (tmp_path / "s.md").exists()


def test_unlocated_problem_and_other_errors_are_annotated_too(tmp_path):
    proc = forge_cli("validate", "missing.yaml", "--ci", cwd=tmp_path, env=_gha(tmp_path))
    assert proc.returncode == 2
    assert "::error file=missing.yaml,title=forge%3A invalid recipe::recipe file not found" in proc.stdout


def test_workflow_command_escaping():
    line = ci.annotation("error", "50% worse\nsee: a, b", file="r.yaml", line=3, title="gate: x, y")
    assert line == "::error file=r.yaml,line=3,title=gate%3A x%2C y::50%25 worse%0Asee: a, b"


# ---------------------------------------------------------------------- gate and scan failures, from real verdicts


def _gated_recipe(tmp_path: Path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((REPO / "tests" / "data" / "configs" / "smollm2-135m.json").read_text())
    tasks = [str(REPO / "evals" / "tasks" / f"{t}.yaml") for t in ("heldout_ppl", "capitals_mc")]
    return resolved(write_recipe(tmp_path / "r.yaml", "./model", eval={"tasks": tasks, "gate": [
        {"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 0.05},
        {"task": "capitals_mc", "metric": "acc", "max_abs_drop": 0.05}]}, container={"base": "cpu-python311"},
        scan={"fail_on": ["CRITICAL", "HIGH"]}))


TRIVY_REPORT = {"SchemaVersion": 2, "ArtifactName": "oci", "ArtifactType": "container_image", "Results": [{
    "Target": "debian 12.8", "Class": "os-pkgs", "Type": "debian", "Vulnerabilities": [
        {"VulnerabilityID": "CVE-2026-1111", "PkgName": "openssl", "InstalledVersion": "3.0.15-1",
         "FixedVersion": "3.0.16-1", "Status": "fixed", "Severity": "HIGH", "Title": "openssl: heap overflow"},
        {"VulnerabilityID": "CVE-2026-2222", "PkgName": "zlib1g", "InstalledVersion": "1.2.13", "Status": "affected",
         "Severity": "CRITICAL", "Title": "zlib: no fix yet"}]}]}


def test_gate_and_scan_failures_are_errors_naming_the_metric_and_the_finding(tmp_path, monkeypatch, capsys):
    loaded = _gated_recipe(tmp_path)
    rng = np.random.default_rng(0)
    acc_base = (rng.random(400) < 0.8).astype(float)
    acc_cand = np.where(rng.random(400) < 0.25, 0.0, acc_base)            # ~20 points worse: beyond 0.05
    ppl = np.stack([-rng.uniform(2, 3, 400) * 50, np.full(400, 50.0)], axis=-1)
    rules = [judge_rule("heldout_ppl", "word_perplexity", "max_rel_increase", 0.05, ppl, ppl),
             judge_rule("capitals_mc", "acc", "max_abs_drop", 0.05, acc_base, acc_cand)]
    verdict = judge(parse_report(json.dumps(TRIVY_REPORT)), fail_on=("CRITICAL", "HIGH"), ignore_unfixed=True)
    assert [r.passed for r in rules] == [True, False] and not verdict.passed
    data = {"build": {"name": "tiny", "status": "rejected", "reason": "eval gate failed", "method": "none", "gpu": "CPU",
                      "engine": "cpu", "recipe_path": "r.yaml", "image_digest": None},
            "gate": {"rules": [r.to_json() for r in rules]},
            "scan": {"status": "scanned", "passed": False, "summary": verdict.summary,
                     "blocking": [f.__dict__ for f in verdict.blocking]},
            "steps": [{"step": "gate", "status": "BUILT", "key": "ab" * 32, "built_seconds": 1.5}]}
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    monkeypatch.setitem(ci._state, "ci", True)
    ci.on_build(loaded, data, tmp_path / "report.html", {"gate": "### ❌ Eval gate failed\n"})
    lines = capsys.readouterr().out.splitlines()
    text = loaded.path.read_text().splitlines()
    gate = [x for x in lines if "title=eval gate failed%3A capitals_mc.acc::" in x]
    assert len(gate) == 1 and gate[0].startswith("::error file=r.yaml,line=")
    rule_line = text.index('        "task": "capitals_mc",')   # 0-based: the line after the rule's "{"
    assert gate[0].startswith(f"::error file=r.yaml,line={rule_line},col=7,")
    assert "eval.gate[1]: capitals_mc.acc: baseline" in gate[0] and "beyond" in gate[0]
    assert not any("heldout_ppl.word_perplexity::" in x and x.startswith("::error") for x in lines)
    scan = [x for x in lines if "scan gate failed%3A " in x]
    assert len(scan) == 1 and "CVE-2026-1111 (HIGH) in openssl 3.0.15-1; fixed in 3.0.16-1" in scan[0]  # unfixed dropped
    fail_on = next(i for i, x in enumerate(text) if '"fail_on"' in x) + 1
    assert scan[0].startswith(f"::error file=r.yaml,line={fail_on},")
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("## ❌ forge build `tiny`: rejected") and "### ❌ Eval gate failed" in summary
    assert "| gate | BUILT | `abababababab` | 1.5 s |" in summary and "report.html" in summary


# ---------------------------------------------------------------------- the action and the examples


def _actionlint() -> str:
    exe = shutil.which("actionlint") or str(Path(sys.executable).with_name("actionlint"))
    assert Path(exe).is_file(), "actionlint is not installed: pip install -e '.[test]' installs it"
    return exe


def _project(tmp_path: Path, workflow: str) -> Path:
    """A repository holding forge's action at its root and the example workflow, as a user's would."""
    root = tmp_path / "repo"
    (root / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(REPO / "action.yml", root / "action.yml")
    (root / ".github" / "workflows" / "forge.yml").write_text(workflow)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def test_actionlint_passes_the_action_and_the_example_workflow(tmp_path):
    workflow = (REPO / "examples" / "ci" / "github" / "forge-matrix.yml").read_text()
    root = _project(tmp_path, workflow)
    proc = subprocess.run([_actionlint(), "-no-color"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # negative control: the same run catches a misspelt input of forge's action (so the action was read)
    (root / ".github" / "workflows" / "forge.yml").write_text(workflow.replace("recipe: ${{ matrix.recipe }}",
                                                                                "recipes: ${{ matrix.recipe }}"))
    proc = subprocess.run([_actionlint(), "-no-color"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 1 and 'input "recipes" is not defined in action "forge build"' in proc.stdout
    assert 'missing input "recipe" which is required' in proc.stdout


def test_gitlab_example_runs_forge_with_junit_reports():
    from ruamel.yaml import YAML

    doc = YAML(typ="safe").load((REPO / "examples" / "ci" / "gitlab" / ".gitlab-ci.yml").read_text())
    job = doc["forge-build"]
    script = "\n".join(job["script"])
    assert 'forge build "$RECIPE" --ci --report-dir "$REPORT_DIR"' in script
    assert job["artifacts"]["when"] == "always"        # a failed gate's report and JUnit are kept too
    assert job["artifacts"]["reports"]["junit"] == "forge-report/*/junit.xml"
    assert 'REPORT_DIR="forge-report/' in script
    assert all(Path(REPO / r).is_file() for r in job["parallel"]["matrix"][0]["RECIPE"])
