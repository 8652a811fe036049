"""vLLM (`vllm serve`): compressed-tensors and ModelOpt checkpoints, OpenAI-compatible API.

``--quantization`` follows the checkpoint's format: compressed-tensors for llm-compressor's, ``modelopt``
for ModelOpt FP8 and ``modelopt_fp4`` for ModelOpt NVFP4 (vLLM's names; vLLM docs, "NVIDIA Model Optimizer").
Capability rows from vLLM's quantization support table: Marlin from 8.0, Machete on Hopper, FP8 W8A8 from
8.9 (Ampere runs FP8 weight-only through FP8 Marlin), CUTLASS INT8 from 7.5, NVFP4 from 10.0.
"""
from __future__ import annotations

from forge.engines.base import EvalApi, GpuEngine, Kernel, QueueMetric, ServeAt, Serving, version_tuple


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
    rocm = frozenset({"BF16", "FP8-W8A8", "W4A16", "W8A16", "INT8-W8A8"})
    # /v1/completions with echo + logprobs returns the prompt's token logprobs: every lm-eval request type
    eval_api = EvalApi("local-completions", "/v1/completions",
                       frozenset({"generate_until", "loglikelihood", "loglikelihood_rolling"}), numerics="vllm")

    def serve_command(self, recipe, fmt: str, at: ServeAt) -> tuple[str, ...]:
        t, q = recipe.target, recipe.quantize
        cmd = ["vllm", "serve", at.model_dir, "--host", "0.0.0.0", "--port", str(at.port),
               "--served-model-name", at.served_name, "--max-model-len", str(t.max_model_len),
               "--max-num-seqs", str(t.max_num_seqs), "--gpu-memory-utilization", str(t.gpu_memory_utilization),
               "--tensor-parallel-size", str(t.tensor_parallel)]
        if fmt == "compressed-tensors":
            cmd += ["--quantization", "compressed-tensors"]
        elif fmt == "modelopt":
            cmd += ["--quantization", "modelopt_fp4" if q.method == "nvfp4" else "modelopt"]
        if q.kv_cache == "fp8":
            cmd += ["--kv-cache-dtype", "fp8"]
        return tuple(cmd)

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
