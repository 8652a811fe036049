"""Quantization backends: llm-compressor (compressed-tensors, for vLLM/TGI/CPU) and ModelOpt (the unified HF
checkpoint TensorRT-LLM and vLLM serve), plus any a plugin registers. One module each, found by name.

A backend is an object with the ``Backend`` protocol: the methods it offers (names in forge.gpu.methods), the
checkpoint format it writes, its config.json pre-flight, and the three stages the quantize step drives
(``quantize`` in place, ``export``, ``validate`` what was written). Everything else (seed, dtype, tokenizer,
calibration windows, loading, verification, reports, manifest) is the quantize step's, the same for all.
Which backend runs is decided here, from the recipe alone.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

from forge.core.plugins import Registry

if TYPE_CHECKING:
    import torch

    from forge.model.shape import ModelShape
    from forge.recipe.load import LoadedRecipe

__all__ = ["Backend", "Quantized", "REGISTRY", "get", "backend_for", "checkpoint_format", "problems",
           "needs_calibration", "architecture_problems", "cast_float32", "fp8_to_float", "fp8_dequantized", "TensorReader",
           "one_torch_thread"]


@dataclass
class Quantized:
    """What a backend's quantize stage reports: per-layer rows (any columns) and extra report sections."""

    layers: list[dict]
    summary: dict = field(default_factory=dict)      # joins the step's facts (e.g. mean weight error)
    sections: dict = field(default_factory=dict)     # extra report.json sections (e.g. AWQ mappings)


class Backend(Protocol):
    name: str                        # the registry name (quantize.backend)
    title: str                       # shown to people: "llm-compressor"
    methods: tuple[str, ...]         # forge.gpu.methods names it offers ("none" included)
    tools: tuple[str, ...]           # distributions whose versions enter the key and the manifest
    loads_in_transformers: bool      # its checkpoints load with transformers (then verified by generating)

    def format(self, q) -> str:
        """The checkpoint format it writes for this quantize section (a forge.gpu.methods format name)."""
        ...

    def needs_calibration(self, q) -> bool: ...

    def verifies(self, q) -> bool:
        """Whether the quantize step can run what it writes for ``q`` on this machine (it loads in transformers,
        or ``dequantized`` gives its float weights): only then does the reference step record BF16's tokens."""
        ...

    def preflight(self, loaded: "LoadedRecipe", shape: "ModelShape") -> list[str]:
        """Problems from config.json alone (architecture support), located in the recipe."""
        ...

    def quantize(self, model, q, windows: list[list[int]] | None, *, report: Callable, log_dir: Path) -> Quantized:
        """Calibrate on ``windows`` (token ids; None when no calibration is needed) and quantize in place."""
        ...

    def export(self, model, out: Path, *, dtype, loaded: "LoadedRecipe") -> None:
        """Write the checkpoint into ``out`` with tensors in the recipe ``dtype`` (the tokenizer is written for it)."""
        ...

    def validate(self, out: Path, q) -> dict:
        """Check what was written against the recipe; facts about it, or ValueError naming each problem."""
        ...

    def dequantized(self, out: Path, q) -> "dict | Iterable[tuple[str, Any]] | None":
        """Float weights by tensor name (a dict, or better an iterator yielding one tensor at a time), when the
        checkpoint does not load in transformers but dequantizes; None when it does not."""
        ...


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
    from forge import engines

    loads = engines.get(engine).formats
    names = REGISTRY.names()
    for name in names:
        b = get(name)
        if quantize.method in b.methods and (quantize.method == "none" or b.format(quantize) in loads):
            return name
    return next((n for n in names if get(n).format(quantize) in loads), names[0])


def checkpoint_format(loaded: "LoadedRecipe") -> str:
    """The format of the checkpoint the quantize step writes for this recipe ("bf16" when not quantized)."""
    q = loaded.recipe.quantize
    if q.method == "none":
        return "bf16"
    return get(backend_for(q, loaded.recipe.target.engine)).format(q)


def needs_calibration(quantize, engine: str) -> bool:
    return quantize.method != "none" and get(backend_for(quantize, engine)).needs_calibration(quantize)


def verifies(quantize, engine: str) -> bool:
    """Whether the quantize step verifies this recipe's checkpoint by generation (the reference step then runs)."""
    return quantize.method != "none" and get(backend_for(quantize, engine)).verifies(quantize)


def problems(loaded: "LoadedRecipe") -> list[str]:
    """Backend/method/engine combinations that cannot work, located in the recipe."""
    from forge import engines

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


def architecture_problems(loaded: "LoadedRecipe", shape: "ModelShape", title: str, supported: frozenset[str]) -> list[str]:
    """The pre-flight's architecture check, one message for every backend."""
    arch, q = shape.architecture, loaded.recipe.quantize
    if arch in supported or arch.islower():  # lower-case: a GGUF arch name (llama, qwen2, ...)
        return []
    return [f"{loaded.where('quantize', 'method')}: {q.method} through {title} does not support architecture {arch}; "
            f"supported: {', '.join(sorted(supported))}"]


def cast_float32(out: Path, dtype, only: Callable[[str], bool] = lambda name: True) -> None:
    """Cast the float32 tensors of a written checkpoint (left by CPU calibration) to the recipe dtype, and say
    so in config.json; quantized ints/fp8 stay as they are, and so do tensors ``only`` rejects (scales)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    cast = False
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        if any(t.dtype == torch.float32 and only(k) for k, t in tensors.items()):
            save_file({k: (t.to(dtype) if t.dtype == torch.float32 and only(k) else t) for k, t in tensors.items()}, f,
                      metadata={"format": "pt"})
            cast = True
    if not cast:
        return
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


class TensorReader:
    """Tensor name -> a copy of it as stored in a checkpoint directory's safetensors (None when absent). Each read
    maps its shard only while it copies the tensor: reading every tensor never leaves the checkpoint resident.
    ``shards``: every tensor name -> its shard, in shard order."""

    def __init__(self, directory):
        from safetensors import safe_open

        self.shards: dict[str, Path] = {}
        for shard in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                self.shards.update(dict.fromkeys(f.keys(), shard))

    def __call__(self, name: str) -> "torch.Tensor | None":
        from safetensors import safe_open

        if (shard := self.shards.get(name)) is None:
            return None
        with safe_open(shard, "pt") as f:
            return f.get_tensor(name)


@contextmanager
def one_torch_thread() -> Iterator[int]:
    """torch's intra-op pool at one thread; yields how many it had, so that as many Python threads can run
    single-threaded ops side by side (torch releases the GIL in its ops)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


FP8_ROWS = 1 << 20   # elements per step of the fp8 decode: its temporaries stay in the CPU cache (fastest of 2^18-2^22)


def fp8_to_float(q: "torch.Tensor", out: "torch.Tensor | None" = None, scale=1.0) -> "torch.Tensor":
    """float8_e4m3fn -> float32 (times ``scale``, into ``out`` when given), exactly: each fp8 byte sign-extended to
    16 bits and shifted by 7 is a float16 with the same sign, exponent and mantissa (bit 14 cleared), worth 2^-8
    of the fp8 value (exponent biases 7 and 15); subnormals come out right, the two NaN codes stay NaN. torch's
    own cast is scalar on a CPU: in cache-sized blocks this is 4-5x faster."""
    import torch

    half = q.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(-0x4001).view(torch.float16)
    out = torch.empty(q.shape, dtype=torch.float32) if out is None else out
    out.copy_(half).mul_(torch.as_tensor(scale, dtype=torch.float32) * 256.0)
    nan = torch.eq(q.view(torch.uint8).bitwise_and(0x7F), 0x7F)
    return out.masked_fill_(nan, float("nan")) if bool(nan.any()) else out


def fp8_dequantized(path) -> "Iterator[tuple[str, torch.Tensor]]":
    """An FP8 checkpoint's quantized weights back in float32 (fp8 × weight_scale, per tensor or per output
    channel), one tensor at a time, decoded in cache-sized row blocks. compressed-tensors and ModelOpt's unified
    checkpoint both store ``<layer>.weight`` (float8_e4m3fn) beside ``<layer>.weight_scale``. Each tensor lives in
    one buffer reused for the next: copy it before taking the next (a fresh 12 GB of float32 pages for a 3B
    model would cost more than the decode)."""
    import torch

    buffer = torch.empty(0, dtype=torch.float32)
    read = TensorReader(path)
    scales = [(file.name, key) for key, file in read.shards.items() if key.endswith(".weight_scale")]
    for shard, key in scales:   # one tensor mapped at a time: the checkpoint never becomes resident as a whole
        name = key.removesuffix("_scale")
        q, scale = read(name), read(key).float()
        if q is None or q.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{shard}: {name} is {'missing' if q is None else q.dtype}, not float8_e4m3fn, beside {key}")
        if buffer.numel() < q.numel():
            buffer = torch.empty(q.numel(), dtype=torch.float32)
        out = buffer[:q.numel()].view(q.shape)
        rows = max(1, FP8_ROWS // max(1, q[0].numel())) if q.dim() > 1 else q.numel()
        per_row = scale.numel() > 1
        if per_row and tuple(scale.shape) != (q.shape[0], 1):
            raise ValueError(f"{shard}: {key} has shape {tuple(scale.shape)}: only per-tensor and per-channel FP8 "
                             "scales are dequantized here")
        for i in range(0, q.shape[0], rows):
            fp8_to_float(q[i:i + rows], out=out[i:i + rows], scale=scale[i:i + rows] if per_row else scale)
        yield name, out
