"""json_extract's exact match through the demo's image beside the checkpoint's (n = 60), one run.

    python bench/image_eval.py [--cache DIR] [--out bench/results/image-eval-json_extract.json]

Builds recipes/smollm2-135m-image-eval.yaml (eval.candidate: image) into the step cache DIR (a cache that
already holds the demo's steps reuses its snapshot, FP8 checkpoint and base image), then reads:
- through the image: the eval_candidate step's results (lm-eval local-completions against the image's
  /v1/completions, transformers serve) and the baseline's (the BF16 snapshot served by the same engine);
- the checkpoint: the same FP8 checkpoint (the quantize step's output, the bytes in the image's weights layer)
  evaluated as the demo's eval_candidate does it (lm-eval's hf backend, float32 on CPU, the eval step's settings),
  on json_extract alone. The BF16 snapshot likewise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-image-eval.yaml"
TASK = "json_extract"


def _forge(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True, text=True, env=env, cwd=REPO)


def _steps(cache: Path, recipe: str) -> dict[str, Path]:
    entries = json.loads(_forge("cache", "ls", "--json", cache=cache).stdout)
    return {e["step"]: cache / "steps" / e["key"] / "out" for e in entries if e["recipe"] == recipe}


def _checkpoint_em(model_dir: Path) -> dict:
    """The eval step's hf path (forge.steps.evaluate.simple_evaluate) on json_extract alone."""
    sys.path.insert(0, str(REPO))
    from forge.evaluation.tasks import load_task
    from forge.steps.evaluate import simple_evaluate

    task = load_task(str(REPO / "evals" / "tasks" / f"{TASK}.yaml"), REPO, "bench")
    t0 = time.monotonic()
    res, model_args, batching = simple_evaluate(model_dir, [task], "hf", "cpu", limit=None, seed=1234)
    return {"exact_match": res["results"][TASK]["exact_match,json-object"], "n": len(res["samples"][TASK]),
            "backend": "hf", "dtype": model_args["dtype"], "batch_size": batching["batch_size"],
            "seconds": round(time.monotonic() - t0, 1)}


def _hf(steps: dict[str, Path]) -> dict:
    return {"checkpoint": {**_checkpoint_em(steps["quantize"]), "what": "the same FP8 checkpoint (quantize output), "
                           "lm-eval hf backend in-process, as the demo's eval_candidate"},
            "bf16_checkpoint": {**_checkpoint_em(steps["resolve"]), "what": "the BF16 snapshot, lm-eval hf backend "
                                "in-process, as the demo's eval_baseline"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("FORGE_CACHE_DIR", "~/.cache/forge")).expanduser())
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "image-eval-json_extract.json")
    ap.add_argument("--hf", type=Path, help="a JSON of {checkpoint: …, bf16_checkpoint: …} from an earlier run of "
                                            "this script's hf part (python bench/image_eval.py --hf-only FILE)")
    ap.add_argument("--hf-only", type=Path, help="only evaluate the checkpoint and the snapshot with the hf backend "
                                                 "(steps already in the cache) and write them to this file")
    args = ap.parse_args()
    if args.hf_only:
        steps = _steps(args.cache, "smollm2-135m-image-eval") or _steps(args.cache, "smollm2-135m-demo")
        args.hf_only.write_text(json.dumps(_hf(steps), indent=2) + "\n")
        return

    t0 = time.monotonic()
    built = _forge("build", str(RECIPE), cache=args.cache)
    if built.returncode not in (0, 3):   # 3: the gate failed, still a measurement
        sys.exit(f"forge build {RECIPE.name} failed (exit {built.returncode}):\n{built.stdout}\n{built.stderr}")
    build_s = round(time.monotonic() - t0, 1)
    steps = _steps(args.cache, "smollm2-135m-image-eval")
    cand = json.loads((steps["eval_candidate"] / "results.json").read_text())
    base = json.loads((steps["eval_baseline"] / "results.json").read_text())
    verdict = json.loads((steps["gate"] / "verdict.json").read_text())
    image = json.loads((steps["package"] / "image.json").read_text())

    def n(step: str) -> int:
        return len((steps[step] / "samples" / f"{TASK}.jsonl").read_text().splitlines())

    result = {
        "task": TASK, "metric": "exact_match", "recipe": str(RECIPE.relative_to(REPO)),
        "through_image": {"exact_match": cand["results"][TASK]["exact_match"], "n": n("eval_candidate"),
                          "image": image["manifest_digest"], "evaluated_on": cand["evaluated_on"]},
        "bf16_through_same_engine": {"exact_match": base["results"][TASK]["exact_match"], "n": n("eval_baseline"),
                                     "evaluated_on": base["evaluated_on"]},
        **(json.loads(args.hf.read_text()) if args.hf else _hf(steps)),
        "gate": {k: verdict["rules"][0].get(k) for k in ("decision", "passed", "n", "baseline", "candidate", "delta",
                                                         "ci_low", "ci_high", "mde", "underpowered")},
        "build_seconds": build_s,   # this run's forge build (0 s of work when every step was a hit)
        "step_seconds": {step: json.loads((out.parent / "manifest.json").read_text()).get("seconds")
                         for step, out in steps.items() if step in ("package", "eval_baseline", "eval_candidate")},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                 "note": "2 cores shared with other builds: the step seconds are an upper bound"},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k]["exact_match"] for k in ("through_image", "bf16_through_same_engine", "checkpoint",
                                                            "bf16_checkpoint")}))


if __name__ == "__main__":
    main()
