"""A record's image and evidence in an OCI registry: push, promote, and re-hash what the registry serves.

The registry client itself (``forge.oci.client``) knows nothing of records.
"""
from __future__ import annotations

import json

from forge.core.errors import ToolError
from forge.oci.client import Client, Remote, fetch_image, parse_ref  # re-exported: the registry's callers use them
from forge.oci.layout import EMPTY_BYTES, MANIFEST, Layout, artifact_manifest, descriptor, manifest_bytes, sha256_bytes
from forge.registry.local import RECORD_ANNOTATION
from forge.registry.record import EVIDENCE_TYPES, PROXY, Record, model_images

RECORD_FILE = "record.json"

__all__ = ["push", "promote", "verify", "Client", "Remote", "parse_ref", "fetch_image"]


def push(rec: Record, store: Layout, remote: Remote, report=lambda *a, **k: None) -> str:
    """Push the image and its evidence; returns the remote reference of the image (by digest).

    The image goes blob by blob and its manifest as the exact bytes forge recorded: a registry copy
    through skopeo would gzip the uncompressed weights layer, changing its digest (and costing minutes).
    container.weights: image: the model image first (tag <tag>-model, its shards four at a time, none the registry
    has sent again), its ModelPack manifest (<tag>-modelpack: the same blobs, so only its config goes up), then the
    serving image."""
    client = Client(remote)
    manifests = [*model_images(rec).values(), rec.image_digest]
    blobs = {b["digest"]: b for d in manifests for m in [json.loads(store.read(d))] for b in [m["config"], *m["layers"]]}
    total, sent = sum(blob["size"] for blob in blobs.values()), [0]

    def done(digest: str, size: int, how: str) -> None:
        sent[0] += size
        report(f"{digest[7:19]} ({size / 1e6:.1f} MB) {how} → {remote.url()}", completed=sent[0], total=total, unit="B")

    report(f"pushing {len(blobs)} blobs ({total / 1e9:.2f} GB) → {remote.url()}", completed=0, total=total, unit="B")
    for role, digest in model_images(rec).items():
        client.push_image(store, digest, model_tag(rec.tag, role), done=done)
    client.push_image(store, rec.image_digest, rec.tag, done=done)
    descriptors = []
    for kind, digest in [(ev.kind, ev.manifest_digest) for ev in rec.evidence] + [("record", record_artifact(rec, store))]:
        report(f"attaching {kind}")
        manifest = store.read(digest)
        m = json.loads(manifest)
        for blob in [m["config"], *m["layers"]]:
            client.put_blob(store.blob_path(blob["digest"]), blob["digest"], blob["size"])
        client.put_manifest(manifest, MANIFEST, digest)
        descriptors.append({"mediaType": MANIFEST, "digest": digest, "size": len(manifest),
                            "artifactType": m["artifactType"], "annotations": m.get("annotations", {})})
    client.add_referrers(rec.image_digest, descriptors)
    return f"{remote.url()}@{rec.image_digest}"


def model_tag(tag: str, role: str) -> str:
    """The tag of a record's model image (<tag>-model) or ModelPack manifest (<tag>-modelpack) beside <tag>."""
    return f"{tag}-model" if role == "model image" else f"{tag}-modelpack"


def record_artifact(rec: Record, store: Layout) -> str:
    """Store (in ``store``) the record as an artifact referring to its image, as published: where it was pushed
    and what was promoted since are the registry's own facts (tags), not the record's; returns its manifest digest.
    ``forge registry pull`` takes it in on another machine, re-deriving the status from the evidence."""
    published = rec.model_copy(update={
        "remote": None, "promoted_tags": (), "accepted_proxy_eval": False,
        "status": (PROXY if rec.accepted_proxy_eval else "validated") if rec.status == "promoted" else rec.status})
    data = published.model_dump_json(indent=1).encode()
    store.put_bytes(data)
    store.put_bytes(EMPTY_BYTES)
    layer = descriptor(EVIDENCE_TYPES["record"], data, annotations={"org.opencontainers.image.title": RECORD_FILE})
    subject = descriptor(MANIFEST, store.read(rec.image_digest))
    manifest = artifact_manifest(EVIDENCE_TYPES["record"], [layer], subject,
                                 {RECORD_ANNOTATION: rec.id, "dev.forge.evidence": "record"})
    return store.put_bytes(manifest_bytes(manifest))


def promote(rec: Record, remote: Remote, tag: str) -> None:
    """Tag the pushed image again: the manifest's exact bytes PUT under the new tag (its blobs are there)."""
    client = Client(remote)
    got = client.get_manifest(rec.image_digest)
    if got is None:
        raise ToolError(f"{remote.url()} has no manifest {rec.image_digest}: push the record first",
                        hint=f"forge build … --publish-to {remote.url()}")
    client.put_manifest(got[0], got[1] or MANIFEST, tag)
    for role, digest in model_images(rec).items():   # the model image and ModelPack move with it
        got = client.get_manifest(digest)
        if got is None:
            raise ToolError(f"{remote.url()} has no {role} {digest}: push the record first",
                            hint=f"forge build … --publish-to {remote.url()}")
        client.put_manifest(got[0], got[1] or MANIFEST, model_tag(tag, role))



def verify(client: Client, rec: Record) -> list[tuple[str, str, str]]:
        """Re-hash, as served by the registry, the image manifest, every blob it names and every piece of
        evidence, and check each evidence artifact is findable as a referrer: (digest, role, problem)."""
        problems, seen = [], set()
        manifests = [(rec.image_digest, "image manifest")] + [(d, f"{role} manifest") for role, d in model_images(
            rec).items()] + [(e.manifest_digest, f"{e.kind} manifest") for e in rec.evidence]
        for digest, role in manifests:
            got = client.get_manifest(digest)
            if got is None:
                problems.append((digest, role, "missing from the registry"))
                continue
            if (actual := sha256_bytes(got[0])) != digest:
                problems.append((digest, role, f"the registry serves content hashing to {actual}"))
                continue
            m = json.loads(got[0])
            if "manifests" in m:   # a variant matrix: re-hash every image it lists, in turn
                manifests += [(d["digest"], f"variant {d['digest'][7:19]} manifest") for d in m["manifests"]]
                continue
            for blob in [m["config"], *m.get("layers", [])]:
                if blob["digest"] in seen:   # a ModelPack's layers are its model image's: each shard re-hashed once
                    continue
                seen.add(blob["digest"])
                actual = client.blob_digest(blob["digest"])
                if actual != blob["digest"]:
                    what = "missing from the registry" if actual is None else f"served content hashes to {actual}"
                    problems.append((blob["digest"], f"{role} → blob", what))
        listed = {d["digest"] for d in client.referrers(rec.image_digest)[0]}
        for e in rec.evidence:
            if e.manifest_digest not in listed:
                problems.append((e.manifest_digest, f"{e.kind} manifest", "not listed as a referrer of the image"))
        return problems

