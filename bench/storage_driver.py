"""Benchmark: buildah's overlay storage driver against vfs for what the package step does with a base image, one run.

For each driver, in a fresh storage root, through forge's own buildah calls (forge.image.builders):
  pull     the base image's OCI layout into the storage (the package step's "loading the image")
  build    `buildah bud` of a package-like Containerfile on it (FROM the base, one small COPY, labels)
  push     the built image to an OCI layout (what the registry and Trivy read)
  serve    a container from the image, one command run in it, removed (the smoke test's start and stop)
and the storage's size on disk. Each phase is timed up to a sync(2) (what it wrote is on disk: on a busy machine
the kernel's writeback throttles a writer that leaves GBs of dirty pages behind), and each driver starts with the
page cache dropped, so neither inherits the other's reads or writes. vfs copies the base's whole root filesystem for every layer and container;
overlay shares it. Prints JSON: per phase seconds per driver, ratio_overlay_over_vfs, the manifest digest each
driver built (they must be equal: the driver is not key material) and the load average.

    .venv/bin/python bench/storage_driver.py BASE_LAYOUT REF [--out bench/results/storage-driver.json]

BASE_LAYOUT: a base_image step's output layout, e.g. CACHE/steps/KEY/out/oci with REF cpu-python311 (after `make
demo`, `forge cache ls` names the key). Needs root and buildah; overlay needs a kernel that mounts it here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONTAINERFILE = """FROM {base}
COPY hub/ /opt/forge/hub/
ENV HF_HUB_OFFLINE="1"
LABEL dev.forge.bench="storage-driver"
USER 10001:10001
"""


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def _cold() -> None:
    """Write back every dirty page and drop the page cache (root), so that a driver starts as the first would."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def one_driver(driver: str, layout: Path, ref: str, work: Path) -> dict:
    from forge.image.builders import buildah, pull_layout

    os.environ["FORGE_BUILDAH_ROOT"] = str(work / "storage")
    os.environ["FORGE_BUILDAH_STORAGE_DRIVER"] = driver
    seconds = {}
    _cold()
    t0 = time.perf_counter()
    image_id = pull_layout(layout, ref)
    buildah("tag", image_id, "localhost/bench-base:1")
    os.sync()
    seconds["pull"] = time.perf_counter() - t0
    ctx = work / "ctx"
    (ctx / "hub").mkdir(parents=True)
    (ctx / "hub" / "version.txt").write_text("1\n")
    (ctx / "Containerfile").write_text(CONTAINERFILE.format(base="localhost/bench-base:1"))
    out = work / "oci"
    t0 = time.perf_counter()
    buildah("bud", "--isolation", "chroot", "--timestamp", "0", "--layers=false", "--pull=never",
            "-f", str(ctx / "Containerfile"), "-t", "localhost/bench:1", str(ctx))
    os.sync()
    seconds["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    buildah("push", "--quiet", "localhost/bench:1", f"oci:{out}:bench")
    os.sync()
    seconds["push"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctr = buildah("from", "--pull=never", "localhost/bench:1").stdout.strip().splitlines()[-1]
    buildah("run", "--isolation", "chroot", ctr, "--", "/bin/true")
    buildah("rm", ctr)
    os.sync()
    seconds["serve"] = time.perf_counter() - t0
    digest = json.loads((out / "index.json").read_text())["manifests"][0]["digest"]
    return {"seconds": {k: round(v, 2) for k, v in seconds.items()}, "total_s": round(sum(seconds.values()), 2),
            "storage_bytes": _du(work / "storage"), "manifest_digest": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("layout", type=Path, help="the base image's OCI layout directory")
    ap.add_argument("ref", help="the image's ref name in the layout (e.g. cpu-python311)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/storage_driver.py: run as root (buildah's overlay driver mounts)")
    from forge.image.builders import buildah, storage_driver

    results = {}
    with tempfile.TemporaryDirectory(prefix="forge-bench-driver-", dir=os.environ.get("TMPDIR")) as tmp:
        if storage_driver(Path(tmp) / "probe") != "overlay":
            sys.exit("bench/storage_driver.py: no overlay filesystem can be mounted here; only vfs would run")
        for driver in ("vfs", "overlay"):
            work = Path(tmp) / driver
            try:
                results[driver] = one_driver(driver, args.layout.resolve(), args.ref, work)
            finally:
                buildah("rmi", "--all", "--force", check=False)
    vfs, ovl = results["vfs"], results["overlay"]
    report = {
        "benchmark": "buildah storage driver: the package step's pull, build, push and smoke-test start",
        "base_layout": str(args.layout), "ref": args.ref, "drivers": results,
        "ratio_overlay_over_vfs": {**{k: round(ovl["seconds"][k] / vfs["seconds"][k], 3) for k in vfs["seconds"]},
                                   "total": round(ovl["total_s"] / vfs["total_s"], 3),
                                   "storage_bytes": round(ovl["storage_bytes"] / vfs["storage_bytes"], 3)},
        "same_digest": ovl["manifest_digest"] == vfs["manifest_digest"],
        "buildah": subprocess.run(["buildah", "--version"], capture_output=True, text=True).stdout.strip(),
        "timing": "each phase up to a sync(2); each driver from a dropped page cache",
        "cpus": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
