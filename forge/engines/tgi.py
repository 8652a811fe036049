"""Text Generation Inference (`text-generation-launcher`): BF16 and compressed-tensors checkpoints."""
from __future__ import annotations

from forge.engines.base import GpuEngine, Kernel, QueueMetric, ServeAt, Serving


class Tgi(GpuEngine):
    name = "tgi"
    formats = ("bf16", "compressed-tensors")
    kernels = {
        "BF16": Kernel((8, 0), "native"),
        "W4A16": Kernel((8, 0), "Marlin"),
        "W8A16": Kernel((8, 0), "Marlin"),
        "FP8-W8A8": Kernel((8, 9), "FP8", weight_only_from=(8, 0), weight_only_kernel="FP8 Marlin"),
        "INT8-W8A8": Kernel((7, 5), "CUTLASS INT8"),
    }

    def serve_command(self, recipe, fmt: str, at: ServeAt) -> tuple[str, ...]:
        t = recipe.target
        cmd = ["text-generation-launcher", "--model-id", at.model_dir, "--hostname", "0.0.0.0", "--port", str(at.port),
               "--max-total-tokens", str(t.max_model_len), "--max-input-tokens", str(max(1, t.max_model_len - 1)),
               "--max-concurrent-requests", str(t.max_num_seqs), "--cuda-memory-fraction", str(t.gpu_memory_utilization),
               "--num-shard", str(t.tensor_parallel)]
        if fmt == "compressed-tensors":
            cmd += ["--quantize", "compressed-tensors"]
        return tuple(cmd)

    def serving(self, version: str | None) -> Serving:
        # /metrics on the API port; tgi_queue_size is the queue (no model label: one model per server)
        return Serving(self.name, version or "?", self.health_route, "/metrics", QueueMetric("tgi_queue_size", None), None,
                       read_only_root=True, writable_dirs=("/tmp", "/data"), env=(("HOME", "/tmp"),),
                       init_seconds=180)   # warm-up batches at max_batch_total_tokens


ENGINE = Tgi()
