"""The target-GPU contract: which quantization schemes a GPU and engine can run, and with what kernel.

One table, used by the quantize pre-flight, `forge validate` and `forge fit`. Facts (vLLM and
TensorRT-LLM documentation):
- FP8 W8A8 needs FP8 tensor cores: compute capability >= 8.9 (Ada, Hopper, Blackwell). On Ampere
  (8.0-8.6) vLLM and TGI run FP8 checkpoints weight-only (FP8 Marlin); TensorRT-LLM refuses.
- W4A16 / W8A16 (AWQ, GPTQ) use Marlin kernels, which need >= 8.0; Machete (faster for large
  batches) is Hopper-only (9.0).
- INT8 W8A8 (SmoothQuant) runs on CUTLASS int8 kernels from 7.5.
- NVFP4 needs Blackwell (>= 10.0).
"""
from __future__ import annotations

from dataclasses import dataclass

from forge.catalog import Gpu

__all__ = ["Verdict", "scheme_of", "check"]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    scheme: str          # e.g. W4A16, FP8-W8A8
    mode: str            # what will actually run: e.g. "W8A8", "weight-only (FP8 Marlin)"
    kernel: str
    message: str = ""


def scheme_of(method: str, bits: int | None = None) -> str:
    return {
        "none": "BF16",
        "awq": "W4A16",
        "gptq": f"W{bits or 4}A16",
        "fp8": "FP8-W8A8",
        "int8": "INT8-W8A8",
        "int4_awq": "W4A16",
        "w4a8_awq": "W4A8",
        "nvfp4": "NVFP4",
    }.get(method, method)


# scheme -> (minimum compute capability, kernel) per engine; None means the engine cannot run it.
_MIN_CC: dict[str, dict[str, tuple[tuple[int, int], str] | None]] = {
    "BF16":      {"vllm": ((8, 0), "native"), "tgi": ((8, 0), "native"), "trtllm": ((8, 0), "native")},
    "W4A16":     {"vllm": ((8, 0), "Marlin"), "tgi": ((8, 0), "Marlin"), "trtllm": ((8, 0), "AWQ/GPTQ plugin")},
    "W8A16":     {"vllm": ((8, 0), "Marlin"), "tgi": ((8, 0), "Marlin"), "trtllm": ((8, 0), "weight-only plugin")},
    "FP8-W8A8":  {"vllm": ((8, 9), "CUTLASS FP8"), "tgi": ((8, 9), "FP8"), "trtllm": ((8, 9), "FP8")},
    "INT8-W8A8": {"vllm": ((7, 5), "CUTLASS INT8"), "tgi": ((7, 5), "CUTLASS INT8"), "trtllm": ((7, 5), "SmoothQuant")},
    "W4A8":      {"vllm": None, "tgi": None, "trtllm": ((8, 9), "W4A8 AWQ")},
    "NVFP4":     {"vllm": ((10, 0), "NVFP4"), "tgi": None, "trtllm": ((10, 0), "NVFP4")},
}


def _fmt(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def check(gpu: Gpu, engine: str, method: str, bits: int | None = None) -> Verdict:
    scheme = scheme_of(method, bits)
    if gpu.is_cpu or engine == "cpu":
        return Verdict(True, scheme, "CPU (weights decompressed to BF16 at load)", "torch CPU")
    if gpu.compute_capability is None:  # AMD: ROCm builds of vLLM
        ok = scheme in ("BF16", "FP8-W8A8", "W4A16", "W8A16", "INT8-W8A8") and engine == "vllm"
        return Verdict(ok, scheme, scheme if ok else "unsupported", "ROCm" if ok else "-",
                       "" if ok else f"{scheme} on {gpu.name} is supported only by vLLM's ROCm build")
    cc = gpu.compute_capability
    rules = _MIN_CC.get(scheme, {})
    rule = rules.get(engine)
    if rule is None:
        engines = [e for e, r in rules.items() if r is not None]
        return Verdict(False, scheme, "unsupported", "-",
                       f"{engine} cannot run {scheme} checkpoints; engines that can: {', '.join(engines) or 'none'}")
    need, kernel = rule
    if scheme == "FP8-W8A8" and cc < (8, 9) and engine in ("vllm", "tgi") and cc >= (8, 0):
        return Verdict(True, scheme, "weight-only (FP8 Marlin)", "FP8 Marlin",
                       f"{gpu.name} (compute capability {_fmt(cc)}) has no FP8 tensor cores: {engine} will run "
                       "this FP8 checkpoint weight-only (activations in BF16), with less speed-up than on >= 8.9")
    if cc < need:
        return Verdict(False, scheme, "unsupported", "-",
                       f"{scheme} on {engine} needs compute capability >= {_fmt(need)} ({kernel}); "
                       f"{gpu.name} has {_fmt(cc)}")
    if scheme in ("W4A16", "W8A16") and engine == "vllm" and cc == (9, 0):
        kernel = "Machete"
    mode = scheme.replace("FP8-", "").replace("INT8-", "")
    return Verdict(True, scheme, mode, kernel)
