"""Quantization through llm-compressor, written as compressed-tensors (what vLLM loads natively).

AutoAWQ and AutoGPTQ are archived; llm-compressor is where AWQ and GPTQ are maintained. Schemes:

    awq   AWQModifier (smoothing) + QuantizationModifier   W4A16, group, (a)symmetric
    gptq  GPTQModifier                                      W4A16 / W8A16, group, activation order
    fp8   QuantizationModifier FP8_DYNAMIC (data-free) or FP8 (static per-tensor, calibrated)
    int8  SmoothQuantModifier + GPTQModifier W8A8 (per-channel weights, dynamic per-token activations)
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

CALIBRATED = {"awq", "gptq", "int8"}


def needs_calibration(q) -> bool:
    return q.method in CALIBRATED or (q.method == "fp8" and q.fp8_scheme == "static") or q.kv_cache == "fp8"


def _weights(q) -> dict:
    bits = 4 if q.method == "awq" else (q.bits or 4)
    return {"num_bits": bits, "type": "int", "symmetric": q.symmetric, "strategy": "group",
            "group_size": q.group_size or 128, "actorder": ("weight" if q.actorder else None)}


def build_recipe(q) -> list:
    """llm-compressor modifiers for a recipe's quantize section."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(q.ignore)
    kv = ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
          if q.kv_cache == "fp8" else None)
    if q.method == "fp8":
        return [QuantizationModifier(targets=["Linear"], ignore=ignore, kv_cache_scheme=kv,
                                     scheme="FP8_DYNAMIC" if q.fp8_scheme == "dynamic" else "FP8")]
    if q.method == "gptq":
        w = _weights(q)
        return [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": w}}, ignore=ignore,
                             kv_cache_scheme=kv, batched_quantization=None)]
    if q.method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        w = {k: v for k, v in _weights(q).items() if k != "actorder"}
        return [AWQModifier(), QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": w}},
                                                    ignore=ignore, kv_cache_scheme=kv)]
    if q.method == "int8":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=ignore, kv_cache_scheme=kv,
                             batched_quantization=None)]
    raise ValueError(f"llm-compressor backend has no method {q.method!r}")


# ------------------------------------------------------------------ CPU shim


@contextmanager
def cpu_pin_memory_shim() -> Iterator[None]:
    """Without an accelerator, make IntermediatesCache.pin_memory a no-op.

    llm-compressor's AWQ pins cached activations before its grid search so that later host-to-device
    copies can be asynchronous. Pinning needs an accelerator runtime; on a CPU-only torch it raises
    ("Cannot access accelerator device when none is available") and AWQ crashes. With no device to
    copy to, pinning has no purpose, so skipping it changes nothing but the crash. Narrow on purpose:
    only this method, only without an accelerator, only for the duration of a quantize run. The test
    tests/test_quantize.py::test_pin_memory_shim_still_needed pins the upstream function it replaces.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


# ------------------------------------------------------------------ per-layer report


@dataclass
class LayerLog:
    """Per-layer facts llm-compressor reports through loguru while it runs."""

    report: Callable
    total: int
    rows: dict[str, dict] = field(default_factory=dict)          # Linear name -> GPTQ error, seconds
    mappings: dict[str, dict] = field(default_factory=dict)      # AWQ smooth layer -> loss before/after
    _pending: list[str] = field(default_factory=list)
    _metric: list[tuple[str, float]] = field(default_factory=list)
    _last: float = field(default_factory=time.monotonic)

    _QUANTIZING = re.compile(r"Quantizing \d+ module\(s\): \[(.*)\]")
    _AWQ = re.compile(r"AWQ grid search for (\S+): initial error = ([\d.e+-]+), best error = ([\d.e+-]+)")

    def sink(self, message) -> None:
        rec = message.record
        text = rec["message"]
        if m := self._QUANTIZING.search(text):
            self._pending = [n.strip().strip("'\"") for n in m.group(1).split(",")]
            self._metric = []
            self.report(f"GPTQ {self._pending[0]}", completed=len(self.rows), total=self.total)
        elif rec["level"].name == "METRIC" and self._pending:
            kind, _, value = text.partition(" ")
            self._metric.append((kind, float(value.rstrip("s"))))
            per = 2  # time, error
            if len(self._metric) == per * len(self._pending):
                # ExitStack closes the per-module loggers last-in first-out
                for i, name in enumerate(reversed(self._pending)):
                    vals = dict(self._metric[i * per:(i + 1) * per])
                    self.rows.setdefault(name, {})["backend_error"] = vals.get("error")
                    self.rows[name]["seconds"] = vals.get("time")
                self._pending = []
        elif m := self._AWQ.search(text):
            now = time.monotonic()
            self.mappings[m.group(1)] = {"smooth_layer": m.group(1), "initial_loss": float(m.group(2)),
                                         "best_loss": float(m.group(3)), "seconds": round(now - self._last, 3)}
            self._last = now
            self.report(f"AWQ smoothing {m.group(1)}", completed=len(self.mappings), total=self.total)


def quantize(model, q, dataset, *, max_seq_len: int, report: Callable, total_layers: int) -> LayerLog:
    """Run oneshot in place on model. Returns what the backend reported per layer (GPTQ) and mapping (AWQ)."""
    from llmcompressor import oneshot
    from loguru import logger

    log = LayerLog(report=report, total=total_layers)
    sink_id = logger.add(log.sink, level="DEBUG", filter=lambda r: r["name"].startswith("llmcompressor"))
    try:
        with cpu_pin_memory_shim():
            kwargs = {}
            if dataset is not None:
                kwargs = dict(dataset=dataset, max_seq_length=max_seq_len, num_calibration_samples=len(dataset),
                              shuffle_calibration_samples=False)
            oneshot(model=model, recipe=build_recipe(q), **kwargs)
    finally:
        logger.remove(sink_id)
    return log
