"""The model image and its ModelPack manifest (issue 29): one layer per shard, reproducible, the same blobs under
both manifests; pushed to the real Distribution registry a shard at a time in parallel, never twice, and pulled
back byte for byte."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from forge.image.model_image import MODELPACK_TYPE, write_model_image
from forge.oci.client import Client, Remote, fetch_image
from forge.oci.layout import Layout

ANNOTATIONS = {"org.opencontainers.image.title": "tiny", "dev.forge.model.digest": "sha256:" + "ab" * 32,
               "dev.forge.method": "fp8", "dev.forge.format": "compressed-tensors"}


def _checkpoint(root: Path, shard2: bytes, config: str = '{"model_type": "llama"}') -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(config)
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "model-00001-of-00002.safetensors").write_bytes(b"A" * 300_000 + b"1")
    (root / "model-00002-of-00002.safetensors").write_bytes(shard2)
    return root


def _files_of(layout: Layout, digest: str) -> dict[str, bytes]:
    """The /models tree a runtime would mount: every layer unpacked in order."""
    out: dict[str, bytes] = {}
    for layer in json.loads(layout.read(digest))["layers"]:
        with tarfile.open(layout.blob_path(layer["digest"])) as tf:
            for m in tf:
                assert m.name == "models" or m.name.startswith("models/"), m.name   # nothing outside /models
                assert (m.uid, m.gid, m.mtime) == (0, 0, 0)
                if m.isfile():
                    assert m.mode == 0o644
                    out[m.name] = tf.extractfile(m).read()
    return out


def test_one_layer_per_shard_shared_across_models_and_the_same_blobs_under_modelpack(tmp_path):
    a = _checkpoint(tmp_path / "a", b"B" * 200_000)
    # a re-quantization that changed the second shard (one more layer kept in BF16) and the config
    b = _checkpoint(tmp_path / "b", b"C" * 250_000, config='{"model_type": "llama", "x": 1}')
    layout = Layout(tmp_path / "oci")
    ia = write_model_image(a, layout, "tiny:a", annotations=ANNOTATIONS, params=135_000_000, precision="fp8",
                           quantization="fp8")
    ib = write_model_image(b, layout, "tiny:b", annotations=ANNOTATIONS)
    assert [la["files"] for la in ia.layers] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                                 "config"]
    assert ia.layers[0]["digest"] == ib.layers[0]["digest"]   # same shard bytes, same layer: stored once
    assert ia.layers[1]["digest"] != ib.layers[1]["digest"] and ia.layers[2]["digest"] != ib.layers[2]["digest"]

    files = _files_of(layout, ia.manifest_digest)
    assert files == {f"models/{p.name}": p.read_bytes() for p in a.iterdir()}
    image = json.loads(layout.read(ia.manifest_digest))
    config = json.loads(layout.read(image["config"]["digest"]))
    assert image["annotations"] == ANNOTATIONS and config["config"] == {"Labels": ANNOTATIONS}
    assert "Entrypoint" not in config["config"] and "Cmd" not in config["config"]   # weights only: nothing runs

    pack = json.loads(layout.read(ia.modelpack_digest))
    assert pack["artifactType"] == MODELPACK_TYPE
    assert [la["digest"] for la in pack["layers"]] == [la["digest"] for la in image["layers"]]   # no byte twice
    assert [la["annotations"]["org.cncf.model.filepath"] for la in pack["layers"]] == [
        "models/model-00001-of-00002.safetensors", "models/model-00002-of-00002.safetensors", "models/"]
    assert pack["layers"][-1]["mediaType"].endswith("weight.config.v1.tar")
    pack_config = json.loads(layout.read(pack["config"]["digest"]))
    assert pack_config["modelfs"]["diffIds"] == config["rootfs"]["diff_ids"]
    assert pack_config["config"] == {"format": "safetensors", "paramSize": "135M", "precision": "fp8",
                                     "quantization": "fp8"}

    # reproducible: the same checkpoint written again elsewhere is the same image, digest for digest
    again = write_model_image(a, Layout(tmp_path / "again"), "tiny:a", annotations=ANNOTATIONS, params=135_000_000,
                              precision="fp8", quantization="fp8")
    assert (again.manifest_digest, again.modelpack_digest) == (ia.manifest_digest, ia.modelpack_digest)
    # and other tools read the layout
    for ref in ("tiny:a", "tiny:a-modelpack"):
        proc = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{layout.root}:{ref}"], capture_output=True)
        assert proc.returncode == 0, proc.stderr


def test_a_checkpoint_without_safetensors_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no .safetensors file"):
        write_model_image(tmp_path / "m", Layout(tmp_path / "oci"), "x:y", annotations={})


def test_shards_go_up_once_in_parallel_and_come_back_byte_for_byte(tmp_path, oci_registry):
    a = _checkpoint(tmp_path / "a", b"B" * 200_000)
    b = _checkpoint(tmp_path / "b", b"C" * 250_000)
    layout = Layout(tmp_path / "oci")
    ia = write_model_image(a, layout, "tiny:a", annotations=ANNOTATIONS)
    ib = write_model_image(b, layout, "tiny:b", annotations=ANNOTATIONS)
    first = Client(Remote.parse(f"oci://{oci_registry}/models/a"))
    hows = first.push_image(layout, ia.manifest_digest, "a")
    assert sorted(hows.values()) == ["sent"] * 4   # config + 3 layers
    # beside it, the ModelPack manifest: its blobs are the image's, so only its config goes up
    pack = first.push_image(layout, ia.modelpack_digest, "a-modelpack")
    assert sorted(pack.values()) == ["present"] * 3 + ["sent"]
    # the re-quantized model in the same repository: only the changed shard (and the image config) go up; the
    # unchanged shard and the unchanged config/tokenizer layer are not sent again
    hows = first.push_image(layout, ib.manifest_digest, "b")
    assert [hows[la["digest"]] for la in ib.layers] == ["present", "sent", "present"]
    # in another repository of the same registry: mounted across repositories, not uploaded
    other = Client(Remote.parse(f"oci://{oci_registry}/models/other"))
    hows = other.push_image(layout, ia.manifest_digest, "a", mount_from=("models/a",))
    assert sorted(hows.values()) == ["mounted"] * 4

    for ref in ("a", "a-modelpack"):
        proc = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                               f"docker://{oci_registry}/models/a:{ref}"], capture_output=True)
        assert proc.returncode == 0, proc.stderr
    pulled = Layout(tmp_path / "pulled")
    fetch_image(Remote.parse(f"oci://{oci_registry}/models/other"), ia.manifest_digest, pulled.root, "a")
    assert _files_of(pulled, ia.manifest_digest) == {f"models/{p.name}": p.read_bytes() for p in a.iterdir()}
    assert not os.environ.get("FORGE_REGISTRY_PASSWORD")
