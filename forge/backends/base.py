"""What a quantization backend is to forge: the ``Backend`` protocol, what its quantize stage reports, and the
pre-flight's architecture message shared by every backend. Imports no backend and nothing above the recipe schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from forge.model.shape import ModelShape

__all__ = ["Backend", "Quantized", "architecture_problems"]


@dataclass
class Quantized:
    """What a backend's quantize stage reports: per-layer rows (any columns) and extra report sections."""

    layers: list[dict]
    summary: dict = field(default_factory=dict)      # joins the step's facts (e.g. mean weight error)
    sections: dict = field(default_factory=dict)     # extra report.json sections (e.g. AWQ mappings)


class Backend(Protocol):
    name: str                        # the registry name (quantize.backend)
    title: str                       # shown to people: "llm-compressor"
    methods: tuple[str, ...]         # forge.gpu.methods names it offers ("none" included)
    tools: tuple[str, ...]           # distributions whose versions enter the key and the manifest
    loads_in_transformers: bool      # its checkpoints load with transformers (then verified by generating)

    def format(self, q) -> str:
        """The checkpoint format it writes for this quantize section (a forge.gpu.methods format name)."""
        ...

    def needs_calibration(self, q) -> bool: ...

    def verifies(self, q) -> bool:
        """Whether the quantize step can run what it writes for ``q`` on this machine (it loads in transformers,
        or ``dequantized`` gives its float weights): only then does the reference step record BF16's tokens."""
        ...

    def preflight(self, loaded: Any, shape: ModelShape) -> list[str]:
        """Problems from config.json alone (architecture support), located in the recipe."""
        ...

    def quantize(self, model, q, windows: list[list[int]] | None, *, report: Callable, log_dir: Path) -> Quantized:
        """Calibrate on ``windows`` (token ids; None when no calibration is needed) and quantize in place."""
        ...

    def export(self, model, out: Path, *, dtype, loaded: Any) -> None:
        """Write the checkpoint into ``out`` with tensors in the recipe ``dtype`` (the tokenizer is written for it)."""
        ...

    def validate(self, out: Path, q) -> dict:
        """Check what was written against the recipe; facts about it, or ValueError naming each problem."""
        ...

    def dequantized(self, out: Path, q) -> "Callable[[str], Any] | None":
        """The checkpoint's quantized weights back in float, by tensor name (a callable returning the tensor, or
        None for a tensor it did not quantize, with ``names``: the quantized ones), read one at a time, when it
        dequantizes (then verified one decoder layer at a time); None when it does not."""
        ...

    # optional (getattr): a backend that quantizes some schemes shard by shard, without building the model

    # def streams(self, q) -> bool: ...
    # def quantize_files(self, src: Path, out: Path, q, *, report: Callable, workers: int) -> Quantized: ...
    # optional: a backend whose ``quantize`` accepts a model loaded with its weights offloaded to disk
    # def offloads(self, q) -> bool: ...


def architecture_problems(loaded, shape: ModelShape, title: str, supported: frozenset[str]) -> list[str]:
    """The pre-flight's architecture check, one message for every backend."""
    arch, q = shape.architecture, loaded.recipe.quantize
    if arch in supported or arch.islower():  # lower-case: a GGUF arch name (llama, qwen2, ...)
        return []
    return [f"{loaded.where('quantize', 'method')}: {q.method} through {title} does not support architecture {arch}; "
            f"supported: {', '.join(sorted(supported))}"]


