"""The weights layer: a checkpoint directory appended to an OCI image as one layer, written in one pass.

An image builder copies the weights into its storage, diffs them into a layer, compresses it and copies
it out again: measured at 3 % of hashing speed on a 6 GB checkpoint. forge instead streams a
deterministic tar of the checkpoint straight into the OCI layout's blob store, hashing while it writes
(the layer digest, and the uncompressed diff_id when compressed), then appends the layer to the image's
config (rootfs.diff_ids, history) and manifest and repoints the layout's index entry. Default: no
compression (media type ``application/vnd.oci.image.layer.v1.tar``): safetensors barely compress, and
an uncompressed layer is written at the speed of reading and hashing it.

The tar is reproducible: sorted entries, mtime 0, fixed owner and modes, PAX format (files over 8 GiB).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["MEDIA_TYPES", "append_weights_layer"]

MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
_CHUNK = 8 << 20
_REF = "org.opencontainers.image.ref.name"


class _HashingWriter:
    """A write-only file object that hashes what passes through it and counts the bytes."""

    def __init__(self, sink, report: Callable[[int], None] | None = None):
        self.sink, self.sha, self.size, self._report = sink, hashlib.sha256(), 0, report

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        if self._report is not None:
            self._report(len(data))
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:  # the compressors close their file object: the caller owns the sink
        pass


class _BackgroundWriter:
    """Writes chunks to a file on a second thread, so hashing (the caller's thread) and writing overlap:
    both release the GIL, and the layer is then written at about the speed of hashing it."""

    def __init__(self, raw, depth: int = 4):
        import queue
        import threading

        self._raw, self._queue, self._error = raw, queue.Queue(maxsize=depth), None
        self._thread = threading.Thread(target=self._drain, name="forge-layer-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._raw.write(chunk)
                except BaseException as e:  # reported to the caller at its next write or at close
                    self._error = e

    def write(self, data) -> int:
        if self._error is not None:
            raise self._error
        self._queue.put(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _entries(src: Path, dest: str, uid: int) -> list[tuple[tarfile.TarInfo, Path | None]]:
    """Tar entries for dest's parents (root-owned), dest itself and every file below src, sorted."""
    def info(name: str, *, is_dir: bool, size: int = 0, owner: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        ti.mode, ti.size, ti.mtime = (0o755 if is_dir else 0o644), size, 0
        ti.uid = ti.gid = owner
        ti.uname = ti.gname = ""
        return ti

    parts = dest.strip("/").split("/")
    out = [(info("/".join(parts[:i]) + "/", is_dir=True), None) for i in range(1, len(parts))]
    out.append((info(dest.strip("/") + "/", is_dir=True, owner=uid), None))
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        name = f"{dest.strip('/')}/{rel}"
        if path.is_symlink():
            raise ValueError(f"{path}: a symbolic link in a checkpoint cannot go into the weights layer")
        if path.is_dir():
            out.append((info(name + "/", is_dir=True, owner=uid), None))
        elif path.is_file():
            out.append((info(name, is_dir=False, size=path.stat().st_size, owner=uid), path))
    return out


def _compressor(kind: str, sink):
    if kind == "none":
        return sink
    if kind == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0)
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ValueError("container.weights_compression: zstd needs the `zstandard` package "
                             "(pip install zstandard), or choose none or gzip") from None
        return zstandard.ZstdCompressor(level=3).stream_writer(sink, closefd=False)
    raise ValueError(f"unknown weights compression {kind!r}; valid: {', '.join(MEDIA_TYPES)}")


def write_layer(src: Path, dest: str, blobs: Path, *, uid: int, compression: str = "none",
                progress: Callable[[int], None] | None = None) -> dict:
    """Write the layer blob for src (installed at dest) into blobs/ (an OCI layout's blobs/sha256).
    Returns its descriptor facts: digest, diff_id, size, media type."""
    entries = _entries(src, dest, uid)
    tmp = blobs / f".forge-layer-{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb", buffering=0) as raw:
            sink = _BackgroundWriter(raw)
            blob = _HashingWriter(sink, progress if compression == "none" else None)  # the stored bytes: digest
            packed = _compressor(compression, blob)
            # uncompressed, the stored bytes are the tar: one hash serves as digest and diff_id
            tar_stream = blob if packed is blob else _HashingWriter(packed, progress)
            with tarfile.open(fileobj=tar_stream, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:
                for ti, path in entries:
                    if path is None:
                        tar.addfile(ti)
                    else:
                        with open(path, "rb", buffering=0) as f:
                            tar.addfile(ti, f)
            if packed is not blob:
                packed.close()
            sink.close()
        digest = "sha256:" + blob.sha.hexdigest()
        tmp.rename(blobs / digest.split(":", 1)[1])  # fsynced with the step's output when it is committed
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    diff_id = "sha256:" + tar_stream.sha.hexdigest()
    return {"digest": digest, "diff_id": diff_id, "size": blob.size, "tar_bytes": tar_stream.size,
            "mediaType": MEDIA_TYPES[compression], "files": sum(1 for _, p in entries if p is not None)}


def _write_blob(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = blobs / digest
    if not path.exists():
        tmp = blobs / f".forge-{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        tmp.rename(path)
    return "sha256:" + digest


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def append_weights_layer(layout: Path, ref: str, src: Path, dest: str, *, uid: int, compression: str = "none",
                         created_by: str = "forge: weights layer", progress: Callable[[int], None] | None = None) -> dict:
    """Append src as the last layer of image ``ref`` in the OCI layout; the index entry then names the new
    manifest. Returns the layer facts plus the new manifest digest."""
    blobs = layout / "blobs" / "sha256"
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    pos = next((i for i, m in enumerate(index["manifests"]) if m.get("annotations", {}).get(_REF) == ref), None)
    if pos is None:
        raise ValueError(f"{layout}: no image tagged {ref!r}")
    desc = index["manifests"][pos]
    manifest = json.loads((blobs / desc["digest"].split(":", 1)[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":", 1)[1]).read_text())

    layer = write_layer(src, dest, blobs, uid=uid, compression=compression, progress=progress)
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"].append(layer["diff_id"])
    config.setdefault("history", []).append({"created": "1970-01-01T00:00:00Z", "created_by": created_by,
                                             "comment": f"{layer['files']} files at {dest}"})
    config_bytes = _canonical(config)
    manifest["config"] = {**manifest["config"], "digest": _write_blob(blobs, config_bytes), "size": len(config_bytes)}
    manifest["layers"].append({"mediaType": layer["mediaType"], "digest": layer["digest"], "size": layer["size"]})
    manifest_bytes = _canonical(manifest)
    manifest_digest = _write_blob(blobs, manifest_bytes)
    index["manifests"][pos] = {**desc, "digest": manifest_digest, "size": len(manifest_bytes)}
    tmp = layout / f".index.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(index))
    tmp.replace(index_path)
    if not any(m["digest"] == desc["digest"] for m in index["manifests"]):  # the weightless image is garbage now
        (blobs / desc["digest"].split(":", 1)[1]).unlink(missing_ok=True)
    return {**layer, "manifest_digest": manifest_digest}
