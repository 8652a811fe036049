"""The step cache: a content-addressed store of step outputs.

Layout under the cache root::

    steps/<key>/manifest.json   what went in (key material), what came out (file digests), timings
    steps/<key>/out/            the step's output files, immutable once committed
    staging/<key>.<pid>.<rnd>/  a step being built; never read by a lookup
    locks/<key>.lock            one builder per key; a second build waits, then reuses
    logs/<step>-<key16>.log     what the libraries wrote while the step last ran (kept when it failed)
    digests.sqlite(.lock)       the file-digest memo (the lock serializes a new file's first opens)

A key is the sha256 of everything that can change a step's output, so a committed entry is valid
forever. An entry becomes visible only by the atomic rename of a complete staging directory whose
manifest was written and fsynced last: a killed build leaves only staging debris, which no lookup
trusts and `forge cache prune` removes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from forge.core.digests import DigestMemo
from forge.core.jsonsafe import dumps
from forge.core import options as env
from forge.core.errors import EvidenceError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def default_cache_dir() -> Path:
    return env.current().cache_dir


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    manifest: dict

    @property
    def out(self) -> Path:
        return self.path / "out"

    @property
    def step(self) -> str:
        return self.manifest["step"]

    @property
    def output_digest(self) -> str:
        return self.manifest["output"]["digest"]

    def read(self, rel: str) -> bytes:
        """One output file's bytes, checked against the digest its manifest recorded (``read_committed``)."""
        return read_committed(self, rel)


def read_committed(entry, rel: str) -> bytes:
    """The bytes of ``rel`` in a committed step output, refused (EvidenceError, exit 5, naming the file) when
    the file is missing or unreadable, or when they no longer hash to what the step's manifest recorded: a
    committed output is immutable, and a decision is never made from one edited in place. ``entry``: anything
    with ``out`` and ``manifest`` (a store Entry)."""
    import hashlib

    path = Path(entry.out) / rel
    step = entry.manifest.get("step", "step")
    hint = (f"Rebuild the step (forge build RECIPE --force {step}), which replaces the entry; do not publish from "
            "this one.")
    want = ((entry.manifest.get("output") or {}).get("files") or {}).get(rel)
    if not isinstance(want, dict) or not isinstance(want.get("sha256"), str):
        raise EvidenceError(f"{path}: the {step} step's manifest records no digest for {rel}, so it cannot be trusted",
                            hint=hint)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvidenceError(f"{path}: cannot read the {step} step's {rel}: {e.strerror or e}", hint=hint) from None
    if (got := hashlib.sha256(data).hexdigest()) != want["sha256"]:
        raise EvidenceError(f"{path} was modified after the {step} step committed it: its bytes hash to sha256:{got}, "
                            f"the step manifest recorded sha256:{want['sha256']}", hint=hint)
    return data


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in ("steps", "staging", "locks", "downloads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.memo = DigestMemo(self.root / "digests.sqlite")

    # ------------------------------------------------------------ lookups
    def get(self, key: str) -> Entry | None:
        path = self.root / "steps" / key
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # unreadable entry: treat as absent; prune removes it
        if manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("key") != key:
            return None
        return Entry(key, path, manifest)

    def touch(self, entry: Entry) -> None:
        """Record a use (prune keeps recently used entries)."""
        try:
            os.utime(entry.path / MANIFEST)
        except OSError:
            pass

    def log_path(self, step: str, key: str) -> Path:
        """The step's log file (see forge.core.steplog): kept after success and failure alike; pruned with its entry."""
        return self.root / "logs" / f"{step}-{key[:16]}.log"

    def entries(self) -> list[Entry]:
        out = []
        for p in sorted((self.root / "steps").iterdir()):
            e = self.get(p.name)
            if e is not None:
                out.append(e)
        return out

    # ------------------------------------------------------------ writing
    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        with FileLock(self.root / "locks" / f"{key}.lock", timeout=timeout):
            yield

    @contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A fresh staging dir for key; removed if the body raises."""
        path = self.root / "staging" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        (path / "out").mkdir(parents=True)
        try:
            yield path
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def commit(self, key: str, staged: Path, manifest: dict, *, replace: bool = False) -> Entry:
        """Publish a staged step output under its key: manifest written and synced, then one rename.
        ``replace`` (a forced rebuild): an existing entry under the key is swapped out, not kept."""
        manifest = {"manifest_version": MANIFEST_VERSION, "key": key, **manifest}
        tmp = staged / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:   # a fact that is not a finite number is null: the manifest stays JSON
            f.write(dumps(manifest, indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, staged / MANIFEST)
        _fsync_tree(staged)
        final = self.root / "steps" / key
        if replace and final.exists():
            old = self.root / "staging" / f"{key}.replaced.{uuid.uuid4().hex[:8]}"
            os.rename(final, old)          # readers holding paths into it keep working until they finish
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(staged, final)
        except OSError:
            if self.get(key) is None:  # a broken leftover: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(staged, final)
            else:                      # someone committed the same key first: theirs is as good
                shutil.rmtree(staged, ignore_errors=True)
        _fsync_dir(final.parent)
        entry = self.get(key)
        assert entry is not None
        return entry

    # ------------------------------------------------------------ maintenance
    def prune(self, *, older_than_s: float | None, everything: bool, dry_run: bool) -> list[tuple[str, Path, int]]:
        """Remove staging debris and entries unused for older_than_s (or all). Returns (what, path, bytes)."""
        removed: list[tuple[str, Path, int]] = []
        now = time.time()
        for p in sorted((self.root / "staging").iterdir()):
            key = p.name.split(".")[0]
            lock = FileLock(self.root / "locks" / f"{key}.lock", timeout=0)
            try:
                lock.acquire()
            except Exception:
                continue  # a build is writing it right now
            try:
                removed.append(("staging", p, _du(p)))
                if not dry_run:
                    shutil.rmtree(p, ignore_errors=True)
            finally:
                lock.release()
        for p in sorted((self.root / "steps").iterdir()):
            entry = self.get(p.name)
            if entry is None:
                removed.append(("broken", p, _du(p)))
            else:
                used = (p / MANIFEST).stat().st_mtime
                if not (everything or (older_than_s is not None and now - used > older_than_s)):
                    continue
                removed.append((entry.step, p, _du(p)))
            if not dry_run:
                with self.lock(p.name):
                    shutil.rmtree(p, ignore_errors=True)
                    for log in (self.root / "logs").glob(f"*-{p.name[:16]}.log"):
                        log.unlink(missing_ok=True)
        live = {p.name[:16] for p in (self.root / "steps").iterdir()}
        for log in sorted((self.root / "logs").glob("*.log")) if (self.root / "logs").is_dir() else []:
            used = log.stat().st_mtime   # a failed step's log: no entry keeps it
            if log.stem.rsplit("-", 1)[-1] not in live and (everything or (older_than_s is not None and
                                                                            now - used > older_than_s)):
                removed.append(("log", log, log.stat().st_size))
                if not dry_run:
                    log.unlink(missing_ok=True)
        for page in sorted((self.root / "report-pages").glob("*.html")):   # drawn pages (forge.report.PAGES), by last use
            if everything or (older_than_s is not None and now - page.stat().st_mtime > older_than_s):
                removed.append(("report", page, page.stat().st_size))
                if not dry_run:
                    page.unlink(missing_ok=True)
        return removed


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
