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

from conftest import REPO, forge_cli, write_recipe

from forge.build import build, plan
from forge.recipe.load import load_recipe
from forge.store import Store

CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"
FAKE_BIN = REPO / "tests" / "fake_bin"


def _trt_recipe(tmp_path, model, method="fp8", gpu="H100-SXM", name="tiny-trt", **extra):
    q = {"method": method, "calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}}
    if method in ("awq", "w4a8_awq"):
        q["group_size"] = 32
    q.update(extra.pop("quantize", {}))
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
    result = {r.name: r for r in build(load_recipe(recipe), Store(cache_dir))}["quantize"]
    out, facts = result.entry.out, result.entry.manifest["facts"]
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == algo and hf["producer"]["name"] == "modelopt"
    assert "lm_head" in hf["quantization"]["exclude_modules"]
    assert facts["backend"] == "modelopt" and facts["checkpoint"]["quantized_layers"] == 14
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    assert (out / "tokenizer.json").exists() and (out / "quantize-report.md").exists()
    if method == "fp8":   # dequantized FP8 generates like BF16
        assert facts["verify"]["tokens"] == 16 and facts["verify"]["agreement"] >= 0.5
    else:
        assert facts["bytes"] < facts["bf16_bytes"]


def test_modelopt_fp8_kv_cache_and_a_qwen2_model(tmp_path, tiny_qwen2, cache_dir):
    recipe = _trt_recipe(tmp_path, tiny_qwen2, "fp8", quantize={"kv_cache": "fp8"})
    out = build(load_recipe(recipe), Store(cache_dir))[-1].entry.out
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["kv_cache_quant_algo"] == "FP8"


def test_a_checkpoint_that_does_not_match_the_recipe_is_refused(tmp_path, tiny_llama, cache_dir):
    from forge.backends.modelopt import validate_checkpoint
    from forge.recipe.schema import Quantize

    out = build(load_recipe(_trt_recipe(tmp_path, tiny_llama, "fp8")), Store(cache_dir))[-1].entry.out
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
     "TensorRT-LLM serves ModelOpt checkpoints; set quantize.backend: modelopt"),
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


def test_trtllm_section_needs_the_trtllm_engine(tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), target={"gpu": "H100-SXM", "engine": "vllm"},
                          trtllm={"mode": "engine"})
    proc = forge_cli("validate", str(recipe))
    assert proc.returncode == 2 and "the trtllm section applies to target.engine: trtllm only" in proc.stderr
