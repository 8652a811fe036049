"""Probes of the machine a step runs on: what steps put into their key material so that a key describes
the machine that built the output (device, CPU bf16 support, GPUs, tool and distribution versions).

One place for them: steps call these, never each other's helpers. All are cheap: no torch import (the FP8 GEMM
probe runs torch in a child process, once per process).
"""
from __future__ import annotations

import contextvars
import functools
import importlib.util
import re
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from forge.core import options as env

__all__ = ["device", "cpu_has_native_bf16", "LocalGpu", "local_gpus", "tool_versions", "trtllm_version"]


def device() -> str:
    """"cuda" when torch is installed and an NVIDIA device is visible, else "cpu"."""
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    # torch.cuda.is_available() imports torch (~1 s); CUDA_VISIBLE_DEVICES and /dev/nvidia0 are free.
    if env.current().cuda_visible_devices != "" and Path("/dev/nvidia0").exists():
        return "cuda"
    return "cpu"


def memory_bytes() -> int:
    """Physical memory of this machine, or the cgroup's limit when one is set lower (a container, a CI runner)."""
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def _cpu_flags() -> set[str]:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.split()[2:])


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls run in hardware; without them PyTorch emulates bf16 on CPU."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


# One FP8 GEMM the way vLLM's CPU build runs an FP8 W8A8 checkpoint without AMX-FP8 (ChannelWiseTorchFP8Scaled-
# MMLinearKernel: torch._scaled_mm with unit scales, float32 out), with oneDNN naming the implementation it picked.
_FP8_GEMM = ("import torch; torch.set_num_threads(1); a = torch.ones(8, 64).to(torch.float8_e4m3fn); "
             "b = torch.ones(64, 32).to(torch.float8_e4m3fn).t().contiguous().t(); one = torch.ones(1); "
             "torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)")


def fp8_gemm_kernel() -> str | None:
    """``_fp8_gemm_run``'s answer, through ``probe``: package's key material asks it, and ``forge plan`` starts no
    child process (Unprobed until this process has run it)."""
    return probe("which kernel computes torch's FP8 GEMM here (a torch child process)", _fp8_gemm_run,
                 remembered=lambda: _fp8_gemm_run() if _fp8_gemm_run.cache_info().currsize else None)


@functools.lru_cache(maxsize=1)
def _fp8_gemm_run() -> str | None:
    """What computes torch's FP8 ``_scaled_mm`` on this CPU: the oneDNN implementation ("ref:any": oneDNN's scalar
    reference kernel, ~100x a BF16 GEMM, measured on an Intel CPU with AVX512-FP16 and no AMX-FP16; "brg_matmul:…": a
    JIT kernel), or "torch" where torch computes it without oneDNN (its own kernel: 18 ms for a 37x576x1536 GEMM here
    with oneDNN switched off, against 1.2 s on oneDNN's reference kernel). Read from ONEDNN_VERBOSE in a child
    process (torch is not imported here); forge's venv pins the torch the vLLM CPU base pins (2.13.0, oneDNN 3.12),
    so it decides alike. None: the probe failed (no torch, or no FP8 on this build)."""
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _FP8_GEMM], capture_output=True, text=True, timeout=120,
                              env={**env.passthrough(()), "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    line = next((ln for ln in proc.stdout.splitlines() if ",exec,cpu,matmul," in ln), None)
    return line.split(",")[6] if line else "torch"


def cpu_has_amx_fp8() -> bool:
    """AMX-FP8 (Diamond Rapids): vLLM's CPU build runs FP8 W8A8 in hardware (CPUFP8W8A8ScaledMMLinearKernel)."""
    return "amx_fp8" in _cpu_flags()


# x86 instruction-set levels a CPU target may name (forge.gpu.catalog cpu_isa), least first, and the /proc/cpuinfo
# flags each needs (AVX-512: what torch.cpu._is_avx512_supported checks, the test vLLM's CPU build dispatches on)
CPU_ISAS = {"avx2": frozenset({"avx2", "fma"}), "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})}


def cpu_isa() -> str | None:
    """The highest of CPU_ISAS this machine's CPU has (None: not even AVX2, or not x86)."""
    flags = _cpu_flags()
    return next((isa for isa in reversed(CPU_ISAS) if CPU_ISAS[isa] <= flags), None)


def isa_at_least(have: str | None, need: str) -> bool:
    """Whether instruction-set level ``have`` (a CPU_ISAS name or None) includes ``need``."""
    order = list(CPU_ISAS)
    return have in order and order.index(have) >= order.index(need)


@dataclass(frozen=True)
class LocalGpu:
    name: str
    compute_capability: str
    driver: str


def local_gpus() -> list[LocalGpu]:
    """GPUs nvidia-smi reports on this machine (none without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    proc = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    out = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            out.append(LocalGpu(*parts))
    return out


def no_nvidia_smi() -> list | None:
    """``[]`` (no GPUs) when nvidia-smi is not installed, known without running anything; else None (ask it). The
    ``remembered`` of a probe of ``local_gpus``: planning on a machine without NVIDIA's driver knows the answer."""
    return [] if shutil.which("nvidia-smi") is None else None


def tool_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of Python distributions ("absent" when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def trtllm_version() -> str:
    """The TensorRT-LLM installed here (the Python distribution, else `trtllm-build --version`)."""
    try:
        return metadata.version("tensorrt_llm")
    except Exception:
        proc = subprocess.run(["trtllm-build", "--version"], capture_output=True, text=True)
        m = re.search(r"\d+\.\d+\.\d+\S*", proc.stdout + proc.stderr)
        return m.group(0) if m else "unknown"


# ---------------------------------------------------------------------- probing, or not (forge plan)

class Unprobed(Exception):
    """A key needs a host fact that was never probed, and this caller may not probe (``forge plan``)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


_PROBES: contextvars.ContextVar[bool] = contextvars.ContextVar("forge_probes", default=True)


@contextmanager
def no_probes() -> Iterator[None]:
    """Within: ``probe`` never runs an external tool (what ``forge plan`` promises)."""
    token = _PROBES.set(False)
    try:
        yield
    finally:
        _PROBES.reset(token)


def probes_allowed() -> bool:
    return _PROBES.get()


def probe(what: str, run: Callable[[], Any], remembered: Callable[[], Any] | None = None) -> Any:
    """A host fact for key material: ``remembered()`` when it knows (not None), else ``run()`` -- unless
    probing is off, then ``Unprobed(what)``."""
    if remembered is not None and (known := remembered()) is not None:
        return known
    if not probes_allowed():
        raise Unprobed(what)
    return run()


