"""Benchmark: a model image pushed to and pulled from a local Distribution registry, vs skopeo, vs hashlib, in one run.

  hashlib       SHA-256 over the checkpoint's files, 16 MiB reads: the floor any content-addressed transfer pays
  forge push    the model image (forge.image.model_image: one uncompressed layer per shard) pushed with forge's client
                (forge.oci.client.Client.push_image: HEAD, then the shards a few at a time, each streamed)
  forge pull    the same image pulled back with Client.pull_image into an empty OCI layout (blobs a few at a time,
                each hashed while streamed to disk and taken in only under its digest)
  skopeo push   ``skopeo copy --preserve-digests`` of the same files as one uncompressed layer (a single-layer OCI
                image, as a serving image with baked weights carries them) to another empty registry
  skopeo pull   ``skopeo copy --preserve-digests`` of that image back into an empty OCI layout
Throughputs are bytes of the image's layers per second; ratios are relative to hashlib (goal >= 0.8 for forge's push
and pull). Each side also records the CPU seconds of the client (this process's threads, or skopeo) and of the
registry process while it ran, which says where the time went on a machine whose cores are shared. Both registries are Debian's docker-registry on 127.0.0.1 with filesystem storage on this disk, so a push
includes the registry's own hashing and writing on the same cores. Every file is read once, untimed, before the first
timed step, so all sides start from the page cache.

Disk: at most about 3 copies of the checkpoint at a time (checkpoint + image + registry, then checkpoint + registry +
pulled copy); each copy is deleted as soon as it is done with. --max-disk-gb refuses to start above that.

    .venv/bin/python bench/model_image_push.py [MODEL_DIR] [--shape llama-3.2-3b] [--work DIR]
                                               [--out bench/results/model-image-push-pull.json]
(no MODEL_DIR: scripts/make_random_checkpoint.py writes one of --shape under --work, deleted at the end)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _hash_files(files: list[Path]) -> None:
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)


@contextmanager
def registry(root: Path):
    """Debian's docker-registry on 127.0.0.1 (filesystem storage under root), as tests/conftest.py starts it."""
    exe = shutil.which("docker-registry")
    if exe is None:
        sys.exit("docker-registry is not installed (`make setup-tools`)")
    root.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "config.yml").write_text(f"version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem:\n"
                                     f"    rootdirectory: {root / 'data'}\n  delete: {{enabled: true}}\n"
                                     f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(root / "registry.log", "w")
    proc = subprocess.Popen([exe, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def single_layer_image(model: Path, layout_dir: Path) -> tuple[str, int]:
    """The checkpoint as one uncompressed layer under /models (forge's deterministic tar), in an OCI layout tagged
    "bench". Returns (manifest digest, layer bytes)."""
    from forge.image.weights_layer import write_layer
    from forge.oci.layout import Layout, descriptor, manifest_bytes

    layout = Layout(layout_dir).init()
    facts = write_layer(model, "/models", layout.root / "blobs" / "sha256", uid=0)
    config = manifest_bytes({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [facts["diff_id"]]}})
    layout.put_bytes(config)
    manifest = manifest_bytes({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": descriptor("application/vnd.oci.image.config.v1+json", config),
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                           "digest": facts["digest"], "size": facts["size"]}]})
    digest = layout.put_bytes(manifest)
    layout.add_to_index([descriptor("application/vnd.oci.image.manifest.v1+json", manifest,
                                    annotations={"org.opencontainers.image.ref.name": "bench"})])
    return digest, facts["size"]


def _skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", *args], check=True, capture_output=True)


def _cpu(proc: subprocess.Popen | None) -> float:
    """CPU seconds (user + system) of a running process, or of this process and its waited-for children."""
    if proc is not None:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextmanager
def timed(into: dict, name: str, registry_proc: subprocess.Popen):
    """Wall seconds, client and registry CPU seconds of the block, as into[name]."""
    c0, r0, t0 = _cpu(None), _cpu(registry_proc), time.perf_counter()
    yield
    into[name] = {"s": time.perf_counter() - t0, "client_cpu_s": round(_cpu(None) - c0, 2),
                  "registry_cpu_s": round(_cpu(registry_proc) - r0, 2)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    from forge.image.model_image import write_model_image
    from forge.oci.client import Client, Remote
    from forge.oci.layout import Layout

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--shape", default="llama-3.2-3b")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new one under $TMPDIR)")
    ap.add_argument("--workers", type=int, default=4, help="blobs in flight for forge's push and pull")
    ap.add_argument("--max-disk-gb", type=float, default=20.0, help="refuse to start if the peak would exceed this")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forge-bench-push-", dir=args.work or os.environ.get("TMPDIR")))
    made = args.model is None
    result: dict = {"benchmark": "model_image_push_pull", "workers": args.workers}
    try:
        if made:
            model = work / "ckpt"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), str(model),
                            "--shape", args.shape], check=True, stdout=subprocess.DEVNULL)
            result["checkpoint"] = {"shape": args.shape, "made_in_s": round(time.perf_counter() - t0, 1)}
        else:
            model = args.model
            result["checkpoint"] = {"dir": str(model)}
        files = sorted(p for p in model.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        peak = 3 * size / 1e9 - (0 if made else size / 1e9)
        if peak > args.max_disk_gb:
            sys.exit(f"the run would hold {peak:.1f} GB at its peak (> --max-disk-gb {args.max_disk_gb})")
        result["checkpoint"].update(bytes=size, files=len(files),
                                    shards=sum(p.suffix == ".safetensors" for p in files))
        result["load_avg_1_5_15"] = {"start": [round(x, 2) for x in os.getloadavg()]}

        _hash_files(files)   # untimed: every side then reads from the page cache
        t0 = time.perf_counter()
        _hash_files(files)
        hash_s = time.perf_counter() - t0

        image = Layout(work / "model-image")
        t0 = time.perf_counter()
        mi = write_model_image(model, image, "bench:1-model", annotations={"org.opencontainers.image.title": "bench"})
        write_s = time.perf_counter() - t0
        layer_bytes = sum(la["size"] for la in mi.layers)
        result["model_image"] = {"digest": mi.manifest_digest, "layers": len(mi.layers), "bytes": layer_bytes,
                                 "write_s": round(write_s, 2)}

        runs: dict = {}
        with registry(work / "registry-forge") as (host, reg_proc):
            remote = Remote.parse(f"oci://{host}/bench/model")
            with timed(runs, "forge_push", reg_proc):
                hows = Client(remote).push_image(image, mi.manifest_digest, "1-model")
            assert set(hows.values()) == {"sent"}, hows
            shutil.rmtree(image.root)   # its bytes are in the registry now
            pulled = Layout(work / "pulled-forge")
            with timed(runs, "forge_pull", reg_proc):
                digest, got = Client(remote).pull_image("1-model", pulled, workers=args.workers)
            assert digest == mi.manifest_digest and set(got.values()) == {"fetched"}, got
            # pull_image takes a blob in only under the digest it hashes to; and every layer is there, whole
            assert all(pulled.blob_path(la["digest"]).stat().st_size == la["size"] for la in mi.layers)
            shutil.rmtree(pulled.root)

        single = work / "single-layer"
        t0 = time.perf_counter()
        single_digest, single_bytes = single_layer_image(model, single)
        result["single_layer_image"] = {"digest": single_digest, "bytes": single_bytes,
                                        "write_s": round(time.perf_counter() - t0, 2)}
        with registry(work / "registry-skopeo") as (host, reg_proc):
            dest = f"docker://{host}/bench/single:1"
            with timed(runs, "skopeo_push", reg_proc):
                _skopeo("--dest-tls-verify=false", f"oci:{single}:bench", dest)
            shutil.rmtree(single)
            back = work / "pulled-skopeo"
            with timed(runs, "skopeo_pull", reg_proc):
                _skopeo("--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers", dest, f"oci:{back}:bench")
            pulled_bytes = _dir_bytes(back / "blobs")
            assert pulled_bytes >= single_bytes, (pulled_bytes, single_bytes)
            assert (back / "blobs" / "sha256" / single_digest[7:]).exists()   # the same manifest, digest for digest
            shutil.rmtree(back)

        def rate(nbytes: int, s: float) -> float:
            return round(nbytes / s / 1e6, 1)

        h_rate = size / hash_s
        result["hashlib"] = {"s": round(hash_s, 2), "mb_s": rate(size, hash_s)}
        for name, run in runs.items():
            nbytes = single_bytes if name.startswith("skopeo") else layer_bytes
            result[name] = {**run, "s": round(run["s"], 2), "mb_s": rate(nbytes, run["s"]),
                            "ratio_over_hashlib": round(nbytes / run["s"] / h_rate, 3),
                            "registry_cpu_s_per_gb": round(run["registry_cpu_s"] / (nbytes / 1e9), 2)}
        result["goal"] = "forge push and pull >= 0.8x hashlib"
        result["met"] = {k: result[k]["ratio_over_hashlib"] >= 0.8 for k in ("forge_push", "forge_pull")}
        result["load_avg_1_5_15"]["end"] = [round(x, 2) for x in os.getloadavg()]
        result["host"] = {"cpus": os.cpu_count(), "registry": "docker-registry (Debian) on 127.0.0.1, filesystem "
                          "storage", "skopeo": subprocess.run(["skopeo", "--version"], capture_output=True,
                                                              text=True).stdout.strip()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
