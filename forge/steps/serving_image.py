"""serving_image: the weights-free serving image of ``container.weights: image``, one per base and engine.

It holds the base (with its engine), forge's entrypoint (``forge/image/serve-entry``) and the model path
(``/models``, where the model image is mounted read-only); nothing of any model. Its key is the base (name and
digest, or forge's own base build), the engine and its executable, the image's env and the builder: no recipe name,
no checkpoint, no quantization. A second model on the same base finds it in the step cache and builds no serving
image; the package step then writes only that model's model image (forge/image/model_image.py) beside it.

The entrypoint reads the model image's ``.forge/serve.json`` (the engine's command for that model, written by the
package step) and refuses one packaged for another engine or executable. The image is built with the package
step's builder and written to an OCI layout exactly as the package step's images are (``package.Output`` reads it).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time

from forge.core.errors import ToolError
from forge.image.builders import CONTAINERFILE, build_image, choose_builder, describe_layout
from forge.image.containers import (MODELS_DIR, SERVE_ENTRY_FILE, SERVE_ENTRY_SOURCE, containerfile, engine_command,
                                    require_cuda, serving_spec)
from forge.steps import StepContext, StepSpec, package

REF = "serving"
SERVER_ENV = (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HOME", "/tmp/hf"))   # as package sets


def enabled(loaded) -> bool:
    return loaded.recipe.container is not None and loaded.weights == "image"


def engine_exe(loaded) -> str:
    """The one executable the serving image's entrypoint runs (what the engine's command starts with)."""
    return engine_command(loaded, "model", MODELS_DIR)[0]


def _env(loaded) -> tuple[tuple[str, str], ...]:
    env = [*SERVER_ENV, *loaded.engine.image_env(), ("FORGE_ENGINE", loaded.engine.name),
           ("FORGE_ENGINE_EXE", engine_exe(loaded)), ("FORGE_MODEL_DIR", MODELS_DIR), ("MODEL", MODELS_DIR)]
    if (req := require_cuda(loaded.base)) is not None:
        env.append(("NVIDIA_REQUIRE_CUDA", req))
    return tuple(env)


def _labels(loaded) -> tuple[tuple[str, str], ...]:
    base = loaded.base
    labels = {
        "org.opencontainers.image.title": f"forge-serving-{base.name}",
        "org.opencontainers.image.description": f"{base.engine} on {base.name}, no model: a forge model image is "
                                                f"mounted at {MODELS_DIR}",
        "org.opencontainers.image.created": "1970-01-01T00:00:00Z",
        "org.opencontainers.image.base.name": base.image or f"forge-base/{base.name}",
        "org.opencontainers.image.vendor": "forge",
        "dev.forge.weights": "image",
        "dev.forge.model.dir": MODELS_DIR,
        "dev.forge.engine": base.engine,
        "dev.forge.engine.version": str(base.engine_version),
        "dev.forge.cuda.version": base.cuda or "none",
        "dev.forge.driver.min": base.min_driver or "none",
        **{f"{package.VERSION_LABEL}{d}": v for d, v in base.versions},
    }
    if loaded.base_digest:
        labels["org.opencontainers.image.base.digest"] = loaded.base_digest
    return tuple(sorted(labels.items()))


def _entry_digest() -> str:
    return "sha256:" + hashlib.sha256(SERVE_ENTRY_SOURCE.read_bytes()).hexdigest()


def _config(loaded) -> dict:
    """Base + engine only: what two models on this base have in common, and nothing else."""
    base = loaded.base
    return {"base": base.name, "base_digest": loaded.base_digest, "engine": loaded.engine.name,
            "engine_version": base.engine_version, "env": [list(e) for e in _env(loaded)],
            "labels": dict(_labels(loaded)), "health_route": loaded.engine.health_route,
            "entrypoint": _entry_digest()}


def _identity(loaded) -> dict:
    """The builder that will run and its version (buildah, podman and docker write different bytes)."""
    try:
        builder = choose_builder(loaded, loaded.base)
    except ToolError:
        return {"builder": "absent"}   # the step itself reports it when it runs
    return {"builder": builder, builder: package.key_tool_version(builder, loaded)}


SPEC = StepSpec(
    name="serving_image", summary="build the weights-free serving image (engine only, shared by every model on its base)",
    depends=("base_image",), tools=(), version=1, config=_config, identity=_identity, enabled=enabled,
    run="forge.steps.serving_image:run")


def run(ctx: StepContext) -> dict:
    loaded = ctx.recipe
    base = loaded.base
    context = ctx.out.parent / "context"
    context.mkdir(parents=True)
    shutil.copyfile(SERVE_ENTRY_SOURCE, context / SERVE_ENTRY_FILE)
    spec = serving_spec(loaded, base_ref=package.base_ref(ctx, base, loaded.base_digest), labels=_labels(loaded),
                        env=_env(loaded))
    text = containerfile(spec)
    (context / CONTAINERFILE).write_text(text)
    (ctx.out / CONTAINERFILE).write_text(text)
    tag = f"localhost/forge-serving/{base.name}:{ctx.out.parent.name[:12]}"
    builder = choose_builder(loaded, base)
    ctx.report(f"{builder} build (the serving image: {base.engine} on {base.name}, no model)")
    t0 = time.monotonic()
    build_image(builder, context, tag, ctx.out / package.OCI_DIR, REF, local_base="base_image" in ctx.inputs)
    shutil.rmtree(context)
    image = describe_layout(ctx.out / package.OCI_DIR, REF)
    image.pop("weights_layer", None)   # no weights here
    image.update(tag=tag, build_seconds=round(time.monotonic() - t0, 1), base=base.name, engine=base.engine,
                 builder=builder)
    (ctx.out / package.IMAGE_JSON).write_text(json.dumps(image, indent=2) + "\n")
    return image
