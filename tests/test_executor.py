"""The executor seam: the same graph through the in-process executor and through one worker process per step
(a serialized request in, JSON lines out) gives the same keys and the same output digests."""
from __future__ import annotations

import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.core import errors
from forge.orchestrate.build import execute_one as execute
from forge.executors import error_from_json, error_to_json
from forge.executors.process import ProcessExecutor
from conftest import resolved
from forge.steps.graph import STEPS
from forge.store.local import Store

TASKS = REPO / "evals" / "tasks"
GRAPH = ["resolve", "reference", "quantize", "eval_baseline", "eval_candidate", "gate"]


def _recipe(tmp_path, tiny_llama, name="tiny", max_rel_increase=5.0):
    return write_recipe(tmp_path / f"{name}.yaml", str(tiny_llama), name=name, quantize={"method": "fp8"},
                        eval={"tasks": [str(TASKS / "heldout_ppl.yaml"), str(TASKS / "capitals_mc.yaml")], "limit": 6,
                              "gate": [{"task": "heldout_ppl", "metric": "word_perplexity",
                                        "max_rel_increase": max_rel_increase}]})


def test_process_executor_builds_the_same_keys_and_digests_as_the_local_one(tmp_path, tiny_llama):
    recipe = _recipe(tmp_path, tiny_llama)
    local = execute(resolved(recipe), Store(tmp_path / "local-cache"))
    started, messages = [], []

    def on_start(label, spec, key):
        started.append((spec.name, key))
        return lambda message, **kw: messages.append((spec.name, message))

    executor = ProcessExecutor(max_parallel=2)
    remote = execute(resolved(recipe), Store(tmp_path / "process-cache"), executor=executor, on_start=on_start)

    assert [r.name for r in local.results] == [r.name for r in remote.results] == GRAPH
    assert local.passed and remote.passed
    assert {r.name: r.status for r in remote.results} == dict.fromkeys(GRAPH, "BUILT")
    # keys computed in the workers, from what they probed there, equal the in-process ones; so do the outputs
    assert [(r.name, r.key, r.output_digest) for r in remote.results] == \
           [(r.name, r.key, r.output_digest) for r in local.results]
    volatile = {s.name: set(s.volatile) for s in STEPS}
    for lr, rr in zip(local.results, remote.results):   # every file but the build reports (timings)
        files = [{f: v for f, v in r.entry.manifest["output"]["files"].items() if f not in volatile[r.name]}
                 for r in (lr, rr)]
        assert files[0] == files[1], lr.name
    # progress flowed back from the workers; independent steps (quantize, eval_baseline) ran side by side
    assert [s for s, _ in started] and {s for s, _ in started} == set(GRAPH)
    assert dict(started) == {r.name: r.key for r in remote.results}
    assert ("quantize", "hashing outputs") in messages
    assert executor.peak == 2

    # a second build through workers reuses every committed entry
    again = execute(resolved(recipe), Store(tmp_path / "process-cache"), executor=ProcessExecutor())
    assert {r.name: r.status for r in again.results} == dict.fromkeys(GRAPH, "HIT")

    # a failed gate in a worker is the build's outcome (the verdict committed first), not a crash
    strict = _recipe(tmp_path, tiny_llama, name="strict", max_rel_increase=0.0)
    outcome = execute(resolved(strict), Store(tmp_path / "process-cache"), executor=ProcessExecutor())
    assert isinstance(outcome.stopped_by, errors.EvalGateError)
    assert "heldout_ppl.word_perplexity" in outcome.stopped_by.message
    assert {r.name: r.status for r in outcome.results} == {**dict.fromkeys(GRAPH, "HIT"), "gate": "BUILT"}


@pytest.mark.parametrize("error", [
    errors.ToolError("buildah failed", hint="install it"),
    errors.RecipeError(["r.yaml:3:5: quantize.method: bad"], hint="see forge schema"),
    errors.EvalGateError("eval gate failed"),
])
def test_a_workers_error_keeps_its_class_exit_code_and_hint(error):
    back = error_from_json(error_to_json(error), "quantize")
    assert type(back) is type(error) and back.exit_code == error.exit_code
    assert (back.message, back.hint) == (error.message, error.hint)


def test_an_unexpected_worker_failure_is_exit_1_with_the_step_named():
    back = error_from_json(error_to_json(ZeroDivisionError("division by zero")), "gate")
    assert back.exit_code == errors.ExitCode.UNEXPECTED and "step gate failed in its worker" in back.message


def test_a_worker_the_kernel_kills_is_reported_as_such_with_its_peak_rss(tmp_path, tiny_llama, monkeypatch):
    """A step's worker killed by SIGKILL (what the kernel's OOM killer sends) is exit 5 naming the step, the kernel
    and the worker's peak RSS, not an internal error; nothing of the step is committed. The test hook stops the
    worker after it wrote its output (SIGSTOP), and the test kills it."""
    import os
    import signal
    import threading
    import time

    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama))   # resolve only: no quantize section
    root = tmp_path / "cache"
    monkeypatch.setenv("FORGE_TEST_STOP_BEFORE_COMMIT", "resolve")
    caught = []
    thread = threading.Thread(target=lambda: caught.append(_raised(lambda: execute(   # the store's memo: this thread's
        resolved(recipe), Store(root), executor=ProcessExecutor()))))
    thread.start()
    marker, deadline = root / "resolve.stopped", time.time() + 120
    while not marker.exists():
        assert time.time() < deadline and thread.is_alive(), caught
        time.sleep(0.1)
    time.sleep(0.2)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    thread.join(timeout=60)
    (error,) = caught
    assert isinstance(error, errors.ResourceError) and error.exit_code == 5, error
    assert "step resolve was killed by the kernel (out of memory?) at" in error.message
    assert "GB peak RSS; nothing of it was committed" in error.message and "forge fit" in error.hint
    assert Store(root).entries() == []
    monkeypatch.delenv("FORGE_TEST_STOP_BEFORE_COMMIT")
    proc = forge_cli("build", str(recipe), "--executor", "process", cache=root, check=0)   # the CLI's name for it
    assert "resolve    BUILT" in proc.stdout


def _raised(run):
    try:
        run()
    except Exception as e:   # noqa: BLE001 -- the test inspects it
        return e
    return None
