"""The weights layer forge writes itself: a normal, reproducible OCI layer that real tools accept."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from forge.image.weights_layer import MEDIA_TYPES, append_weights_layer

MODEL = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
         "model-00001-of-00002.safetensors": bytes(range(256)) * 4096,
         "model-00002-of-00002.safetensors": b"\x01" * 300_000,
         "sub/tokenizer.json": b'{"version": "1.0"}'}


def _model(root: Path) -> Path:
    for rel, data in MODEL.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _base_layout(tmp_path: Path, storage: list[str]) -> Path:
    """A real image from buildah (FROM scratch + a label), exported as an OCI layout, as the package step does."""
    env = {"BUILDAH_ISOLATION": "chroot", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    ctr = subprocess.run(["buildah", *storage, "from", "scratch"], check=True, capture_output=True, text=True,
                         env=env).stdout.strip()
    subprocess.run(["buildah", *storage, "config", "--label", "dev.forge.test=1", ctr], check=True, env=env)
    subprocess.run(["buildah", *storage, "commit", "-q", "--timestamp", "0", "--rm", ctr, "localhost/wl:base"],
                   check=True, capture_output=True, env=env)
    layout = tmp_path / "oci"
    subprocess.run(["buildah", *storage, "push", "-q", "localhost/wl:base", f"oci:{layout}:img"], check=True, env=env)
    return layout


@pytest.fixture
def storage(tmp_path) -> list[str]:
    if shutil.which("buildah") is None or shutil.which("skopeo") is None:
        pytest.fail("buildah and skopeo are needed: `make setup-tools` installs them")
    return ["--storage-driver", "vfs", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]


def test_uncompressed_weights_layer_round_trips_through_a_real_registry(tmp_path, storage, oci_registry):
    layout = _base_layout(tmp_path, storage)
    facts = append_weights_layer(layout, "img", _model(tmp_path / "model"), "/opt/forge/model", uid=10001)
    assert facts["mediaType"] == MEDIA_TYPES["none"] == "application/vnd.oci.image.layer.v1.tar"
    assert facts["digest"] == facts["diff_id"]          # uncompressed: the stored bytes are the tar
    blob = layout / "blobs" / "sha256" / facts["digest"][7:]
    assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == facts["digest"]

    raw = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"oci:{layout}:img"], check=True,
                                    capture_output=True, text=True).stdout)
    assert raw["layers"][-1] == {"mediaType": MEDIA_TYPES["none"], "digest": facts["digest"], "size": facts["size"]}
    config = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci:{layout}:img"], check=True,
                                       capture_output=True, text=True).stdout)
    assert config["rootfs"]["diff_ids"][-1] == facts["diff_id"]
    assert config["config"]["Labels"]["dev.forge.test"] == "1"   # the base image's config is kept

    # push with forge's registry client (blobs as they are, manifest as the exact bytes), pull with skopeo
    from forge.oci.client import Client, Remote

    client = Client(Remote.parse(f"oci://{oci_registry}/forge/wl"))
    for desc in [raw["config"], *raw["layers"]]:
        client.put_blob(layout / "blobs" / "sha256" / desc["digest"][7:], desc["digest"], desc["size"])
    manifest_bytes = (layout / "blobs" / "sha256" / facts["manifest_digest"][7:]).read_bytes()
    assert client.put_manifest(manifest_bytes, raw["mediaType"], "1") == facts["manifest_digest"]
    pulled = tmp_path / "pulled"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--preserve-digests",
                    "--dest-oci-accept-uncompressed-layers", f"docker://{oci_registry}/forge/wl:1", f"oci:{pulled}:img"],
                   check=True)
    assert (pulled / "blobs" / "sha256" / facts["digest"][7:]).read_bytes() == blob.read_bytes()
    assert (pulled / "blobs" / "sha256" / facts["manifest_digest"][7:]).read_bytes() == manifest_bytes

    # and a container made from the pulled image has the files, owned by the serving user
    env = {"BUILDAH_ISOLATION": "chroot", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    ctr = subprocess.run(["buildah", *storage, "from", "--pull=always", f"oci:{pulled}:img"], check=True,
                         capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    try:
        mnt = Path(subprocess.run(["buildah", *storage, "mount", ctr], check=True, capture_output=True, text=True,
                                  env=env).stdout.strip())
        for rel, data in MODEL.items():
            path = mnt / "opt/forge/model" / rel
            assert path.read_bytes() == data, rel
            assert path.stat().st_uid == 10001 and oct(path.stat().st_mode & 0o777) == "0o644"
        assert (mnt / "opt").stat().st_uid == 0
    finally:
        subprocess.run(["buildah", *storage, "rm", ctr], capture_output=True, env=env)


def test_weights_layer_is_reproducible_and_compressions_differ_only_in_storage(tmp_path):
    model = _model(tmp_path / "model")
    blobs = {}
    for i, kind in enumerate(("none", "none", "gzip")):
        layout = tmp_path / f"l{i}"
        (layout / "blobs" / "sha256").mkdir(parents=True)
        from forge.image.weights_layer import write_layer

        blobs[i] = write_layer(model, "/opt/forge/model", layout / "blobs" / "sha256", uid=10001, compression=kind)
    assert blobs[0]["digest"] == blobs[1]["digest"]                 # same files -> same layer, byte for byte
    assert blobs[2]["mediaType"].endswith("+gzip")
    assert blobs[2]["diff_id"] == blobs[0]["diff_id"] != blobs[2]["digest"]   # gzip of the same tar
    assert blobs[2]["size"] < blobs[0]["size"]


def test_a_symlink_in_the_checkpoint_is_refused_and_nothing_is_left(tmp_path):
    model = _model(tmp_path / "model")
    (model / "link.safetensors").symlink_to(model / "model-00002-of-00002.safetensors")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    from forge.image.weights_layer import write_layer

    with pytest.raises(ValueError, match="symbolic link"):
        write_layer(model, "/opt/forge/model", blobs, uid=10001)
    assert list(blobs.iterdir()) == []
