"""forge's CPU kernel for compressed-tensors' ``_quantize``, bit for bit the library's own result.

compressed-tensors picks the implementation of ``_quantize`` (scale, clamp, round to the quantized type) through
its ``ImplBackend`` registry: a Triton kernel on GPUs, torch ops elsewhere. On a CPU the torch path rounds to FP8
with torch's float8 casts, which are scalar, three times per weight: writing a Llama-3.2-3B-shaped FP8 checkpoint
spent 35 of llm-compressor's 50 s there.

The rounding is elementwise on the scaled values, and when those are 16-bit (bfloat16 or float16 weights) there
are only 65,536 of them. This kernel runs the library's own rounding (``round_to_quantized_type_args``) once on
every 16-bit value, then looks each element up, a cache-sized block of rows at a time (torch's threads divide
and cast each block): the same bytes, about 10x faster. It applies only where that holds (CPU tensors, 16-bit
scaled values, scalar ranges, no global scale, scales that broadcast along whole rows) and otherwise leaves the
call to the library.
compressed-tensors' ``CT_ENFORCE_EAGER=1`` turns every registered kernel off, this one included.

The blocks run in the calling thread. Spread over a pool of Python threads they were 5 % faster on one tensor
(12.9 against 13.6 ms per 25M elements) and 16 % over the 14 shards of the 14B shape (47.4 against 56.3 s), but
there they grew the process's anonymous memory from 1.6 to 3.3 GB (peak RSS 5.48 against 3.85 GB; the split is in
bench/results/scale-qwen2.5-14b-streaming.json).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["register", "quantize_rows"]

BLOCK_ELEMENTS = 1 << 19      # per lookup: the block's temporaries stay in the CPU cache (fastest of 2^16-2^22)
_tables: dict[tuple, "torch.Tensor"] = {}
_lock = threading.Lock()
_registered = False


def register() -> None:
    """Add the kernel to compressed-tensors' ``_quantize`` dispatch (once per process; later calls do nothing)."""
    global _registered
    with _lock:
        if _registered:
            return
        from compressed_tensors.utils.impl_backend import ImplBackend

        ImplBackend.register("_quantize", _applies, priority=1)(forge_quantize_cpu)
        _registered = True


def _rows(t, x) -> "str | None":
    """How ``t`` (a scale or zero point) goes with a block of ``x``'s rows: "whole" (it broadcasts over rows),
    "sliced" (one entry per row), or None (anything else: the kernel does not apply)."""
    if t is None or t.dim() < x.dim() or t.shape[0] == 1:
        return "whole"
    return "sliced" if t.dim() == x.dim() and t.shape[0] == x.shape[0] else None


def _applies(x, scale, zero_point, q_min, q_max, args, dtype=None, global_scale=None) -> bool:
    import torch
    from compressed_tensors.quantization import QuantizationType

    kind = args.type
    return (x.device.type == "cpu" and x.dim() >= 1 and x.numel() >= 4 * 65536 and global_scale is None
            and q_min.numel() == 1 and q_max.numel() == 1 and scale.device.type == "cpu"
            and (kind == QuantizationType.INT or (kind == QuantizationType.FLOAT and args.num_bits == 8))
            and torch.result_type(x, scale) in (torch.bfloat16, torch.float16)
            and all(t is None or torch.broadcast_shapes(x.shape, t.shape) == x.shape for t in (scale, zero_point))
            and _rows(scale, x) is not None and _rows(zero_point, x) is not None)


def _table(scaled_dtype, args, q_min, q_max, dtype) -> "torch.Tensor":
    """The library's rounding of every ``scaled_dtype`` value, indexed by its bits + 32768."""
    import torch
    from compressed_tensors.quantization.quant_args import round_to_quantized_type_args

    key = (scaled_dtype, str(args.type), args.num_bits, float(q_min), float(q_max), dtype)
    with _lock:
        table = _tables.get(key)
        if table is None:
            values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(scaled_dtype)
            table = round_to_quantized_type_args(tensor=values, args=args, min=q_min, max=q_max)
            _tables[key] = table = table.to(dtype) if dtype is not None else table
    return table


def quantize_rows(x, scale, zero_point, q_min, q_max, args, dtype=None) -> "torch.Tensor":
    """``_quantize``'s result for ``x`` (see ``_applies`` for where it holds), a block of rows at a time."""
    import torch

    scaled_dtype = torch.result_type(x, scale)
    table = _table(scaled_dtype, args, q_min, q_max, dtype)
    out = torch.empty(x.shape, dtype=table.dtype)
    lookup = table.view(torch.uint8 if table.element_size() == 1 else torch.int16)
    flat = out.view(lookup.dtype)
    step = max(1, BLOCK_ELEMENTS // max(1, x[0].numel()))
    sliced_scale, sliced_zp = _rows(scale, x) == "sliced", _rows(zero_point, x) == "sliced"
    for i in range(0, x.shape[0], step):
        # the library's own ops, in its order, on a block of rows: the same 16-bit values
        scaled = x[i:i + step] / (scale[i:i + step] if sliced_scale else scale)
        if zero_point is not None:
            scaled += (zero_point[i:i + step] if sliced_zp else zero_point).to(x.dtype)
        index = scaled.contiguous().view(torch.int16).to(torch.int32).add_(32768)
        torch.index_select(lookup, 0, index.view(-1), out=flat[i:i + step].view(-1))
    return out


def forge_quantize_cpu(x, scale, zero_point, q_min, q_max, args, dtype=None, global_scale=None):
    """The registered kernel (compressed-tensors calls it with ``_quantize``'s arguments)."""
    import torch

    with torch.no_grad():
        return quantize_rows(x, scale, zero_point, q_min, q_max, args, dtype)
