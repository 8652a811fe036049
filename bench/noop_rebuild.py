"""Benchmark: wall time of a no-op `forge build` (every step a HIT), for the demo and for the variants recipe.

Targets (issue 27): the demo's no-op rebuild <= 0.5 s, the variants recipe's (three variants, three records and
the variant matrix) <= 1 s, each the median of --runs (7) runs of the whole `forge build` process; the time of
`forge --help` (the interpreter and forge's imports, no build) is measured in the same run as the floor. Both
recipes are built once first (minutes: the demo model's evals on the CPU), unless --cache-dir names a cache that
holds them already (the e2e tests' demo cache does); the GPU variants package onto local stand-ins of the vLLM
base (tests/conftest.py makes them; --buildah-root reuses a storage that has them).

    .venv/bin/python bench/noop_rebuild.py [--runs 7] [--cache-dir DIR] [--buildah-root DIR] [--out FILE.json]
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
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"demo": REPO / "recipes" / "smollm2-135m-demo.yaml",
           "variants": REPO / "recipes" / "smollm2-135m-variants.yaml"}
TARGETS = {"demo": 0.5, "variants": 1.0}


def _times(cmd: list[str], env: dict, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        samples.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        if "BUILT" in proc.stdout:
            sys.exit(f"not a no-op: a step was built\n{proc.stdout}")
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cache-dir", type=Path, default=None, help="a step cache that may hold both builds already")
    ap.add_argument("--buildah-root", type=Path, default=None, help="buildah storage with the stand-in GPU bases")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "noop_rebuild.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="forge-bench-noop-"))
    env = {**os.environ, "FORGE_CACHE_DIR": str(args.cache_dir or work / "cache"), "HF_HUB_OFFLINE": "1",
           "FORGE_REGISTRY_DIR": str(work / "registry")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # as a default Python runs: its bytecode cached, not compiled each run
    if args.buildah_root is None:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import make_standin_bases   # the vLLM base's stand-in: the real one cannot be pulled here

        env.update(make_standin_bases(work / "buildah" / "storage"))
    else:
        env["FORGE_BUILDAH_ROOT"] = str(args.buildah_root)
    forge = [sys.executable, "-m", "forge"]

    t0 = time.perf_counter()
    for name, recipe in RECIPES.items():   # the first builds (or, with a warm --cache-dir, the first no-ops)
        proc = subprocess.run([*forge, "build", str(recipe)], env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"building {name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    first_builds = time.perf_counter() - t0
    time.sleep(2.5)  # past the racy-clean window of the digest memo; the next builds record the settled stats
    for recipe in RECIPES.values():
        subprocess.run([*forge, "build", str(recipe)], env=env, capture_output=True, check=True, cwd=REPO)

    help_s = _times([*forge, "--help"], env, args.runs)
    result = {"benchmark": "noop_rebuild", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "runs": args.runs, "load_average_before": os.getloadavg()[0], "cpus": os.cpu_count(),
              "bytecode_cache": "on (PYTHONDONTWRITEBYTECODE unset for the runs)",
              "forge_help_median_s": round(statistics.median(help_s), 3), "first_builds_s": round(first_builds, 1)}
    for name, recipe in RECIPES.items():
        samples = _times([*forge, "build", str(recipe)], env, args.runs)
        median = statistics.median(samples)
        result[name] = {"recipe": str(recipe.relative_to(REPO)), "median_s": round(median, 3),
                        "samples_s": [round(s, 3) for s in samples], "target_s": TARGETS[name],
                        "meets_target": median <= TARGETS[name],
                        "over_forge_help": round(median / result["forge_help_median_s"], 2)}
    result["load_average_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
