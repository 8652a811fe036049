"""Capacity planning: rules of thumb, KV cache arithmetic, TP sizing, the shared capability table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import forge_cli, write_recipe

from forge.gpu import capability, fit
from forge.gpu.catalog import gpu, gpus
from forge.model.shape import from_config_file

CONFIGS = Path(__file__).parent / "data" / "configs"


def shape(name):
    return from_config_file(CONFIGS / f"{name}.json")


def within(value, target, tol=0.15):
    return abs(value - target) <= tol * target


@pytest.mark.parametrize("model,gb", [("llama-2-7b", 14), ("llama-2-13b", 26), ("llama-2-70b", 140)])
def test_fp16_weights_rule_of_thumb(model, gb):
    assert within(fit.weight_bytes(shape(model), fit.Plan()) / 1e9, gb)


def test_70b_fp16_needs_two_80gb_gpus():
    r = fit.fit(shape("llama-2-70b"), gpu("A100-80GB"), fit.Plan(max_model_len=4096, max_num_seqs=1))
    assert not r.fits and r.tp_needed == 2
    r2 = fit.fit(shape("llama-2-70b"), gpu("A100-80GB"), fit.Plan(max_model_len=4096, max_num_seqs=1, tensor_parallel=2))
    assert r2.fits


def test_70b_4bit_fits_one_80gb_gpu():
    plan = fit.Plan(method="awq", group_size=128, max_model_len=4096, max_num_seqs=8)
    w = fit.weight_bytes(shape("llama-2-70b"), plan) / 1e9
    assert 35 * 0.85 <= w <= 40 * 1.15
    assert fit.fit(shape("llama-2-70b"), gpu("H100-SXM"), plan).fits


def test_llama3_8b_awq_weights():
    assert within(fit.weight_bytes(shape("llama-3-8b"), fit.Plan(method="awq", group_size=128)) / 1e9, 5.5)


def test_kv_cache_per_token_llama3_8b_by_hand():
    by_hand = 2 * 32 * 8 * 128 * 2  # K and V × layers × KV heads × head_dim × BF16 bytes
    assert by_hand == 128 * 1024
    assert shape("llama-3-8b").kv_bytes_per_token() == by_hand
    assert shape("llama-3-8b").kv_bytes_per_token(1) == by_hand // 2  # FP8 KV halves it


def test_kv_totals_and_max_sequences():
    s, g = shape("llama-3-8b"), gpu("L4")
    r = fit.fit(s, g, fit.Plan(method="awq", group_size=128, max_model_len=8192, max_num_seqs=4))
    assert r.kv_cache_gb == pytest.approx(128 * 1024 * 8192 * 4 / 1e9)
    free = g.memory_gib * fit.GIB * 0.9 - fit.weight_bytes(s, fit.Plan(method="awq", group_size=128)) - fit.OVERHEAD_GIB * fit.GIB
    assert r.max_seqs_at_max_model_len == int(free // (128 * 1024 * 8192))
    # "a single 32K context costs as much as 16 users at 2K": KV is linear in tokens
    one_long = fit.fit(s, g, fit.Plan(max_model_len=32768, max_num_seqs=1)).kv_cache_gb
    sixteen_short = fit.fit(s, g, fit.Plan(max_model_len=2048, max_num_seqs=16)).kv_cache_gb
    assert one_long == pytest.approx(sixteen_short)


def test_roofline_and_cost():
    s, g = shape("llama-3-8b"), gpu("H100-SXM")
    r = fit.fit(s, g, fit.Plan(max_model_len=2048, max_num_seqs=1), price=3.0)
    w = fit.weight_bytes(s, fit.Plan())
    assert r.decode_tok_s_per_seq == pytest.approx(3350e9 / (w + 128 * 1024 * 1024))
    assert r.usd_per_million_tokens == pytest.approx(3.0 / (r.decode_tok_s_aggregate * 3600) * 1e6)
    batched = fit.fit(s, g, fit.Plan(max_model_len=2048, max_num_seqs=32), price=3.0)
    assert batched.decode_tok_s_aggregate > 10 * r.decode_tok_s_aggregate  # weights read once per step
    assert batched.usd_per_million_tokens < r.usd_per_million_tokens / 10


def test_price_override_from_environment(monkeypatch):
    monkeypatch.setenv("FORGE_GPU_PRICES", json.dumps({"L4": 0.5}))
    assert fit.price_of(gpu("L4")) == 0.5
    assert fit.price_of(gpu("L40S")) == gpu("L40S").price_per_hour


def test_catalog_compute_capabilities():
    cc = {n: g.compute_capability for n, g in gpus().items()}
    assert cc["A100-40GB"] == cc["A100-80GB"] == (8, 0)
    assert cc["A10G"] == (8, 6)
    assert cc["L4"] == cc["L40S"] == cc["RTX-4090"] == (8, 9)
    assert cc["H100-SXM"] == cc["H100-PCIe"] == cc["H200"] == (9, 0)
    assert cc["B200"] == (10, 0)


@pytest.mark.parametrize("gpu_name,method,ok,mode", [
    ("L4", "fp8", True, "W8A8"),
    ("A100-80GB", "fp8", True, "weight-only (FP8 Marlin)"),
    ("A10G", "awq", True, "W4A16"),
    ("H100-SXM", "gptq", True, "W4A16"),
    ("H100-SXM", "nvfp4", False, "unsupported"),
    ("B200", "nvfp4", True, "NVFP4"),
])
def test_capability_table(gpu_name, method, ok, mode):
    v = capability.check(gpu(gpu_name), "vllm", method)
    assert (v.ok, v.mode) == (ok, mode)


def test_capability_kernels_and_trtllm():
    assert capability.check(gpu("H100-SXM"), "vllm", "awq").kernel == "Machete"
    assert capability.check(gpu("A100-80GB"), "vllm", "awq").kernel == "Marlin"
    v = capability.check(gpu("A100-80GB"), "trtllm", "fp8")
    assert not v.ok and "needs compute capability >= 8.9" in v.message and "8.0" in v.message


def test_fit_check_uses_the_same_capability_table(monkeypatch, tmp_path):
    """One source of truth: changing the table changes what validate accepts."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((CONFIGS / "smollm2-135m.json").read_text())
    recipe = write_recipe(tmp_path / "r.yaml", "./m", target={"gpu": "A100-80GB", "engine": "trtllm"})
    r = json.loads(recipe.read_text())
    r["quantize"] = {"method": "none"}
    recipe.write_text(json.dumps(r))
    from conftest import resolved

    assert resolved(recipe).fit.fits
    from forge import engines

    monkeypatch.setitem(engines.get("trtllm").kernels, "BF16", engines.Kernel((9, 0), "native"))
    from forge.core.errors import RecipeError

    with pytest.raises(RecipeError, match="needs compute capability >= 9.0"):
        resolved(recipe)


def test_validate_fails_a_recipe_that_does_not_fit(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((CONFIGS / "llama-2-70b.json").read_text())
    write_recipe(tmp_path / "r.yaml", "./m", target={"gpu": "L40S", "engine": "vllm", "max_model_len": 4096})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "target.gpu: the model does not fit L40S" in proc.stderr
    assert proc.stderr.index("r.yaml:") < proc.stderr.index("target.gpu")
    assert "weights 138.0 GB" in proc.stderr and "needs tensor parallel" in proc.stderr


def test_fit_cli_json_and_exit_codes(tmp_path):
    ok = forge_cli("fit", "--model", str(CONFIGS / "llama-3-8b.json"), "--gpu", "L4", "--method", "awq",
                   "--max-num-seqs", "8", "--json", check=0)
    data = json.loads(ok.stdout)
    assert data["fits"][0]["fits"] and data["fits"][0]["kv_bytes_per_token"] == 131072
    too_big = forge_cli("fit", "--model", str(CONFIGS / "llama-2-70b.json"), "--gpu", "A100-80GB")
    assert too_big.returncode == 2 and "no (TP" in too_big.stdout
    listed = forge_cli("fit", "--list", "--json", check=0)
    assert "H200" in json.loads(listed.stdout)
    bad = forge_cli("fit", "--model", str(CONFIGS / "llama-3-8b.json"), "--gpu", "H100")
    assert bad.returncode == 2 and "unknown GPU H100" in bad.stderr


def test_shape_from_gguf_header_matches_config(tmp_path):
    """The GGUF reader maps header fields onto the same shape transformers' config gives."""
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2); w.add_embedding_length(64); w.add_feed_forward_length(128)
    w.add_head_count(4); w.add_head_count_kv(2); w.add_context_length(256); w.add_vocab_size(100)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    from forge.model.shape import from_gguf

    s = from_gguf(path)
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (64, 2, 4, 2, 16, 100)
    assert s.tie_word_embeddings  # no output.weight tensor


# ------------------------------------------------------------------ issue 14: every method's bytes come from one table


@pytest.mark.parametrize("method,engine,gb", [
    ("nvfp4", "vllm", 6.03),      # 0.5 B + an FP8 scale per 16 weights: 0.5625 B/param on the Linear layers
    ("w4a8_awq", "trtllm", 5.70),  # the same 4-bit group-128 weights as AWQ
    ("awq", "vllm", 5.70),
    ("fp8", "vllm", 9.08),
    ("none", "vllm", 16.06),
])
def test_fit_cli_weights_for_every_method(method, engine, gb):
    """Bug: nvfp4 and w4a8_awq reported 16.06 GB (as BF16) because fit kept its own list of methods."""
    proc = forge_cli("fit", "--model", str(CONFIGS / "llama-3-8b.json"), "--gpu", "H100-SXM", "--method", method,
                     "--engine", engine, "--json", check=0)
    report = json.loads(proc.stdout)["fits"][0]
    assert round(report["weights_gb"], 2) == gb


def test_no_method_falls_back_to_bf16_bytes():
    """Every method in the table has its own bytes per parameter: none is ever counted as BF16 by default."""
    from forge.gpu.methods import NAMES

    bf16 = fit.weight_bytes(shape("llama-3-8b"), fit.Plan())
    for method in NAMES:
        if method != "none":
            assert fit.weight_bytes(shape("llama-3-8b"), fit.Plan(method=method)) < 0.6 * bf16, method


def test_validate_accepts_nvfp4_that_fits_only_when_quantized(tmp_path):
    """Llama-2-70B with 64 sequences of 4096 tokens (86 GB of KV cache) fits a B200 in NVFP4 (~37 GB of weights);
    counted as BF16 (~138 GB), as fit did before, validate refused it."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((CONFIGS / "llama-2-70b.json").read_text())
    calib = Path(__file__).parents[1] / "evals" / "data" / "calib-pydoc.jsonl"
    write_recipe(tmp_path / "r.yaml", "./m", target={"gpu": "B200", "engine": "trtllm", "max_model_len": 4096,
                                                     "max_num_seqs": 64},
                 quantize={"method": "nvfp4", "calibration": {"data": str(calib), "samples": 4, "max_seq_len": 64}})
    proc = forge_cli("validate", str(tmp_path / "r.yaml"), "--build-elsewhere")   # 70B: not on this host's memory
    assert proc.returncode == 0, proc.stderr
    write_recipe(tmp_path / "r.yaml", "./m", target={"gpu": "B200", "engine": "trtllm", "max_model_len": 4096,
                                                     "max_num_seqs": 64})
    proc = forge_cli("validate", str(tmp_path / "r.yaml"), "--build-elsewhere")
    assert proc.returncode == 2 and "the model does not fit B200" in proc.stderr


def test_unknown_method_or_engine_in_fit_is_a_usage_error():
    proc = forge_cli("fit", "--model", str(CONFIGS / "llama-3-8b.json"), "--gpu", "L4", "--method", "nvfp5")
    assert proc.returncode == 2 and "Unknown method 'nvfp5'. Did you mean 'nvfp4'?" in proc.stderr
    proc = forge_cli("fit", "--model", str(CONFIGS / "llama-3-8b.json"), "--gpu", "L4", "--engine", "vlm")
    assert proc.returncode == 2 and "Unknown engine 'vlm'. Did you mean 'vllm'?" in proc.stderr


def test_fit_recipe_on_another_gpu_when_the_recipe_gpu_is_too_small(tmp_path):
    """Bug: `forge fit RECIPE --gpu X` exited 2 with the recipe's own "does not fit L4" before showing X, the very
    case where a user asks "what about X?". With --gpu the recipe's target is not enforced; other problems are."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((CONFIGS / "smollm2-135m.json").read_text())
    # 8192 tokens × 160 sequences of KV cache (~30 GB) does not fit an L4 (24 GiB × 0.9), fits an H200
    target = {"gpu": "L4", "engine": "vllm", "max_model_len": 8192, "max_num_seqs": 160}
    write_recipe(tmp_path / "r.yaml", "./m", target=target)
    own = forge_cli("fit", "r.yaml", cwd=tmp_path)
    assert own.returncode == 2 and "the model does not fit L4" in own.stderr   # without --gpu: the recipe's contract
    other = forge_cli("fit", "r.yaml", "--gpu", "H200", "--json", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    report = json.loads(other.stdout)["fits"]
    assert [(r["gpu"], r["fits"]) for r in report] == [("H200", True)]
    assert json.loads(other.stdout)["plan"]["max_num_seqs"] == 160    # the recipe's plan, on X
    both = forge_cli("fit", "r.yaml", "--gpu", "L4", "--gpu", "H200", "--json", cwd=tmp_path)
    assert both.returncode == 0 and [r["fits"] for r in json.loads(both.stdout)["fits"]] == [False, True]
    # a recipe invalid for another reason (gptq without calibration data) is still refused with --gpu
    write_recipe(tmp_path / "r.yaml", "./m", target=target, quantize={"method": "gptq"})
    bad = forge_cli("fit", "r.yaml", "--gpu", "H200", cwd=tmp_path)
    assert bad.returncode == 2 and "needs calibration data" in bad.stderr and "Traceback" not in bad.stderr
