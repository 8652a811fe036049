"""Benchmark: writing the weights layer vs hashing the same files (Python hashlib SHA-256), in one run.

  forge      forge's weights layer: a deterministic tar of the checkpoint streamed into an OCI layout's
             blob store, hashed while written, appended to an image (forge/image/weights_layer.py), uncompressed
             (the default) — the part of packaging that grows with the model
  hashlib    SHA-256 over the same files, 16 MiB reads: the floor any content-addressed packaging pays
  buildah    (--buildah) the previous path: buildah bud `COPY model/` + push to an OCI layout (gzip)
Prints JSON with the throughputs, ratio_forge_over_hashlib (goal >= 0.8) and the load average. The files are
read once, untimed, before the first run, so both sides read from the page cache.

    .venv/bin/python bench/package.py MODEL_DIR [--runs 3] [--compression none|gzip|zstd] [--buildah]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _hash_files(files: list[Path]) -> None:
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)


def empty_image(layout: Path) -> None:
    """A minimal OCI layout with one empty image to append to (what the package step's buildah build gives)."""
    from forge.oci.layout import Layout, descriptor, manifest_bytes

    store = Layout(layout).init()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    store.put_bytes(config)
    manifest = manifest_bytes({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": descriptor("application/vnd.oci.image.config.v1+json", config), "layers": []})
    store.put_bytes(manifest)
    store.add_to_index([descriptor("application/vnd.oci.image.manifest.v1+json", manifest,
                                   annotations={"org.opencontainers.image.ref.name": "bench"})])


def _buildah(model: Path, work: Path, i: int) -> float:
    ctx = work / "ctx"
    if not ctx.exists():
        shutil.copytree(model, ctx / "model", copy_function=os.link)
        (ctx / "Containerfile").write_text("FROM scratch\nCOPY model/ /opt/forge/model/\n")
    storage = ["--storage-driver", "vfs", "--root", str(work / "root"), "--runroot", str(work / "run")]
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    t0 = time.perf_counter()
    subprocess.run(["buildah", *storage, "bud", "--timestamp", "0", "--layers=false", "-t", f"bench:{i}", str(ctx)],
                   check=True, capture_output=True, env=env)
    subprocess.run(["buildah", *storage, "push", "--quiet", f"bench:{i}", f"oci:{work / 'oci-buildah'}:b{i}"],
                   check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    from forge.image.weights_layer import append_weights_layer

    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compression", default="none", choices=("none", "gzip", "zstd"))
    ap.add_argument("--buildah", action="store_true", help="also time the previous buildah COPY path")
    ap.add_argument("--out", type=Path, help="also write the JSON here (e.g. bench/results/package-3b.json)")
    args = ap.parse_args()
    files = sorted(p for p in args.model.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    work = Path(tempfile.mkdtemp(prefix="forge-bench-pkg-", dir=os.environ.get("TMPDIR")))
    forge_s, hash_s, buildah_s = [], [], []
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    _hash_files(files)   # untimed: both sides then read from the same page cache (the first to read pays the disk)
    try:
        for i in range(args.runs):
            layout = work / f"oci-{i}"
            empty_image(layout)
            t0 = time.perf_counter()
            append_weights_layer(layout, "bench", args.model, "/opt/forge/model", uid=10001,
                                 compression=args.compression)
            forge_s.append(time.perf_counter() - t0)
            shutil.rmtree(layout)
            t0 = time.perf_counter()
            _hash_files(files)
            hash_s.append(time.perf_counter() - t0)
            if args.buildah:
                buildah_s.append(_buildah(args.model, work, i))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f, h = statistics.median(forge_s), statistics.median(hash_s)
    result = {"benchmark": "package_weights_layer", "bytes": size, "files": len(files), "runs": args.runs,
              "compression": args.compression, "forge_s": round(f, 2), "hashlib_s": round(h, 2),
              "forge_mb_s": round(size / f / 1e6, 1), "hashlib_mb_s": round(size / h / 1e6, 1),
              "ratio_forge_over_hashlib": round(h / f, 3),
              "load_avg_1_5_15": {**load, "end": [round(x, 2) for x in os.getloadavg()]}}
    if buildah_s:
        b = statistics.median(buildah_s)
        result.update(buildah_s=round(b, 2), buildah_mb_s=round(size / b / 1e6, 1),
                      ratio_buildah_over_hashlib=round(h / b, 3))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
