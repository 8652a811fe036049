"""Benchmark: wall time of a no-op `forge build` (every step a HIT) beyond interpreter start.

Measures the demo recipe and a synthetic local checkpoint of --synthetic-gb GB (default 2), each after
one full build, and prints JSON. The two should be about equal: a no-op rebuild stats files, it never
re-reads weights, so its cost does not grow with model size.

    .venv/bin/python bench/noop_rebuild.py [--runs 5] [--synthetic-gb 2] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _time(cmd: list[str], env: dict, runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=REPO)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _synthetic_checkpoint(root: Path, gigabytes: float) -> Path:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    n = int(gigabytes * 1e9) // 2
    save_file({"weight": torch.ones(n, dtype=torch.bfloat16)}, str(root / "model.safetensors"))
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--synthetic-gb", type=float, default=2.0)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    cache = args.cache_dir or work / "cache"
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    forge = [sys.executable, "-m", "forge", "build"]

    model = _synthetic_checkpoint(work / "synthetic", args.synthetic_gb)
    size = sum(p.stat().st_size for p in model.iterdir())
    synth = work / "synthetic.yaml"
    synth.write_text(json.dumps({"apiVersion": "forge/v1", "name": "synthetic", "model": {"source": str(model)},
                                 "target": {"gpu": "CPU", "engine": "cpu"}}))
    demo = REPO / "recipes" / "smollm2-135m-demo.yaml"

    t0 = time.perf_counter()
    for recipe in (demo, synth):
        subprocess.run(forge + [str(recipe)], env=env, check=True, capture_output=True, cwd=REPO)
    first_builds = time.perf_counter() - t0
    time.sleep(2.5)  # past the racy-clean window of the digest memo
    for recipe in (demo, synth):  # these record the settled file stats in the memo
        subprocess.run(forge + [str(recipe)], env=env, check=True, capture_output=True, cwd=REPO)

    startup = _time([sys.executable, "-c", "pass"], env, args.runs)
    demo_s = _time(forge + [str(demo)], env, args.runs)
    synth_s = _time(forge + [str(synth)], env, args.runs)
    print(json.dumps({
        "benchmark": "noop_rebuild",
        "runs": args.runs,
        "python_startup_s": round(startup, 3),
        "demo_noop_s": round(demo_s, 3),
        "demo_noop_beyond_startup_s": round(demo_s - startup, 3),
        "synthetic_bytes": size,
        "synthetic_noop_s": round(synth_s, 3),
        "synthetic_noop_beyond_startup_s": round(synth_s - startup, 3),
        "ratio_synthetic_over_demo": round((synth_s - startup) / (demo_s - startup), 3),
        "first_builds_s": round(first_builds, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
