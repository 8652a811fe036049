"""The variant matrix: one artifact that lists every published variant of a recipe and the GPU each is for.

It is an OCI image index with ``artifactType: application/vnd.forge.variant-matrix.v1+json``, tagged
``<name>:matrix`` in the embedded registry and ``matrix`` in the recipe's OCI repository. Each entry is a
variant's image manifest descriptor carrying the variant's ``dev.forge.*`` annotations (forge/registry/
annotations.py: tag, GPU, GFD product labels, compute capability, minimum driver, method, engine, kernel, fit).

It is **not runnable**, and must not be: an image index chooses among its images by ``platform`` (os,
architecture, variant, features), which has no field for a GPU, and container runtimes pull the first entry
whose platform matches — every variant here is linux/amd64, so a runtime handed the matrix would run the first
variant whatever GPU the node has. The artifactType marks it as data for forge; ``forge registry select`` reads
it and names the image a node should run, by digest.

Variants that were rejected (eval or scan gate) or have no image are left out of ``manifests`` (they must never
be deployed, and a rejected image is never pushed, so a registry would refuse an index naming it); they are
listed with their status and reason in the ``dev.forge.matrix.left-out`` annotation, so `select` can say why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from forge.core.errors import ToolError, UsageError
from forge.registry import MATRIX_TAG, MATRIX_TYPE, annotate as ann, remote
from forge.oci.layout import INDEX, MANIFEST, descriptor, manifest_bytes, sha256_bytes
from forge.registry.local import LocalRegistry
from forge.registry.record import PROMOTABLE, Record

__all__ = ["publish_matrix", "Matrix", "load", "MATRIX_TYPE", "MATRIX_TAG"]

NAME = "dev.forge.name"
LEFT_OUT = "dev.forge.matrix.left-out"
DESCRIPTION = ("forge variant matrix: NOT runnable (an image index cannot choose by GPU). "
               "Run `forge registry select NAME --gpu-product <nvidia.com/gpu.product>` for the image to deploy.")


def publish_matrix(loaded, records: list[Record], registry: LocalRegistry, target: str | None) -> Record | None:
    """Record (and push, when ``target`` or the recipe's publish.registry names a remote) the matrix of the
    variant ``records`` just published; None when no variant has a publishable image."""
    name = loaded.recipe.name
    listed = [r for r in records if r.variant is not None and r.image_digest and r.status != "rejected"]
    left_out = {(r.variant or r.id[:12]): (f"{r.status}: {r.reason}" if r.reason else r.status)
                for r in records if r not in listed}
    if not listed:
        return None
    index = {"schemaVersion": 2, "mediaType": INDEX, "artifactType": MATRIX_TYPE,
             "manifests": [{**descriptor(MANIFEST, registry.blobs.read(r.image_digest)),
                            "annotations": {**r.annotations, ann.STATUS: r.status, ann.RECORD: r.id}} for r in listed],
             "annotations": {NAME: name, "org.opencontainers.image.description": DESCRIPTION,
                             **({LEFT_OUT: json.dumps(left_out, sort_keys=True)} if left_out else {})}}
    data = manifest_bytes(index)   # no timestamp: the same variants make the same matrix
    digest = registry.blobs.put_bytes(data)
    rec = Record(
        id=digest.removeprefix("sha256:"), name=name, tag=MATRIX_TAG, kind="matrix", status=_status(listed),
        reason=f"variant matrix of {len(listed)} variant(s); not runnable: `forge registry select` names the image",
        image_digest=digest, image_size=len(data), recipe_digest=loaded.digest, recipe_path=str(loaded.path),
        model_source=loaded.recipe.model.source, model_digest=None,
        method=",".join(dict.fromkeys(r.method for r in listed)),
        target_gpu=",".join(dict.fromkeys(r.target_gpu for r in listed)), engine=None, engine_version=None,
        eval_verdict=_same(r.eval_verdict for r in listed), eval_digest=None,
        scan_verdict=_same(r.scan_verdict for r in listed), scan_digest=None, sbom_digest=None,
        tool_versions={}, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        annotations=index["annotations"])
    target = target or loaded.recipe.publish.registry
    with registry.publishing(rec.id):
        stored, _ = registry.insert(rec)
        if target != "local":
            pushed = _push(data, listed, registry, target)
            if stored.remote != pushed:
                stored = registry.update(stored.model_copy(update={"remote": pushed}), f"pushed to {pushed}")
        registry.tag(stored, MATRIX_TAG, INDEX, MATRIX_TYPE)
    return stored


def _status(listed: list[Record]) -> str:
    """validated when every listed variant is; else the first one's status that is not (unscanned, scanned…)."""
    return next((r.status for r in listed if r.status not in PROMOTABLE), "validated")


def _same(values) -> str:
    seen = set(values)
    return seen.pop() if len(seen) == 1 else "mixed"


def _push(data: bytes, listed: list[Record], registry: LocalRegistry, target: str) -> str:
    """Every listed variant first (a registry refuses an index naming a manifest it lacks), then the index."""
    r = remote.Remote.parse(target)
    for rec in listed:
        if rec.remote != f"{r.url()}@{rec.image_digest}":
            remote.push(rec, registry.blobs, r)
            remote.promote(rec, r, rec.variant)
    remote.Client(r).put_manifest(data, INDEX, MATRIX_TAG)
    return f"{r.url()}@{sha256_bytes(data)}"


# ---------------------------------------------------------------------- reading it back


@dataclass(frozen=True)
class Matrix:
    name: str
    digest: str
    where: str                     # the embedded registry's directory, or oci://HOST/REPO
    entries: tuple[dict, ...]      # the index's descriptors: digest, annotations
    left_out: dict[str, str]       # variant -> "status: reason"

    def image(self, digest: str) -> str:
        """The reference a deployment pulls: HOST/REPO@sha256:… remotely, NAME@sha256:… in the embedded registry."""
        if self.where.startswith("oci://"):
            return f"{self.where.removeprefix('oci://')}@{digest}"
        return f"{self.name}@{digest}"


def load(name: str, registry: LocalRegistry | None = None, url: str | None = None) -> Matrix:
    """The matrix of recipe ``name``: from the OCI repository ``url`` (oci://HOST/REPO, the recipe's
    publish.registry), else from the embedded registry. Its bytes are checked against its digest."""
    if url is not None:
        client = remote.Client(remote.Remote.parse(url))
        got = client.get_manifest(MATRIX_TAG)
        if got is None:
            raise UsageError(f"{url} has no variant matrix (tag {MATRIX_TAG!r})",
                             hint="Build the recipe's variants with this publish.registry (or --publish-to) first.")
        data, where = got[0], url
    else:
        registry = registry or LocalRegistry()
        rec = registry.resolve(f"{name}:{MATRIX_TAG}")
        if (problem := registry.blobs.verify(rec.image_digest)) is not None:
            raise ToolError(f"variant matrix {rec.image_digest} of {name} does not verify: {problem}",
                            hint="The store was modified after publishing: build the variants again.")
        data, where = registry.blobs.read(rec.image_digest), str(registry.root)
    index = json.loads(data)
    if index.get("artifactType") != MATRIX_TYPE:
        raise UsageError(f"{where}: {name}:{MATRIX_TAG} is not a forge variant matrix "
                         f"(artifactType {index.get('artifactType')!r})")
    found = index.get("annotations", {}).get(NAME)
    if found != name:
        raise UsageError(f"the variant matrix at {where} is for {found!r}, not {name!r}",
                         hint="Give the recipe name that published to this repository.")
    return Matrix(name, sha256_bytes(data), where, tuple(index["manifests"]),
                  json.loads(index["annotations"].get(LEFT_OUT, "{}")))
