"""The demo's FP8 gate measured through vLLM beside the transformers proxy, one run, same machine.

    python bench/vllm_cpu_gate.py [--cache DIR] [--out bench/results/vllm-cpu-gate.json]

Builds two variants of recipes/smollm2-135m-variants.yaml into the step cache DIR, both gated on heldout_ppl alone
(word perplexity, all 40 documents, max_rel_increase 0.10):
- ``cpu-fp8``, the proxy: lm-eval's hf backend loads the BF16 snapshot and the FP8 checkpoint in-process
  (transformers, float32 on the CPU), as the CPU demo's gate does;
- ``vllm-cpu-fp8`` as shipped: eval.candidate: image, vLLM 0.32 CPU serving the BF16 snapshot (from the base image)
  and the FP8 image, scored through lm-eval's local-completions (prompt logprobs through echo).
Both gate the same FP8 checkpoint (one quantize step). Reported: each gate's baseline, candidate, degradation and
its 95 % paired-bootstrap interval; the step times (the vLLM base image build; each side's eval) and the ratio of the
gate through vLLM (both evals) to the proxy's. A cache that already holds the steps reuses them (times then come
from the cache manifests of the run that built them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-variants.yaml"
VARIANTS = ("cpu-fp8", "vllm-cpu-fp8")
HELDOUT = {"tasks": [str(REPO / "evals" / "tasks" / "heldout_ppl.yaml")],
           "gate": [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 0.10}]}


def _forge(*args: str, cache: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def _recipe(work: Path) -> Path:
    """The shipped variants recipe with the proxy variant gated on heldout_ppl alone (the vLLM variant's own gate)."""
    yaml = YAML(typ="safe")
    doc = yaml.load(RECIPE.read_text().replace("../evals/", f"{REPO}/evals/"))
    doc["variants"] = [v for v in doc["variants"] if v["name"] in VARIANTS]
    proxy = next(v for v in doc["variants"] if v["name"] == "cpu-fp8")
    proxy["eval"] = dict(HELDOUT)
    shipped = next(v for v in doc["variants"] if v["name"] == "vllm-cpu-fp8")
    assert shipped["eval"]["gate"] == HELDOUT["gate"], "the vLLM variant's gate changed: update HELDOUT"
    path = work / "smollm2-135m-vllm-gate.yaml"
    path.write_text(json.dumps(doc, indent=2))
    return path


def _steps(cache: Path) -> dict[tuple[str, str], dict]:
    """(step, key) -> the manifest, for every entry in the cache."""
    out = {}
    for manifest in cache.glob("steps/*/manifest.json"):
        m = json.loads(manifest.read_text())
        out[(m.get("step"), manifest.parent.name)] = {**m, "dir": manifest.parent / "out"}
    return out


def _gate(record: dict, steps: dict) -> dict:
    """One variant's verdict row and its evals' times, found through the build's JSON (step -> key)."""
    keys = {s["step"]: s["key"] for s in record["steps"]}
    verdict = json.loads((steps[("gate", keys["gate"])]["dir"] / "verdict.json").read_text())
    (rule,) = verdict["rules"]
    evals = {side: steps[(f"eval_{side}", keys[f"eval_{side}"])] for side in ("baseline", "candidate")}
    return {"passed": verdict["passed"],
            **{k: rule.get(k) for k in ("baseline", "candidate", "delta", "degradation", "ci_low", "ci_high", "n",
                                        "threshold", "decision")},
            "evaluated_on": {side: json.loads((m["dir"] / "results.json").read_text())["evaluated_on"]
                             for side, m in evals.items()},
            "eval_seconds": {side: m.get("seconds") for side, m in evals.items()},
            "reused_by_this_run": [s["step"] for s in record["steps"] if s["status"] != "BUILT"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, help="step cache to build in (default: a fresh temporary one)")
    ap.add_argument("--out", type=Path, help="write the JSON here (e.g. bench/results/vllm-cpu-gate.json)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forge-bench-vllm-gate-"))
    cache = args.cache or work / "cache"
    recipe = _recipe(work)
    report: dict = {"benchmark": "vllm-cpu-gate", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(), "load_avg_start": os.getloadavg()}
    t0 = time.monotonic()
    builds = {}
    for variant in VARIANTS:   # one at a time: each variant's evals see the machine alone
        proc = _forge("build", str(recipe), "--variant", variant, "--json", cache=cache, timeout=7200)
        if proc.returncode not in (0, 3):
            sys.exit(f"forge build --variant {variant} failed ({proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        builds[variant] = json.loads(proc.stdout)["variants"][variant]
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    report["load_avg_end"] = os.getloadavg()
    steps = _steps(cache)
    report["gates"] = {"transformers_proxy": _gate(builds["cpu-fp8"], steps),
                       "vllm": _gate(builds["vllm-cpu-fp8"], steps)}
    base_key = next(s["key"] for s in builds["vllm-cpu-fp8"]["steps"] if s["step"] == "base_image")
    report["vllm_base_image_build_seconds"] = steps[("base_image", base_key)].get("seconds")
    seconds = {k: sum(v or 0 for v in g["eval_seconds"].values()) for k, g in report["gates"].items()}
    report["gate_eval_seconds"] = seconds
    report["ratio_vllm_gate_to_proxy_time"] = round(seconds["vllm"] / seconds["transformers_proxy"], 2)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
