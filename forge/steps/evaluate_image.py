"""eval.candidate: image — the eval step through a served image instead of a loaded checkpoint.

The candidate: forge serves the package step's image (its OCI layout, by manifest digest; with
``container.weights: image`` the weights-free serving image, its model image mounted read-only at /models) with the
builder that built it, checks it as the smoke test does (health route, GET /v1/models lists the served id, one chat answer:
forge.image.smoketest.serving, the one path both use; the chat only when the package step's smoke test of this very
image did not pass here, since it asked the same question of the same digest), and runs lm-eval's own API model for the engine
(``Engine.eval_api``: ``local-completions`` against /v1/completions for transformers serve and vLLM) against it.
The numbers are the shipped artifact's: its digest, the engine and the endpoint are recorded in ``evaluated_on``.

The baseline, like with like: the BF16 snapshot served by the same engine from the same base image (the snapshot
bind-mounted read-only where the image holds its weights, the engine's own extra directories and env beside it),
through the same API model, with the same settings. Its key is (snapshot, base image, the engine's BF16 command,
tasks, settings): every image-evaluated recipe on that model and base shares it. Measuring it with lm-eval's hf
backend instead would compare two engines (float32 transformers against the server's dtype), not two checkpoints.

Fail closed: an image that does not start or does not answer is SmokeTestError (exit 6, the server log's tail);
an endpoint that errors during the eval, a server that dies, a task with no or fewer documents than asked, or an
aggregate that is not a finite number is ToolError (exit 5). Nothing of that is ever written as a result.
"""
from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from forge.core.errors import SmokeTestError, ToolError
from forge.core.host import local_gpus
from forge.image.builders import buildah, choose_builder, describe_layout, image_entrypoint
from forge.image.containers import MODEL_DIR, PORT, kv_cache_bytes
from forge.image.smoketest import Served, serving, why_not_here
from forge.engines import ServeAt
from forge.recipe.schema import Quantize
from forge.evaluation.tasks import task_manager
from forge.steps import StepContext, package

BASELINE_ID = "bf16-baseline"   # the id the baseline's server serves the snapshot under (no recipe's name: shared)
SERVER_ENV = (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HOME", "/tmp/hf"))  # as package sets


def through_image(loaded) -> bool:
    ev = loaded.recipe.eval
    return ev is not None and ev.candidate == "image"


def api_of(loaded):
    """The engine's EvalApi (validate refused a recipe whose engine has none)."""
    api = getattr(loaded.engine, "eval_api", None)
    if api is None:
        raise ToolError(f"the {loaded.engine.name} engine declares no eval_api: its image cannot be evaluated",
                        hint="Use eval.candidate: checkpoint (forge validate refuses this recipe).")
    return api


def baseline_command(loaded) -> tuple[tuple[str, ...], str, tuple[tuple[str, str], ...]]:
    """(the engine's command for the BF16 snapshot, the id it serves, its env): key material of the baseline."""
    engine = loaded.engine
    served = engine.served_name(BASELINE_ID)
    bf16 = loaded.recipe.model_copy(update={"quantize": Quantize()})   # no quantization flags (kv cache included)
    at = ServeAt(MODEL_DIR, PORT, served, kv_cache_bytes=kv_cache_bytes(loaded, bf16))   # a CPU target's planned KV
    return tuple(engine.serve_command(bf16, "bf16", at)), served, \
        (*SERVER_ENV, *engine.image_env())


def key_material(loaded, side: str) -> dict:
    """What the eval's key adds when it goes through a server: the API model and endpoint; for the baseline also
    the base image and the command that serves the snapshot (the candidate's image is its upstream digest)."""
    api = api_of(loaded)
    through = {"through": "image" if side == "candidate" else "base image", "engine": loaded.engine.name,
               "api": api.model, "route": api.route}
    if side == "baseline":
        args, served, env = baseline_command(loaded)
        through.update(base=loaded.base.name, base_digest=loaded.base_digest, command=list(args), env=dict(env))
    return through


def on_gpu(loaded) -> bool:
    """Whether the image is served with this machine's GPU: its target is a GPU (vLLM's CPU build on a CPU target,
    like the CPU engine, serves on the CPU)."""
    return not loaded.gpu.is_cpu


def _can_serve(loaded, builder: str) -> bool:
    """Whether the image needs this machine's GPU, after refusing when it cannot run here."""
    engine, gpu = loaded.engine, loaded.recipe.target.gpu
    if (why := why_not_here(engine.name, gpu, builder, loaded.scheme)) is not None:
        raise ToolError(f"eval.candidate: image: the {engine.name} image cannot be served on this machine "
                        f"({why.removeprefix('not smoke-tested: ')})",
                        hint=("Build on a CPU the reason above does not apply to" if loaded.gpu.is_cpu else
                              f"Build where a {gpu} is (with docker or podman)") +
                        ", or use eval.candidate: checkpoint.")
    return on_gpu(loaded)


@contextmanager
def served_candidate(ctx: StepContext, keep: Path) -> Iterator[tuple[Served, dict]]:
    """The package step's image, served from its OCI layout; yields (the server, what evaluated_on says of it)."""
    loaded = ctx.recipe
    image = package.Output.read(ctx.upstream["package"])
    builder, ref = image.image["builder"], image.image["oci_ref"]
    gpus = _can_serve(loaded, builder)
    entrypoint = image_entrypoint(image.oci_dir, ref)          # the artifact's own ENTRYPOINT, not the recipe's
    served = loaded.engine.served_name(loaded.recipe.name)
    ctx.report(f"serving the image {image.manifest_digest[:19]} ({loaded.engine.name})")
    model = {"model_image": image.model_image_digest} if image.weights == "image" else {}
    asked = (image.image.get("smoke_test") or {}).get("passed") is True   # this digest answered the chat already
    with package.model_mounts(image, ctx.out.parent) as mounts, \
            _served(image.image["tag"], entrypoint, served, ctx, keep=keep, builder=builder,
                    layout=(image.oci_dir, ref), gpus=gpus, mounts=mounts, chat=not asked) as s:
        yield s, {"image": image.manifest_digest, "ref": ref, "builder": builder, **model}


@contextmanager
def served_baseline(ctx: StepContext, keep: Path) -> Iterator[tuple[Served, dict]]:
    """The BF16 snapshot served by the engine of the recipe's base image: the snapshot mounted at the image's model
    path, the engine's extra directories (the CPU engine's hub cache entry) mounted beside it."""
    loaded = ctx.recipe
    base, engine = loaded.base, loaded.engine
    builder = choose_builder(loaded, base)
    gpus = _can_serve(loaded, builder)
    tag = package.base_ref(ctx, base, loaded.base_digest)
    if builder == "buildah" and buildah("inspect", "--type", "image", tag, check=False).returncode != 0:
        buildah("pull", "--quiet", tag)
    args, served, env = baseline_command(loaded)
    with tempfile.TemporaryDirectory(prefix="forge-baseline-") as tmp:
        extra = engine.context_dirs(Path(tmp), served)
        mounts = ((ctx.inputs["resolve"], MODEL_DIR), *((Path(tmp) / src, dst) for src, dst in extra))
        ctx.report(f"serving the BF16 snapshot from the base image {base.name} ({engine.name})")
        with _served(tag, args, served, ctx, keep=keep, builder=builder, gpus=gpus, mounts=mounts, env=env,
                     command=True) as s:
            yield s, {"image": _base_digest(ctx, loaded), "ref": tag, "builder": builder, "model": "bf16 snapshot"}


@contextmanager
def _served(tag, entrypoint, served, ctx, *, keep, **kw) -> Iterator[Served]:
    try:
        with serving(tag, entrypoint, served, ctx.report, keep=keep, health_route=ctx.recipe.engine.health_route,
                     **kw) as s:
            yield s
    except SmokeTestError as e:
        raise SmokeTestError(f"eval.candidate: image: {e.message}",
                             hint="forge serves the image to evaluate it and it did not serve: read the server log "
                                  "above (eval.candidate: checkpoint evaluates the checkpoint instead).") from None


def _base_digest(ctx: StepContext, loaded) -> str | None:
    if "base_image" in ctx.inputs:   # forge's own base: its OCI layout in the base_image step's output
        return describe_layout(ctx.inputs["base_image"] / package.OCI_DIR, loaded.base.name)["manifest_digest"]
    return loaded.base_digest


def api_evaluate(s: Served, served_id: str, tasks, api, *, tokenizer: Path, limit, seed: int, max_length: int):
    """lm-eval's API model for the engine against the running server: (lm-eval's result, model_args)."""
    import lm_eval

    scored = {t.request_type for t in tasks} - {"generate_until"}
    model_args = {"model": served_id, "base_url": f"{s.url}{api.route}", "tokenizer_backend": "huggingface",
                  "tokenizer": str(tokenizer),   # the checkpoint's own tokenizer files (offline)
                  "tokenized_requests": bool(scored),   # generation sends text: transformers serve takes a string
                  "num_concurrent": 1, "max_retries": 3, "timeout": 600, "max_length": max_length, "seed": seed}
    try:
        res = lm_eval.simple_evaluate(
            model=api.model, model_args=model_args, tasks=[t.lm_eval_task() for t in tasks], batch_size=1,
            limit=limit, log_samples=True, bootstrap_iters=0, task_manager=task_manager(tasks), apply_chat_template=False,
            fewshot_as_multiturn=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    except Exception as e:   # an HTTP error after lm-eval's retries, a connection lost, an answer it cannot read
        raise ToolError(f"lm-eval ({api.model}) against {s.url}{api.route} failed: {type(e).__name__}: "
                        f"{str(e)[:800]}\n  server log, last lines ({s.log}):\n{_tail(s.log)}",
                        hint="The image served but its endpoint failed during the eval; the server log says why.") from None
    if (code := s.exited()) is not None:
        raise ToolError(f"the image's server exited with {code} during the eval ({s.log})\n{_tail(s.log)}")
    return res, {k: v for k, v in model_args.items() if k not in ("base_url", "tokenizer")}


def check_results(res: dict, tasks, limit, where: str) -> None:
    """Fail closed on what an endpoint can get wrong quietly: a task with no samples or fewer than its documents,
    an aggregate that is missing or not a finite number."""
    problems = []
    for t in tasks:
        samples = (res.get("samples") or {}).get(t.name) or []
        n = (res.get("n-samples") or {}).get(t.name, {}).get("effective")
        if not samples or (n is not None and len(samples) < n):
            problems.append(f"{t.name}: {len(samples)} document(s) scored" + (f" of {n}" if n is not None else ""))
        agg = {k: v for k, v in (res.get("results") or {}).get(t.name, {}).items()
               if "," in k and not k.split(",")[0].endswith("_stderr")}
        bad = {k.split(",")[0]: v for k, v in agg.items()
               if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)}
        if not agg or bad:
            problems.append(f"{t.name}: " + (f"metrics not finite numbers: {bad}" if bad else "no metrics"))
    if problems:
        raise ToolError(f"the eval through {where} produced no usable result: " + "; ".join(problems),
                        hint="Nothing is gated on an empty or non-finite result; the server log is kept beside the "
                             "step's staging directory.")


def evaluated_on(api, engine, base, through: dict, served_gpus: bool, batching: dict) -> dict:
    """Where the numbers came from: the engine whose kernels computed them (the server's), lm-eval's API model, the
    device, and the image they were served from, by digest."""
    gpus = sorted({g.name for g in local_gpus()}) if served_gpus else []
    return {"engine": api.numerics, "backend": api.model, "device": "cuda" if served_gpus else "cpu", "gpus": gpus,
            "dtype": "served", "batch_size": batching.get("batch_size"),
            "through": {"kind": "image" if "model" not in through else "base image", "engine": engine.name,
                        "engine_version": base.engine_version, "endpoint": api.route, **through}}


def keep_dir(ctx: StepContext) -> Path:
    """Where the server's log goes (kept beside the staging dir, as a failed smoke test's is)."""
    return ctx.out.parent.with_name(ctx.out.parent.name + ".eval-server")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_bytes()[-12000:].decode(errors="replace")
    except OSError:
        return "    (no log)"
    return "\n".join(f"    {x}" for x in text.splitlines()[-lines:])


__all__ = ["through_image", "api_of", "on_gpu", "key_material", "served_candidate", "served_baseline", "api_evaluate",
           "check_results", "evaluated_on", "keep_dir", "BASELINE_ID"]
