"""TensorRT-LLM: ModelOpt quantization on CPU (tiny models), recipe rules, engine validation, the
trtllm-build / trtllm-serve contracts (stand-in executables that check their arguments), and the
compile step's refusal to build for a GPU it is not running on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, image_config, write_recipe

from forge.orchestrate.build import build
from conftest import resolved
from forge.store.local import Store

CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"
FAKE_BIN = REPO / "tests" / "fake_bin"


def _trt_recipe(tmp_path, model, method="fp8", gpu="H100-SXM", name="tiny-trt", **extra):
    q = {"method": method, "calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}}
    if method in ("awq", "w4a8_awq"):
        q["group_size"] = 32
    q.update(extra.pop("quantize", {}))
    extra.setdefault("scan", {"required": False})   # Trivy is not installed here; the scan has its own tests
    return write_recipe(tmp_path / f"{name}.yaml", str(model), name=name, quantize=q,
                        target={"gpu": gpu, "engine": "trtllm", "max_model_len": 256, "max_num_seqs": 4}, **extra)


# ---------------------------------------------------------------------- ModelOpt on CPU

@pytest.mark.parametrize("method,gpu,algo", [
    ("fp8", "H100-SXM", "FP8"),
    ("nvfp4", "B200", "NVFP4"),
    ("awq", "H100-SXM", "W4A16_AWQ"),
    ("w4a8_awq", "H100-SXM", "W4A8_AWQ"),
])
def test_modelopt_quantizes_exports_and_validates_on_cpu(tmp_path, tiny_llama, cache_dir, method, gpu, algo):
    recipe = _trt_recipe(tmp_path, tiny_llama, method, gpu)
    results = {r.name: r for r in build(resolved(recipe), Store(cache_dir))}
    result = results["quantize"]
    out, facts = result.entry.out, result.entry.manifest["facts"]
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == algo and hf["producer"]["name"] == "modelopt"
    assert "lm_head" in hf["quantization"]["exclude_modules"]
    assert facts["backend"] == "modelopt" and facts["checkpoint"]["quantized_layers"] == 14
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    assert (out / "tokenizer.json").exists() and (out / "quantize-report.md").exists()
    if method == "fp8":   # dequantized FP8 generates like BF16
        assert facts["verify"]["tokens"] == 16 and facts["verify"]["agreement"] >= 0.5
        assert "reference" in results
    else:   # packed 4-bit: not runnable here, so BF16's reference tokens are not recorded for nothing
        assert facts["bytes"] < facts["bf16_bytes"]
        assert facts["verify"] is None and "reference" not in results


def test_modelopt_fp8_kv_cache_and_a_qwen2_model(tmp_path, tiny_qwen2, cache_dir):
    recipe = _trt_recipe(tmp_path, tiny_qwen2, "fp8", quantize={"kv_cache": "fp8"})
    out = build(resolved(recipe), Store(cache_dir))[-1].entry.out
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["kv_cache_quant_algo"] == "FP8"


def test_a_checkpoint_that_does_not_match_the_recipe_is_refused(tmp_path, tiny_llama, cache_dir):
    from forge.backends.modelopt import validate_checkpoint
    from forge.recipe.schema import Quantize

    out = build(resolved(_trt_recipe(tmp_path, tiny_llama, "fp8")), Store(cache_dir))[-1].entry.out
    copy = tmp_path / "ckpt"
    shutil.copytree(out, copy)
    with pytest.raises(ValueError, match=r"quant_algo is 'FP8'; the recipe's nvfp4 means 'NVFP4'"):
        validate_checkpoint(copy, Quantize(method="nvfp4"))
    with pytest.raises(ValueError, match=r"kv_cache_quant_algo is None; the recipe asks 'FP8'"):
        validate_checkpoint(copy, Quantize(method="fp8", kv_cache="fp8"))
    hf = json.loads((copy / "hf_quant_config.json").read_text())
    hf["quantization"]["exclude_modules"] = []
    (copy / "hf_quant_config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"quantize.ignore 'lm_head' is not in exclude_modules"):
        validate_checkpoint(copy, Quantize(method="fp8"))


@pytest.mark.parametrize("quantize,target,message", [
    ({"method": "gptq", "group_size": 32}, {"engine": "trtllm"},
     "method gptq is not available with backend modelopt (chosen for engine trtllm)"),
    ({"method": "fp8", "backend": "llmcompressor"}, {"engine": "trtllm"},
     "trtllm cannot load compressed-tensors checkpoints (what backend llmcompressor writes; it loads bf16, modelopt, "
     "trtllm-checkpoint); set quantize.backend: modelopt (or auto)"),
    ({"method": "nvfp4", "backend": "llmcompressor"}, {"engine": "vllm"},
     "method nvfp4 is not available with backend llmcompressor; set quantize.backend: modelopt"),
    ({"method": "nvfp4"}, {"engine": "trtllm", "gpu": "H100-SXM"}, "nvfp4 is not legal for target H100-SXM/trtllm"),
    ({"method": "awq", "group_size": 48}, {"engine": "trtllm"}, "group_size 48 does not divide the input features"),
])
def test_bad_trtllm_recipes_exit_2_before_any_weight(tmp_path, tiny_llama, quantize, target, message):
    q = {"calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}, **quantize}
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize=q,
                          target={"gpu": "H100-SXM", "max_model_len": 256, "max_num_seqs": 4, **target})
    proc = forge_cli("validate", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_engine_mode_on_a_tensorrt_llm_release_without_trtllm_build_is_exit_2_naming_the_fix(tmp_path, tiny_llama):
    """TensorRT-LLM 1.2 removed trtllm-build and the TensorRT backend: engine mode is for bases <= 1.1 only."""
    recipe = _trt_recipe(tmp_path, tiny_llama, "fp8", container={"base": "trtllm-1.2-cu130"}, trtllm={"mode": "engine"})
    proc = forge_cli("validate", str(recipe))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the trtllm-build engine flow was removed after TensorRT-LLM 1.1" in proc.stderr
    assert "base trtllm-1.2-cu130 is 1.2.0. Use mode: pytorch, or a base with TensorRT-LLM <= 1.1" in proc.stderr
    proc = forge_cli("validate", str(_trt_recipe(tmp_path, tiny_llama, "fp8", container={"base": "trtllm-1.2-cu130"})))
    assert proc.returncode == 0, proc.stderr   # the PyTorch backend on the same base is fine


def test_trtllm_section_needs_the_trtllm_engine(tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), target={"gpu": "H100-SXM", "engine": "vllm"},
                          trtllm={"mode": "engine"})
    proc = forge_cli("validate", str(recipe))
    assert proc.returncode == 2 and "the trtllm section applies to target.engine: trtllm only" in proc.stderr


# ---------------------------------------------------------------------- engine config validation

def _engine_dir(tmp_path, *, cluster="H100-SXM", version="1.0.0", quant="FP8", kv=None, dtype="bfloat16", seq=256,
                batch=4, tokens=8192, tp=1) -> Path:
    d = tmp_path / f"engine-{cluster}-{version}-{quant}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "version": version,
        "pretrained_config": {"architecture": "LlamaForCausalLM", "dtype": dtype, "mapping": {"world_size": tp, "tp_size": tp},
                              "quantization": {"quant_algo": quant, "kv_cache_quant_algo": kv}},
        "build_config": {"max_batch_size": batch, "max_input_len": seq - 1, "max_seq_len": seq, "max_num_tokens": tokens,
                         "plugin_config": {"gemm_plugin": "auto"}, "auto_parallel_config": {"cluster_key": cluster}}}))
    return d


@pytest.fixture
def engine_recipe(tmp_path, tiny_llama):
    return resolved(_trt_recipe(tmp_path, tiny_llama, "fp8", container={"base": "trtllm-1.0-cu129"},
                                   trtllm={"mode": "engine"}))


@pytest.mark.parametrize("kwargs,message", [
    ({}, None),
    ({"cluster": "H100-PCIe"}, "engine built for GPU 'H100-PCIe' (build_config.auto_parallel_config.cluster_key); "
                               "the recipe targets H100-SXM (H100-SXM)"),
    ({"cluster": "L40S"}, "engine built for GPU 'L40S'"),
    ({"version": "0.21.0"}, "engine built with TensorRT-LLM 0.21.0; the base image trtllm-1.0-cu129 runs TensorRT-LLM 1.0.0"),
    ({"version": "1.0.0rc4"}, None),   # the same release
    ({"quant": "W4A16_AWQ"}, "engine quantization 'W4A16_AWQ'; the recipe's quantize.method fp8 means 'FP8'"),
    ({"kv": "FP8"}, "engine KV cache 'FP8'; the recipe's quantize.kv_cache auto means None"),
    ({"dtype": "float16"}, "engine dtype float16; the recipe's model.dtype is bfloat16"),
    ({"seq": 512}, "engine max_seq_len 512; the recipe asks 256"),
    ({"tp": 2}, "engine tp_size 2; the recipe's target.tensor_parallel is 1"),
])
def test_engine_validation_names_both_sides(tmp_path, engine_recipe, kwargs, message):
    from forge.engines.trtllm_build import EngineFacts, check_engine

    problems = check_engine(EngineFacts.read(_engine_dir(tmp_path, **kwargs)), engine_recipe.recipe, engine_recipe.base)
    if message is None:
        assert problems == []
    else:
        assert any(p.startswith(message) for p in problems), problems


def test_an_engine_dir_without_a_valid_config_is_refused(tmp_path):
    from forge.engines.trtllm_build import EngineFacts

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text('{"version": "1.0.0"}')
    with pytest.raises(ValueError, match="not a TensorRT-LLM engine config"):
        EngineFacts.read(tmp_path / "e")


# ---------------------------------------------------------------------- compile: only on the recipe's GPU

def _fake_env(tmp_path, gpus="NVIDIA H100 80GB HBM3, 9.0, 580.65.06", cluster="H100-SXM", **extra):
    bin_dir = tmp_path / "bin"   # the GPU tools' stand-ins only (no trivy: these recipes are not scanned here)
    bin_dir.mkdir(exist_ok=True)
    for tool in ("nvidia-smi", "trtllm-build"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(FAKE_BIN / tool)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI_GPUS": gpus, "FAKE_TRTLLM_CLUSTER_KEY": cluster,
            "FAKE_TRTLLM_LOG": str(tmp_path / "trtllm-build.log"), **extra}


@pytest.mark.parametrize("gpus,here", [
    ("", "no NVIDIA GPU"),
    ("NVIDIA L4, 8.9, 570.26", "this machine has NVIDIA L4"),
    ("NVIDIA H100 PCIe, 9.0, 580.65.06", "this machine has NVIDIA H100 PCIe"),
])
def test_compile_refuses_a_gpu_that_is_not_the_recipes(tmp_path, tiny_llama, gpus, here):
    recipe = _trt_recipe(tmp_path, tiny_llama, "fp8", container={"base": "trtllm-1.0-cu129"}, trtllm={"mode": "engine"})
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=_fake_env(tmp_path, gpus=gpus))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "the engine must be built on a H100-SXM" in proc.stderr and here in proc.stderr
    assert not (tmp_path / "trtllm-build.log").exists()   # trtllm-build never ran


def test_engine_mode_needs_a_legacy_release_and_a_base(tmp_path, tiny_llama):
    recipe = _trt_recipe(tmp_path, tiny_llama, "fp8", trtllm={"mode": "engine"})
    proc = forge_cli("validate", str(recipe))
    assert proc.returncode == 2 and "mode engine needs container.base" in proc.stderr


# ---------------------------------------------------------------------- stand-in GPU bases and packaging

def _serve_args(config: dict) -> list[str]:
    return config["config"]["Entrypoint"]


def test_engine_mode_builds_validates_and_packages_on_the_target_gpu(tmp_path, tiny_llama, standin_bases):
    recipe = _trt_recipe(tmp_path, tiny_llama, "fp8", container={"base": "trtllm-1.0-cu129"},
                         trtllm={"mode": "engine", "max_num_tokens": 4096})
    env = {**_fake_env(tmp_path), **standin_bases}
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entries = {e["step"]: tmp_path / "cache" / "steps" / e["key"] / "out"
               for e in json.loads(forge_cli("cache", "ls", "--json", cache=tmp_path / "cache", check=0).stdout)}
    # trtllm-build got the recipe's limits and ModelOpt's TensorRT-LLM checkpoint
    argv = json.loads((tmp_path / "trtllm-build.log").read_text().splitlines()[0])
    opts = dict(zip(argv[::2], argv[1:][::2]))
    assert opts["--max_batch_size"] == "4" and opts["--max_seq_len"] == "256" and opts["--max_input_len"] == "255"
    assert opts["--max_num_tokens"] == "4096" and opts["--checkpoint_dir"].endswith("trtllm-checkpoint")
    manifest = json.loads((entries["compile"].parent / "manifest.json").read_text())
    assert manifest["facts"]["engine"]["cluster_key"] == "H100-SXM" and manifest["facts"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert manifest["inputs"]["identity"]["gpus_here"] == [["NVIDIA H100 80GB HBM3", "9.0"]]
    # the image: engine in its own layer, trtllm-serve on the engine, CUDA pinned by forge over NGC's cuda>=9.0
    text = (entries["package"] / "Containerfile").read_text()
    assert "COPY --chown=10001:10001 engine/ /opt/forge/engine/" in text
    config = image_config(entries["package"])
    env_vars = dict(e.split("=", 1) for e in config["config"]["Env"])
    assert env_vars["NVIDIA_REQUIRE_CUDA"] == "cuda>=12.9" and env_vars["CUDA_VERSION"] == "12.9.1"
    labels = config["config"]["Labels"]
    assert labels["dev.forge.engine"] == "trtllm" and labels["dev.forge.driver.min"] == "575.51.03"
    assert labels["dev.forge.cuda.version"] == "12.9" and labels["com.nvidia.build.ref"] == "standin"
    serve = subprocess.run([str(FAKE_BIN / "trtllm-serve"), *_serve_args(config)[1:]], capture_output=True, text=True)
    assert serve.returncode == 0, serve.stderr
    parsed = json.loads(serve.stdout)
    assert parsed["backend"] == "tensorrt" and parsed["model"] == "/opt/forge/engine"
    assert parsed["tokenizer"] == "/opt/forge/model" and parsed["max_num_tokens"] == 4096
    transcript = json.loads((entries["package"] / "smoke-test.json").read_text())
    # the H100 is here (the stand-in nvidia-smi says so), but buildah cannot hand a container a GPU: not run, not failed
    assert transcript["passed"] is None and transcript["skipped"].startswith(
        "not smoke-tested: the H100-SXM is here, but buildah cannot give a container a GPU")

    # the same build on a machine whose GPU differs is refused before anything is reused or packaged
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache",
                     env={**env, "FAKE_NVIDIA_SMI_GPUS": "NVIDIA L40S, 8.9, 570.26"})
    assert proc.returncode == 5 and "this machine has NVIDIA L40S" in proc.stderr


def test_an_engine_built_for_another_gpu_never_reaches_packaging(tmp_path, tiny_llama, standin_bases):
    recipe = _trt_recipe(tmp_path, tiny_llama, "fp8", container={"base": "trtllm-1.0-cu129"}, trtllm={"mode": "engine"})
    env = {**_fake_env(tmp_path, cluster="H100-PCIe"), **standin_bases}   # trtllm-build ran on another part
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "engine built for GPU 'H100-PCIe'" in proc.stderr and "the recipe targets H100-SXM" in proc.stderr
    assert "package" not in proc.stdout


def test_pytorch_mode_packages_the_modelopt_checkpoint_for_trtllm_serve(tmp_path, tiny_llama, standin_bases):
    recipe = _trt_recipe(tmp_path, tiny_llama, "fp8", container={"base": "trtllm-1.2-cu130",   # the current release
                                                                 "weights": "baked"})   # its image holds the weights
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env={**standin_bases})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compile" not in proc.stdout   # nothing to compile: trtllm-serve loads the checkpoint
    entries = {e["step"]: tmp_path / "cache" / "steps" / e["key"] / "out"
               for e in json.loads(forge_cli("cache", "ls", "--json", cache=tmp_path / "cache", check=0).stdout)}
    config = image_config(entries["package"])
    parsed = json.loads(subprocess.run([str(FAKE_BIN / "trtllm-serve"), *_serve_args(config)[1:]],
                                       capture_output=True, text=True, check=True).stdout)
    assert parsed["backend"] == "pytorch" and parsed["model"] == "/opt/forge/model" and parsed["max_batch_size"] == 4
    from forge.image.builders import file_digests_in_layer
    from forge.steps.quantize import REPORTS

    image = json.loads((entries["package"] / "image.json").read_text())
    layer = file_digests_in_layer(entries["package"] / "oci", image["weights_layer"])
    expected = json.loads((entries["quantize"].parent / "manifest.json").read_text())["output"]["files"]
    assert {k.removeprefix("opt/forge/model/"): v for k, v in layer.items() if k.startswith("opt/forge/model/")} == \
        {rel: f["sha256"] for rel, f in expected.items() if rel not in REPORTS}
    assert "hf_quant_config.json" in {k.rsplit("/", 1)[-1] for k in layer}


def test_vllm_recipe_on_a_standin_ngc_base_pins_cuda_and_labels(tmp_path, tiny_llama, standin_bases):
    """The vLLM GPU base: forge's env and labels override what the base ships; the engine line is vLLM's."""
    recipe = write_recipe(tmp_path / "v.yaml", str(tiny_llama), name="tiny-vllm",
                          target={"gpu": "L40S", "engine": "vllm", "max_model_len": 256, "max_num_seqs": 4},
                          quantize={"method": "fp8"}, container={"base": "vllm-0.11-cu128", "weights": "baked"},
                          scan={"required": False})   # baked: the engine line and the labels are the image's own
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env={**standin_bases})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entries = {e["step"]: tmp_path / "cache" / "steps" / e["key"] / "out"
               for e in json.loads(forge_cli("cache", "ls", "--json", cache=tmp_path / "cache", check=0).stdout)}
    config = image_config(entries["package"])
    env_vars = dict(e.split("=", 1) for e in config["config"]["Env"])
    assert env_vars["NVIDIA_REQUIRE_CUDA"] == "cuda>=12.8" and env_vars["HF_HUB_OFFLINE"] == "1"
    assert config["config"]["Labels"]["dev.forge.driver.min"] == "570.26"
    assert config["config"]["Labels"]["org.opencontainers.image.title"] == "tiny-vllm"   # forge's, not the base's
    assert config["config"]["User"] == "10001:10001"
    assert _serve_args(config)[:3] == ["vllm", "serve", "/opt/forge/model"]
    assert "--quantization" in _serve_args(config) and "compressed-tensors" in _serve_args(config)
    # no L40S here: never failed, never passed, and the record and the report say why
    image = json.loads((entries["package"] / "image.json").read_text())
    assert image["smoke_test"] == {"passed": None, "skipped": "not smoke-tested: no L40S here", "answer": None,
                                   "health_seconds": None, "models": None}
    reg = tmp_path / "registry"
    proc = forge_cli("build", str(recipe), "--registry-dir", str(reg), "--report-dir", str(tmp_path / "report"),
                     cache=tmp_path / "cache", env={**standin_bases}, check=0)
    shown = json.loads(forge_cli("registry", "show", "tiny-vllm", "--json", "--registry-dir", str(reg), check=0).stdout)
    assert shown["smoke_test"] == "not smoke-tested: no L40S here"
    assert '<td id="smoke-test">not smoke-tested: no L40S here</td>' in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.parametrize("gpus,builder,why", [
    ("", "buildah", "not smoke-tested: no L4 here"),
    ("NVIDIA H100 80GB HBM3, 9.0, 580.65.06", "podman", "not smoke-tested: no L4 here"),   # another GPU model
    ("NVIDIA L4, 8.9, 570.26", "buildah", "not smoke-tested: the L4 is here, but buildah cannot give a container a GPU"),
    ("NVIDIA L4, 8.9, 570.26", "docker", None),                                            # it runs, with --gpus all
])
def test_a_gpu_image_is_smoke_tested_where_its_gpu_is(monkeypatch, gpus, builder, why):
    from forge.image.builders import GPU_FLAGS
    from forge.image.smoketest import why_not_here

    monkeypatch.setenv("PATH", f"{FAKE_BIN}:{os.environ['PATH']}")   # the stand-in nvidia-smi
    monkeypatch.setenv("FAKE_NVIDIA_SMI_GPUS", gpus)
    said = why_not_here("vllm", "L4", builder)
    assert said == why if why is None else said.startswith(why)
    assert why_not_here("cpu", "CPU", "buildah") is None   # the CPU image runs anywhere
    assert GPU_FLAGS == {"docker": ("--gpus", "all"), "podman": ("--device", "nvidia.com/gpu=all")}


def test_docker_builder_contract_on_a_standin_base(tmp_path, tiny_llama, standin_bases):
    """container.builder: docker — build with BuildKit and SOURCE_DATE_EPOCH, save, convert to an OCI layout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").symlink_to(FAKE_BIN / "docker")
    recipe = write_recipe(tmp_path / "v.yaml", str(tiny_llama), name="tiny-docker",
                          target={"gpu": "L40S", "engine": "vllm", "max_model_len": 256, "max_num_seqs": 4},
                          quantize={"method": "fp8"}, container={"base": "vllm-0.11-cu128", "builder": "docker"},
                          scan={"required": False})
    env = {**standin_bases, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DOCKER_LOG": str(tmp_path / "docker.log")}
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "docker.log").read_text().splitlines()]
    assert [c["argv"][0] for c in calls] == ["build", "save"]
    assert calls[0]["SOURCE_DATE_EPOCH"] == "0" and calls[0]["DOCKER_BUILDKIT"] == "1"
    entries = {e["step"]: tmp_path / "cache" / "steps" / e["key"] / "out"
               for e in json.loads(forge_cli("cache", "ls", "--json", cache=tmp_path / "cache", check=0).stdout)}
    image = json.loads((entries["package"] / "image.json").read_text())
    assert image["builder"] == "docker"
    config = image_config(entries["package"])
    assert dict(e.split("=", 1) for e in config["config"]["Env"])["NVIDIA_REQUIRE_CUDA"] == "cuda>=12.8"
    manifest = json.loads((entries["package"].parent / "manifest.json").read_text())
    assert manifest["inputs"]["identity"]["builder"] == "docker"   # a different builder is a different key


def test_builder_missing_or_incompatible(tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "v.yaml", str(tiny_llama), target={"gpu": "L40S", "engine": "vllm", "max_num_seqs": 4},
                          quantize={"method": "fp8"}, container={"base": "vllm-0.11-cu128", "builder": "podman"},
                          scan={"required": False})
    env = {"PATH": f"{Path(os.__file__).parents[2] / 'bin'}:/usr/bin:/bin"} if not shutil.which("podman") else {}
    if not shutil.which("podman"):
        proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env)
        assert proc.returncode == 5 and "no image builder on PATH (container.builder: podman" in proc.stderr
    cpu = write_recipe(tmp_path / "c.yaml", str(tiny_llama), container={"base": "cpu-python311", "builder": "docker"})
    proc = forge_cli("validate", str(cpu))
    assert proc.returncode == 2 and "is built by forge with buildah; builder docker cannot use it" in proc.stderr
