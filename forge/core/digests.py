"""File and tree digests, with a memo so a no-op rebuild never re-reads large files.

A file's sha256 is remembered by (path, size, mtime_ns, inode, ctime_ns). A file whose mtime is within
RACY_NS of when it was hashed is not remembered: a write in the same timestamp tick could go unseen
(git's "racily clean" problem), so such files are hashed again next time.
"""
from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from forge.core.errors import UsageError
from forge.core.sqlitedb import open_wal

CHUNK = 8 << 20
RACY_NS = 2_000_000_000


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


class DigestMemo:
    """sha256 of files, remembered across runs in SQLite (safe for concurrent processes)."""

    def __init__(self, db_path: Path | None):
        self._db = None
        if db_path is not None:
            self._db = open_wal(db_path, "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                                         "mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, sha256 TEXT);")

    def file(self, path: Path) -> FileEntry:
        path = Path(os.path.abspath(path))
        st = path.stat()
        ident = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if self._db is not None:
            row = self._db.execute("SELECT size, mtime_ns, ctime_ns, inode, sha256 FROM digests WHERE path=?",
                                   (str(path),)).fetchone()
            if row is not None and tuple(row[:4]) == ident:
                return FileEntry(st.st_size, row[4])
        digest = sha256_file(path)
        if self._db is not None and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            self._db.execute("INSERT OR REPLACE INTO digests VALUES (?,?,?,?,?,?)", (str(path), *ident, digest))
        return FileEntry(st.st_size, digest)

    def tree(self, root: Path) -> dict[str, FileEntry]:
        return {rel: self.file(root / rel) for rel in list_files(root)}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def list_files(root: Path, *, skip_hidden: bool = False) -> list[str]:
    """Regular files under root, as sorted POSIX relative paths. Symlinks to files are followed (an HF
    snapshot is made of them); symlinks to directories are not. A symlink loop or a broken symlink is a
    UsageError naming it: a tree that cannot be read whole is never half-hashed or half-copied.
    ``skip_hidden`` leaves out dot-files and dot-directories (.git, .cache)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if skip_hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            filenames = [f for f in filenames if not f.startswith(".")]
        dirnames.sort()
        for name in dirnames:
            if os.path.islink(full := os.path.join(dirpath, name)):
                _check_dir_link(full, dirpath)
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_symlink():
                _check_link(full)
            if full.is_file():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


_LINK_HINT = "Remove the link, or replace it with what it should point to."


def _check_link(link: Path) -> None:
    try:
        os.stat(link)
    except OSError as e:
        what = "a symlink loop" if e.errno == errno.ELOOP else "a broken symlink"
        raise UsageError(f"{link} is {what} (-> {os.readlink(link)}): it cannot be read", hint=_LINK_HINT) from None


def _check_dir_link(link: str, parent: str) -> None:
    """A symlink to a directory that contains it (``up -> ..``) is a loop for any tool that follows it."""
    target = os.path.realpath(link)
    here = os.path.realpath(parent)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        raise UsageError(f"{link} is a symlink loop (-> {os.readlink(link)}): it points to a directory that "
                         "contains it", hint=_LINK_HINT)


def tree_digest(files: dict[str, FileEntry]) -> str:
    """A Merkle digest over (path, size, sha256) of every file: stable across machines and copies."""
    h = hashlib.sha256()
    for rel in sorted(files):
        e = files[rel]
        h.update(f"{rel}\0{e.size}\0{e.sha256}\n".encode())
    return "sha256:" + h.hexdigest()


def canonical_json(obj) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def digest_of(obj) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(obj)).hexdigest()
