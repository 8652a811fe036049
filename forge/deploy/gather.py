"""Everything a deployment needs, gathered from a registry record: nothing here is re-derived.

- the record: status (only a validated or promoted artifact deploys), image digest, where it was pushed,
  recipe and eval-verdict digests, GPU, engine and engine version;
- the image config in the registry's OCI layout: the container command (ENTRYPOINT + CMD), user,
  exposed port, env: the Deployment runs exactly what was smoke-tested and scanned;
- the recipe the record was built from (its file, checked against the recorded digest, or, where the file is
  not here, the copy the record carries as evidence): tensor parallel size, max_model_len, max_num_seqs, the
  quantization plan;
- the served model's config.json, read out of the image's weights layer (or, for a record whose weights are their
  own model image, out of that image's small last layer): its shape, for sizing.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from forge.core.errors import EvidenceError, UsageError
from forge.image.model_image import MODELS_DIR
from forge.oci.layout import member_path, sha256_bytes
from forge.registry import PROMOTABLE, LocalRegistry, Record
from forge.registry.record import PROXY, PROXY_HINT
from forge.recipe.resolve import sections

__all__ = ["Artifact", "gather", "image_config"]

MODEL_CONFIG = "opt/forge/model/config.json"
MODEL_IMAGE_CONFIG = MODELS_DIR.strip("/") + "/config.json"


@dataclass(frozen=True)
class Artifact:
    record: Record
    image: str                       # repository@sha256:… (what the cluster pulls)
    pushed: bool                     # False: the image is only in the embedded registry
    command: tuple[str, ...]         # the image's ENTRYPOINT
    args: tuple[str, ...]            # the image's CMD
    user: tuple[int, int]            # uid, gid the image runs as
    port: int
    recipe: object                   # forge.recipe.schema.Recipe
    model_config: dict | None        # config.json of the served model (None: not found in the weights layer)
    weights_layer_bytes: int         # the weights layer, or all of the model image's layers
    model_image: str | None = None   # repository@sha256:… of the model image (weights == "image"), else None


def image_config(reg: LocalRegistry, image_digest: str) -> dict:
    """The OCI image config (``config`` section and all) of an image in the embedded registry."""
    manifest = json.loads(reg.blobs.read(image_digest))
    return json.loads(reg.blobs.read(manifest["config"]["digest"]))


def gather(reg: LocalRegistry, rec: Record, recipe_path: Path | None = None, *,
           accept_proxy_eval: bool = False) -> Artifact:
    if rec.kind == "matrix":   # issue 16: a variant matrix lists images; it is not one
        raise UsageError(f"{rec.name}:{rec.tag} is a variant matrix, which no runtime can run",
                         hint=f"`forge registry select {rec.name} --gpu-product LABEL` names the variant to deploy.")
    if rec.status == PROXY and not accept_proxy_eval:
        raise UsageError(f"{rec.name} {rec.short()} is {PROXY}: {rec.reason}", hint=PROXY_HINT)
    if rec.status not in PROMOTABLE and rec.status != PROXY:
        why = f": {rec.reason}" if rec.reason else ""
        raise UsageError(f"{rec.name} {rec.short()} is {rec.status}{why}; only a validated artifact can be deployed",
                         hint="Fix what stopped it and build again; `forge registry show` has its evidence.")
    manifest = json.loads(reg.blobs.read(rec.image_digest))
    cfg = json.loads(reg.blobs.read(manifest["config"]["digest"])).get("config") or {}
    command = tuple(cfg.get("Entrypoint") or ())
    args = tuple(cfg.get("Cmd") or ())
    if not command and not args:
        raise UsageError(f"the image of {rec.name} {rec.short()} has no ENTRYPOINT or CMD: nothing to run",
                         hint="Rebuild it with forge (the package step sets the engine command).")
    ports = sorted(int(p.split("/")[0]) for p in (cfg.get("ExposedPorts") or {}))
    if not ports:
        raise UsageError(f"the image of {rec.name} {rec.short()} exposes no port", hint="Rebuild it with forge.")
    model_image = None
    if rec.weights == "image":
        model_image, model_config, weights_bytes = _model_image(reg, rec)
    else:
        weights, model_config = manifest["layers"][-1], None
        for layer in reversed(manifest["layers"][-3:]):   # forge appends the weights layer last (a few small ones may follow)
            if (model_config := _model_config(reg.blobs.blob_path(layer["digest"]))) is not None:
                weights = layer
                break
        weights_bytes = int(weights["size"])
    return Artifact(record=rec, image=_image_ref(rec), pushed=bool(rec.remote), command=command, args=args,
                    user=_user(rec, cfg.get("User") or ""), port=ports[0], recipe=_recipe(reg, rec, recipe_path),
                    model_config=model_config, weights_layer_bytes=weights_bytes, model_image=model_image)


def _model_image(reg: LocalRegistry, rec: Record) -> tuple[str, dict | None, int]:
    """(repository@digest, config.json, bytes of all its layers) of the record's model image."""
    digest = rec.model_image_digest
    if not digest:
        raise EvidenceError(f"{rec.name} {rec.short()} keeps its weights in a model image, but the record names none "
                            "(model_image_digest is empty)", hint="Build it again; `forge registry verify` checks records.")
    if not reg.blobs.has(digest):
        raise EvidenceError(f"the model image {digest[:19]}… of {rec.name} {rec.short()} is not in the registry at "
                            f"{reg.root}", hint="`forge registry pull` of the record brings its model image with it.")
    layers = json.loads(reg.blobs.read(digest))["layers"]
    config = None
    for layer in reversed(layers):   # config.json is in the small last layer
        if reg.blobs.has(layer["digest"]) and (
                config := _model_config(reg.blobs.blob_path(layer["digest"]), MODEL_IMAGE_CONFIG)) is not None:
            break
    return _image_ref(rec).split("@")[0] + "@" + digest, config, sum(int(la["size"]) for la in layers)


def _image_ref(rec: Record) -> str:
    if rec.remote:   # oci://host/repo@sha256:…
        repo = rec.remote.removeprefix("oci://").split("@")[0]
    else:
        repo = f"forge.local/{rec.name}"
    return f"{repo}@{rec.image_digest}"


def _user(rec: Record, user: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"the image of {rec.name} {rec.short()} runs as {user or 'root'!r}; forge deploys images that "
                         "run as a numeric non-root user (runAsNonRoot needs a uid)",
                         hint="Rebuild it with forge: its images run as uid 10001.")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def _recipe(reg: LocalRegistry, rec: Record, recipe_path: Path | None):
    """The recipe's sections as built: from ``--recipe FILE``, else from the file the record was built from when it
    is here unchanged, else from the record's recipe evidence (a record pulled onto a machine without the recipe)."""
    path = Path(recipe_path or rec.recipe_path)
    stored = next((ev for ev in rec.evidence if ev.kind == "recipe"), None)
    if recipe_path is None and stored is not None and not _same_file(path, rec.recipe_digest):
        (name, digest), = stored.files.items()
        raw = reg.blobs.read(digest)
        if sha256_bytes(raw) != rec.recipe_digest:
            raise EvidenceError(f"{rec.name} {rec.short()}: its recipe evidence ({digest[:19]}…) is not the recipe the "
                                f"record names ({rec.recipe_digest[:19]}…)",
                                hint="`forge registry verify` says what else does not hold; do not deploy it.")
        return sections(f"{rec.name}@{rec.short()}:{name}", raw, variant=rec.variant)
    if not path.is_file():
        raise UsageError(f"the recipe {rec.name} was built from ({path}) is not here, and the record carries no copy "
                         "(it was published before forge kept recipes as evidence)",
                         hint="Pass it with --recipe FILE (its sha256 must be the record's recipe digest).")
    if not _same_file(path, rec.recipe_digest):
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        raise UsageError(f"{path} has changed since {rec.name} {rec.short()} was built: it hashes to {digest[:19]}…, "
                         f"the record says {rec.recipe_digest[:19]}…",
                         hint="Deploy from the recipe as it was built (git checkout it, or --recipe FILE), or build "
                              "the changed recipe and deploy that record.")
    return sections(path, variant=rec.variant)


def _same_file(path: Path, digest: str) -> bool:
    return path.is_file() and "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest


def _model_config(layer: Path, member: str = MODEL_CONFIG) -> dict | None:
    """config.json out of the weights layer (uncompressed: the tar index is read by seeking, no weights)."""
    with tarfile.open(layer) as tf:
        for m in tf:
            if m.isfile() and member_path(m.name) == member:
                return json.loads(tf.extractfile(m).read())
    return None
