"""eval_baseline / eval_candidate: lm-eval on the BF16 snapshot and on the quantized checkpoint.

Both run the recipe's task pack through lm-eval's Python API and keep every per-sample output. The
baseline's key is (BF16 snapshot digest, task and data digests, eval settings, lm-eval version):
nothing of the recipe's name, quantization or gate, so every recipe on the same base model reuses
one baseline run.

Backends: ``hf`` (CPU: float32; GPU: bfloat16), ``vllm`` (GPU with vllm installed); ``auto`` picks
vllm when both a GPU and vllm are present, else hf.

``eval.candidate: image``: the candidate is the package step's image, served, and the baseline the BF16 snapshot
served by the same engine from the same base image, both through lm-eval's API model for the engine
(forge.steps.evaluate_image); the graph wires the candidate after the package step (``StepSpec.needs``).

Batching. Documents are evaluated 8 at a time, except on a checkpoint that quantizes activations
dynamically (scales computed at run time, e.g. FP8 W8A8 per-token, INT8 W8A8): one document per
forward pass. compressed-tensors computes those scales per token (it reduces over the hidden dimension
only), so padding never enters a scale; but a padded batch changes the float rounding of attention and
of every matmul (~1e-7 relative), and FP8's 3-bit mantissa turns a few of those into a whole rounding
step of an activation, so a document's log-likelihood would depend on its batch neighbours (the demo:
word_perplexity 97.63 at batch 1, 98.14 at batch 8). One document per pass makes the numbers a
function of the checkpoint alone. The policy is key material; the batch size used is recorded in
results.json and in the gate's verdict.
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from forge.steps import StepContext, StepSpec, evaluate_image, probe, quantize
from forge.steps.evaluate_image import key_material as image_key, through_image
from forge.core.errors import ToolError
from forge.core.host import device, local_gpus, no_nvidia_smi
from forge.core.jsonsafe import dumps
from forge.evaluation.tasks import load_tasks, task_manager

RESULTS, SAMPLES_DIR, RAW_DIR = "results.json", "samples", "lm_eval_samples"
BATCH_SIZE = 8
BATCHING = {"batch_size": BATCH_SIZE, "dynamic_activations": 1}   # the policy (key material), see the module doc


def _enabled(loaded) -> bool:
    return loaded.recipe.eval is not None


def _config(loaded) -> dict:
    ev = loaded.recipe.eval
    # Task *names*: where a recipe keeps its task files must not matter; their bytes enter via `data`.
    return {"tasks": [t.name for t in load_tasks(loaded)], "backend": ev.backend, "limit": ev.limit, "seed": ev.seed,
            "batching": BATCHING}


def _data(loaded) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for t in load_tasks(loaded):
        files.update(t.files)
    return files


def _identity(loaded) -> dict:
    # the GPU model too: numbers from an L4 are not an H100's, and a record says which it was (evaluated_on)
    gpus = probe("this host's GPUs (nvidia-smi)", local_gpus, remembered=no_nvidia_smi)
    return {"device": device(), "gpus": [g.name for g in gpus]}


def _spec(name: str, upstream: str, summary: str, *, served: tuple[str, ...]) -> StepSpec:
    side = name.removeprefix("eval_")

    def config(loaded) -> dict:
        if through_image(loaded):   # eval.candidate: image: served by the image's engine (forge.steps.evaluate_image)
            return {**_config(loaded), "model": served[0], "served": image_key(loaded, side)}
        return {**_config(loaded), "model": upstream}

    return StepSpec(name=name, summary=summary, depends=(upstream,),
                    needs=lambda loaded: served if through_image(loaded) else (upstream,),
                    # 2: batching; 3: evaluated_on (engine, backend, device, GPUs, dtype) in results.json
                    tools=("lm_eval", "torch", "transformers", "compressed-tensors", "vllm"), version=3,
                    config=config, data=_data, identity=_identity,
                    enabled=_enabled, run="forge.steps.evaluate:run", gpu=True)


# eval.candidate: image: the candidate is the package step's image; the baseline the BF16 snapshot served from the
# same base image (forge's own base is the base_image step's output; a published base is in the key by digest)
BASELINE = _spec("eval_baseline", "resolve", "lm-eval the BF16 snapshot (shared by every recipe on it)",
                 served=("resolve", "base_image"))
CANDIDATE = _spec("eval_candidate", "quantize", "lm-eval the quantized checkpoint (or, eval.candidate: image, the "
                  "built image through its endpoint)", served=("package", "quantize"))


def pick_backend(requested: str) -> tuple[str, str]:
    """(lm-eval model type, device)."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "vllm" and not (cuda and importlib.util.find_spec("vllm")):
        raise ToolError("eval.backend is vllm, but vllm or a CUDA GPU is missing here",
                        hint="Use backend: auto (hf on CPU) or run where vllm and a GPU are available.")
    if requested == "vllm" or (requested == "auto" and cuda and importlib.util.find_spec("vllm")):
        return "vllm", "cuda"
    return "hf", "cuda" if cuda else "cpu"


def dynamic_activations(checkpoint: Path) -> bool:
    """Does the checkpoint quantize activations with scales computed at run time? (compressed-tensors
    config groups with dynamic input or output activations; a BF16 or weight-only checkpoint does not)."""
    try:
        qc = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    groups = qc.get("config_groups") or {}
    return any(isinstance(g, dict) and isinstance(g.get(kind), dict) and g[kind].get("dynamic") not in (False, None)
               for g in groups.values() for kind in ("input_activations", "output_activations"))


def batching_for(checkpoint: Path, requested: int = BATCH_SIZE) -> dict:
    """The batch size this checkpoint is evaluated at, and why (recorded in results.json and the verdict)."""
    if dynamic_activations(checkpoint):
        return {"batch_size": BATCHING["dynamic_activations"], "requested": requested,
                "reason": "activations quantized dynamically: one document per forward pass, so a document's "
                          "numbers do not depend on its batch neighbours"}
    return {"batch_size": requested, "requested": requested, "reason": "no dynamic activation quantization"}


def simple_evaluate(model_dir: Path, tasks, backend: str, device: str, *, limit, seed: int, max_model_len: int = 4096,
                    batch_size: int = BATCH_SIZE) -> tuple[dict, dict, dict]:
    """lm-eval on one checkpoint with forge's settings: (lm-eval's result, model_args, batching)."""
    import lm_eval

    if backend == "hf":
        model_args = {"pretrained": str(model_dir), "dtype": "float32" if device == "cpu" else "bfloat16", "device": device}
    else:
        model_args = {"pretrained": str(model_dir), "dtype": "auto", "gpu_memory_utilization": 0.8,
                      "max_model_len": min(max_model_len, 4096), "seed": seed}
    batching = batching_for(model_dir, batch_size)
    res = lm_eval.simple_evaluate(
        model=backend, model_args=model_args, tasks=[t.lm_eval_task() for t in tasks], batch_size=batching["batch_size"],
        limit=limit, log_samples=True, bootstrap_iters=0, task_manager=task_manager(tasks),
        apply_chat_template=False, fewshot_as_multiturn=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    return res, model_args, batching


def run(ctx: StepContext) -> dict:
    if through_image(ctx.recipe):
        return run_served(ctx)
    ev = ctx.recipe.recipe.eval
    (upstream,) = ctx.inputs.values()
    tasks = load_tasks(ctx.recipe)
    backend, device = pick_backend(ev.backend)
    if backend == "hf" and "quantize" in ctx.upstream and quantize.Output.read(ctx.upstream["quantize"]).modelopt_checkpoint:
        raise ToolError("a ModelOpt checkpoint cannot be evaluated with the hf backend (transformers has no "
                        "'modelopt' quantization loader)",
                        hint="Evaluate where a GPU and vllm are present (eval.backend: vllm or auto), or remove the "
                             "eval section; without an eval gate the artifact is never validated.")
    ctx.report(f"lm-eval ({backend} on {device}): {', '.join(t.name for t in tasks)}")
    t0 = time.monotonic()
    res, model_args, batching = simple_evaluate(upstream, tasks, backend, device, limit=ev.limit, seed=ev.seed,
                                                max_model_len=ctx.recipe.recipe.target.max_model_len)
    seconds = time.monotonic() - t0
    results = _write(ctx, tasks, res, {"backend": backend, "device": device,
                                       "model_args": {k: v for k, v in model_args.items() if k != "pretrained"},
                                       "batching": batching,
                                       "evaluated_on": evaluated_on(backend, device, model_args, batching)})
    return {"backend": backend, "device": device, "batch_size": batching["batch_size"], "seconds": round(seconds, 1),
            "results": results}


def run_served(ctx: StepContext) -> dict:
    """eval.candidate: image: lm-eval's API model against the served image (candidate) or the BF16 snapshot served
    by the same engine from the same base image (baseline); see forge.steps.evaluate_image."""
    import shutil

    loaded, ev = ctx.recipe, ctx.recipe.recipe.eval
    tasks = load_tasks(loaded)
    api = evaluate_image.api_of(loaded)
    candidate = "package" in ctx.inputs
    serve = evaluate_image.served_candidate if candidate else evaluate_image.served_baseline
    tokenizer = ctx.inputs["quantize" if candidate else "resolve"]   # the served checkpoint's own tokenizer files
    keep = evaluate_image.keep_dir(ctx)
    t0 = time.monotonic()
    with serve(ctx, keep) as (server, through):
        ctx.report(f"lm-eval ({api.model} {api.route}): {', '.join(t.name for t in tasks)}")
        served_id = server.transcript["model"]
        res, model_args = evaluate_image.api_evaluate(
            server, served_id, tasks, api, tokenizer=tokenizer, limit=ev.limit, seed=ev.seed,
            max_length=loaded.recipe.target.max_model_len)
    gpus = evaluate_image.on_gpu(loaded)   # a GPU target's image was served with this machine's GPU (or refused)
    seconds = time.monotonic() - t0
    shutil.rmtree(keep, ignore_errors=True)   # served and answered: the log is not evidence
    evaluate_image.check_results(res, tasks, ev.limit, f"{through['ref']} ({api.model})")
    batching = {"batch_size": 1, "requested": 1, "reason": f"{api.model}: one request at a time (lm-eval num_concurrent 1)"}
    on = evaluate_image.evaluated_on(api, loaded.engine, loaded.base, through, gpus, batching)
    results = _write(ctx, tasks, res, {"backend": api.model, "device": on["device"], "model_args": model_args,
                                       "batching": batching, "evaluated_on": on})
    return {"backend": api.model, "device": on["device"], "batch_size": 1, "seconds": round(seconds, 1),
            "through": on["through"], "results": results}


def _write(ctx: StepContext, tasks, res: dict, summary: dict) -> dict:
    """samples/ (per document, what the gate pairs), lm_eval_samples/ (lm-eval's own records), results.json."""
    import lm_eval

    (ctx.out / SAMPLES_DIR).mkdir()
    (ctx.out / RAW_DIR).mkdir()
    results = {}
    for t in tasks:
        agg = res["results"].get(t.name, {})
        results[t.name] = {k.split(",")[0]: v for k, v in agg.items()
                           if "," in k and not k.split(",")[0].endswith("_stderr")}
        samples = res["samples"].get(t.name, [])
        with open(ctx.out / RAW_DIR / f"{t.name}.jsonl", "w") as raw, open(ctx.out / SAMPLES_DIR / f"{t.name}.jsonl", "w") as flat:
            for s in samples:
                raw.write(dumps(s, default=str) + "\n")
                values = {m: (list(s[m]) if isinstance(s[m], (tuple, list)) else s[m]) for m in s.get("metrics", []) if m in s}
                flat.write(dumps({"doc_id": s["doc_id"], "values": values}) + "\n")   # NaN/inf: null
    # No timings in the output files: same inputs, same bytes (timings live in the step manifest).
    summary = {**summary, "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
               "results": results}
    (ctx.out / RESULTS).write_text(dumps(summary, indent=2, default=str) + "\n")
    return results


ENGINE_OF_BACKEND = {"hf": "transformers", "vllm": "vllm"}   # whose kernels computed lm-eval's numbers


def evaluated_on(backend: str, device: str, model_args: dict, batching: dict) -> dict:
    """Where an eval ran, as the gate's verdict and the registry record carry it: the engine whose numerics
    produced the scores, lm-eval's backend, the device, the GPU models nvidia-smi reports, dtype and batching."""
    return {"engine": ENGINE_OF_BACKEND.get(backend, backend), "backend": backend, "device": device,
            "gpus": sorted({g.name for g in local_gpus()}) if device == "cuda" else [],
            "dtype": model_args.get("dtype"), "batch_size": batching.get("batch_size")}


def load_samples(out: Path, task: str) -> dict[str, dict]:
    """doc_id -> {metric: value} from an eval step's output."""
    path = out / SAMPLES_DIR / f"{task}.jsonl"
    return {row["doc_id"]: row["values"] for row in map(json.loads, path.read_text().splitlines())}


@dataclass(frozen=True)
class Output:
    """What an eval step hands downstream: aggregate metrics per task, and per-sample values on demand."""
    dir: Path
    results: dict[str, dict]          # task -> metric -> value
    backend: str | None
    device: str | None
    batching: dict | None = None      # the batch size used, the one requested, and why
    evaluated_on: dict | None = None  # engine, backend, device, GPUs, dtype (None: an eval from before forge said)

    @classmethod
    def read(cls, entry) -> "Output":
        summary = json.loads((entry.out / RESULTS).read_text())
        return cls(entry.out, summary["results"], summary.get("backend"), summary.get("device"), summary.get("batching"),
                   summary.get("evaluated_on"))

    def samples(self, task: str) -> dict[str, dict]:
        """doc_id -> {metric: value}."""
        return load_samples(self.dir, task)
