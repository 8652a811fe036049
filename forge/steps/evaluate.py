"""eval_baseline / eval_candidate: lm-eval on the BF16 snapshot and on the quantized checkpoint.

Both run the recipe's task pack through lm-eval's Python API and keep every per-sample output. The
baseline's key is (BF16 snapshot digest, task and data digests, eval settings, lm-eval version):
nothing of the recipe's name, quantization or gate, so every recipe on the same base model reuses
one baseline run.

Backends: ``hf`` (CPU: float32; GPU: bfloat16), ``vllm`` (GPU with vllm installed); ``auto`` picks
vllm when both a GPU and vllm are present, else hf.
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from forge.steps import StepContext, StepSpec

RESULTS, SAMPLES_DIR, RAW_DIR = "results.json", "samples", "lm_eval_samples"


def _enabled(loaded) -> bool:
    return loaded.recipe.eval is not None


def _config(loaded) -> dict:
    from forge.evaltasks import load_tasks

    ev = loaded.recipe.eval
    # Task *names*: where a recipe keeps its task files must not matter; their bytes enter via `data`.
    return {"tasks": [t.name for t in load_tasks(loaded)], "backend": ev.backend, "limit": ev.limit, "seed": ev.seed}


def _data(loaded) -> dict[str, Path]:
    from forge.evaltasks import load_tasks

    files: dict[str, Path] = {}
    for t in load_tasks(loaded):
        files.update(t.files)
    return files


def _identity(loaded) -> dict:
    from forge.host import device

    return {"device": device()}


def _spec(name: str, upstream: str, summary: str) -> StepSpec:
    return StepSpec(name=name, summary=summary, depends=(upstream,),
                    tools=("lm_eval", "torch", "transformers", "compressed-tensors", "vllm"), version=1,
                    config=lambda loaded: {**_config(loaded), "model": upstream}, data=_data, identity=_identity,
                    enabled=_enabled, run="forge.steps.evaluate:run")


BASELINE = _spec("eval_baseline", "resolve", "lm-eval the BF16 snapshot (shared by every recipe on it)")
CANDIDATE = _spec("eval_candidate", "quantize", "lm-eval the quantized checkpoint")


def pick_backend(requested: str) -> tuple[str, str]:
    """(lm-eval model type, device)."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "vllm" and not (cuda and importlib.util.find_spec("vllm")):
        from forge.errors import ToolError

        raise ToolError("eval.backend is vllm, but vllm or a CUDA GPU is missing here",
                        hint="Use backend: auto (hf on CPU) or run where vllm and a GPU are available.")
    if requested == "vllm" or (requested == "auto" and cuda and importlib.util.find_spec("vllm")):
        return "vllm", "cuda"
    return "hf", "cuda" if cuda else "cpu"


def run(ctx: StepContext) -> dict:
    from forge.evaltasks import load_tasks
    from forge.steps import quantize

    ev = ctx.recipe.recipe.eval
    (upstream,) = ctx.inputs.values()
    tasks = load_tasks(ctx.recipe)
    backend, device = pick_backend(ev.backend)
    if backend == "hf" and "quantize" in ctx.upstream and quantize.Output.read(ctx.upstream["quantize"]).modelopt_checkpoint:
        from forge.errors import ToolError

        raise ToolError("a ModelOpt checkpoint cannot be evaluated with the hf backend (transformers has no "
                        "'modelopt' quantization loader)",
                        hint="Evaluate where a GPU and vllm are present (eval.backend: vllm or auto), or remove the "
                             "eval section; without an eval gate the artifact is never validated.")
    ctx.report(f"lm-eval ({backend} on {device}): {', '.join(t.name for t in tasks)}")

    import lm_eval
    from lm_eval.tasks import TaskManager

    if backend == "hf":
        model_args = {"pretrained": str(upstream), "dtype": "float32" if device == "cpu" else "bfloat16", "device": device}
    else:
        model_args = {"pretrained": str(upstream), "dtype": "auto", "gpu_memory_utilization": 0.8,
                      "max_model_len": min(ctx.recipe.recipe.target.max_model_len, 4096), "seed": ev.seed}
    t0 = time.monotonic()
    res = lm_eval.simple_evaluate(
        model=backend, model_args=model_args, tasks=[t.lm_eval_task() for t in tasks], batch_size=8,
        limit=ev.limit, log_samples=True, bootstrap_iters=0, task_manager=TaskManager(),
        apply_chat_template=False, fewshot_as_multiturn=False, random_seed=ev.seed, numpy_random_seed=ev.seed,
        torch_random_seed=ev.seed, fewshot_random_seed=ev.seed)
    seconds = time.monotonic() - t0

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
                raw.write(json.dumps(s, default=str) + "\n")
                values = {m: (list(s[m]) if isinstance(s[m], (tuple, list)) else s[m]) for m in s.get("metrics", []) if m in s}
                flat.write(json.dumps({"doc_id": s["doc_id"], "values": values}) + "\n")
    # No timings in the output files: same inputs, same bytes (timings live in the step manifest).
    summary = {"backend": backend, "device": device, "model_args": {k: v for k, v in model_args.items() if k != "pretrained"},
               "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None, "results": results}
    (ctx.out / RESULTS).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return {"backend": backend, "device": device, "seconds": round(seconds, 1), "results": results}


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

    @classmethod
    def read(cls, entry) -> "Output":
        summary = json.loads((entry.out / RESULTS).read_text())
        return cls(entry.out, summary["results"], summary.get("backend"), summary.get("device"))

    def samples(self, task: str) -> dict[str, dict]:
        """doc_id -> {metric: value}."""
        return load_samples(self.dir, task)
