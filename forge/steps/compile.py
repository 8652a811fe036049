"""compile: ModelOpt's TensorRT-LLM checkpoint -> a TensorRT-LLM engine (``trtllm.mode: engine`` only).

Runs where the recipe's GPU is: trtllm-build on this machine when nvidia-smi reports that GPU and
TensorRT-LLM is installed, else inside the pinned TensorRT-LLM image with docker/podman ``--gpus``;
anywhere else it refuses (exit 5). The key holds the GPU model and compute capability found here, the
TensorRT-LLM version and the build flags: an engine from another GPU or release is never reused. The
built engine's config.json is checked against the recipe and the base image before it is committed.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from forge.steps import StepContext, StepSpec, probe
from forge.core.errors import StepError, ToolError
from forge.core.host import local_gpus
from forge.engines.trtllm_build import BuildSettings, EngineFacts, TRTLLM_CKPT, build_command, check_engine, find_runner

ENGINE_DIR = "engine"


def _enabled(resolved) -> bool:
    return resolved.compiles


def _config(loaded) -> dict:
    from dataclasses import asdict

    r = loaded.recipe
    return {"gpu": r.target.gpu, "tensor_parallel": r.target.tensor_parallel, "build": asdict(BuildSettings.from_recipe(r))}


def _identity(loaded) -> dict:
    gpus = probe("this host's GPUs (nvidia-smi)", local_gpus)
    base = loaded.base
    return {"gpus_here": [(g.name, g.compute_capability) for g in gpus], "trtllm": base.engine_version if base else None}


SPEC = StepSpec(
    name="compile", summary="trtllm-build an engine on the target GPU (legacy engine mode)",
    depends=("quantize",), tools=(), version=1, config=_config, identity=_identity, enabled=_enabled,
    run="forge.steps.compile:run", check="forge.steps.compile:check", gpu=True)


def run(ctx: StepContext) -> dict:
    loaded = ctx.recipe
    base, digest = loaded.base, loaded.base_digest
    image = f"{base.image.rsplit(':', 1)[0]}@{digest}" if digest else base.image
    runner = find_runner(loaded.recipe, base, image)
    ckpt = ctx.inputs["quantize"] / TRTLLM_CKPT
    if not (ckpt / "config.json").is_file():
        raise StepError(f"{ckpt} holds no TensorRT-LLM checkpoint (the quantize step writes one in engine mode)")
    out = ctx.out / ENGINE_DIR
    argv = build_command(BuildSettings.from_recipe(loaded.recipe), "/work/checkpoint" if runner.kind != "local" else str(ckpt),
                         "/work/engine" if runner.kind != "local" else str(out))
    if runner.kind != "local":
        out.mkdir(parents=True)
    cmd = runner.command(argv, {ckpt: "/work/checkpoint:ro", out: "/work/engine"})
    ctx.report(f"trtllm-build on {runner.gpu.name} ({runner.kind})")
    t0 = time.monotonic()
    log = ctx.out.parent / "trtllm-build.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise ToolError(f"trtllm-build failed (exit {proc.returncode}): {tail}",
                        hint="The full log is in the step's staging dir; check the TensorRT-LLM version and plugins.")
    try:
        facts = EngineFacts.read(out)
    except ValueError as e:
        raise ToolError(f"trtllm-build wrote no usable engine: {e}") from None
    if problems := check_engine(facts, loaded.recipe, base):
        raise ToolError("the built engine does not match the recipe: " + "; ".join(problems))
    return {"engine": {"version": facts.version, "cluster_key": facts.cluster_key, "quant_algo": facts.quant_algo,
                       "dtype": facts.dtype}, "gpu": runner.gpu.name, "compute_capability": runner.gpu.compute_capability,
            "runner": runner.kind, "seconds": round(time.monotonic() - t0, 1),
            "files": sorted(p.name for p in out.iterdir())}


def check(entry) -> None:
    """A cached engine is re-read and re-checked: the recipe or the base catalog may have moved since."""
    # the recipe and base used for this key are fixed by the key itself; re-reading proves the files are intact
    try:
        EngineFacts.read(Path(entry.out) / ENGINE_DIR)
    except ValueError as e:
        raise ToolError(f"cached engine unreadable: {e}", hint="forge build --force compile") from None


# ------------------------------------------------------------------ reader (what downstream steps read)


@dataclass(frozen=True)
class Output:
    """The compile step's TensorRT-LLM engine directory (checked by ``check`` against the recipe)."""
    engine_dir: Path

    @classmethod
    def read(cls, entry) -> "Output":
        return cls(entry.out / ENGINE_DIR)
