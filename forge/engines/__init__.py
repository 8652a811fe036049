"""Serving engines (vLLM, TGI, TensorRT-LLM, CPU transformers serve): one module each, found by name.

An engine says how its image serves a checkpoint (``serve_command``), which checkpoint formats it loads,
its health route, which schemes it runs on which GPUs (its capability rows), whether its image can be
smoke-tested on a machine without a GPU, and which lm-eval requests its server answers (``eval_api``, for
``eval.candidate: image``). The Containerfile (forge.image.containers) stays engine-neutral and
asks the engine for these. Adding an engine: one module with an ``ENGINE`` object, plus a line in
``REGISTRY`` (or an entry point / FORGE_PLUGINS, see forge.core.plugins).

May import: forge.core, forge.gpu, forge.recipe.
"""
from __future__ import annotations

from forge.core.plugins import Registry
from forge.engines.base import (CpuKernel, Engine, EvalApi, GpuEngine, Kernel, QueueMetric, ServeAt, Serving,
                                version_tuple)

__all__ = ["Engine", "EvalApi", "GpuEngine", "Kernel", "CpuKernel", "ServeAt", "QueueMetric", "Serving", "version_tuple",
           "REGISTRY", "get",
           "names"]

REGISTRY: Registry[Engine] = Registry("engine", "forge.engines", {
    "vllm": "forge.engines.vllm:ENGINE",
    "tgi": "forge.engines.tgi:ENGINE",
    "trtllm": "forge.engines.trtllm:ENGINE",
    "cpu": "forge.engines.cpu:ENGINE",
})


def get(name: str) -> Engine:
    return REGISTRY.get(name)


def names() -> list[str]:
    return REGISTRY.names()
