"""The quantization methods forge knows: one row per method, the only list of them.

The recipe schema (``quantize.method``), the backends (which methods each offers), the capability check
(via the scheme), ``forge fit`` (bytes per parameter) and the engines (flags that follow the checkpoint
format) all read this table. Adding a method is one row here (then `python -m forge schema`).

Bytes per weight, Linear layers only (embeddings stay BF16): ``bits / 8`` for the quantized value, plus per
group of ``group`` input features one scale of ``scale_bytes`` (BF16: 2; NVFP4's E4M3 block scale: 1) and,
for asymmetric integer schemes, a zero point of ``bits / 8`` bytes. ``group=None`` means a scale per output
channel; ``group="recipe"`` the recipe's ``group_size`` (default 128).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["Method", "METHODS", "NAMES", "AUTO", "get", "scheme", "written_as", "bytes_per_linear", "KV_CACHE_ALGO", "GROUPED"]

Calibrates = Literal["nothing", "weights", "activations", "awq-smoothing", "smoothquant"]


@dataclass(frozen=True)
class Method:
    name: str
    scheme: str                        # what runs on the GPU: W4A16, FP8-W8A8, ... (the capability rows' key)
    bits: int                          # weight bits (the default when bits_options has more than one)
    calibrates: Calibrates             # what calibration data is used for ("nothing": data-free)
    formats: tuple[str, ...]           # checkpoint formats a backend can write it as
    group: int | None | str = None     # see the module docstring
    scale_bytes: float = 2.0
    bits_options: tuple[int, ...] = ()
    quant_algo: str | None = None      # TensorRT-LLM's QuantAlgo name (hf_quant_config.json, engine config)
    summary: str = ""

    def scheme_for(self, bits: int | None) -> str:
        return self.scheme.replace("{bits}", str(bits or self.bits))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "BF16", 16, "nothing", ("bf16",), summary="BF16 pass-through"),
    Method("awq", "W4A16", 4, "awq-smoothing", ("compressed-tensors", "modelopt", "trtllm-checkpoint"),
           group="recipe", bits_options=(4,), quant_algo="W4A16_AWQ", summary="AWQ smoothing + 4-bit group weights"),
    Method("gptq", "W{bits}A16", 4, "weights", ("compressed-tensors",), group="recipe", bits_options=(4, 8),
           summary="GPTQ (Hessian from calibration activations), 4 or 8-bit group weights"),
    Method("fp8", "FP8-W8A8", 8, "nothing", ("compressed-tensors", "modelopt", "trtllm-checkpoint"),
           quant_algo="FP8", summary="FP8 E4M3 weights and activations (dynamic; static scales are calibrated)"),
    Method("int8", "INT8-W8A8", 8, "smoothquant", ("compressed-tensors",),
           summary="SmoothQuant + GPTQ INT8 weights, dynamic per-token INT8 activations"),
    Method("w4a8_awq", "W4A8", 4, "awq-smoothing", ("modelopt", "trtllm-checkpoint"), group="recipe",
           quant_algo="W4A8_AWQ", summary="AWQ 4-bit weights, FP8 activations (TensorRT-LLM)"),
    Method("nvfp4", "NVFP4", 4, "activations", ("modelopt", "trtllm-checkpoint"), group=16, scale_bytes=1.0,
           quant_algo="NVFP4", summary="FP4 E2M1 weights and activations, an E4M3 scale per 16 (Blackwell)"),
)}
NAMES: tuple[str, ...] = tuple(METHODS)
AUTO = "auto"   # quantize.method: auto is not a method: forge.orchestrate.auto picks one of these per target (no row)
GROUPED: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.group == "recipe")   # quantize.group_size applies
KV_CACHE_ALGO = {"auto": None, "fp8": "FP8"}   # quantize.kv_cache -> kv_cache_quant_algo


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        import difflib

        guess = difflib.get_close_matches(name, NAMES, n=1)
        raise ValueError(f"Unknown method {name!r}." + (f" Did you mean {guess[0]!r}?" if guess else "")
                         + f" Available: {', '.join(NAMES)}") from None


def written_as(fmt: str) -> tuple[str, ...]:
    """Methods whose row lists checkpoint format ``fmt`` ("none" first: every backend passes BF16 through)."""
    return ("none", *(n for n, m in METHODS.items() if fmt in m.formats))


def scheme(method: str, bits: int | None = None) -> str:
    """The scheme a method runs as: W4A16, W8A16, FP8-W8A8, ... (an unknown name is returned as it is)."""
    m = METHODS.get(method)
    return m.scheme_for(bits) if m else method


def bytes_per_linear(method: str, fan_in: int, fan_out: int, *, bits: int | None = None,
                     group_size: int | None = None, symmetric: bool = True) -> float:
    """Bytes one Linear layer's weights take in a checkpoint of this method, scales and zero points included."""
    m = get(method)
    b = bits or m.bits
    n = fan_in * fan_out
    if b >= 16:
        return 2.0 * n
    group = (group_size or 128) if m.group == "recipe" else (m.group or fan_in)
    groups = fan_out * math.ceil(fan_in / group)
    zero = 0.0 if symmetric or m.group != "recipe" else b / 8
    return n * b / 8 + groups * (m.scale_bytes + zero)
