"""buildah's storage driver (FORGE_BUILDAH_STORAGE_DRIVER=auto): a storage root keeps the driver it holds images
with, a new one gets overlay where an overlay mounts, else vfs; and both drivers build the same digests."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from forge.image.builders import storage_driver, storage_flags

needs_buildah = pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed (make setup-tools)")


def test_a_storage_root_keeps_the_driver_it_already_holds_images_with(tmp_path):
    for driver in ("vfs", "overlay"):
        root = tmp_path / driver
        (root / f"{driver}-images").mkdir(parents=True)
        assert storage_driver(root) == driver


def test_explicit_driver_wins_and_auto_is_resolved_per_root(tmp_path, monkeypatch):
    (tmp_path / "old" / "vfs-images").mkdir(parents=True)
    monkeypatch.setenv("FORGE_BUILDAH_ROOT", str(tmp_path / "old"))
    monkeypatch.setenv("FORGE_BUILDAH_STORAGE_DRIVER", "auto")
    assert storage_flags()[:2] == ["--storage-driver", "vfs"]
    monkeypatch.setenv("FORGE_BUILDAH_STORAGE_DRIVER", "overlay")
    assert storage_flags()[:2] == ["--storage-driver", "overlay"]


@needs_buildah
def test_a_users_vfs_storage_keeps_its_images_under_auto(tmp_path, monkeypatch):
    """Storage forge made with vfs before auto stays vfs, its images still there. buildah itself, given no driver,
    would take overlay on that root and see none of them (buildah 1.28, measured): forge decides, not buildah."""
    from forge.image.builders import buildah

    root = tmp_path / "old"
    monkeypatch.setenv("FORGE_BUILDAH_ROOT", str(root))
    monkeypatch.setenv("FORGE_BUILDAH_STORAGE_DRIVER", "vfs")
    ctr = buildah("from", "scratch").stdout.strip().splitlines()[-1]
    buildah("commit", "--quiet", "--rm", ctr, "localhost/kept:1")
    monkeypatch.setenv("FORGE_BUILDAH_STORAGE_DRIVER", "auto")
    assert storage_flags()[:2] == ["--storage-driver", "vfs"]
    assert "localhost/kept" in buildah("images", "--format", "{{.Name}}").stdout


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_where_no_overlay_mounts_a_new_root_gets_vfs(tmp_path):
    """A user namespace without its own mount namespace: root there, but mount(2) is refused, as in an unprivileged
    container. The probe fails and leaves nothing behind."""
    root = tmp_path / "storage"
    code = f"from pathlib import Path; from forge.image.builders import storage_driver; print(storage_driver(Path({str(root)!r})))"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"user namespaces are not available here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "vfs"
    assert not any(root.iterdir())


@needs_buildah
def test_overlay_and_vfs_build_the_same_digests(tmp_path, monkeypatch):
    """The driver is not key material: the same Containerfile gives the same layer and manifest digests on both."""
    from forge.image.builders import build_image

    if os.geteuid() != 0 or storage_driver(tmp_path / "probe") != "overlay":
        pytest.skip("no overlay filesystem can be mounted here: only vfs is used")
    ctx = tmp_path / "ctx"
    (ctx / "data").mkdir(parents=True)
    (ctx / "data" / "a.txt").write_text("forge\n")
    (ctx / "Containerfile").write_text("FROM scratch\nCOPY data/ /opt/data/\nLABEL dev.forge.test=1\n")
    digests = {}
    for driver in ("overlay", "vfs"):
        monkeypatch.setenv("FORGE_BUILDAH_ROOT", str(tmp_path / driver / "storage"))
        monkeypatch.setenv("FORGE_BUILDAH_STORAGE_DRIVER", driver)
        layout = tmp_path / driver / "oci"
        build_image("buildah", ctx, "localhost/driver-test:1", layout, "x", local_base=True)
        digests[driver] = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
        assert (tmp_path / driver / "storage" / f"{driver}-images").is_dir()
    assert digests["overlay"] == digests["vfs"]


@needs_buildah
def test_an_image_loaded_for_a_smoke_test_leaves_nothing_in_the_storage_once_unloaded(tmp_path, monkeypatch):
    """load_image pulls the layout through a temporary name; left behind, that name kept every image a smoke test
    or an image eval had loaded in the user's storage (the whole image, per build) after unload_image."""
    from forge.image.builders import buildah, load_image, unload_image

    monkeypatch.setenv("FORGE_BUILDAH_ROOT", str(tmp_path / "made"))
    ctr = buildah("from", "scratch").stdout.strip().splitlines()[-1]
    buildah("commit", "--quiet", "--rm", ctr, "localhost/made:1")
    buildah("push", "--quiet", "localhost/made:1", f"oci:{tmp_path / 'layout'}:made")

    monkeypatch.setenv("FORGE_BUILDAH_ROOT", str(tmp_path / "user"))
    names = lambda: buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split()  # noqa: E731
    load_image("buildah", tmp_path / "layout", "made", "localhost/forge/served:abc")
    assert names() == ["localhost/forge/served:abc"]
    unload_image("buildah", "localhost/forge/served:abc")
    assert names() == [] and buildah("images", "--quiet").stdout.strip() == ""
