"""The model image: a checkpoint as its own OCI artifact, beside (not inside) the serving image (issue 29).

Kubernetes mounts an image read-only as a volume (``volumes: - image: {reference}``, KEP-4639: GA in 1.36, beta
and on by default in 1.35); KServe's modelcars are such images, with the weights under ``/models``. forge writes:

- **the model image**: an OCI image with no shell and no packages, the checkpoint under ``/models``, **one layer per
  safetensors shard** and one last small layer with everything else (config.json, tokenizer, generation config).
  Layers are uncompressed tars written at hashing speed (``forge.image.weights_layer``) and reproducible (sorted
  entries, mtime 0, root-owned, 0644): the same shard bytes under the same name are the same layer digest across
  models, variants and rebuilds, so a registry stores, and a node pulls, a shard once. Shards go up and down in
  parallel, and a re-quantization that changes two shards moves two layers.
- **a ModelPack manifest** (CNCF ``application/vnd.cncf.model.manifest.v1+json``, read by KitOps, Docker Model
  Runner and CRI-O) over **the same blobs**: weight layers as ``application/vnd.cncf.model.weight.v1.tar``, the
  small one as ``…weight.config.v1.tar``, each with its ``org.cncf.model.filepath``; a registry holds no byte twice.

Both name the model digest, method, format and recipe in their annotations (``dev.forge.*``). The small layer also
holds ``.forge/serve.json``: how the weights-free serving image's entrypoint (forge/image/serve-entry) serves it.

``mounted`` unpacks a model image the way a runtime does before it mounts the volume (layers in order, read-only
bind at ``/models``): the smoke test and ``eval.candidate: image`` serve the serving image through it.
"""
from __future__ import annotations

import shutil
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from forge.image.weights_layer import write_layer
from forge.oci.layout import MANIFEST, REF_NAME, Layout, descriptor, manifest_bytes, member_path

__all__ = ["MODELS_DIR", "MODELPACK_TYPE", "SERVE_FILE", "ModelImage", "write_model_image", "weight_files", "unpack",
           "mounted"]

MODELS_DIR = "/models"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MODELPACK_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_WEIGHT = "application/vnd.cncf.model.weight.v1.tar"
MODELPACK_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.tar"
FILEPATH = "org.cncf.model.filepath"
SERVE_FILE = ".forge/serve.json"   # in the small layer: the engine's command for this model (forge/image/serve-entry reads it)


@dataclass(frozen=True)
class ModelImage:
    manifest_digest: str        # the model image (what a pod's image volume names)
    modelpack_digest: str       # the ModelPack manifest over the same blobs
    layers: tuple[dict, ...]    # digest, diff_id, size, files (the shard, or "config" for the small layer)
    bytes: int                  # all layers together


def weight_files(checkpoint: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors shards, every other file) of a checkpoint directory, each sorted by path."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    shards = [p for p in files if p.suffix == ".safetensors"]
    return shards, [p for p in files if p.suffix != ".safetensors"]


def write_model_image(checkpoint: Path, layout: Layout | Path, ref: str, *, annotations: dict[str, str],
                      params: int | None = None, precision: str | None = None, quantization: str | None = None,
                      progress: Callable[[int], None] | None = None, index_modelpack: bool = True) -> ModelImage:
    """Write the model image of ``checkpoint`` and its ModelPack manifest into ``layout``, tagged ``ref`` and
    ``ref-modelpack``. ``annotations``: dev.forge.* facts (model digest, method, format, recipe).
    ``index_modelpack=False``: the ModelPack's blobs are written but index.json names the model image alone (a
    layout that Trivy and buildah read as one image)."""
    layout = layout if isinstance(layout, Layout) else Layout(Path(layout))
    shards, rest = weight_files(checkpoint)
    if not shards:
        raise ValueError(f"{checkpoint}: no .safetensors file: a model image carries safetensors weights")
    blobs = layout.init().root / "blobs" / "sha256"
    layers = []
    for group, role in [([s], s.relative_to(checkpoint).as_posix()) for s in shards] + [(rest, "config")]:
        facts = write_layer(checkpoint, MODELS_DIR, blobs, uid=0, files=group, progress=progress)
        layers.append({"digest": facts["digest"], "diff_id": facts["diff_id"], "size": facts["size"], "files": role})

    config = {"architecture": "amd64", "os": "linux", "config": {"Labels": annotations},
              "rootfs": {"type": "layers", "diff_ids": [la["diff_id"] for la in layers]},
              "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "forge: model image",
                           "comment": f"{MODELS_DIR}/{la['files']}"} for la in layers]}
    config_bytes = manifest_bytes(config)
    layout.put_bytes(config_bytes)
    image = {"schemaVersion": 2, "mediaType": MANIFEST, "config": descriptor(IMAGE_CONFIG, config_bytes),
             "layers": [{"mediaType": LAYER_TAR, "digest": la["digest"], "size": la["size"]} for la in layers],
             "annotations": annotations}
    image_bytes = manifest_bytes(image)
    image_digest = layout.put_bytes(image_bytes)

    pack_config = {"descriptor": {"name": annotations.get("org.opencontainers.image.title", ref)},
                   "config": {"format": "safetensors", **({"paramSize": _param_size(params)} if params else {}),
                              **({"precision": precision} if precision else {}),
                              **({"quantization": quantization} if quantization else {})},
                   "modelfs": {"type": "layers", "diffIds": [la["diff_id"] for la in layers]}}
    pack_config_bytes = manifest_bytes(pack_config)
    layout.put_bytes(pack_config_bytes)
    pack = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": MODELPACK_TYPE,
            "config": descriptor(MODELPACK_CONFIG, pack_config_bytes),
            "layers": [{"mediaType": MODELPACK_WEIGHT_CONFIG if la["files"] == "config" else MODELPACK_WEIGHT,
                        "digest": la["digest"], "size": la["size"],
                        "annotations": {FILEPATH: MODELS_DIR.strip("/") + ("/" if la["files"] == "config"
                                                                          else f"/{la['files']}")}}
                       for la in layers],
            "annotations": annotations}
    pack_bytes = manifest_bytes(pack)
    pack_digest = layout.put_bytes(pack_bytes)
    named = [{**descriptor(MANIFEST, image_bytes), "annotations": {REF_NAME: ref}}]
    if index_modelpack:
        named.append({**descriptor(MANIFEST, pack_bytes), "artifactType": MODELPACK_TYPE,
                      "annotations": {REF_NAME: f"{ref}-modelpack"}})
    layout.add_to_index(named)
    return ModelImage(image_digest, pack_digest, tuple(layers), sum(la["size"] for la in layers))


def _param_size(params: int) -> str:
    """ModelPack's paramSize: a count with at most one decimal and a scale letter (135M, 6.7B, 1T)."""
    for scale, letter in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.1f}".removesuffix(".0") + letter
    return str(params)


def unpack(layout: Layout, digest: str, dest: Path) -> Path:
    """The filesystem of the model image ``digest`` in ``layout``, as a runtime lays it out before it mounts the
    volume: every layer unpacked in order under ``dest`` (directories and regular files only, nothing outside
    ``models/``). Returns ``dest/models``."""
    import json

    for layer in json.loads(layout.read(digest))["layers"]:
        with tarfile.open(layout.blob_path(layer["digest"])) as tf:
            for m in tf:
                name = member_path(m.name).rstrip("/")
                parts = Path(name).parts
                if not parts or parts[0] != MODELS_DIR.strip("/") or ".." in parts or not (m.isdir() or m.isfile()):
                    raise ValueError(f"model image layer {layer['digest']} holds {m.name!r}: only directories and "
                                     f"files under {MODELS_DIR} belong in a model image")
                target = dest / name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                target.chmod(0o644)
    return dest / MODELS_DIR.strip("/")


@contextmanager
def mounted(layout_dir: Path, digest: str, scratch: Path) -> Iterator[tuple[tuple[Path, str], ...]]:
    """(host path, container path) bind mounts that put the model image at /models (read-only: the builders'
    ``start_server`` mounts them ``ro``), unpacked under ``scratch`` and removed afterwards."""
    root = Path(scratch) / f".model-image-{digest[7:19]}"
    shutil.rmtree(root, ignore_errors=True)
    try:
        yield ((unpack(Layout(Path(layout_dir)), digest, root), MODELS_DIR),)
    finally:
        shutil.rmtree(root, ignore_errors=True)
