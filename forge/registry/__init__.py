"""The registry of validated artifacts: what was built, with its evidence, and whether it may ship.

Public surface: ``publish`` (the pipeline's last step), ``LocalRegistry`` (ls/show/verify/promote),
``pull`` (weights and evidence out of the embedded store or an OCI registry), ``take_in`` (a pushed record, its
image and evidence from an OCI registry into the embedded one), ``Record``.

May import: forge.core, forge.model, forge.oci, forge.evaluation, forge.gpu, forge.steps.
"""
from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

from forge.core.errors import EvidenceError, ToolError, UsageError
from forge.oci.layout import EMPTY_BYTES, MANIFEST, REF_NAME, Layout, descriptor, member_path, sha256_bytes
from forge.registry.local import RECORD_ANNOTATION, LocalRegistry, default_registry_dir
from forge.registry.record import PROMOTABLE, STATUSES, Collected, EvidenceFiles, Record, collect
from forge.registry import remote

__all__ = ["publish", "pull", "take_in", "LocalRegistry", "Record", "STATUSES", "PROMOTABLE", "default_registry_dir"]

MODEL_PREFIX = "opt/forge/model/"
MATRIX_TAG = "matrix"   # <name>:matrix, the variant matrix (forge/registry/matrix.py)
MATRIX_TYPE = "application/vnd.forge.variant-matrix.v1+json"   # its artifactType


def publish(loaded, results: dict, report=lambda *a, **k: None, registry: LocalRegistry | None = None,
            target: str | None = None, attach=None) -> Record:
    """Record a finished (or gate-stopped) build; push it with its evidence when the recipe (or ``target``,
    which overrides ``publish.registry``) names a remote.

    ``attach(collected) -> {kind: file or files}`` adds evidence made from the record-to-be (the build report)."""
    collected: Collected = collect(loaded, results)
    if attach is not None:   # issue 18 hook: the HTML build report is evidence like the verdicts
        from dataclasses import replace

        extra = tuple(EvidenceFiles(kind, tuple(map(Path, f)) if isinstance(f, (tuple, list)) else (Path(f),))
                      for kind, f in attach(collected).items())
        collected = replace(collected, evidence=collected.evidence + extra)
    variant = collected.record.variant
    if variant == MATRIX_TAG:
        raise UsageError(f"{loaded.path}: variant name {variant!r} is the tag of the variant matrix",
                         hint="Rename the variant (e.g. vllm-fp8-h100-sxm-tp1).")
    reg = registry or LocalRegistry()
    target = target or loaded.recipe.publish.registry
    with reg.publishing(collected.record.id):
        rec = reg.get(collected.record.id)   # the same build published before: keep its record (and history)
        if rec is None:
            report("storing image and evidence")
            rec = reg.store(collected)
        pushed = None
        if target != "local" and rec.image_digest and rec.status != "rejected":
            pushed = remote.push(rec, reg.blobs, remote.Remote.parse(target), report)  # idempotent: digests kept
        stored, _ = reg.insert(rec.model_copy(update={"remote": pushed or rec.remote}))
        if pushed and stored.remote != pushed:
            stored = reg.update(stored.model_copy(update={"remote": pushed}), f"pushed to {pushed}")
        if variant is not None and stored.tag:   # <name>:<variant> moves to this build (never to a rejected one)
            reg.tag(stored, variant)
            if pushed:
                remote.promote(stored, remote.Remote.parse(target), variant)
    return stored


def promote(reg: LocalRegistry, rec: Record, tag: str, *, accept_proxy_eval: bool = False) -> Record:
    updated = reg.promote(rec, tag, accept_proxy_eval=accept_proxy_eval)
    if rec.remote:
        r = remote.Remote.parse(rec.remote.split("@")[0])
        remote.promote(rec, r, tag)
    return updated


def pull(ref: str, dest: Path, reg: LocalRegistry | None = None) -> dict:
    """Write the model files of the image's weights layer to dest/model and its evidence to dest/evidence/<kind>/.

    ``ref`` is a local reference (see ``LocalRegistry.resolve``) or oci://HOST/REPO:TAG|@DIGEST. Every
    blob is checked against its digest before anything is written (locally by ``verify``; from a registry
    by skopeo while copying the image and by ``Layout.put_bytes`` for the evidence); returns a summary.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UsageError(f"--to {dest} is not empty", hint="Pull into a new or empty directory.")
    if ref.startswith("oci://"):
        with tempfile.TemporaryDirectory(prefix="forge-pull-") as tmp:
            layout, image_digest, fetched = _fetch_remote(ref, Path(tmp))
            evidence = {kind: (d, files) for kind, d, files in fetched if kind != "record"}
            return _extract(layout, image_digest, evidence, dest)
    reg = reg or LocalRegistry()
    rec = reg.resolve(ref)
    if rec.kind == "matrix":
        raise UsageError(f"{ref} is a variant matrix: it lists images, it holds no model",
                         hint=f"`forge registry select {rec.name} --gpu-product LABEL` names the variant to pull.")
    if not rec.image_digest:
        raise UsageError(f"{rec.name} {rec.short()} has no image ({rec.status}: {rec.reason})")
    if problems := reg.verify(rec):
        digest, role, what = problems[0]
        raise ToolError(f"registry blob {digest} ({role}) does not verify: {what}",
                        hint="`forge registry verify` lists every bad blob; rebuild and publish again.")
    evidence = {ev.kind: (ev.manifest_digest, ev.files) for ev in rec.evidence}
    return _extract(reg.blobs, rec.image_digest, evidence, dest)


def take_in(ref: str, reg: LocalRegistry, report=lambda *a, **k: None) -> Record:
    """Pull a pushed record, its image and all its evidence from an OCI registry into the local registry, so that
    `forge registry show/verify` and `forge deploy` work on a machine that never built it (nor has its recipe: the
    record's recipe evidence carries it).

    Fails closed: every blob is checked against its digest on the way in, the record must name this image, each
    evidence artifact the record lists must be among the image's referrers, and the status is re-derived from the
    evidence (``LocalRegistry.verify``) before anything is recorded; a record the evidence does not support is
    refused (exit 5) and leaves no row behind (blobs stored on the way are content-addressed, unreferenced)."""
    if not ref.startswith("oci://"):
        raise UsageError(f"{ref}: pull without --to takes a record in from an OCI registry (oci://HOST/REPO:TAG or "
                         "@sha256:…); a local record is already here", hint="Pass --to DIR to write its files out.")
    with tempfile.TemporaryDirectory(prefix="forge-pull-") as tmp:
        report(f"fetching {ref}")
        layout, digest, fetched = _fetch_remote(ref, Path(tmp))
        rec = _pushed_record(layout, digest, fetched, ref)
        for d, _ in layout.image_blobs(digest):
            reg.blobs.put_file(layout.blob_path(d), d)
        reg.blobs.put_bytes(EMPTY_BYTES)
        for ev in rec.evidence:
            for d in (ev.manifest_digest, *ev.files.values()):
                if not layout.has(d):
                    raise EvidenceError(f"{ref}: the record's {ev.kind} artifact is not in the registry ({d} is "
                                        "missing among the image's referrers)",
                                        hint="Push the record again from the machine that built it "
                                             "(forge build … --publish-to), then pull.")
                reg.blobs.put_bytes(layout.read(d), d)
    r, _ = remote.parse_ref(ref)
    rec = rec.model_copy(update={"remote": f"{r.url()}@{digest}"})
    if problems := reg.verify(rec):
        d, role, what = problems[0]
        raise EvidenceError(f"{ref}: the pulled record does not hold: {role} ({d[:19]}…): {what}",
                            hint="Do not deploy it; rebuild and publish it again.")
    stored, new = reg.insert(rec)
    named = [{**descriptor(MANIFEST, reg.blobs.read(ev.manifest_digest)), "artifactType": ev.artifact_type,
              "annotations": {RECORD_ANNOTATION: rec.id}} for ev in rec.evidence]
    ann = {**rec.annotations, RECORD_ANNOTATION: rec.id, **({REF_NAME: f"{rec.name}:{rec.tag}"} if rec.tag else {})}
    reg.blobs.add_to_index(named + [{**descriptor(MANIFEST, reg.blobs.read(digest)), "annotations": ann}])
    if rec.variant is not None and rec.tag:
        reg.tag(stored, rec.variant)
    return stored


def _pushed_record(layout: Layout, digest: str, fetched: list, ref: str) -> Record:
    """The record artifact among the fetched referrers that names this image (the newest, if more than one build
    made the same image)."""
    found = []
    for kind, _, files in fetched:
        if kind != "record" or remote.RECORD_FILE not in files:
            continue
        try:
            rec = Record.model_validate_json(layout.read(files[remote.RECORD_FILE]))
        except ValueError as e:
            raise EvidenceError(f"{ref}: its record artifact is not a forge record ({str(e).splitlines()[0]})",
                                hint="Push it again with this forge version.") from None
        if rec.image_digest == digest:
            found.append(rec)
    if not found:
        raise UsageError(f"{ref} has no forge record among its referrers: it was not pushed by a forge that records "
                         "itself (or not by forge)",
                         hint="Push it again with `forge build … --publish-to`, or pull its files with --to DIR.")
    return max(found, key=lambda r: r.created_at)


def _fetch_remote(ref: str, tmp: Path) -> tuple[Layout, str, list[tuple[str, str, dict]]]:
    """The image (by digest) and every referrer, each blob checked against its digest, into a layout under tmp:
    (layout, image digest, [(evidence kind, manifest digest, {file name: digest})])."""
    r, what = remote.parse_ref(ref)
    client = remote.Client(r)
    got = client.get_manifest(what)
    if got is None:
        raise UsageError(f"{ref} not found in the registry", hint="Check the tag; `skopeo list-tags` shows them.")
    digest = sha256_bytes(got[0])
    if json.loads(got[0]).get("artifactType") == MATRIX_TYPE:
        raise UsageError(f"{ref} is a variant matrix: it lists images, it holds no model",
                         hint="`forge registry select MODEL --gpu-product LABEL --registry oci://…` names the variant.")
    if what.startswith("sha256:") and digest != what:
        raise ToolError(f"{ref}: the registry's manifest hashes to {digest}")
    layout = Layout(tmp / "oci")
    remote.fetch_image(r, digest, layout.root, "image")
    evidence = []
    referrers, _ = client.referrers(digest)
    for d in referrers:
        data, _ = client.get_manifest(d["digest"]) or (None, None)
        if data is None:
            continue
        layout.put_bytes(data, d["digest"])
        m = json.loads(data)
        files = {}
        for layer in m.get("layers", []):
            name = layer.get("annotations", {}).get("org.opencontainers.image.title", layer["digest"])
            files[name] = layout.put_bytes(client.get_blob(layer["digest"]), layer["digest"])
        kind = m.get("annotations", {}).get("dev.forge.evidence") or d.get("artifactType", "artifact")
        evidence.append((kind, d["digest"], files))
    return layout, digest, evidence


def _extract(layout: Layout, image_digest: str, evidence: dict, dest: Path) -> dict:
    """Copy out of an already verified layout."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(layout.read(image_digest))
    weights = manifest["layers"][-1]["digest"]   # forge writes the weights as the image's last layer
    written = []
    with tarfile.open(layout.blob_path(weights)) as tf:
        for m in tf:
            name = member_path(m.name)
            if not m.isfile() or not name.startswith(MODEL_PREFIX):
                continue
            rel = Path(name[len(MODEL_PREFIX):])
            if rel.is_absolute() or ".." in rel.parts:
                raise ToolError(f"weights layer {weights} holds an unsafe path {m.name!r}")
            (dest / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(m) as src, open(dest / "model" / rel, "wb") as out:
                while chunk := src.read(4 << 20):
                    out.write(chunk)
            written.append(str(rel))
    for kind, (_, files) in evidence.items():
        for name, digest in files.items():
            (dest / "evidence" / kind).mkdir(parents=True, exist_ok=True)
            (dest / "evidence" / kind / Path(name).name).write_bytes(layout.read(digest))
    return {"image": image_digest, "weights_layer": weights, "model_files": sorted(written),
            "evidence": sorted(evidence)}
