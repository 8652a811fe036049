"""TensorRT-LLM (`trtllm-serve`): the PyTorch backend on a ModelOpt checkpoint, or the TensorRT backend on
an engine built by the compile step (legacy engine mode). The command lines live in forge.engines.trtllm_build."""
from __future__ import annotations

from forge.engines.base import GpuEngine, Kernel, ServeAt, Serving, version_tuple
from forge.engines.trtllm_build import engine_mode_problems, mode, serve_command


class TrtLlm(GpuEngine):
    name = "trtllm"
    formats = ("bf16", "modelopt", "trtllm-checkpoint")
    kernels = {
        "BF16": Kernel((8, 0), "native"),
        "W4A16": Kernel((8, 0), "AWQ/GPTQ plugin"),
        "W8A16": Kernel((8, 0), "weight-only plugin"),
        "FP8-W8A8": Kernel((8, 9), "FP8"),
        "INT8-W8A8": Kernel((7, 5), "SmoothQuant"),
        "W4A8": Kernel((8, 9), "W4A8 AWQ"),
        "NVFP4": Kernel((10, 0), "NVFP4"),
    }

    def serve_command(self, recipe, fmt: str, at: ServeAt) -> tuple[str, ...]:
        # trtllm-serve names the model after its path; 1.0 has no --served_model_name
        return serve_command(recipe, at.model_dir, at.port, engine_dir=at.engine_dir if self.compiles(recipe) else None)

    def compiles(self, recipe) -> bool:
        return mode(recipe) == "engine"

    def gpu_bound(self, recipe) -> bool:
        return self.compiles(recipe)   # a serialized engine runs on the GPU model that built it, nowhere else

    def problems(self, recipe, base) -> list[tuple[tuple[str, ...], str]]:
        return engine_mode_problems(recipe, base)

    def serving(self, version: str | None) -> Serving:
        # Prometheus metrics at /prometheus/metrics from 1.1 (TensorRT-LLM PR 5785): latencies only, no queue gauge
        return Serving(self.name, version or "?", self.health_route,
                       "/prometheus/metrics" if version_tuple(version) >= (1, 1) else None, None, None,
                       read_only_root=False, writable_dirs=("/tmp",), env=(), init_seconds=240)


ENGINE = TrtLlm()
