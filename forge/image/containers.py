"""The generated Containerfile.

It is assembled from small pure functions, one fragment each, in an order chosen for layer reuse: the base, then
the weights (the one big layer, which depends on nothing but the weights), then metadata and the engine command
(config only, no layers), so changing an engine flag never rebuilds the weights layer. What goes in it comes from
the resolved recipe (forge.recipe.resolve): the base, the engine and the checkpoint format.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from forge.engines.base import ServeAt
from forge.image.bases import Base

MODEL_DIR = "/opt/forge/model"
ENGINE_DIR = "/opt/forge/engine"      # a TensorRT-LLM engine (legacy engine mode), its own layer
PORT = 8000
UID = 10001
VENV_PYTHON = "/opt/venv/bin/python3"   # the Python of the bases forge builds (forge.steps.package run_base)
MODELS_DIR = "/models"                  # container.weights: image: where the model image is mounted
SERVE_ENTRY = "/opt/forge/serve.py"     # forge's entrypoint in a weights-free serving image (forge/image/serve-entry)
SERVE_ENTRY_FILE = "serve.py"           # its name in the build context
SERVE_ENTRY_SOURCE = Path(__file__).with_name("serve-entry")   # the script itself (package data: it runs in the image)


@dataclass(frozen=True)
class ImageSpec:
    """Everything the Containerfile says, fixed before it is written."""

    base_ref: str
    base: Base
    served_name: str
    engine_args: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    engine_dir: bool = False          # the build context holds engine/ (TensorRT-LLM engine mode)
    health_route: str = "/health"     # the engine's readiness route
    python: str = "python3"           # the image's Python, which runs the HEALTHCHECK
    extra_dirs: tuple[tuple[str, str], ...] = ()   # (build-context dir, image path) the engine asked for
    weights: str = "baked"            # image: a weights-free serving image (forge's entrypoint, the model at /models)


def require_cuda(base: Base) -> str | None:
    """NVIDIA_REQUIRE_CUDA for a GPU base: the NVIDIA runtime refuses to start the container on a
    driver that cannot run this CUDA version (NGC bases ship `cuda>=9.0`, which enforces nothing)."""
    return f"cuda>={base.cuda}" if base.cuda else None


def engine_command(resolved, served_name: str, model_dir: str = MODEL_DIR) -> tuple[str, ...]:
    """The engine's ENTRYPOINT for this recipe's checkpoint: asked of the engine module (forge.engines)."""
    return resolved.engine.serve_command(resolved.recipe, resolved.format,
                                         ServeAt(model_dir, PORT, served_name, engine_dir=ENGINE_DIR,
                                                 kv_cache_bytes=kv_cache_bytes(resolved)))


KV_BLOCK = 128   # tokens: a CPU KV cache is planned in whole blocks of this many per sequence (vLLM's block sizes divide it)


def kv_cache_bytes(resolved, recipe=None) -> int | None:
    """On a CPU target, the KV cache the recipe plans: max_num_seqs sequences of max_model_len tokens (rounded up to
    whole blocks) at the model's bytes per token (FP8: 1 byte a value). None on a GPU (the engine sizes it from its
    share of device memory) or when the model's shape is not known offline. ``recipe``: another version of the
    resolved recipe to plan for (the BF16 baseline served from the base image)."""
    recipe = recipe or resolved.recipe
    shape, t = resolved.shape, recipe.target
    if not resolved.gpu.is_cpu or shape is None:
        return None
    tokens = -(-t.max_model_len // KV_BLOCK) * KV_BLOCK
    per_token = shape.kv_bytes_per_token(1 if recipe.quantize.kv_cache == "fp8" else 2)
    return int(per_token * tokens * t.max_num_seqs)


def image_spec(resolved, *, base_ref: str, labels, env, engine_dir: bool = False,
               context: Path | None = None) -> ImageSpec:
    """The ImageSpec for a resolved recipe on its base: the engine supplies the served model id, the command, its
    env, health route and Python, and (written into ``context``) any extra directories the image needs."""
    engine, base = resolved.engine, resolved.base
    served = engine.served_name(resolved.recipe.name)
    extra = engine.context_dirs(context, served) if context is not None else ()
    return ImageSpec(base_ref=base_ref, base=base, served_name=served, engine_args=engine_command(resolved, served),
                     labels=tuple(labels), env=(*env, *engine.image_env()), engine_dir=engine_dir,
                     health_route=engine.health_route, python=VENV_PYTHON if base.built else engine.python,
                     extra_dirs=tuple(extra))


def serving_spec(resolved, *, base_ref: str, labels, env) -> ImageSpec:
    """The weights-free serving image (container.weights: image): the base, forge's entrypoint and the engine's
    health route; no model and no served id (the model image's .forge/serve.json brings both), so every model on
    this base serves from the same image."""
    engine, base = resolved.engine, resolved.base
    python = VENV_PYTHON if base.built else engine.python
    return ImageSpec(base_ref=base_ref, base=base, served_name="", engine_args=(python, SERVE_ENTRY),
                     labels=tuple(labels), env=tuple(env), health_route=engine.health_route, python=python,
                     weights="image")


def serve_file(resolved, served_name: str) -> dict:
    """The model image's .forge/serve.json (container.weights: image): the engine's command for this checkpoint at
    MODELS_DIR, and what the engine lays down at start (forge/image/serve-entry checks and runs it)."""
    runtime = getattr(resolved.engine, "runtime_files", None)
    env, files, links = runtime(served_name, MODELS_DIR) if runtime is not None else ({}, {}, {})
    return {"engine": resolved.engine.name, "argv": list(engine_command(resolved, served_name, MODELS_DIR)),
            "port": PORT, "served_name": served_name, "env": env, "files": files, "links": links}


def _from(spec: ImageSpec) -> list[str]:
    return [f"FROM {spec.base_ref}"]


def _weights(spec: ImageSpec) -> list[str]:
    # The checkpoint is not COPYed: forge appends it as the image's last layer itself (forge/image/weights_layer.py),
    # streamed into the OCI layout at hashing speed. A compiled engine and small extra dirs are COPYed here.
    if spec.weights == "image":   # no model at all: the model image is mounted at MODELS_DIR when it runs
        return [f"# {MODELS_DIR}/: no model in this image; the model image is mounted there read-only",
                f"COPY {SERVE_ENTRY_FILE} {SERVE_ENTRY}"]
    lines = [f"# {MODEL_DIR}/: the checkpoint, appended by forge as the last layer (container.weights_compression)"]
    if spec.engine_dir:
        lines.append(f"COPY --chown={UID}:{UID} engine/ {ENGINE_DIR}/")
    lines += [f"COPY --chown={UID}:{UID} {src.rstrip('/')}/ {dst.rstrip('/')}/" for src, dst in spec.extra_dirs]
    return lines


def _env(spec: ImageSpec) -> list[str]:
    return [f"ENV {k}={json.dumps(v)}" for k, v in spec.env]


def _labels(spec: ImageSpec) -> list[str]:
    return ["LABEL " + " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in spec.labels)] if spec.labels else []


def _runtime(spec: ImageSpec) -> list[str]:
    health = (f"{spec.python} -c \"import urllib.request,sys; "
              f"sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{PORT}{spec.health_route}', timeout=5).status "
              "== 200 else 1)\"")
    workdir = MODELS_DIR if spec.weights == "image" else MODEL_DIR
    return [f"USER {UID}:{UID}", f"WORKDIR {workdir}", f"EXPOSE {PORT}",
            f"HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD {health}",
            f"ENTRYPOINT {json.dumps(list(spec.engine_args))}"]


FRAGMENTS = (_from, _weights, _env, _labels, _runtime)


def containerfile(spec: ImageSpec) -> str:
    head = ["# Generated by forge. Build context: this directory; forge appends the model files (model/) as the last layer.",
            f"# Serve: {shlex.join(spec.engine_args)}"] if spec.weights != "image" else [
        f"# Generated by forge: a weights-free serving image (container.weights: image). The model image is mounted at "
        f"{MODELS_DIR}; its .forge/serve.json names the engine's command.", f"# Serve: {shlex.join(spec.engine_args)}"]
    body = [line for fragment in FRAGMENTS for line in fragment(spec)]
    return "\n".join(head + body) + "\n"


