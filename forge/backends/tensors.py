"""Tensor helpers the backends and the verification share: reading a checkpoint one tensor at a time, FP8 decoding,
casting what CPU calibration left in float32, and torch's thread pool. torch is imported inside each function.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

__all__ = ["cast_float32", "TensorReader", "one_torch_thread", "fp8_to_float", "fp8_dequantized", "Fp8Weights",
           "FP8_ROWS", "CompressedWeights"]


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
    ``shards``: every tensor name -> its shard, in shard order; ``shapes``, ``dtypes``: every tensor name -> its shape,
    its dtype (from the files' headers: no tensor is read to list them)."""

    def __init__(self, directory):
        from safetensors import safe_open

        self.shards: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}    # safetensors' names: BF16, F32, F8_E4M3, ...
        for shard in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    self.shards[key] = shard
                    self.shapes[key] = tuple(part.get_shape())
                    self.dtypes[key] = part.get_dtype()

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


_FP8_TABLE: "torch.Tensor | None" = None


def fp8_to_float(q: "torch.Tensor", out: "torch.Tensor | None" = None, scale=1.0) -> "torch.Tensor":
    """float8_e4m3fn -> float32 (times ``scale``, into ``out`` when given), exactly: every code looked up in a
    256-entry table of torch's own cast (the two NaN codes stay NaN). torch's cast is scalar on a CPU: the
    lookup, in cache-sized blocks, is about 1.5x faster than the float16 bit moves it replaced, which were 4-5x
    faster than the cast."""
    import torch

    global _FP8_TABLE
    if _FP8_TABLE is None:
        _FP8_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    out = torch.empty(q.shape, dtype=torch.float32) if out is None else out
    index = q.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    torch.index_select(_FP8_TABLE, 0, index, out=out.view(-1))
    return out.mul_(scale) if not (isinstance(scale, float) and scale == 1.0) else out


class Fp8Weights:
    """An FP8 checkpoint's quantized weights back in float32 (fp8 x weight_scale, per tensor or per output channel),
    by name, decoded in cache-sized row blocks; None for a tensor the checkpoint did not quantize.
    compressed-tensors and ModelOpt's unified checkpoint both store ``<layer>.weight`` (float8_e4m3fn) beside
    ``<layer>.weight_scale``. ``names``: the quantized weights, in shard order. Each result lives in one buffer
    reused for the next: copy it before asking for the next (a fresh 12 GB of float32 pages for a 3B model would
    cost more than the decode). One tensor is mapped at a time: the checkpoint never becomes resident."""

    def __init__(self, path):
        self.read = TensorReader(path)
        self.names = tuple(key.removesuffix("_scale") for key in self.read.shards if key.endswith(".weight_scale"))
        self._quantized = set(self.names)
        self._buffer = None

    def _stored(self, name: str):
        """(fp8 weight, float32 scale, rows per block) as stored, checked."""
        import torch

        key, shard = name + "_scale", self.read.shards[name + "_scale"].name
        q, scale = self.read(name), self.read(key).float()
        if q is None or q.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{shard}: {name} is {'missing' if q is None else q.dtype}, not float8_e4m3fn, beside {key}")
        if scale.numel() > 1 and tuple(scale.shape) != (q.shape[0], 1):
            raise ValueError(f"{shard}: {key} has shape {tuple(scale.shape)}: only per-tensor and per-channel FP8 "
                             "scales are dequantized here")
        return q, scale, (max(1, FP8_ROWS // max(1, q[0].numel())) if q.dim() > 1 else q.numel())

    def __call__(self, name: str) -> "torch.Tensor | None":
        import torch

        if name not in self._quantized:
            return None
        q, scale, rows = self._stored(name)
        if self._buffer is None or self._buffer.numel() < q.numel():
            self._buffer = torch.empty(q.numel(), dtype=torch.float32)
        out = self._buffer[:q.numel()].view(q.shape)
        per_row = scale.numel() > 1
        for i in range(0, q.shape[0], rows):
            fp8_to_float(q[i:i + rows], out=out[i:i + rows], scale=scale[i:i + rows] if per_row else scale)
        return out

    def dequantize(self, name: str, dtype, original=None) -> "tuple[torch.Tensor, float | None]":
        """(the weight dequantized and cast to ``dtype``, its relative error ||fp8 x scale - original|| /
        ||original|| when ``original`` is given), in one pass of cache-sized row blocks on as many threads as
        torch has (each op single-threaded): the float32 value of each block is cast and compared while it is in
        the cache, never written whole. The same numbers as ``__call__`` + ``relative_error`` up to the order of
        the float64 sums."""
        import torch
        from concurrent.futures import ThreadPoolExecutor

        q, scale, rows = self._stored(name)
        out = torch.empty(q.shape, dtype=dtype)
        per_row = scale.numel() > 1
        fp8_to_float(q[:0])   # the table, made once before the threads share it

        def block(i: int) -> tuple[float, float]:
            value = fp8_to_float(q[i:i + rows], scale=scale[i:i + rows] if per_row else scale)
            out[i:i + rows].copy_(value)
            if original is None:
                return 0.0, 0.0
            ref = original[i:i + rows].float().reshape(-1)
            diff = value.reshape(-1).sub_(ref)
            return float(torch.dot(diff, diff)), float(torch.dot(ref, ref))

        starts = range(0, q.shape[0], rows)
        with one_torch_thread() as threads, ThreadPoolExecutor(max(1, min(threads, len(starts))),
                                                               thread_name_prefix="forge-fp8") as pool:
            sums = list(pool.map(block, starts))
        if original is None:
            return out, None
        num, den = sum(a for a, _ in sums), sum(b for _, b in sums)
        return out, (round((num / den) ** 0.5, 6) if den else 0.0)


def fp8_dequantized(path) -> "Iterator[tuple[str, torch.Tensor]]":
    """``Fp8Weights`` of a checkpoint as (name, tensor), one at a time, in shard order (the same reused buffer)."""
    weights = Fp8Weights(path)
    for name in weights.names:
        yield name, weights(name)


class CompressedWeights:
    """A compressed-tensors checkpoint's quantized weights back in float, by name (``<layer>.weight``), decompressed
    by the library's own compressor for the checkpoint's format (``pack-quantized`` int4/int8 for GPTQ and AWQ):
    what transformers computes when it loads the checkpoint, one layer at a time, so the checkpoint never becomes
    resident. None for a tensor the checkpoint did not quantize; ``unquantized`` reads those as written. ``names``: the quantized weights, in shard order.
    Raises ValueError for a checkpoint it cannot read this way (several config groups, a format without a
    compressor)."""

    def __init__(self, path):
        import json

        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig

        path = Path(path)
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        groups = list(QuantizationConfig.model_validate(qc).config_groups.values())
        if len(groups) != 1 or groups[0].weights is None:
            raise ValueError(f"{path / 'config.json'}: {len(groups)} quantization config groups; one group with "
                             "quantized weights is decompressed layer by layer here")
        self.scheme = groups[0]
        fmt = self.scheme.format or qc.get("format")
        self.compressor = BaseCompressor.get_value_from_registry(fmt)
        self.read = TensorReader(path)
        self.unquantized = self.read   # every other tensor as written (AWQ's smoothed norms differ from the snapshot's)
        # a quantized layer's compressed tensors sit under its name beside its weight scale
        self.names = tuple(key.removesuffix("_scale") for key in self.read.shards if key.endswith(".weight_scale"))
        self._parts: dict[str, list[str]] = {name: [] for name in self.names}   # <layer>.weight -> its stored tensors
        for key in self.read.shards:
            layer, _, local = key.rpartition(".")
            if local.startswith("weight") and f"{layer}.weight" in self._parts:
                self._parts[f"{layer}.weight"].append(key)

    def __call__(self, name: str) -> "torch.Tensor | None":
        if (keys := self._parts.get(name)) is None:
            return None
        state = {key.rpartition(".")[2]: self.read(key) for key in keys}
        return self.compressor.decompress(state, self.scheme)["weight"]
