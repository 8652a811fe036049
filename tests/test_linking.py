"""Zero-copy placement: unchanged bytes are linked (same inode), copied only across filesystems."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from forge.core.linking import COPIED, LINKED, place, place_tree
from forge.oci.layout import DigestMismatch, Layout


def _files(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (root / "sub" / "config.json").write_text("{}")
    return root


def test_same_filesystem_shares_the_inode(tmp_path):
    src = _files(tmp_path / "src")
    moved = place_tree(src, tmp_path / "dst", ["model.safetensors", "sub/config.json"])
    assert moved == {LINKED: (1 << 20) + 2, COPIED: 0}
    for rel in ("model.safetensors", "sub/config.json"):
        assert os.stat(src / rel).st_ino == os.stat(tmp_path / "dst" / rel).st_ino


def test_across_filesystems_it_copies_the_bytes(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm as tmpfs)")
    src = _files(tmp_path / "src")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        dst = Path(other) / "model.safetensors"
        assert place(src / "model.safetensors", dst) == COPIED
        assert dst.read_bytes() == (src / "model.safetensors").read_bytes()
        assert os.stat(dst).st_ino != os.stat(src / "model.safetensors").st_ino


def test_registry_blob_store_links_a_verified_blob_and_refuses_a_wrong_one(tmp_path):
    src = _files(tmp_path / "src") / "model.safetensors"
    digest = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    store = Layout(tmp_path / "registry").init()
    assert store.put_file(src, digest) is True
    assert os.stat(store.blob_path(digest)).st_ino == os.stat(src).st_ino
    assert store.put_file(src, digest) is False          # already there
    with pytest.raises(DigestMismatch):
        store.put_file(src, "sha256:" + "0" * 64)
    assert sorted(p.name for p in (tmp_path / "registry" / "blobs" / "sha256").iterdir()) == [digest[7:]]


def test_local_model_resolve_and_method_none_write_no_second_copy(tmp_path, tiny_llama, cache_dir):
    """A local checkpoint is linked into the resolve snapshot, and `method: none` links it on: one inode."""
    import json

    from conftest import forge_cli, write_recipe

    model = tmp_path / "model"
    place_tree(tiny_llama, model, [p.name for p in tiny_llama.iterdir()])  # a private copy the test may own
    recipe = write_recipe(tmp_path / "r.yaml", str(model))
    forge_cli("build", str(recipe), cache=cache_dir, check=0)
    weights = model / "model.safetensors"
    entries = {json.loads((d / "manifest.json").read_text())["step"]: d / "out" for d in (cache_dir / "steps").iterdir()}
    for step in ("resolve", "quantize"):
        assert os.stat(entries[step] / "model.safetensors").st_ino == os.stat(weights).st_ino, step
