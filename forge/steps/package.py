"""base_image / package: an OCI image with the weights in their own layer, built daemonless with buildah.

base_image builds forge's own CPU base (a Debian rootfs from mmdebstrap, a venv with pinned CPU torch
and transformers[serving]) and is cached like any step. package renders the Containerfile from the
recipe (kept as an artifact), builds it with buildah (overlay storage where it mounts, else vfs; chroot
isolation; --timestamp 0 for reproducible layers), exports an OCI layout directory (what Trivy and the
registry consume), and by default smoke-tests it: start the image's server, wait for /health, require GET
/v1/models to list the served model, ask one chat question by that id, require an answer, stop the whole
process group, keep the transcript. A failed smoke test is exit 6 with the HTTP status, the body and the server log's tail in the
message; the transcript and the full server log are kept beside the step's staging directory. The container tool
calls are forge.image.builders'; the smoke test is forge.image.smoketest's.

With ``container.weights: image`` (``run_model_image``) package builds nothing: the serving image is the
serving_image step's (base + engine, shared by every model on the base), linked into this step's layout, and beside
it (``model-oci/``) go this checkpoint's model image and ModelPack manifest (forge.image.model_image); the smoke test
serves the serving image with the model image mounted read-only at /models.

Secrets never reach the image: builds run with a scrubbed environment; the host's CA bundle and
wheel sources are bind-mounted read-only into the pip step only, never copied into a layer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from forge.core import options as fenv
from forge.image.builders import (CONTAINERFILE, build_image, buildah, choose_builder, clean_env, describe_layout,
                            pull_layout, tool_version)
from forge.image.containers import (MODEL_DIR, UID, containerfile, image_spec, kv_cache_bytes, require_cuda, serve_file,
                                    serving_spec)
from forge.image.model_image import SERVE_FILE, mounted, write_model_image
from forge.core.errors import ToolError
from forge.engines import get as get_engine
from forge.image.smoketest import TRANSCRIPT, smoke_test, why_not_here
from forge.steps import StepContext, StepSpec, compile, probe, quantize
from forge.core.host import no_nvidia_smi
from forge.gpu import host_fit
from forge.engines.trtllm_build import EngineFacts, check_engine
from forge.image.weights_layer import append_weights_layer

OCI_DIR, IMAGE_JSON = "oci", "image.json"
MODEL_OCI, MODEL_REF = "model-oci", "model"   # container.weights: image: the model image (and its ModelPack's blobs)
VERSION_LABEL = "dev.forge.version."   # + a distribution: its version in the image (the base's declared versions)
SMOKE_KEEP = ".smoke-test"   # suffix of the directory beside the staging dir that keeps a failed smoke test


def _enabled(loaded) -> bool:
    return loaded.recipe.container is not None


def _base_enabled(resolved) -> bool:
    return resolved.base is not None and resolved.base.built


def _base_config(resolved) -> dict:
    # pip_remove and versions only when a base has them: a base without them keeps the key it had before them
    return {k: v for k, v in resolved.base.__dict__.items()
            if k != "catalog" and not (k in ("pip_remove", "versions") and not v)}


def _pip_sources() -> dict:
    """Where pip inside the build takes wheels from (part of the base key: it decides the bytes)."""
    opts = fenv.current()
    return {"index_url": opts.pip_index_url, "find_links": opts.pip_find_links}


def key_tool_version(tool: str, resolved) -> str:
    """`tool --version` for key material, remembered in the step cache the build uses (never the default one)."""
    return tool_version(tool, resolved.cache_root)


BASE = StepSpec(
    name="base_image", summary="build forge's CPU base image (mmdebstrap + venv)", depends=(), tools=(), version=1,
    config=_base_config, identity=lambda resolved: {"pip": _pip_sources(), "buildah": key_tool_version("buildah", resolved),
                                         "mmdebstrap": key_tool_version("mmdebstrap", resolved)},
    enabled=_base_enabled, run="forge.steps.package:run_base")


def _config(loaded) -> dict:
    r = loaded.recipe
    base, digest = loaded.base, loaded.base_digest
    config = {"container": r.container.model_dump(mode="json", exclude={"weights"}),
              "target": r.target.model_dump(mode="json"), "quantize_method": r.quantize.method,
              "kv_cache": r.quantize.kv_cache, "name": r.name, "base": base.name, "base_digest": digest,
              "recipe_digest": loaded.digest}
    if loaded.weights == "image":   # a baked image's key is what it was before container.weights
        config["weights"] = "image"
    return config


def _identity(loaded) -> dict:
    """The builder that will run and its version: buildah, podman and docker write different bytes."""
    base = loaded.base
    try:
        builder = choose_builder(loaded, base)
    except ToolError:
        builder = "absent"   # the step itself reports it when it runs
    facts = {"builder": builder, builder: key_tool_version(builder, loaded) if builder != "absent" else "absent"}
    if base is not None and loaded.recipe.container.smoke_test and not get_engine(base.engine).smoke_test \
            and base.cuda is None:   # an engine's own CPU build (vLLM's): runs here if this CPU has the target's ISA
        facts["smoke_test_here"] = why_not_here(base.engine, loaded.recipe.target.gpu, builder, loaded.scheme) or "yes"
    elif base is not None and loaded.recipe.container.smoke_test and not get_engine(base.engine).smoke_test:
        # a GPU image is smoke-tested where its GPU is: built here without one, it is built again there
        here = lambda: why_not_here(base.engine, loaded.recipe.target.gpu, builder)   # noqa: E731
        facts["smoke_test_here"] = probe("this host's GPUs (nvidia-smi)", here,
                                         remembered=lambda: here() if no_nvidia_smi() is not None else None) or "yes"
    return facts


def _needs(loaded) -> tuple[str, ...]:
    # eval.candidate: image: the image is built before it is gated (the gate evaluates it), so it cannot wait for the
    # gate; its verdict is the registry record's evidence instead of a label. container.weights: image: the serving
    # image is the serving_image step's (no base_image here: nothing is built on it in this step)
    after = ("serving_image",) if loaded.weights == "image" else ("compile", "base_image")
    return ("quantize", *after) if _through_image(loaded) else ("quantize", "gate", *after)


SPEC = StepSpec(
    name="package", summary="build the OCI image (weights in their own layer, or a model image) and smoke-test it",
    depends=("quantize", "compile", "gate", "base_image", "serving_image"), tools=(), version=2,  # 2: cpu hub entry
    config=_config, identity=_identity, enabled=_enabled, needs=_needs, run="forge.steps.package:run")


def _through_image(loaded) -> bool:
    return loaded.recipe.eval is not None and loaded.recipe.eval.candidate == "image"


# ------------------------------------------------------------------ buildah


def _host_pip_mounts() -> tuple[list[str], list[str]]:
    """Bind mounts and env for pip inside a build: the CA bundle and local wheel sources, read-only."""
    mounts, env = [], ["PIP_NO_CACHE_DIR=1", "PIP_DISABLE_PIP_VERSION_CHECK=1", "PIP_ROOT_USER_ACTION=ignore"]  # for the build
    opts = fenv.current()
    ca = opts.ca_bundle
    if ca and Path(ca).is_file():
        mounts += ["-v", f"{ca}:/run/forge/ca.pem:ro"]
        env += ["PIP_CERT=/run/forge/ca.pem", "SSL_CERT_FILE=/run/forge/ca.pem"]
    links = opts.pip_find_links
    if links:
        for i, d in enumerate(p for p in links.split() if Path(p).is_dir()):
            mounts += ["-v", f"{d}:/run/forge/wheels{i}:ro"]
            env += [f"PIP_FIND_LINKS=/run/forge/wheels{i}"]
    if idx := opts.pip_index_url:
        env += [f"PIP_INDEX_URL={idx}"]
    return mounts, env


def run_base(ctx: StepContext) -> dict:
    base = ctx.recipe.base
    if shutil.which("mmdebstrap") is None:
        raise ToolError("mmdebstrap is not on PATH: forge cannot build its Debian base", hint="apt-get install mmdebstrap")
    rootfs = ctx.out.parent / "rootfs.tar"
    ctx.report(f"mmdebstrap {base.suite} ({', '.join(base.packages)})")
    proc = subprocess.run(["mmdebstrap", "--variant=apt", f"--include={','.join(base.packages)}", base.suite, str(rootfs)],
                          capture_output=True, text=True, env=clean_env())
    if proc.returncode != 0:
        raise ToolError(f"mmdebstrap failed: {proc.stderr.strip()[-1500:]}")
    ctr = buildah("from", "scratch").stdout.strip()
    try:
        ctx.report("importing the rootfs")
        buildah("add", ctr, str(rootfs), "/")
        rootfs.unlink()
        buildah("run", ctr, "--", "python3", "-m", "venv", "/opt/venv")
        ctx.report(f"pip install {' '.join(base.pip)}")
        mounts, env = _host_pip_mounts()
        torch_index = [] if fenv.current().pip_find_links or not base.torch_index \
            else ["--extra-index-url", base.torch_index]
        buildah("run", *mounts, *[x for e in env for x in ("--env", e)], ctr, "--",
                "/opt/venv/bin/pip", "install", "--quiet", *torch_index, *base.pip)
        if base.pip_remove:
            ctx.report(f"pip uninstall {' '.join(base.pip_remove)}")
            buildah("run", *[x for e in env for x in ("--env", e)], ctr, "--",
                    "/opt/venv/bin/pip", "uninstall", "--yes", "--quiet", *base.pip_remove)
        versions, removed = _installed_versions(ctr, base)
        buildah("run", ctr, "--", "useradd", "--uid", str(UID), "--create-home", "--shell", "/usr/sbin/nologin", "forge")
        buildah("config", "--env", "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env", "PYTHONUNBUFFERED=1", "--label", f"dev.forge.base={base.name}",
                *[x for d, v in versions.items() for x in ("--label", f"{VERSION_LABEL}{d}={v}")], ctr)
        tag = f"localhost/forge-base/{base.name}:{ctx.out.parent.name[:12]}"
        ctx.report("committing")
        image_id = buildah("commit", "--timestamp", "0", "--rm", ctr, tag).stdout.strip().splitlines()[-1]
        ctr = None
        buildah("push", tag, f"oci:{ctx.out / OCI_DIR}:{base.name}")
    finally:
        if ctr:
            buildah("rm", ctr, check=False)
    return {"base": base.name, "image_id": image_id, "tag": tag, "versions": versions,
            **({"removed": removed} if removed else {})}


def _installed_versions(ctr: str, base) -> tuple[dict[str, str], list[str]]:
    """Read in the image: the versions pip installed of the distributions the base declares (``versions`` in its
    catalog), and that each one of ``pip_remove`` is gone (no distribution metadata, no importable module of that
    name). A version other than the catalog's, or a removed distribution still there, fails the build: what
    validate promised is what the image holds. Returns (versions, the removed distributions checked absent)."""
    if not base.versions and not base.pip_remove:
        return {}, []
    names = [d for d, _ in base.versions]
    code = ("import importlib.metadata as m, importlib.util as u, json, sys; n = int(sys.argv[1]); "
            "ds, gone = sys.argv[2:2 + n], sys.argv[2 + n:]\n"
            "def there(d):\n"
            "    try:\n        m.distribution(d)\n        return True\n"
            "    except m.PackageNotFoundError:\n        return u.find_spec(d.replace('-', '_')) is not None\n"
            "print(json.dumps({'versions': {d: m.version(d) for d in ds}, 'left': [d for d in gone if there(d)]}))")
    proc = buildah("run", ctr, "--", "/opt/venv/bin/python3", "-c", code, str(len(names)), *names, *base.pip_remove,
                   check=False)
    if proc.returncode != 0:
        raise ToolError(f"base {base.name}: could not read the installed distributions "
                        f"({', '.join([*names, *base.pip_remove])}): "
                        f"{proc.stderr.strip()[-600:]}",
                        hint=f"Each distribution under versions in {base.catalog} must be installed by its pip list.")
    said = json.loads(proc.stdout.strip().splitlines()[-1])
    found, left = said["versions"], said["left"]
    wrong = [f"{d} {found[d]} (declared {v})" for d, v in base.versions if found[d] != v]
    if wrong:
        raise ToolError(f"base {base.name}: pip installed {', '.join(wrong)}",
                        hint=f"Pin the pip list of {base.name} in {base.catalog} so that it installs the declared "
                             "versions, or declare what it installs (the engine's compatibility table reads them).")
    if left:
        raise ToolError(f"base {base.name}: {', '.join(left)} still installed after pip uninstall (pip_remove)",
                        hint=f"Something in the pip list of {base.name} in {base.catalog} reinstalls it: pin it out, "
                             "or remove it later in the build.")
    return found, sorted(base.pip_remove)


def base_ref(ctx: StepContext, base, digest: str | None) -> str:
    """The base image's reference in the builder's storage (forge's own base: loaded from its step's layout)."""
    if "base_image" in ctx.inputs:
        # forge's own base, named by its cache key: already in local storage when this machine built it,
        # else loaded from the step's OCI layout
        tag = f"localhost/forge-base/{base.name}:{ctx.inputs['base_image'].parent.name[:12]}"
        if buildah("inspect", "--type", "image", tag, check=False).returncode != 0:
            pull_layout(ctx.inputs["base_image"] / OCI_DIR, base.name, tag)
        return tag
    if digest:
        return f"{base.image.rsplit(':', 1)[0]}@{digest}"
    return base.image


def _labels(ctx: StepContext, base, digest: str | None) -> tuple[tuple[str, str], ...]:
    r, loaded = ctx.recipe.recipe, ctx.recipe
    q_manifest = ctx.input_manifests["quantize"]
    verdict = ctx.input_manifests.get("gate", {}).get("output", {}).get("digest") or \
        ("after the build: this image is what was gated" if _through_image(loaded) else "none")
    labels = {
        "org.opencontainers.image.title": r.name,
        "org.opencontainers.image.description": f"{r.name}: {r.quantize.method} for {r.target.gpu} on {base.engine}",
        "org.opencontainers.image.created": "1970-01-01T00:00:00Z",
        "org.opencontainers.image.base.name": base.image or f"forge-base/{base.name}",
        "org.opencontainers.image.vendor": "forge",
        "dev.forge.recipe.digest": loaded.digest,
        "dev.forge.model.digest": q_manifest["output"]["digest"],
        "dev.forge.model.source": r.model.source,
        "dev.forge.quantization.method": r.quantize.method,
        "dev.forge.target.gpu": r.target.gpu,
        "dev.forge.engine": base.engine,
        "dev.forge.engine.version": base.engine_version,
        "dev.forge.cuda.version": base.cuda or "none",
        "dev.forge.driver.min": base.min_driver or "none",
        "dev.forge.eval.verdict.digest": verdict,
        **{f"{VERSION_LABEL}{d}": v for d, v in base.versions},   # what the base installed (checked when built)
    }
    if digest:
        labels["org.opencontainers.image.base.digest"] = digest
    if "quantize" in loaded.overrides:   # chosen by method: auto (forge.orchestrate.auto): its scheme and the layers kept in BF16
        labels["dev.forge.quantization.auto"] = "true"
        labels["dev.forge.quantization.bf16_layers"] = ",".join(r.quantize.ignore)
    return tuple(sorted(labels.items()))


def run(ctx: StepContext) -> dict:
    loaded = ctx.recipe
    if loaded.weights == "image":
        return run_model_image(ctx)
    base, digest = loaded.base, loaded.base_digest
    env = [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HOME", "/tmp/hf")]
    if (req := require_cuda(base)) is not None:
        env.append(("NVIDIA_REQUIRE_CUDA", req))
    context = ctx.out.parent / "context"
    (context / "model").mkdir(parents=True)
    spec = image_spec(loaded, base_ref=base_ref(ctx, base, digest), labels=_labels(ctx, base, digest), env=env,
                      engine_dir="compile" in ctx.inputs, context=context)
    checkpoint = quantize.Output.read(ctx.upstream["quantize"])
    engine = ctx.inputs.get("compile")
    if engine is not None:  # legacy TensorRT-LLM engine: checked against the recipe and this base before anything is built
        engine = compile.Output.read(ctx.upstream["compile"]).engine_dir
        if problems := check_engine(EngineFacts.read(engine), loaded.recipe, base):
            raise ToolError("the engine does not match the recipe or the base image: " + "; ".join(problems),
                            hint="Rebuild it on the recipe's GPU with the base image's TensorRT-LLM: forge build --force compile")
        shutil.copytree(engine, context / "engine", copy_function=os.link)
    for f in checkpoint.model_entries():  # the checkpoint, not the build reports (they carry timings)
        if engine is not None and f.suffix == ".safetensors":
            continue  # with an engine, the image needs the tokenizer and configs, not the weights twice
        os.link(f, context / "model" / f.name) if f.is_file() else shutil.copytree(f, context / "model" / f.name,
                                                                                   copy_function=os.link)
    text = containerfile(spec)
    (context / CONTAINERFILE).write_text(text)
    (ctx.out / CONTAINERFILE).write_text(text)
    tag = f"localhost/forge/{loaded.recipe.name}:{ctx.out.parent.name[:12]}"
    ref = loaded.recipe.name
    builder = choose_builder(loaded, base)
    ctx.report(f"{builder} build (everything but the weights)")
    t0 = time.monotonic()
    build_image(builder, context, tag, ctx.out / OCI_DIR, ref, local_base="base_image" in ctx.inputs)
    build_s = time.monotonic() - t0
    weights = _weights_layer(ctx, context / "model", ref)
    shutil.rmtree(context)
    image = describe_layout(ctx.out / OCI_DIR, ref)
    image.update(tag=tag, build_seconds=round(build_s, 1), base=base.name, engine=base.engine, builder=builder,
                 weights=weights)
    image["smoke_test"] = _smoke_test(ctx, tag, spec, builder, ref)
    (ctx.out / IMAGE_JSON).write_text(json.dumps(image, indent=2) + "\n")
    return image


def _smoke_test(ctx: StepContext, tag: str, spec, builder: str, ref: str, model: str | None = None) -> dict:
    """Serve the image from the step's layout (``model``: the model image's digest in MODEL_OCI, unpacked and mounted
    read-only at /models, only when the smoke test runs here) and check it; the transcript is kept in the output,
    what the record says of it is returned."""
    loaded = ctx.recipe
    gpu = loaded.recipe.target.gpu
    if not loaded.recipe.container.smoke_test:
        return {"passed": None, "skipped": "not smoke-tested: container.smoke_test is false"}
    cannot = _no_room_to_serve(loaded, spec, ctx.inputs["quantize"]) or \
        why_not_here(spec.base.engine, gpu, builder, loaded.scheme)
    keep = ctx.out.parent.with_name(ctx.out.parent.name + SMOKE_KEEP)
    runs = model is not None and cannot is None
    with mounted(ctx.out / MODEL_OCI, model, ctx.out.parent) if runs else nullcontext(()) as mounts:
        transcript = smoke_test(tag, spec, ctx.report, builder=builder, keep=keep, layout=(ctx.out / OCI_DIR, ref),
                                mounts=mounts, skip=cannot)
    if transcript.get("skipped"):
        ctx.report(transcript["skipped"])
    (ctx.out / TRANSCRIPT).write_text(json.dumps(transcript, indent=2) + "\n")
    return {k: transcript.get(k) for k in ("passed", "skipped", "answer", "health_seconds", "models")}


def _no_room_to_serve(loaded, spec, checkpoint: Path) -> str | None:
    """Why a CPU image cannot be smoke-tested on this host for want of memory (None: it fits, or the image is a GPU's,
    whose weights go to VRAM). vLLM's CPU kernels hold the checkpoint as written; transformers serve (dtype auto)
    holds a quantized checkpoint decompressed to BF16."""
    if spec.base.cuda is not None:
        return None
    files = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    if get_engine(spec.base.engine).cpu_kernels:   # and the KV cache the image reserves (--kv-cache-memory-bytes)
        weights, kv, how = files, kv_cache_bytes(loaded) or 0, f"{spec.base.engine} holds the checkpoint as written"
    else:   # its cache grows with what it is asked: one short chat
        weights = host_fit.bf16_bytes(loaded.shape) if loaded.shape is not None else files
        kv, how = 0, f"{spec.base.engine} holds the weights in BF16"
    need = host_fit.serving_need(weights, kv, how)
    short = need.shortfall(host_fit.available_bytes())
    return f"not smoke-tested: {short}; served here, it would page the weights from disk" if short else None


def run_model_image(ctx: StepContext) -> dict:
    """container.weights: image: the serving_image step's image as it is (linked into this step's layout, which the
    scan and the registry read), and beside it this checkpoint's model image and ModelPack manifest (MODEL_OCI); then
    the smoke test, with the model image mounted read-only at /models as a kubelet mounts an image volume."""
    loaded = ctx.recipe
    r = loaded.recipe
    serving = Output.read(ctx.upstream["serving_image"])
    shutil.copytree(serving.oci_dir, ctx.out / OCI_DIR, copy_function=os.link)
    (ctx.out / CONTAINERFILE).write_bytes(serving.containerfile.read_bytes())
    served = loaded.engine.served_name(r.name)
    stage = ctx.out.parent / "model"
    (stage / ".forge").mkdir(parents=True)
    for f in quantize.Output.read(ctx.upstream["quantize"]).model_entries():   # the checkpoint, not its reports
        os.link(f, stage / f.name) if f.is_file() else shutil.copytree(f, stage / f.name, copy_function=os.link)
    (stage / SERVE_FILE).write_text(json.dumps(serve_file(loaded, served), indent=2, sort_keys=True) + "\n")
    model = _model_image(ctx, stage)
    shutil.rmtree(stage)
    ref = serving.image["oci_ref"]
    image = describe_layout(ctx.out / OCI_DIR, ref)
    image.pop("weights_layer", None)
    image.update(tag=f"localhost/forge/{r.name}:{ctx.out.parent.name[:12]}", base=loaded.base.name,
                 engine=loaded.base.engine, builder=serving.image["builder"], serving_image_built_in=serving.image["tag"],
                 model_image=model)
    spec = replace(serving_spec(loaded, base_ref="", labels=(), env=()), served_name=served)
    image["smoke_test"] = _smoke_test(ctx, image["tag"], spec, image["builder"], ref, model["manifest_digest"])
    (ctx.out / IMAGE_JSON).write_text(json.dumps(image, indent=2) + "\n")
    return image


def _model_image(ctx: StepContext, stage: Path) -> dict:
    """The model image and ModelPack manifest of the staged checkpoint, in MODEL_OCI (forge/image/model_image.py)."""
    loaded = ctx.recipe
    r = loaded.recipe
    annotations = {"org.opencontainers.image.title": r.name, "org.opencontainers.image.created": "1970-01-01T00:00:00Z",
                   "org.opencontainers.image.vendor": "forge",
                   "dev.forge.model.digest": ctx.input_manifests["quantize"]["output"]["digest"],
                   "dev.forge.model.source": r.model.source, "dev.forge.quantization.method": r.quantize.method,
                   "dev.forge.format": loaded.format, "dev.forge.recipe.digest": loaded.digest,
                   "dev.forge.engine": loaded.engine.name}
    total = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        ctx.report("model image (one layer per shard)", completed=done, total=total, unit="B")

    t0 = time.monotonic()
    try:
        made = write_model_image(stage, ctx.out / MODEL_OCI, MODEL_REF, annotations=annotations,
                                 params=loaded.shape.total_params if loaded.shape else None, precision=loaded.format,
                                 quantization=r.quantize.method, progress=progress, index_modelpack=False)
    except ValueError as e:
        raise ToolError(f"the model image could not be written: {e}") from None
    seconds = time.monotonic() - t0
    return {"manifest_digest": made.manifest_digest, "modelpack_digest": made.modelpack_digest, "oci_ref": MODEL_REF,
            "layers": list(made.layers), "bytes": made.bytes, "seconds": round(seconds, 2),
            "mb_s": round(made.bytes / max(seconds, 1e-9) / 1e6, 1), "annotations": annotations}


@contextmanager
def model_mounts(image: "Output", scratch: Path) -> Iterator[tuple[tuple[Path, str], ...]]:
    """The bind mounts an image of this step needs to serve: its model image at /models (container.weights: image),
    unpacked under ``scratch``; none for a baked image."""
    if image.weights != "image":
        yield ()
        return
    with mounted(image.model_oci_dir, image.model_image_digest, scratch) as mounts:
        yield mounts


def _weights_layer(ctx: StepContext, model: Path, ref: str) -> dict:
    """Append the checkpoint to the built image as its last layer, written in one pass (forge/image/weights_layer.py)."""
    compression = ctx.recipe.recipe.container.weights_compression
    total = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        ctx.report(f"weights layer ({compression})", completed=done, total=total, unit="B")

    t0 = time.monotonic()
    try:
        layer = append_weights_layer(ctx.out / OCI_DIR, ref, model, MODEL_DIR, uid=UID, compression=compression,
                                     progress=progress)
    except ValueError as e:
        raise ToolError(f"the weights layer could not be written: {e}") from None
    seconds = time.monotonic() - t0
    return {"digest": layer["digest"], "diff_id": layer["diff_id"], "media_type": layer["mediaType"],
            "bytes": layer["size"], "files": layer["files"], "seconds": round(seconds, 2),
            "mb_s": round(layer["tar_bytes"] / max(seconds, 1e-9) / 1e6, 1)}


# ------------------------------------------------------------------ smoke test


# ------------------------------------------------------------------ readers (what downstream steps and the registry read)


@dataclass(frozen=True)
class Output:
    """The package step's image: its OCI layout and the description written next to it."""
    oci_dir: Path                     # OCI image layout (what Trivy scans and the registry stores)
    image: dict                       # image.json: manifest_digest, oci_ref, engine, builder, …
    containerfile: Path

    @classmethod
    def read(cls, entry) -> "Output":
        return cls(entry.out / OCI_DIR, json.loads((entry.out / IMAGE_JSON).read_text()), entry.out / CONTAINERFILE)

    @property
    def manifest_digest(self) -> str:
        return self.image["manifest_digest"]

    @property
    def weights(self) -> str:
        """image: a weights-free serving image with a model image beside it (MODEL_OCI); baked: weights inside."""
        return "image" if "model_image" in self.image else "baked"

    @property
    def model_oci_dir(self) -> Path:
        return self.oci_dir.parent / MODEL_OCI

    @property
    def model_image_digest(self) -> str | None:
        return (self.image.get("model_image") or {}).get("manifest_digest")

    @property
    def modelpack_digest(self) -> str | None:
        return (self.image.get("model_image") or {}).get("modelpack_digest")
