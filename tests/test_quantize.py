"""Quantization: config-only pre-flight, llm-compressor methods on tiny models, the CPU shim."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from conftest import forge_cli, write_recipe

from forge.orchestrate.build import build
from conftest import resolved
from forge.steps.quantize import REPORTS
from forge.store.local import Store

CONFIGS = Path(__file__).parent / "data" / "configs"
CALIB = Path(__file__).resolve().parents[1] / "evals" / "data" / "calib-pydoc.jsonl"


def _config_only(tmp_path, name="smollm2-135m", **overrides) -> Path:
    """A model directory holding only config.json: pre-flight must need nothing else."""
    d = tmp_path / "model"
    d.mkdir()
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg.update(overrides)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _calibrated(**q):
    return {"calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}, **q}


# ------------------------------------------------------------------ pre-flight, before any weight


def test_group_size_128_on_smollm_names_layers_and_suggests_64(tmp_path):
    _config_only(tmp_path)
    write_recipe(tmp_path / "r.yaml", "./model", quantize=_calibrated(method="gptq", bits=4, group_size=128))
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "quantize.group_size: group_size 128 does not divide the input features (576)" in err
    assert "self_attn.q_proj" in err and "mlp.gate_proj" in err and "down_proj" not in err.split("(e.g.")[0]
    assert "Use group_size: 64" in err and "quantize.ignore" in err


def test_group_size_64_passes_preflight(tmp_path):
    _config_only(tmp_path)
    write_recipe(tmp_path / "r.yaml", "./model", quantize=_calibrated(method="gptq", bits=4, group_size=64))
    assert forge_cli("validate", "r.yaml", cwd=tmp_path).returncode == 0


def test_ignore_list_can_exempt_indivisible_layers(tmp_path):
    _config_only(tmp_path, intermediate_size=1000)  # down_proj in_features 1000 % 64 != 0
    write_recipe(tmp_path / "r.yaml", "./model",
                 quantize=_calibrated(method="gptq", group_size=64, ignore=["lm_head", "re:.*down_proj"]))
    assert forge_cli("validate", "r.yaml", cwd=tmp_path).returncode == 0


def test_method_illegal_for_target_gpu(tmp_path):
    _config_only(tmp_path)
    write_recipe(tmp_path / "r.yaml", "./model", target={"gpu": "A100-80GB", "engine": "trtllm"}, quantize={"method": "fp8"})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "fp8 is not legal for target A100-80GB/trtllm" in proc.stderr and "needs compute capability >= 8.9" in proc.stderr


def test_fp8_on_ampere_vllm_is_weight_only_with_a_warning(tmp_path):
    _config_only(tmp_path)
    write_recipe(tmp_path / "r.yaml", "./model", target={"gpu": "A100-80GB", "engine": "vllm"}, quantize={"method": "fp8"})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0 and "weight-only" in proc.stderr


def test_missing_calibration_file(tmp_path):
    _config_only(tmp_path)
    write_recipe(tmp_path / "r.yaml", "./model",
                 quantize={"method": "gptq", "group_size": 64, "calibration": {"data": "nope.jsonl"}})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "quantize.calibration.data: calibration file" in proc.stderr
    assert "nope.jsonl does not exist" in proc.stderr


def test_calibration_section_required_for_calibrated_methods(tmp_path):
    _config_only(tmp_path)
    write_recipe(tmp_path / "r.yaml", "./model", quantize={"method": "awq", "group_size": 64})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "method awq needs calibration data" in proc.stderr


def test_calibration_shorter_than_max_seq_len_at_validate(tmp_path):
    _config_only(tmp_path)
    (tmp_path / "short.jsonl").write_text('{"text": "tiny"}\n')
    write_recipe(tmp_path / "r.yaml", "./model", quantize={"method": "gptq", "group_size": 64,
                 "calibration": {"data": "short.jsonl", "samples": 2, "max_seq_len": 512}})
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "has 4 bytes of text: too short for 2 samples × 512 tokens" in proc.stderr


def test_calibration_token_windows_checked_before_weights_load(tmp_path, tiny_llama, cache_dir, monkeypatch):
    """The quantize step tokenizes its calibration data before it loads the model: no model is loaded (the reference
    step streams BF16's greedy tokens layer by layer, and stays cached: fixing the calibration does not record them
    again)."""
    # enough bytes for the validate-time estimate, too few tokens once tokenized
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "the " * 750}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "gptq", "group_size": 32,
                          "calibration": {"data": "c.jsonl", "samples": 4, "max_seq_len": 700}})
    import transformers

    from forge.orchestrate.build import plan
    from forge.core.errors import RecipeError

    load, loads = transformers.AutoModelForCausalLM.from_pretrained, []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    with pytest.raises(RecipeError, match=r"window\(s\) of max_seq_len 700, but samples is 4"):
        build(resolved(recipe), Store(cache_dir))
    assert loads == [], loads
    (tmp_path / "c.jsonl").write_text(CALIB.read_text())
    fixed = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "gptq", "group_size": 32,
                         "calibration": {"data": "c.jsonl", "samples": 4, "max_seq_len": 64}})
    assert [(p.spec.name, p.status) for p in plan(resolved(fixed), Store(cache_dir))][:3] == \
        [("resolve", "HIT"), ("reference", "HIT"), ("quantize", "MISS")]


def test_unsupported_architecture_for_awq(tmp_path):
    _config_only(tmp_path, architectures=["FalconForCausalLM"])
    write_recipe(tmp_path / "r.yaml", "./model", quantize=_calibrated(method="awq", group_size=64))
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "awq through llm-compressor does not support architecture FalconForCausalLM" in proc.stderr


# ------------------------------------------------------------------ methods on tiny models


METHODS = [
    ("tiny_llama", {"method": "fp8"}, "float-quantized", 8),
    ("tiny_llama", _calibrated(method="gptq", bits=4, group_size=32, actorder=True), "pack-quantized", 4),
    ("tiny_llama", _calibrated(method="gptq", bits=8, group_size=32), "pack-quantized", 8),
    ("tiny_llama", _calibrated(method="awq", group_size=32, symmetric=False), "pack-quantized", 4),
    ("tiny_llama", _calibrated(method="int8"), "int-quantized", 8),
    ("tiny_qwen2", _calibrated(method="gptq", bits=4, group_size=32), "pack-quantized", 4),
    ("tiny_qwen2", {"method": "fp8", "fp8_scheme": "static", **_calibrated()}, "float-quantized", 8),
]


@pytest.mark.parametrize("model,quantize,fmt,bits", METHODS,
                         ids=[f"{m}-{q['method']}-{b}" for m, q, _, b in METHODS])
def test_method_on_tiny_model(request, model, quantize, fmt, bits, tmp_path, cache_dir):
    path = request.getfixturevalue(model)
    recipe = write_recipe(tmp_path / "r.yaml", str(path), quantize=quantize)
    result = build(resolved(recipe), Store(cache_dir))[-1]
    out = result.entry.out
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    assert "lm_head" in qc["ignore"]
    assert cfg["dtype"] == "bfloat16"
    report = json.loads((out / "quantize-report.json").read_text())
    layers = report["layers"]
    assert len(layers) == 14 and {r["bits"] for r in layers} == {bits}
    if quantize["method"] in ("gptq", "int8"):
        assert all(r["backend_error"] is not None for r in layers)
    if quantize["method"] == "awq":
        assert report["awq_mappings"] and all(m["best_loss"] <= m["initial_loss"] for m in report["awq_mappings"])
    if quantize["method"] != "int8" and not quantize.get("actorder"):
        assert all(r["weight_rel_error"] is not None and 0 < r["weight_rel_error"] < 0.5 for r in layers)
    facts = result.entry.manifest["facts"]
    assert facts["verify"]["tokens"] == 16 and facts["verify"]["quantized_text"].strip()
    assert facts["calibration_dtype"] in ("float32", "bfloat16") and facts["device"] == "cpu"
    assert (out / "forge-quantization.json").exists() and (out / "quantize-report.md").exists()
    if bits == 4:
        assert facts["bytes"] < facts["bf16_bytes"]


def test_quantized_checkpoint_loads_and_generates_with_transformers(tmp_path, tiny_llama, cache_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize=_calibrated(method="gptq", group_size=32))
    out = build(resolved(recipe), Store(cache_dir))[-1].entry.out
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(**tok("import os", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > 2


def test_calibration_is_part_of_the_key(tmp_path, tiny_llama, cache_dir):
    from forge.orchestrate.build import plan

    calib = tmp_path / "c.jsonl"
    calib.write_text(CALIB.read_text())
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "gptq", "group_size": 32,
                          "calibration": {"data": str(calib), "samples": 4, "max_seq_len": 64}})
    store = Store(cache_dir)
    build(resolved(recipe), store)
    assert [p.status for p in plan(resolved(recipe), store)] == ["HIT", "HIT", "HIT"]
    calib.write_text(CALIB.read_text().replace("the", "teh", 1))
    assert [p.status for p in plan(resolved(recipe), store)] == ["HIT", "HIT", "MISS"]


# ------------------------------------------------------------------ the CPU shim


def test_pin_memory_shim_still_needed():
    """Fails loudly when llm-compressor changes the function the shim replaces, or stops needing it."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    from forge.backends.llmcompressor import cpu_pin_memory_shim

    original = IntermediatesCache.pin_memory
    assert list(inspect.signature(original).parameters) == ["self", "batch_index", "input_names"], \
        "IntermediatesCache.pin_memory changed its signature: review forge.backends.llmcompressor.cpu_pin_memory_shim"
    assert "pin_memory()" in inspect.getsource(IntermediatesCache._pin_intermediate), \
        "llm-compressor no longer pins with Tensor.pin_memory(): review the shim"
    assert not torch.accelerator.is_available(), "this test describes CPU-only machines"

    cache = IntermediatesCache.__new__(IntermediatesCache)
    cache.batch_intermediates = [{"hidden": IntermediateValue(value=torch.ones(2), device=torch.device("cpu"))}]
    with pytest.raises(RuntimeError):
        cache.pin_memory(0)  # upstream still crashes without an accelerator: the shim is still needed
    with cpu_pin_memory_shim():
        cache.pin_memory(0)
        assert IntermediatesCache.pin_memory is not original
    assert IntermediatesCache.pin_memory is original


def test_hf_dataset_calibration_is_pinned_and_fails_clearly_offline(tmp_path, tiny_llama, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "gptq", "group_size": 32,
                          "calibration": {"data": "hf://datasets/org/calib@main", "samples": 2, "max_seq_len": 64}})
    warn = forge_cli("validate", str(recipe))
    assert warn.returncode == 0 and "is not a commit; pin it: hf://datasets/org/calib@<40-hex sha>" in warn.stderr
    assert forge_cli("validate", str(recipe), "--ci").returncode == 2
    pinned = write_recipe(tmp_path / "p.yaml", str(tiny_llama), quantize={"method": "gptq", "group_size": 32,
                          "calibration": {"data": "hf://datasets/org/calib@" + "a" * 40, "samples": 2, "max_seq_len": 64}})
    proc = forge_cli("build", str(pinned), cache=cache_dir)  # offline, nothing cached: a clear tool error
    assert proc.returncode == 5 and "calibration dataset org/calib@" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("native,method,env,memory_gib,expected", [
    (False, "gptq", None, 24, "float32"),        # emulated bf16: float32 is 4.5x faster, and it fits
    (False, "gptq", None, 0, "bfloat16"),        # ... unless the float32 model would not fit half the memory
    (True, "gptq", None, 24, "bfloat16"),        # AVX512-BF16/AMX: the recipe dtype
    (False, "fp8", None, 24, "bfloat16"),        # data-free: nothing is calibrated, loaded as stored (as the library does)
    (True, "gptq", "float32", 24, "float32"),    # the override
    (False, "awq", "bfloat16", 24, "bfloat16"),
])
def test_cpu_calibration_dtype_policy(tmp_path, tiny_llama, monkeypatch, native, method, env, memory_gib, expected):
    from forge.core import host
    from forge.steps import quantize as qstep

    monkeypatch.setattr(host, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(host, "device", lambda: "cpu")
    monkeypatch.setattr(host, "memory_bytes", lambda: memory_gib << 30)
    if env:
        monkeypatch.setenv("FORGE_CPU_CALIBRATION_DTYPE", env)
    q = {"method": method}
    if method != "fp8":
        q.update(group_size=32, calibration={"data": str(CALIB), "samples": 2, "max_seq_len": 64})
    loaded = resolved(write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize=q))
    policy = qstep.calibration_policy(loaded)
    assert qstep.SPEC.identity(loaded)["calibration_dtype"] == policy   # the policy (and the memory) is in the key
    assert qstep.calibration_dtype(policy, tiny_llama, "bfloat16") == expected


def test_a_forced_requantize_with_the_same_result_keeps_the_output_digest(tmp_path, tiny_llama, cache_dir):
    """The reports carry timings; the checkpoint is deterministic. Only the checkpoint decides the digest,
    so a forced rebuild that writes the same weights leaves every downstream key as it was."""
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "fp8"})
    store = Store(cache_dir)
    first = build(resolved(recipe), store)[-1]
    files_first = dict(first.entry.manifest["output"]["files"])
    again = build(resolved(recipe), store, force={"quantize"})[-1]
    assert again.status == "BUILT" and again.output_digest == first.output_digest
    files_again = again.entry.manifest["output"]["files"]
    assert "quantize-report.json" in files_again   # kept and hashed, just not in the digest
    assert {k: v for k, v in files_again.items() if k not in REPORTS} == \
        {k: v for k, v in files_first.items() if k not in REPORTS}


@pytest.mark.parametrize("quantize,streaming,loads", [({"method": "fp8"}, "1", 0), ({"method": "fp8"}, "0", 4),
                                                      (_calibrated(method="gptq", group_size=32), "1", 1)],
                         ids=["fp8-streamed", "fp8-in-memory", "gptq"])
def test_quantize_never_holds_two_models(tmp_path, tiny_llama, cache_dir, monkeypatch, quantize, streaming, loads):
    """Every model forge loads is gone (weakref dead after a collection) before the next one is loaded. Streamed FP8
    loads none (tests/test_streaming.py); in memory (FORGE_STREAMING=0) the reference step records BF16's greedy
    tokens and frees its model, and the quantize step then loads the written checkpoint alone; GPTQ loads the model
    to calibrate it, and its reference and the verification of its decompressed weights stream."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    loaded_models: list[weakref.ref] = []
    alive_at_load: list[int] = []

    def audited(*args, **kwargs):
        gc.collect()
        alive_at_load.append(sum(ref() is not None for ref in loaded_models))
        model = load(*args, **kwargs)
        loaded_models.append(weakref.ref(model[0] if isinstance(model, tuple) else model))  # output_loading_info
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", audited)
    monkeypatch.setenv("FORGE_STREAMING", streaming)
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize=quantize)
    result = build(resolved(recipe), Store(cache_dir))[-1]
    assert result.name == "quantize" and result.status == "BUILT"
    # in memory: the reference step's BF16 model (its greedy tokens); one load to quantize; then the written
    # checkpoint (FP8: loaded to prove it loads, freed, then its dequantized weights verified in the BF16 model)
    assert len(alive_at_load) == loads, alive_at_load
    assert set(alive_at_load) <= {0}, f"models alive when the next was loaded: {alive_at_load}"
    verify = result.entry.manifest["facts"]["verify"]
    assert verify["tokens"] == 16 and verify["quantized_text"].strip()


def test_teacher_forced_verification_reports_the_greedy_prefix(tmp_path, tiny_llama, cache_dir):
    """The written checkpoint is verified in one forward pass over BF16's greedy tokens; up to the first mismatch
    its predictions are the tokens its own greedy decoding writes, so the recorded prefix is the greedy one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge.steps.reference import VERIFY_TOKENS, greedy_tokens

    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "fp8"})
    result = build(resolved(recipe), Store(cache_dir))[-1]
    verify = result.entry.manifest["facts"]["verify"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    bf16 = greedy_tokens(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="bfloat16"), tok)
    quant = greedy_tokens(AutoModelForCausalLM.from_pretrained(result.entry.out, dtype="bfloat16"), tok)
    prefix = next((i for i, (a, b) in enumerate(zip(bf16, quant)) if a != b), VERIFY_TOKENS)
    # FP8 is verified through forge's own dequantization: the same predictions as transformers' load of the checkpoint
    assert verify["how"] == "dequantized weights" and verify["tokens"] == len(bf16) == VERIFY_TOKENS
    assert verify["bf16_text"] == tok.decode(bf16, skip_special_tokens=True)
    assert verify["matching_prefix"] == prefix


@pytest.mark.parametrize("streaming", ["1", "0"], ids=["streamed", "in-memory"])
def test_verification_stops_a_checkpoint_with_broken_scales(tmp_path, tiny_llama, cache_dir, monkeypatch, streaming):
    """A checkpoint that loads but computes NaN (a broken weight scale) stops the step, naming the checkpoint,
    written and verified shard by shard and layer by layer or in memory."""
    import torch
    from safetensors.torch import load_file, save_file

    from forge.backends.llmcompressor import LlmCompressor
    from forge.core.errors import StepError

    export, quantize_files = LlmCompressor.export, LlmCompressor.quantize_files

    def broken(self, model, out, **kw):
        written = export(self, model, out, **kw)
        _break_a_scale(out)
        return written

    def broken_streamed(self, src, out, q, **kw):
        written = quantize_files(self, src, out, q, **kw)
        _break_a_scale(out)
        return written

    def _break_a_scale(out):
        shard = next(out.glob("*.safetensors"))
        tensors = load_file(shard)
        name = next(k for k in tensors if k.endswith("mlp.down_proj.weight_scale"))
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, shard, metadata={"format": "pt"})

    monkeypatch.setattr(LlmCompressor, "export", broken)
    monkeypatch.setattr(LlmCompressor, "quantize_files", broken_streamed)
    monkeypatch.setenv("FORGE_STREAMING", streaming)
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), quantize={"method": "fp8"})
    with pytest.raises(StepError, match=r"non-finite logits .* weights or scales are broken") as e:
        build(resolved(recipe), Store(cache_dir))
    assert "the quantized checkpoint at" in str(e.value)


def test_fp8_decode_is_exact_for_every_code():
    """forge's fp8 decode (bit moves, vectorized) gives torch's own cast for all 256 float8_e4m3fn codes."""
    import torch

    from forge.backends import fp8_to_float

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ours, torchs = fp8_to_float(codes), codes.float()
    assert torch.equal(ours.isnan(), torchs.isnan()) and int(torchs.isnan().sum()) == 2
    assert torch.equal(ours[~ours.isnan()], torchs[~torchs.isnan()])


def test_fp8_layer_error_and_dequantization_match_compressed_tensors(tmp_path):
    """The per-layer weight error and the verification's dequantized weights computed with forge's fp8 decode are
    compressed-tensors' own figures: fake_quantize for the error, weight × scale for the checkpoint."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors.torch import save_file

    from forge.backends import fp8_dequantized
    from forge.backends.llmcompressor import _fake_fp8, _rel_error

    torch.manual_seed(0)
    weight = torch.randn(300, 96, dtype=torch.bfloat16)
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    scale = (weight.float().abs().amax(dim=1, keepdim=True) / 448.0).to(torch.bfloat16)
    ref = weight.float()
    theirs = fake_quantize(weight.float(), scale.float(), None, args)
    assert torch.equal(_fake_fp8(weight.float(), scale.float()), theirs)
    assert _rel_error(weight, scale, None, args, weight) == pytest.approx(float((theirs - ref).norm() / ref.norm()), abs=2e-6)

    q = (weight.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    save_file({"m.weight": q, "m.weight_scale": scale, "norm.weight": torch.ones(96)}, tmp_path / "model.safetensors")
    (name, deq), = list(fp8_dequantized(tmp_path))
    assert name == "m.weight" and torch.equal(deq, q.float() * scale.float())


# ------------------------------------------------------------------ forge's CPU kernel in compressed-tensors


def _weights_with_specials(dtype):
    import torch

    torch.manual_seed(1)
    x = (torch.randn(1024, 512) * 0.02).to(dtype)
    x[0, :10] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 0.0, -0.0, 3.0, 1e4, -1e4])
    return x


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["fp8-channel", "fp8-tensor", "int4-group-asym", "int8-channel"])
def test_cpu_quantize_kernel_is_the_library_bit_for_bit(dtype, case, monkeypatch):
    """forge's ``_quantize`` kernel returns the library's eager result, byte for byte, rounded (dtype None) and
    cast to the quantized dtype, with NaN, inf, subnormal and out-of-range values among the weights, over several
    blocks of rows (per-row scales and zero points sliced with them)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_range
    from compressed_tensors.utils.impl_backend import ImplBackend

    from forge.backends import cpu_quantize
    from forge.backends.cpu_quantize import _applies, forge_quantize_cpu

    monkeypatch.setattr(cpu_quantize, "BLOCK_ELEMENTS", 1 << 16)   # 2 to 8 blocks of the 1024 rows

    x = _weights_with_specials(getattr(torch, dtype))
    finite = x.float().nan_to_num(0, 0, 0).abs()
    zp = None
    if case.startswith("fp8"):
        args = QuantizationArgs(num_bits=8, type="float", strategy=case.split("-")[1], symmetric=True)
        scale = (finite.amax(dim=1, keepdim=True) / 448 if case == "fp8-channel" else finite.max() / 448).to(x.dtype)
        out_dtype = torch.float8_e4m3fn
    elif case == "int4-group-asym":
        args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False)
        x = x.view(1024, 8, 64)   # as compressed-tensors hands a grouped weight to _quantize
        scale = (finite.view(1024, 8, 64).amax(-1, keepdim=True) / 7).to(x.dtype)
        zp = torch.randint(-3, 3, (1024, 8, 1), dtype=torch.int8)
        out_dtype = torch.int8
    else:
        args = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
        scale = (finite.amax(dim=1, keepdim=True) / 127).to(x.dtype)
        out_dtype = torch.int8
    q_min, q_max = calculate_range(args, "cpu")
    for target in (None, out_dtype):
        assert _applies(x, scale, zp, q_min, q_max, args, target)
        theirs = ImplBackend.call("_quantize", x, scale, zp, q_min, q_max, args, target)   # the eager fallback
        ours = forge_quantize_cpu(x, scale, zp, q_min, q_max, args, target)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        bits = torch.uint8 if ours.element_size() == 1 else torch.int16
        assert torch.equal(ours.view(bits), theirs.view(bits)), (case, target)
    # float32 weights have no table: the library keeps the call
    assert not _applies(x.float(), scale.float(), zp, q_min, q_max, args, out_dtype)


def test_fp8_checkpoint_written_with_forge_kernel_is_the_librarys(tmp_path, tiny_llama, monkeypatch):
    """A model whose layers are large enough for the kernel, quantized FP8 and saved compressed twice: through
    compressed-tensors' eager path and with forge's kernel registered. The safetensors files are identical."""
    import shutil

    import compressed_tensors.utils.impl_backend as impl
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge.backends import cpu_quantize

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=256)
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, src / f.name)

    def write(out: Path) -> bytes:
        model = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        oneshot(model=model, recipe=[QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=["lm_head"])])
        model.save_pretrained(out, save_compressed=True)
        return b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))

    cpu_quantize.register()
    calls = []
    monkeypatch.setattr(cpu_quantize, "quantize_rows", lambda *a, q=cpu_quantize.quantize_rows: calls.append(1) or q(*a))
    ours = write(tmp_path / "forge")
    assert len(calls) == 7   # q, k, v, o, gate, up, down: each at least 512 x 512
    monkeypatch.setattr(impl, "ENFORCE_EAGER", True)
    assert write(tmp_path / "eager") == ours and len(calls) == 7
