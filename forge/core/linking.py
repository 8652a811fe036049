"""Zero-copy file placement: bytes that do not change are linked, never written a second time.

``place(src, dst)`` makes dst hold src's bytes: a hard link when both are on one filesystem (the step
cache, the registry and the package context are immutable content stores, so sharing an inode is safe);
across filesystems an in-kernel copy (``copy_file_range``, which shares extents on filesystems that
reflink, e.g. XFS and Btrfs), else a plain copy. Returns how it was placed, for reports.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["place", "place_tree"]

LINKED, COPIED = "linked", "copied"


def place(src: Path, dst: Path) -> str:
    src = Path(os.path.realpath(src))   # link the file a symlink names (HF cache), never the symlink itself
    try:
        os.link(src, dst)
        return LINKED
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    _copy(src, dst)
    return COPIED


def place_tree(src: Path, dst: Path, files: list[str]) -> dict[str, int]:
    """Place each relative path of ``files`` from src under dst; returns bytes linked and bytes copied."""
    out = {LINKED: 0, COPIED: 0}
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        out[place(src / rel, dst / rel)] += (src / rel).stat().st_size
    return out


def _copy(src: Path, dst: Path) -> None:
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            left = os.fstat(fin.fileno()).st_size
            while left > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
            if left == 0:
                shutil.copymode(src, dst)
                return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    shutil.copyfile(src, dst)
