"""What a person (or a CI log) reads: forge's own lines on the terminal, library output in each step's log,
the gate table and a final summary; tables in a pipe printed plain and whole."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, write_recipe

TASKS = REPO / "evals" / "tasks"
CI = {"COLUMNS": "80"}   # what a CI runner's pipe gives: rich would lay tables out in 80 columns
BOX = re.compile("[┏┃━┡│└┘┐┌─]")


def _log_paths(stdout: str) -> dict[str, Path]:
    """The summary's 'step logs' lines: step name -> path."""
    return {m.group(1): Path(m.group(2)) for m in re.finditer(r"^\s+(?:step logs)?\s+(\w+)\s+(/\S+\.log)$", stdout, re.M)}


def test_build_log_is_forges_lines_and_each_steps_log_holds_the_library_output(tmp_path, tiny_llama, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "fp8"},
                          eval={"tasks": [str(TASKS / "heldout_ppl.yaml"), str(TASKS / "capitals_mc.yaml")], "limit": 4,
                                "gate": [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 5.0}]})
    proc = forge_cli("build", str(recipe), cache=cache_dir, env=CI, check=0)
    shown = proc.stdout + proc.stderr
    # no library output reached the terminal: no tqdm bar, no Python warning, no logging/loguru line
    for library in ("it/s]", "%|", "Warning", "Applying quantization config", "Quantizing:", "Running loglikelihood requests",
                    "Loading weights", "warnings.warn"):
        assert library not in shown, f"{library!r} leaked to the terminal:\n{shown}"
    assert not re.search(r"^(INFO|WARNING|DEBUG|ERROR)[: ]|\| (INFO|WARNING|DEBUG|SUCCESS)\s+\|", shown, re.M), shown
    assert proc.stderr == "", proc.stderr
    # forge's own lines: one result line per step, the gate's table although it passed, then the summary
    for step in ("resolve", "reference", "quantize", "eval_baseline", "eval_candidate", "gate"):
        assert re.search(rf"✓ {step}\s+BUILT\s+[0-9a-f]{{12}}", proc.stdout), proc.stdout
    assert "eval gate passed" in proc.stdout
    assert re.search(r"^heldout_ppl\.word_perplexity\s+max_rel_increase 5\s+\S+\s+\S+\s+.*\s4\s+pass\s*$",
                     proc.stdout, re.M), proc.stdout
    assert re.search(r"^capitals_mc\.acc\s+reported", proc.stdout, re.M)
    summary = proc.stdout[proc.stdout.index("\nsummary\n"):]
    assert re.search(r"^\s+status\s+gated", summary, re.M)
    assert re.search(r"^\s+eval gate\s+/\S+/out/\{summary\.md, verdict\.json, junit\.xml\}$", summary, re.M), summary
    assert re.search(r"^\s+quantize\s+/\S+/out/\{quantize-report\.md, quantize-report\.json\}$", summary, re.M)
    last = proc.stdout.rstrip().splitlines()[-1]
    assert re.fullmatch(r"done in \d+\.\ds: 6 built, 0 reused", last), last
    # the logs the summary names exist, in the store, and hold what the libraries wrote
    logs = _log_paths(summary)
    assert {"quantize", "eval_baseline", "eval_candidate"} <= set(logs), summary
    for path in logs.values():
        assert path.is_file() and path.parent == cache_dir / "logs"
    assert "Quantizing: 100%" in logs["quantize"].read_text()   # model_free_ptq's bar (FP8 streams shard by shard)
    assert "Running loglikelihood requests" in logs["eval_candidate"].read_text()
    # the logs are forge's too: a rebuild that reuses everything still names them, and prints only forge lines
    again = forge_cli("build", str(recipe), cache=cache_dir, env=CI, check=0)
    assert again.stdout.count(" HIT ") == 6 and "eval gate passed" in again.stdout
    assert _log_paths(again.stdout) == logs
    assert again.stdout.rstrip().splitlines()[-1].endswith("0 built, 6 reused")


def test_a_failing_step_prints_where_its_log_is(tmp_path, tiny_llama, cache_dir):
    # passes validate (enough bytes) but not the step (too few tokens): the step fails after it started
    calib = tmp_path / "calib.txt"
    calib.write_text(("lorem ipsum dolor sit amet " * 200)[:4 * 256])
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama),
                          quantize={"method": "gptq", "group_size": 32,
                                    "calibration": {"data": str(calib), "samples": 4, "max_seq_len": 256}})
    proc = forge_cli("build", str(recipe), cache=cache_dir, env=CI)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "tokenizes to" in proc.stderr
    log = Path(re.search(r"^log: (\S+)", proc.stderr, re.M).group(1))
    assert log.parent == cache_dir / "logs" and log.name.startswith("quantize-")
    assert "tokenizes to" in log.read_text() and "Traceback" in log.read_text()   # kept, with the traceback
    assert not list((cache_dir / "staging").iterdir())                              # and nothing half-done
    forge_cli("cache", "prune", "--all", cache=cache_dir, check=0)                 # prune takes the logs too
    assert not list((cache_dir / "logs").iterdir())


def test_fit_in_a_pipe_prints_every_column_whole(tmp_path):
    proc = forge_cli("fit", "--model", str(REPO / "tests" / "data" / "configs" / "llama-3-8b.json"), "--gpu", "all",
                     "--method", "awq", env=CI, check=0)
    assert "…" not in proc.stdout and not BOX.search(proc.stdout), proc.stdout
    assert "\x1b[" not in proc.stdout                                  # no colour codes unless forced
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("gpu "))
    assert header.split() == ["gpu", "fits", "TP", "weights", "KV", "headroom", "seqs", "ctx", "tok/s/seq", "tok/s",
                              "$/Mtok", "kernel"]
    assert len(header.rstrip()) > 80                                    # full width, not the pipe's 80 columns
    data = json.loads(forge_cli("fit", "--model", str(REPO / "tests" / "data" / "configs" / "llama-3-8b.json"),
                                "--gpu", "all", "--method", "awq", "--json", check=0).stdout)
    for fit in data["fits"]:   # every row is there with its full values, as --json gives them
        row = next(line for line in lines if line.startswith(fit["gpu"] + " "))
        assert row.split()[-1] == fit["scheme_mode"] and f"{fit['weights_gb']:.1f} GB" in row
    assert "seqs: concurrent sequences at max_model_len · ctx: max context at max_num_seqs" in proc.stdout


@pytest.fixture
def long_named_build(tmp_path, tiny_llama, cache_dir):
    name = "tiny-with-a-deliberately-long-recipe-name-that-no-80-column-table-would-show-whole"
    recipe = write_recipe(tmp_path / "long.yaml", str(tiny_llama), name=name)
    forge_cli("build", str(recipe), cache=cache_dir, env=CI, check=0)
    return name, recipe


def test_registry_cache_and_plan_tables_in_a_pipe_show_every_cell_whole(long_named_build, cache_dir):
    name, recipe = long_named_build
    records = json.loads(forge_cli("registry", "ls", "--json", check=0).stdout)
    assert [r["name"] for r in records] == [name]
    shown = forge_cli("registry", "ls", env=CI, check=0).stdout
    row = next(line for line in shown.splitlines() if name in line)
    assert row.split() == [records[0]["id"][:12], name, "built", "none", "CPU", "none", "none", "-", records[0]["created_at"]]
    cached = forge_cli("cache", "ls", env=CI, cache=cache_dir, check=0).stdout
    assert cached.count(name) == 2                                     # resolve and quantize rows
    planned = forge_cli("plan", str(recipe), env=CI, cache=cache_dir, check=0).stdout
    from forge.steps.graph import STEPS

    for spec in (s for s in STEPS if s.name in ("resolve", "quantize")):   # every cell of their rows, the long "what it does" too
        assert re.search(rf"^{spec.name}\s+HIT\s+[0-9a-f]{{16}}\s+.*{re.escape(spec.summary)}\s*$", planned, re.M), planned
    for out in (shown, cached, planned):
        assert "…" not in out and not BOX.search(out) and "\x1b[" not in out, out
    assert f"plan: {name}" in planned
    # the build itself, as JSON for a pipeline: stdout is only the JSON, forge's lines go to stderr
    again = forge_cli("build", str(recipe), "--json", env=CI, cache=cache_dir, check=0)
    built = json.loads(again.stdout)
    assert built["record"]["id"] == records[0]["id"] and built["record"]["name"] == name
    assert [(s["step"], s["status"]) for s in built["steps"]] == [("resolve", "HIT"), ("quantize", "HIT")]
    assert "✓ resolve" in again.stderr and "done in" in again.stderr
    # colour when forced (FORCE_COLOR, as CI systems set it), still plain and whole
    forced = forge_cli("registry", "ls", env={**CI, "FORCE_COLOR": "1"}, check=0).stdout
    assert "\x1b[" in forced and name in forced and "…" not in forced and not BOX.search(forced)


CAPTURE_SCRIPT = r'''
import logging, os, subprocess, sys, warnings
from pathlib import Path
from loguru import logger
from forge.core import steplog

logging.basicConfig()                      # a handler made before the step, on the original sys.stderr
log = Path(sys.argv[1])
try:
    with steplog.capture(log):
        subprocess.run(["sh", "-c", "echo from-a-subprocess; echo subprocess-stderr >&2"], check=True)
        os.write(2, b"raw-fd-write\n")
        print("python-print")
        warnings.warn("a-library-warning")
        logging.getLogger("lib").warning("a-logging-line")
        logger.info("a-loguru-line")
        steplog.terminal("stdout").write("forge-progress-line\n")
        raise RuntimeError("the-step-failed")
except RuntimeError as e:
    print("after:", steplog.log_of(e))
'''


def test_capture_sends_every_kind_of_library_output_to_the_log_and_forges_to_the_terminal(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "logs" / "step.log"
    proc = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT, str(log)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    for line in ("from-a-subprocess", "subprocess-stderr", "raw-fd-write", "python-print", "a-library-warning",
                 "a-logging-line", "a-loguru-line", "RuntimeError: the-step-failed"):
        assert line in text, f"{line!r} missing from the log:\n{text}"
        assert line not in proc.stdout + proc.stderr
    assert "forge-progress-line" not in text
    assert proc.stdout == f"forge-progress-line\nafter: {log}\n" and proc.stderr == ""
