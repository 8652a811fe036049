"""eval.candidate: image — what is refused at validate, how the graph is wired, and failing closed.

The end-to-end run (the demo gating json_extract through its own image) is in tests/test_e2e_demo.py, on the
demo's build."""
from __future__ import annotations

import http.server
import json
import math
import threading

import pytest

from conftest import REPO, forge_cli, resolved, write_recipe

TASKS = REPO / "evals" / "tasks"


def _image_recipe(tmp_path, model, *, tasks=("json_extract",), name="tiny", method="none", **sections):
    return write_recipe(tmp_path / f"{name}.yaml", str(model), name=name, quantize={"method": method},
                        eval={"candidate": "image", "tasks": [str(TASKS / f"{t}.yaml") for t in tasks],
                              "gate": [{"task": "json_extract", "metric": "exact_match", "max_abs_drop": 0.1}]},
                        container={"base": "cpu-python311"}, scan={"required": False}, **sections)


def test_validate_refuses_loglikelihood_tasks_through_a_transformers_serve_image(tiny_llama, tmp_path):
    recipe = _image_recipe(tmp_path, tiny_llama, tasks=("heldout_ppl", "capitals_mc", "json_extract"))
    proc = forge_cli("validate", str(recipe), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "eval.tasks[0]: heldout_ppl (loglikelihood_rolling: loglikelihood_rolling requests) cannot be " \
           "evaluated through the cpu image: transformers serve returns no prompt logprobs" in proc.stderr
    assert "eval.tasks[1]: capitals_mc (multiple_choice: loglikelihood requests)" in proc.stderr
    assert "json_extract (" not in proc.stderr and "or use eval.candidate: checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_accepts_generation_tasks_and_refuses_image_eval_without_an_image(tiny_llama, tmp_path):
    forge_cli("validate", str(_image_recipe(tmp_path, tiny_llama)), cwd=tmp_path, check=0)
    doc = json.loads(_image_recipe(tmp_path, tiny_llama).read_text())
    del doc["container"]
    (tmp_path / "noimage.yaml").write_text(json.dumps(doc))
    proc = forge_cli("validate", str(tmp_path / "noimage.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "eval.candidate: image: the candidate is evaluated through the built image, " \
                                   "but the recipe has no container section" in proc.stderr
    doc = json.loads(_image_recipe(tmp_path, tiny_llama).read_text())
    doc["eval"]["backend"] = "hf"
    (tmp_path / "backend.yaml").write_text(json.dumps(doc))
    proc = forge_cli("validate", str(tmp_path / "backend.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "eval.backend: hf: with candidate: image both sides are evaluated through the " \
                                   "cpu engine's server" in proc.stderr


def test_the_engine_declares_what_its_server_answers():
    from forge.engines import get

    cpu, vllm = get("cpu").eval_api, get("vllm").eval_api
    assert cpu.model == vllm.model == "local-completions" and cpu.route == "/v1/completions"
    assert cpu.requests == {"generate_until"} and "no prompt logprobs" in cpu.refuses
    assert {"generate_until", "loglikelihood", "loglikelihood_rolling"} <= vllm.requests   # echo + logprobs
    assert get("tgi").eval_api is None   # not declared: refused at validate, never guessed


def test_graph_evaluates_the_image_after_it_is_built(tiny_llama, tmp_path):
    from forge.steps.graph import active_steps

    steps = active_steps(resolved(_image_recipe(tmp_path, tiny_llama)))
    order = [s.name for s in steps]
    deps = {s.name: set(s.depends) for s in steps}
    assert deps["eval_candidate"] == {"package", "quantize"} and "gate" not in deps["package"]
    assert deps["eval_baseline"] == {"resolve", "base_image"} and deps["gate"] == {"eval_baseline", "eval_candidate"}
    assert order.index("package") < order.index("eval_candidate") < order.index("gate") < order.index("scan") or \
        order.index("package") < order.index("eval_candidate") < order.index("gate")
    # the checkpoint path is as it was: the candidate after quantize, the image after the gate
    plain = write_recipe(tmp_path / "plain.yaml", str(tiny_llama), eval={"tasks": [str(TASKS / "json_extract.yaml")]},
                         container={"base": "cpu-python311"})
    deps = {s.name: set(s.depends) for s in active_steps(resolved(plain))}
    assert deps["eval_candidate"] == {"quantize"} and "gate" in deps["package"] and deps["eval_baseline"] == {"resolve"}


def test_the_served_baseline_is_shared_and_keyed_by_engine_and_base(tiny_llama, tmp_path):
    from forge.steps.evaluate import BASELINE, CANDIDATE

    a = resolved(_image_recipe(tmp_path, tiny_llama, name="a", method="none"))
    b = resolved(_image_recipe(tmp_path, tiny_llama, name="b", method="fp8"))
    assert BASELINE.config(a) == BASELINE.config(b)   # no recipe name, no quantization: one baseline per model + base
    served = BASELINE.config(a)["served"]
    assert served["through"] == "base image" and served["base"] == "cpu-python311" and served["engine"] == "cpu"
    assert served["command"][:3] == ["/opt/venv/bin/transformers", "serve", "bf16-baseline"]
    assert CANDIDATE.config(a)["served"] == {"through": "image", "engine": "cpu", "api": "local-completions",
                                             "route": "/v1/completions"}
    plain = resolved(write_recipe(tmp_path / "plain.yaml", str(tiny_llama),
                                  eval={"tasks": [str(TASKS / "json_extract.yaml")]}))
    assert "served" not in BASELINE.config(plain)   # the checkpoint path's keys are unchanged


# ------------------------------------------------------------------ fail closed


def _results(samples, metrics):
    return {"samples": {"json_extract": samples}, "n-samples": {"json_extract": {"effective": 3}},
            "results": {"json_extract": {f"{k},json-object": v for k, v in metrics.items()}}}


@pytest.mark.parametrize("res, said", [
    (_results([], {"exact_match": 0.5}), "json_extract: 0 document(s) scored of 3"),
    (_results([{}] * 2, {"exact_match": 0.5}), "json_extract: 2 document(s) scored of 3"),
    (_results([{}] * 3, {"exact_match": math.nan}), "metrics not finite numbers"),
    (_results([{}] * 3, {"exact_match": None}), "metrics not finite numbers"),
    (_results([{}] * 3, {}), "json_extract: no metrics"),
], ids=["no-samples", "missing-samples", "nan", "null", "no-metrics"])
def test_an_empty_or_non_finite_result_is_refused(res, said):
    from forge.core.errors import ToolError
    from forge.evaluation.tasks import load_task
    from forge.steps.evaluate_image import check_results

    task = load_task(str(TASKS / "json_extract.yaml"), REPO, "eval.tasks[0]")
    with pytest.raises(ToolError, match="produced no usable result") as e:
        check_results(res, [task], None, "localhost/forge/x (local-completions)")
    assert said in e.value.message and e.value.exit_code == 5


def test_an_endpoint_that_errors_fails_the_eval(tiny_llama, tmp_path):
    """A server that is up but answers the eval's requests with HTTP 500: lm-eval's API model retries, then the
    step fails (exit 5) with the server's log, never a result."""
    from forge.core.errors import ToolError
    from forge.engines import get
    from forge.evaluation.tasks import load_task
    from forge.image.smoketest import Served
    from forge.steps.evaluate_image import api_evaluate

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "model exploded"}')

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    (tmp_path / "server.log").write_text("RuntimeError: model exploded\n")
    served = Served(f"http://127.0.0.1:{httpd.server_port}", {"model": "tiny"}, lambda: None, tmp_path / "server.log")
    task = load_task(str(TASKS / "json_extract.yaml"), REPO, "eval.tasks[0]")
    try:
        with pytest.raises(ToolError) as e:
            api_evaluate(served, "tiny", [task], get("cpu").eval_api, tokenizer=tiny_llama, limit=2, seed=1,
                         max_length=256)
    finally:
        httpd.shutdown()
    assert f"lm-eval (local-completions) against {served.url}/v1/completions failed: HTTPError: 500" \
        in e.value.message, e.value.message
    assert "RuntimeError: model exploded" in e.value.message and e.value.exit_code == 5   # the server log's tail


def test_the_record_tells_a_gate_through_this_image_from_one_through_another():
    from forge.registry.evidence import proxy_reason, through_image

    on = {"engine": "transformers", "backend": "local-completions", "device": "cpu", "gpus": [],
          "through": {"kind": "image", "engine": "cpu", "image": "sha256:" + "a" * 64}}
    assert through_image(on, "sha256:" + "a" * 64) and proxy_reason(on, "cpu", "CPU", image="sha256:" + "a" * 64) is None
    other = proxy_reason(on, "cpu", "CPU", image="sha256:" + "b" * 64)
    assert not through_image(on, "sha256:" + "b" * 64) and other.startswith("evaluated through the image sha256:aaa")
    checkpoint = {k: v for k, v in on.items() if k != "through"}   # the checkpoint path: no image to compare
    assert not through_image(checkpoint, "sha256:" + "a" * 64)
    assert proxy_reason(checkpoint, "cpu", "CPU", image="sha256:" + "a" * 64) is None
