"""Serving engines (vLLM, TGI, TensorRT-LLM, CPU transformers serve): one module each, found by name.

An engine says how its image serves a checkpoint (``serve_command``), which checkpoint formats it loads,
its health route, which schemes it runs on which GPUs (its capability rows), and whether its image can be
smoke-tested on a machine without a GPU. The Containerfile (forge.containers) stays engine-neutral and
asks the engine for these. Adding an engine: one module with an ``ENGINE`` object, plus a line in
``REGISTRY`` (or an entry point / FORGE_PLUGINS, see forge.plugins).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol

from forge.plugins import Registry

if TYPE_CHECKING:
    from forge.recipe.load import LoadedRecipe

__all__ = ["Engine", "GpuEngine", "Kernel", "ServeAt", "REGISTRY", "get", "names"]


@dataclass(frozen=True)
class Kernel:
    """One capability row: the scheme runs from compute capability ``min_cc`` with ``name``."""

    min_cc: tuple[int, int]
    name: str
    weight_only_from: tuple[int, int] | None = None   # below min_cc, from here: runs weight-only (e.g. FP8 Marlin)
    weight_only_kernel: str = ""
    on_hopper: str | None = None                      # a faster kernel on compute capability 9.0 (Machete)


@dataclass(frozen=True)
class ServeAt:
    """Where the image holds what the engine serves."""

    model_dir: str
    port: int
    served_name: str
    engine_dir: str | None = None     # a compiled engine's directory, when the image carries one


class Engine(Protocol):
    name: str
    formats: tuple[str, ...]          # checkpoint formats it loads (forge.methods formats; "bf16" = unquantized)
    kernels: Mapping[str, Kernel]     # scheme -> capability row; a scheme not here cannot run on it
    rocm: frozenset[str]              # schemes its ROCm build runs on AMD GPUs (empty: none)
    cpu: bool                         # serves on CPU (weights decompressed at load): no GPU contract applies
    health_route: str                 # GET here answers 200 once the server is ready
    python: str                       # the image's Python (the HEALTHCHECK runs it)
    smoke_test: bool                  # its image can serve on a machine with no GPU (package smoke-tests it)

    def serve_command(self, loaded: "LoadedRecipe", fmt: str, at: ServeAt) -> tuple[str, ...]:
        """The image's ENTRYPOINT for a checkpoint of format ``fmt``."""
        ...

    def served_name(self, name: str) -> str:
        """The model id clients use, from the recipe name (an engine may have rules for ids)."""
        ...

    def image_env(self) -> tuple[tuple[str, str], ...]:
        """Engine-specific ENV lines of the image."""
        ...

    def context_dirs(self, context: Path, served: str) -> tuple[tuple[str, str], ...]:
        """Write extra small directories into the build context; (context dir, image path) each, COPYed after
        the weights."""
        ...


class GpuEngine:
    """Defaults for an engine that serves on NVIDIA GPUs (subclass and set name, formats, kernels, serve_command)."""

    rocm: frozenset[str] = frozenset()
    cpu = False
    health_route = "/health"
    python = "python3"
    smoke_test = False

    def served_name(self, name: str) -> str:
        return name

    def image_env(self) -> tuple[tuple[str, str], ...]:
        return ()

    def context_dirs(self, context: Path, served: str) -> tuple[tuple[str, str], ...]:
        return ()


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
