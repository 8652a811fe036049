"""An OCI image layout on disk as a content-addressed blob store (the embedded registry's storage).

Only what the spec asks of a layout writer: blobs under ``blobs/sha256/<hex>`` written to a temporary
name and renamed once their digest is proven, and ``index.json`` rewritten whole under a lock. Readers
(skopeo, buildah, Trivy, oras) see a valid layout at every instant; concurrent writers of the same blob
write identical bytes, so the last rename wins harmlessly.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from forge.core.linking import place

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_BYTES = b"{}"
REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 4 << 20


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def descriptor(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": sha256_bytes(data), "size": len(data), **extra}


def manifest_bytes(obj: dict) -> bytes:
    """The one serialisation forge uses for manifests it writes: the bytes are what the digest names."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def artifact_manifest(artifact_type: str, layers: list[dict], subject: dict | None, annotations: dict) -> dict:
    """An OCI image manifest used as an artifact (image-spec 1.1 guidance: empty config, artifactType)."""
    m = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": artifact_type,
         "config": descriptor(EMPTY, EMPTY_BYTES), "layers": layers, "annotations": annotations}
    if subject is not None:
        m["subject"] = subject
    return m


class DigestMismatch(Exception):
    def __init__(self, digest: str, actual: str, where: str):
        super().__init__(f"{where}: content hashes to {actual}, not {digest}")
        self.digest, self.actual, self.where = digest, actual, where


@dataclass(frozen=True)
class Layout:
    root: Path

    def init(self) -> "Layout":
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (self.root / "oci-layout").exists():
            _atomic_write(self.root / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        if not (self.root / "index.json").exists():
            with self._lock():
                if not (self.root / "index.json").exists():
                    _atomic_write(self.root / "index.json", manifest_bytes({"schemaVersion": 2, "manifests": []}))
        return self

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / "blobs" / algo / hexd

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def put_bytes(self, data: bytes, digest: str | None = None) -> str:
        actual = sha256_bytes(data)
        if digest is not None and digest != actual:
            raise DigestMismatch(digest, actual, "incoming blob")
        if not self.has(actual):
            tmp = self._tmp()
            tmp.write_bytes(data)
            os.replace(tmp, self.blob_path(actual))
        return actual

    def put_file(self, src: Path, digest: str) -> bool:
        """Take a blob in: hash src, refuse it if it is not what ``digest`` names, then link it in (the step
        cache and this store are both immutable content stores), copying only across filesystems.
        True if it was taken in (False: already present)."""
        if self.has(digest):
            return False
        actual = sha256_file(src)
        if actual != digest:
            raise DigestMismatch(digest, actual, str(src))
        tmp = self._tmp()
        try:
            place(src, tmp)
            os.replace(tmp, self.blob_path(digest))
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def read(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def verify(self, digest: str) -> str | None:
        """None if the stored blob hashes to its name; else what is wrong with it."""
        path = self.blob_path(digest)
        if not path.exists():
            return f"missing ({path})"
        actual = sha256_file(path)
        return None if actual == digest else f"content hashes to {actual} ({path})"

    def index(self) -> dict:
        return json.loads((self.root / "index.json").read_text())

    def add_to_index(self, descriptors: list[dict]) -> None:
        """Add descriptors to index.json. One equal to a present one is not added twice; a named one
        (``org.opencontainers.image.ref.name``) replaces the descriptor holding that name: a tag moves."""
        with self._lock():
            index = self.index()
            for d in descriptors:
                name = d.get("annotations", {}).get(REF_NAME)
                index["manifests"] = [m for m in index["manifests"] if m != d and
                                      (name is None or m.get("annotations", {}).get(REF_NAME) != name)]
                index["manifests"].append(d)
            _atomic_write(self.root / "index.json", json.dumps(index, indent=1, sort_keys=True).encode())

    def image_blobs(self, manifest_digest: str) -> Iterator[tuple[str, str]]:
        """(digest, role) of an image manifest and every blob it names."""
        yield manifest_digest, "manifest"
        m = json.loads(self.read(manifest_digest))
        yield m["config"]["digest"], "config"
        for i, layer in enumerate(m.get("layers", [])):
            yield layer["digest"], f"layer {i}"

    def _tmp(self) -> Path:
        return self.root / "blobs" / "sha256" / f".tmp-{uuid.uuid4().hex}"

    def _lock(self) -> FileLock:
        return FileLock(str(self.root) + ".lock")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def member_path(name: str) -> str:
    """A tar member's name without its leading "./" (as often as it is there: "././x") or "/", and never a character
    more: ".hidden", "..x" and ".opt/..." keep their dots (``lstrip("./")`` would strip any leading dots)."""
    while (stripped := name.removeprefix("./").lstrip("/")) != name:
        name = stripped
    return name
