"""The target-GPU contract: whether a GPU and engine can run a method, and with what kernel.

The method's scheme (forge.gpu.methods) is looked up in the engine's capability rows (forge.engines: each
engine module lists the schemes it runs, the minimum compute capability and the kernel). Used by the
quantize pre-flight, `forge validate` and `forge fit`. Facts (vLLM and TensorRT-LLM documentation):
FP8 W8A8 needs FP8 tensor cores (>= 8.9; vLLM and TGI run FP8 weight-only on Ampere); Marlin needs >= 8.0;
Machete is Hopper-only; CUTLASS INT8 from 7.5; NVFP4 needs Blackwell (>= 10.0).
"""
from __future__ import annotations

from dataclasses import dataclass

from forge import engines
from forge.core.host import isa_at_least
from forge.gpu import methods
from forge.gpu.catalog import Gpu

__all__ = ["Verdict", "scheme_of", "check"]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    scheme: str          # e.g. W4A16, FP8-W8A8
    mode: str            # what will actually run: e.g. "W8A8", "weight-only (FP8 Marlin)"
    kernel: str
    message: str = ""


def scheme_of(method: str, bits: int | None = None) -> str:
    return methods.scheme(method, bits)


def _fmt(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def check(gpu: Gpu, engine: str, method: str, bits: int | None = None) -> Verdict:
    scheme = scheme_of(method, bits)
    eng = engines.get(engine)
    if gpu.is_cpu and eng.cpu_kernels:
        return _on_cpu(gpu, engine, eng.cpu_kernels, scheme)
    if gpu.is_cpu or eng.cpu:
        return Verdict(True, scheme, "CPU (weights decompressed to BF16 at load)", "torch CPU")
    if gpu.compute_capability is None:  # AMD: ROCm builds
        ok = scheme in eng.rocm
        able = [e.name for e in engines.REGISTRY.all() if scheme in e.rocm]
        return Verdict(ok, scheme, scheme if ok else "unsupported", "ROCm" if ok else "-",
                       "" if ok else f"{scheme} on {gpu.name} is supported only by the ROCm build of "
                                     f"{', '.join(able) or 'no engine forge knows'}")
    cc = gpu.compute_capability
    row = eng.kernels.get(scheme)
    if row is None:
        able = [e.name for e in engines.REGISTRY.all() if scheme in e.kernels]
        return Verdict(False, scheme, "unsupported", "-",
                       f"{engine} cannot run {scheme} checkpoints; engines that can: {', '.join(able) or 'none'}")
    if cc < row.min_cc and row.weight_only_from is not None and cc >= row.weight_only_from:
        return Verdict(True, scheme, f"weight-only ({row.weight_only_kernel})", row.weight_only_kernel,
                       f"{gpu.name} (compute capability {_fmt(cc)}) has no {scheme.split('-')[0]} tensor cores: {engine} "
                       f"will run this checkpoint weight-only (activations in BF16), with less speed-up than on "
                       f">= {_fmt(row.min_cc)}")
    if cc < row.min_cc:
        return Verdict(False, scheme, "unsupported", "-",
                       f"{scheme} on {engine} needs compute capability >= {_fmt(row.min_cc)} ({row.name}); "
                       f"{gpu.name} has {_fmt(cc)}")
    kernel = row.on_hopper if row.on_hopper and cc == (9, 0) else row.name
    mode = scheme.replace("FP8-", "").replace("INT8-", "")
    return Verdict(True, scheme, mode, kernel)


def _on_cpu(gpu: Gpu, engine: str, rows, scheme: str) -> Verdict:
    """An engine with a CPU build of its own kernels (vLLM's): the scheme's row and the target's instruction set."""
    row = rows.get(scheme)
    if row is None:
        return Verdict(False, scheme, "unsupported", "-",
                       f"{engine}'s CPU build has no kernel for {scheme}; on CPU it runs {', '.join(rows)}")
    if gpu.cpu_isa is None:
        return Verdict(False, scheme, "unsupported", "-",
                       f"target {gpu.name} names no instruction set, and {engine}'s CPU build picks its kernels by it: "
                       "use target.gpu CPU-AVX2 or CPU-AVX512 (forge/gpu/catalog/gpus.yaml)")
    if not isa_at_least(gpu.cpu_isa, row.isa):
        return Verdict(False, scheme, "unsupported", "-",
                       f"{scheme} on {engine}'s CPU build needs {row.isa.upper()} ({row.why or row.name}); target "
                       f"{gpu.name} promises only {gpu.cpu_isa.upper()}")
    return Verdict(True, scheme, f"CPU ({gpu.cpu_isa.upper()})", row.name)
