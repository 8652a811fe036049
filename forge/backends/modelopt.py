"""NVIDIA ModelOpt backend: quantize a transformers model and write the unified HF checkpoint
(``hf_quant_config.json`` + safetensors) that trtllm-serve, vLLM and SGLang load.

What runs on a CPU (nvidia-modelopt 0.47, measured here on SmolLM2-135M and tiny Llama/Qwen2 models):
fp8 (FP8_DEFAULT_CFG: per-tensor weights and static activation scales), nvfp4 (fake-quant calibration
and export; the kernels need compute capability >= 10.0), int4_awq and w4a8_awq (awq_lite) when the
block size divides every quantized layer's input features (export refuses partial blocks). Two traps
handled here: the export needs ``dtype=`` passed as a torch dtype (the config's string form crashes
it), and it reads ``config.architectures``.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

from forge.backends.base import Quantized, architecture_problems
from forge.backends.tensors import Fp8Weights, cast_float32
from forge.gpu.methods import GROUPED, KV_CACHE_ALGO as KV_ALGO, METHODS, written_as
from forge.model.shape import DECODERS
from forge.engines.trtllm_build import DECODER, TRTLLM_CKPT

CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "awq": "INT4_AWQ_CFG", "w4a8_awq": "W4A8_AWQ_BETA_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


def quant_config(q) -> dict:
    """ModelOpt's config for the recipe: the method's preset, the block size, FP8 KV, the ignore list."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, CONFIGS[q.method]))
    entries = cfg["quant_cfg"]
    if q.method in GROUPED:
        block = q.group_size or 128
        for entry in entries:
            if entry.get("quantizer_name") == "*weight_quantizer":
                for c in (entry["cfg"] if isinstance(entry["cfg"], list) else [entry["cfg"]]):
                    if "block_sizes" in c:
                        c["block_sizes"][-1] = block
    if q.kv_cache == "fp8":
        entries.extend(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    for pattern in q.ignore:
        entries.append({"quantizer_name": f"*{pattern.strip('*')}*", "enable": False})
    return cfg


def _quantize(model, q, batches: list, report: Callable[..., None]) -> dict:
    """Calibrate and quantize in place; returns timings and the per-layer quantizer summary."""
    import modelopt.torch.quantization as mtq
    import torch

    device = next(model.parameters()).device
    total = len(batches)

    def forward_loop(m) -> None:
        for i, ids in enumerate(batches):
            report(f"calibrating ({i + 1}/{total} windows)", completed=i, total=total)
            with torch.no_grad():
                m(torch.tensor([ids], device=device))

    t0 = time.monotonic()
    mtq.quantize(model, quant_config(q), forward_loop=forward_loop)
    return {"seconds": time.monotonic() - t0, "layers": layer_summary(model)}


def layer_summary(model) -> list[dict]:
    """One row per quantized Linear: bits, block size, weight amax (what ModelOpt calibrated)."""
    rows = []
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is None or not getattr(wq, "is_enabled", False):
            continue
        first = wq[0] if hasattr(wq, "__getitem__") and not hasattr(wq, "num_bits") else wq
        amax = getattr(first, "amax", None)
        block = (getattr(first, "block_sizes", None) or {}).get(-1)
        rows.append({"layer": name, "bits": _bits(getattr(first, "num_bits", None)), "group_size": block,
                     "weight_amax": None if amax is None else round(float(amax.float().max()), 6)})
    return rows


def _bits(num_bits) -> str | None:
    if num_bits is None:
        return None
    if isinstance(num_bits, (tuple, list)):
        return f"e{num_bits[0]}m{num_bits[1]}"
    return str(num_bits)


def _export_hf(model, out, dtype) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    export_hf_checkpoint(model, export_dir=str(out), dtype=dtype)


def export_trtllm(model, out, dtype, tensor_parallel: int) -> None:
    """ModelOpt's TensorRT-LLM checkpoint (config.json + rank<N>.safetensors), what trtllm-build reads."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch not in DECODER:
        raise ValueError(f"no TensorRT-LLM decoder type known for {arch}; known: {', '.join(sorted(DECODER))}")
    export_tensorrt_llm_checkpoint(model, DECODER[arch], dtype, export_dir=str(out),
                                   inference_tensor_parallel=tensor_parallel)


# ---------------------------------------------------------------------- checking what was written

def validate_checkpoint(path, q) -> dict:
    """Check an exported unified checkpoint against the recipe: the declared algorithm, the KV cache,
    the excluded modules, and every quantized tensor's dtype, shape and scales. Returns facts; raises
    ValueError naming each problem."""
    from safetensors import safe_open

    path = Path(path)
    problems = []
    try:
        hf = json.loads((path / "hf_quant_config.json").read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a ModelOpt unified checkpoint ({e})") from None
    quant = hf.get("quantization", {})
    want = METHODS[q.method].quant_algo
    if quant.get("quant_algo") != want:
        problems.append(f"hf_quant_config.json quant_algo is {quant.get('quant_algo')!r}; the recipe's {q.method} means {want!r}")
    if quant.get("kv_cache_quant_algo") != KV_ALGO[q.kv_cache]:
        problems.append(f"kv_cache_quant_algo is {quant.get('kv_cache_quant_algo')!r}; the recipe asks "
                        f"{KV_ALGO[q.kv_cache]!r} (quantize.kv_cache: {q.kv_cache})")
    excluded = quant.get("exclude_modules") or []
    for pattern in q.ignore:
        if not any(pattern.strip("*") in e for e in excluded):
            problems.append(f"quantize.ignore {pattern!r} is not in exclude_modules {excluded}")
    if config.get("quantization_config", {}).get("quant_method") != "modelopt":
        problems.append("config.json quantization_config.quant_method is not 'modelopt' (trtllm-serve and vLLM read it)")

    quantized, bad = 0, []
    expect = "F8_E4M3" if METHODS[q.method].bits == 8 else "U8"   # 4-bit values are packed two per byte
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if k.endswith(".weight_scale")):
                layer = key.removesuffix(".weight_scale")
                weight = f.get_slice(f"{layer}.weight")
                if weight.get_dtype() != expect:
                    bad.append(f"{layer}.weight is {weight.get_dtype()}, expected {expect}")
                scale = f.get_tensor(key).float()
                if not bool(((scale > 0) & scale.isfinite()).all()):
                    bad.append(f"{key} has zero, negative or non-finite entries")
                if any(e.strip("*") and e.strip("*") in layer for e in excluded):
                    bad.append(f"{layer} is quantized but listed in exclude_modules")
                quantized += 1
    if quantized == 0:
        problems.append("no quantized layer (no *.weight_scale tensor) in the checkpoint")
    problems += bad[:10]
    if problems:
        raise ValueError("; ".join(problems))
    return {"quant_algo": quant.get("quant_algo"), "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
            "quantized_layers": quantized, "exclude_modules": excluded,
            "producer": hf.get("producer", {}), "group_size": quant.get("group_size")}


class ModelOpt:
    name = "modelopt"
    title = "ModelOpt"
    methods = written_as("modelopt")
    tools = ("nvidia-modelopt", "torch", "transformers")
    loads_in_transformers = False

    def format(self, q) -> str:
        return "modelopt"

    def needs_calibration(self, q) -> bool:
        return q.method != "none"   # static activation scales, AWQ search: every quantized method calibrates

    def preflight(self, loaded, shape) -> list[str]:
        return architecture_problems(loaded, shape, self.title, DECODERS)

    def quantize(self, model, q, windows, *, report, log_dir: Path) -> Quantized:
        result = _quantize(model, q, windows or [], report)
        return Quantized(result["layers"], summary={"calibration_seconds": round(result["seconds"], 1)})

    def export(self, model, out: Path, *, dtype, loaded) -> None:
        if loaded.compiles:
            export_trtllm(model, out / TRTLLM_CKPT, dtype, loaded.recipe.target.tensor_parallel)  # for trtllm-build
        _export_hf(model, out, dtype)
        # ModelOpt leaves unquantized tensors in the model's (CPU calibration) float32; its scales stay float32
        cast_float32(out, dtype, only=lambda name: name.endswith((".weight", ".bias")))

    def validate(self, out: Path, q) -> dict:
        return validate_checkpoint(out, q)

    def verifies(self, q) -> bool:
        # FP8 dequantizes exactly (fp8 × scale); the 4-bit packed formats need ModelOpt's kernels
        return q.method == "fp8"

    def dequantized(self, out: Path, q):
        return Fp8Weights(out) if self.verifies(q) else None


BACKEND = ModelOpt()
