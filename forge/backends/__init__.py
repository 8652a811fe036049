"""Quantization backends: llm-compressor (compressed-tensors, for vLLM/TGI) and ModelOpt (the unified HF
checkpoint TensorRT-LLM serves). Which one runs is decided here, from the recipe alone."""
from __future__ import annotations

METHODS = {
    "llmcompressor": ("none", "awq", "gptq", "fp8", "int8"),
    "modelopt": ("none", "fp8", "awq", "w4a8_awq", "nvfp4"),
}


def backend_for(quantize, engine: str) -> str:
    """The backend a recipe's quantize section runs on (``quantize.backend: auto`` resolved)."""
    if quantize.backend != "auto":
        return quantize.backend
    if engine == "trtllm" or quantize.method in ("w4a8_awq", "nvfp4"):
        return "modelopt"
    return "llmcompressor"


def problems(loaded) -> list[str]:
    """Backend/method/engine combinations that cannot work, located in the recipe."""
    r = loaded.recipe
    q, engine = r.quantize, r.target.engine
    backend = backend_for(q, engine)
    out = []
    if q.method not in METHODS[backend]:
        other = next(b for b in METHODS if b != backend)
        fix = (f"set quantize.backend: {other}" if q.method in METHODS[other] and (engine != "trtllm" or other == "modelopt")
               else f"use one of {', '.join(m for m in METHODS[backend] if m != 'none')}")
        out.append(f"{loaded.where('quantize', 'method')}: method {q.method} is not available with backend {backend}"
                   f"{' (chosen for engine trtllm)' if q.backend == 'auto' and engine == 'trtllm' else ''}; {fix}")
    if engine == "trtllm" and backend != "modelopt":
        out.append(f"{loaded.where('quantize', 'backend')}: TensorRT-LLM serves ModelOpt checkpoints; "
                   "set quantize.backend: modelopt (or auto)")
    if r.trtllm is not None and engine != "trtllm":
        out.append(f"{loaded.where('trtllm')}: the trtllm section applies to target.engine: trtllm only; "
                   f"found engine {engine!r}: remove the section or change the engine")
    if q.kv_cache == "fp8" and backend == "modelopt" and q.method == "none":
        out.append(f"{loaded.where('quantize', 'kv_cache')}: an FP8 KV cache with ModelOpt needs a quantized method")
    return out


def needs_calibration(quantize, engine: str) -> bool:
    """ModelOpt calibrates every quantized method (static activation scales, AWQ search); llm-compressor
    only what its recipes need data for."""
    if backend_for(quantize, engine) == "modelopt":
        return quantize.method != "none"
    from forge.backends.llmcompressor import needs_calibration as lc

    return lc(quantize)
