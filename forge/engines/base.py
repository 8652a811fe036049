"""What a serving engine is to forge: the ``Engine`` protocol, the ``GpuEngine`` defaults, and the facts an engine
declares (capability rows, where the image holds the model, deployment facts).

Engines read the recipe's sections (``forge.recipe.schema``) and a resolved recipe's checkpoint format; they never
import the recipe loader or the resolution stage (those import them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

from forge.recipe.schema import Recipe
from forge.core.errors import UsageError

__all__ = ["Engine", "GpuEngine", "Kernel", "CpuKernel", "ServeAt", "QueueMetric", "Serving", "EvalApi",
           "version_tuple"]


@dataclass(frozen=True)
class Kernel:
    """One capability row: the scheme runs from compute capability ``min_cc`` with ``name``."""

    min_cc: tuple[int, int]
    name: str
    weight_only_from: tuple[int, int] | None = None   # below min_cc, from here: runs weight-only (e.g. FP8 Marlin)
    weight_only_kernel: str = ""
    on_hopper: str | None = None                      # a faster kernel on compute capability 9.0 (Machete)


@dataclass(frozen=True)
class CpuKernel:
    """One CPU capability row: the scheme runs on CPU targets of x86 level ``isa`` (forge.core.host CPU_ISAS) or
    higher, with ``name``; ``why``: where the requirement comes from; ``slow_here``: why this host would run it so
    slowly that serving it cannot be checked here (None: it runs at speed), for a kernel that depends on more than
    the ISA level."""

    isa: str
    name: str
    why: str = ""
    slow_here: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class ServeAt:
    """Where the image holds what the engine serves."""

    model_dir: str
    port: int
    served_name: str
    engine_dir: str | None = None     # a compiled engine's directory, when the image carries one
    kv_cache_bytes: int | None = None  # CPU targets: the KV cache the recipe plans (max_model_len x max_num_seqs)


@dataclass(frozen=True)
class QueueMetric:
    name: str                       # the Prometheus series of requests waiting for a slot
    model_label: str | None         # label naming the served model, when the engine has one


@dataclass(frozen=True)
class Serving:
    """What a cluster needs to know about the engine at one version (forge deploy reads it)."""

    engine: str
    version: str
    health_route: str
    metrics_path: str | None        # Prometheus text format on the container port; None: no metrics
    queue: QueueMetric | None       # requests waiting for a slot; None: cannot autoscale on a queue
    kv_cache_usage: str | None      # 0..1 gauge of KV-cache use (a second scaling signal), when exposed
    read_only_root: bool            # runs with readOnlyRootFilesystem given the writable dirs below
    writable_dirs: tuple[str, ...]  # in-memory or node-disk emptyDirs mounted there
    env: tuple[tuple[str, str], ...]   # env the Deployment adds so caches land in writable_dirs
    init_seconds: int               # start-up work besides reading the weights (compile, CUDA graphs, warm-up)

    def scaled_on(self, served_name: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
        """The series forge deploy's autoscaling queries (KEDA, the HPA's adapter), each with the label that selects
        this model's server where the engine labels its series with it: what a running image must export on
        ``metrics_path`` (the package step's smoke test checks it). Empty when the engine has no queue metric."""
        if self.metrics_path is None or self.queue is None:
            return ()
        labels = ((self.queue.model_label, served_name),) if self.queue.model_label else ()
        return tuple((series, labels) for series in (self.queue.name, self.kv_cache_usage) if series)


@dataclass(frozen=True)
class EvalApi:
    """How lm-eval evaluates a model through the engine's OpenAI-compatible server (``eval.candidate: image``):
    lm-eval's own API model, and which of lm-eval's request types the server can answer. A loglikelihood request
    (``loglikelihood``: multiple choice; ``loglikelihood_rolling``: perplexity) needs the prompt's own token
    logprobs (``/v1/completions`` with ``echo`` and ``logprobs``); ``generate_until`` needs only generation."""

    model: str                       # lm-eval model type: "local-completions" or "local-chat-completions"
    route: str                       # the endpoint it calls, e.g. "/v1/completions"
    requests: frozenset[str]         # lm-eval request types answered: generate_until, loglikelihood, loglikelihood_rolling
    numerics: str                    # whose kernels compute the scores (as evaluated_on names an engine)
    refuses: str = ""                # why the other request types cannot be answered (shown at validate)


def version_tuple(v: str | None) -> tuple[int, ...]:
    """"0.11.0" -> (0, 11, 0); "transformers-5.17" -> (5, 17); None -> (0,)."""
    parts = []
    for p in (v or "0").removeprefix("transformers-").split("."):
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class Engine(Protocol):
    name: str
    formats: tuple[str, ...]          # checkpoint formats it loads (forge.gpu.methods formats; "bf16" = unquantized)
    kernels: Mapping[str, Kernel]     # scheme -> capability row; a scheme not here cannot run on it
    rocm: frozenset[str]              # schemes its ROCm build runs on AMD GPUs (empty: none)
    cpu: bool                         # serves on CPU (weights decompressed at load): no GPU contract applies
    cpu_kernels: Mapping[str, CpuKernel]   # scheme -> row on CPU targets, for an engine with a CPU build (else empty)
    health_route: str                 # GET here answers 200 once the server is ready
    python: str                       # the image's Python (the HEALTHCHECK runs it)
    smoke_test: bool                  # its image can serve on a machine with no GPU (package smoke-tests it)
    eval_api: EvalApi | None          # how lm-eval evaluates through its server (None: forge cannot, eval.candidate:
                                      # image is refused at validate)

    def serve_command(self, recipe: Recipe, fmt: str, at: ServeAt) -> tuple[str, ...]:
        """The image's ENTRYPOINT for a checkpoint of format ``fmt``."""
        ...

    def compiles(self, recipe: Recipe) -> bool:
        """Whether this recipe's checkpoint is compiled into an engine by a compile step before packaging."""
        ...

    def gpu_bound(self, recipe: Recipe) -> bool:
        """Whether what it serves runs only on the GPU model it was built on (a compiled engine): such an image
        never runs on another GPU, not even one of the same architecture with less memory."""
        ...

    def problems(self, recipe: Recipe, base) -> list[tuple[tuple[str, ...], str]]:
        """Engine-specific rules a recipe breaks, as (recipe key path, message) pairs; ``base`` is the recipe's base
        image (``forge.image.bases.Base``) or None without a container section."""
        ...

    def served_name(self, name: str) -> str:
        """The model id clients use, from the recipe name (an engine may have rules for ids)."""
        ...

    def serving(self, version: str | None) -> Serving:
        """Deployment facts at the base image's engine version (health, metrics, queue, filesystem, start-up)."""
        ...

    def image_env(self) -> tuple[tuple[str, str], ...]:
        """Engine-specific ENV lines of the image."""
        ...

    def context_dirs(self, context: Path, served: str) -> tuple[tuple[str, str], ...]:
        """Write extra small directories into the build context; (context dir, image path) each, COPYed after
        the weights."""
        ...

    def runtime_files(self, served: str, model_dir: str) -> tuple[dict, dict, dict]:
        """What a weights-free serving image (container.weights: image) lays down at start, in place of
        ``context_dirs``: (env, {path: text}, {link: target}), paths under /tmp (forge/image/serve-entry)."""
        ...


class GpuEngine:
    """Defaults for an engine that serves on NVIDIA GPUs (subclass and set name, formats, kernels, serve_command)."""

    rocm: frozenset[str] = frozenset()
    cpu = False
    cpu_kernels: Mapping[str, CpuKernel] = {}
    health_route = "/health"
    python = "python3"
    smoke_test = False
    eval_api: EvalApi | None = None

    def served_name(self, name: str) -> str:
        return name

    def compiles(self, recipe: Recipe) -> bool:
        return False

    def gpu_bound(self, recipe: Recipe) -> bool:
        return False

    def problems(self, recipe: Recipe, base) -> list[tuple[tuple[str, ...], str]]:
        return []

    def image_env(self) -> tuple[tuple[str, str], ...]:
        return ()

    def context_dirs(self, context: Path, served: str) -> tuple[tuple[str, str], ...]:
        return ()

    def runtime_files(self, served: str, model_dir: str) -> tuple[dict, dict, dict]:
        return {}, {}, {}

    def serving(self, version: str | None) -> Serving:
        raise UsageError(f"the serving engine {self.name!r} declares no deployment facts (health, metrics, queue)",
                         hint="Give its engine module a serving(version) method (see forge/engines/vllm.py).")


