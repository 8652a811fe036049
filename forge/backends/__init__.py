"""Quantization backends: llm-compressor (compressed-tensors, for vLLM/TGI/CPU) and ModelOpt (the unified HF
checkpoint TensorRT-LLM and vLLM serve), plus any a plugin registers. One module each, found by name.

A backend is an object with the ``Backend`` protocol: the methods it offers (names in forge.gpu.methods), the
checkpoint format it writes, its config.json pre-flight, and the three stages the quantize step drives
(``quantize`` in place, ``export``, ``validate`` what was written). Everything else (seed, dtype, tokenizer,
calibration windows, loading, verification, reports, manifest) is the quantize step's, the same for all.
Which backend runs is decided here, from the recipe alone.

May import: forge.core, forge.model, forge.gpu, forge.engines.
"""
from __future__ import annotations

import os
from pathlib import Path

from forge.backends.base import Backend, Quantized, architecture_problems
from forge.backends.tensors import Fp8Weights, TensorReader, cast_float32, fp8_dequantized, fp8_to_float, one_torch_thread
from forge.core import options
from forge.core.plugins import Registry
from forge import engines
from forge.core.errors import RecipeError
from forge.gpu.methods import GROUPED
from forge.model.calibration import check_size, parse_hf_dataset

__all__ = ["Backend", "Quantized", "REGISTRY", "get", "backend_for", "checkpoint_format", "problems",
           "needs_calibration", "streams", "verifies", "preflight", "architecture_problems", "cast_float32", "fp8_to_float", "fp8_dequantized", "Fp8Weights", "TensorReader",
           "one_torch_thread"]


REGISTRY: Registry[Backend] = Registry("backend", "forge.backends", {
    "llmcompressor": "forge.backends.llmcompressor:BACKEND",
    "modelopt": "forge.backends.modelopt:BACKEND",
})


def get(name: str) -> Backend:
    return REGISTRY.get(name)


def backend_for(quantize, engine: str) -> str:
    """The backend a recipe's quantize section runs on. ``auto``: the first backend (forge's own first) that
    offers the method in a format the engine loads; failing that, the first whose format the engine loads."""
    if quantize.backend != "auto":
        return quantize.backend
    loads = engines.get(engine).formats
    names = REGISTRY.names()
    for name in names:
        b = get(name)
        if quantize.method in b.methods and (quantize.method == "none" or b.format(quantize) in loads):
            return name
    return next((n for n in names if get(n).format(quantize) in loads), names[0])


def checkpoint_format(loaded) -> str:
    """The format of the checkpoint the quantize step writes for this recipe ("bf16" when not quantized)."""
    q = loaded.recipe.quantize
    if q.method == "none":
        return "bf16"
    return get(backend_for(q, loaded.recipe.target.engine)).format(q)


def needs_calibration(quantize, engine: str) -> bool:
    return quantize.method != "none" and get(backend_for(quantize, engine)).needs_calibration(quantize)


def streams(quantize, engine: str) -> bool:
    """Whether the quantize step streams this recipe's method (FORGE_STREAMING on, and a backend that quantizes it
    shard by shard: ``streams``), from the recipe alone (the step also checks the snapshot's dtypes)."""
    if quantize.method in ("none", "auto") or not options.current().streaming:
        return False
    b = get(backend_for(quantize, engine))
    return getattr(b, "streams", None) is not None and b.streams(quantize)


def offloads(quantize, engine: str) -> bool:
    """Whether the quantize step can calibrate this recipe's method with the weights offloaded to disk when the model
    does not fit in memory (a backend with ``offloads``: llm-compressor's sequential pipeline)."""
    if quantize.method in ("none", "auto"):
        return False
    b = get(backend_for(quantize, engine))
    return getattr(b, "offloads", None) is not None and b.offloads(quantize)


def verifies(quantize, engine: str) -> bool:
    """Whether the quantize step verifies this recipe's checkpoint by generation (the reference step then runs)."""
    return quantize.method != "none" and get(backend_for(quantize, engine)).verifies(quantize)


def problems(loaded) -> list[str]:
    """Backend/method/engine combinations that cannot work, located in the recipe."""
    r = loaded.recipe
    q, engine = r.quantize, r.target.engine
    if q.method == "auto":
        return []   # method: auto: every candidate is checked as its own trial recipe (forge.orchestrate.auto)
    loads = engines.get(engine).formats
    name = backend_for(q, engine)
    b = get(name)
    out = []

    def able() -> list[str]:
        return [n for n in REGISTRY.names() if n != name and q.method in get(n).methods and get(n).format(q) in loads]

    if q.method not in b.methods:
        other = able()
        fix = f"set quantize.backend: {other[0]}" if other else \
            f"use one of {', '.join(m for m in b.methods if m != 'none')}"
        chosen = f" (chosen for engine {engine})" if q.backend == "auto" else ""
        out.append(f"{loaded.where('quantize', 'method')}: method {q.method} is not available with backend {name}"
                   f"{chosen}; {fix}")
    elif q.method != "none" and b.format(q) not in loads:
        other = able()
        out.append(f"{loaded.where('quantize', 'backend')}: {engine} cannot load {b.format(q)} checkpoints (what "
                   f"backend {name} writes; it loads {', '.join(loads)})"
                   + (f"; set quantize.backend: {other[0]} (or auto)" if other else "; choose another target.engine"))
    if r.trtllm is not None and engine != "trtllm":
        out.append(f"{loaded.where('trtllm')}: the trtllm section applies to target.engine: trtllm only; "
                   f"found engine {engine!r}: remove the section or change the engine")
    if q.kv_cache == "fp8" and name == "modelopt" and q.method == "none":
        out.append(f"{loaded.where('quantize', 'kv_cache')}: an FP8 KV cache with ModelOpt needs a quantized method")
    return out


def preflight(loaded, shape, backend: str) -> list[str]:
    """Problems with the quantize section found from config.json alone (empty when fine), before any weight is
    loaded: the backend's own (architecture), group sizes against every targeted layer, calibration declared and
    long enough. ``backend``: the one the resolution stage chose."""
    q = loaded.recipe.quantize
    problems: list[str] = []
    if q.method == "none":
        return problems
    problems += get(backend).preflight(loaded, shape)
    if q.method in GROUPED:
        group = q.group_size or 128
        targeted = shape.targeted_layers(q.ignore)
        bad = [(n, f) for n, f in targeted if f % group]
        if bad:
            fans = sorted({f for _, f in bad})
            all_fans = sorted({f for _, f in targeted})
            fits = [g for g in (256, 128, 64, 32, 16) if g < group and all(f % g == 0 for f in all_fans)]
            kinds = sorted({n.split(".", 3)[3] for n, _ in bad})
            problems.append(
                f"{loaded.where('quantize', 'group_size')}: group_size {group} does not divide the input features "
                f"({', '.join(map(str, fans))}) of {len(bad)} targeted layers: {', '.join(kinds)} "
                f"(e.g. {bad[0][0]}). Use group_size: {fits[0] if fits else 'a divisor of ' + str(fans[0])}"
                f" or add those layers to quantize.ignore")
    calibrates = needs_calibration(q, loaded.recipe.target.engine)
    if calibrates and q.calibration is None:
        # forge's own set, as this recipe must write it: data paths are relative to the recipe's directory
        shipped = Path(__file__).resolve().parents[2] / "evals" / "data" / "calib-pydoc.jsonl"
        data = os.path.relpath(shipped, loaded.base_dir.resolve()) if shipped.is_file() else "calib.jsonl"
        problems.append(f"{loaded.where('quantize')}: method {q.method} needs calibration data; add "
                        f"`calibration: {{data: {data}, samples: 128, max_seq_len: 512}}` "
                        "(path relative to the recipe)")
    elif calibrates and q.calibration is not None:
        path = loaded.resolve_path(q.calibration.data)
        if parse_hf_dataset(q.calibration.data) is None and path.is_file():
            try:
                check_size(path, samples=q.calibration.samples, max_seq_len=q.calibration.max_seq_len,
                           where=loaded.where("quantize", "calibration"))
            except RecipeError as e:
                problems.extend(e.problems)
    return problems
