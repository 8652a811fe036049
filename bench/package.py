"""Benchmark: weights-layer packaging throughput vs `sha256sum` over the same files, in one run.

Builds `FROM scratch` + `COPY model/ /opt/forge/model/` with buildah (vfs, chroot, --timestamp 0) and
exports it to an OCI layout — the weights layer's whole cost — and times `sha256sum` over the same
files. Prints JSON with both throughputs and their ratio.

    .venv/bin/python bench/package.py MODEL_DIR [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    files = sorted(p for p in args.model.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    work = Path(tempfile.mkdtemp(prefix="forge-bench-pkg-"))
    (work / "ctx" / "model").mkdir(parents=True)
    for p in files:
        dst = work / "ctx" / "model" / p.relative_to(args.model)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    (work / "ctx" / "Containerfile").write_text("FROM scratch\nCOPY model/ /opt/forge/model/\n")
    storage = ["--storage-driver", "vfs", "--root", str(work / "root"), "--runroot", str(work / "run")]
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    pack, hashing = [], []
    for i in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run(["buildah", *storage, "bud", "--timestamp", "0", "--layers=false", "-t", f"bench:{i}",
                        str(work / "ctx")], check=True, capture_output=True, env=env)
        subprocess.run(["buildah", *storage, "push", "--quiet", f"bench:{i}", f"oci:{work / 'oci'}:b{i}"],
                       check=True, capture_output=True, env=env)
        pack.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
        hashing.append(time.perf_counter() - t0)
    p, h = statistics.median(pack), statistics.median(hashing)
    print(json.dumps({"benchmark": "package_weights_layer", "bytes": size, "files": len(files), "runs": args.runs,
                      "package_s": round(p, 2), "sha256sum_s": round(h, 2),
                      "package_mb_s": round(size / p / 1e6, 1), "sha256sum_mb_s": round(size / h / 1e6, 1),
                      "ratio_package_over_sha256sum_throughput": round(h / p, 3)}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
