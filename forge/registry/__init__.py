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
from forge.registry.record import PROMOTABLE, STATUSES, Collected, EvidenceFiles, Record, collect, model_images
from forge.registry import remote

__all__ = ["publish", "pull", "take_in", "LocalRegistry", "Record", "STATUSES", "PROMOTABLE", "default_registry_dir"]

MODEL_PREFIX = "opt/forge/model/"
MODELS_PREFIX = "models/"   # container.weights: image: the model image's tree
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
            evidence = {kind: (d, files) for kind, d, files in fetched if kind not in ("record", "model-tag")}
            try:
                rec = _pushed_record(layout, image_digest, fetched, ref)
            except UsageError:   # pushed without a record (by an older forge): its weights are its last layer
                rec = None
            if rec is not None and rec.model_image_digest:
                _fetch_model(ref, rec, layout)
            return _extract(layout, image_digest, evidence, dest, rec.model_image_digest if rec else None)
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
    return _extract(reg.blobs, rec.image_digest, evidence, dest, rec.model_image_digest)


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
        if rec.model_image_digest:
            report(f"fetching the model image {rec.model_image_digest[:19]}")
            _fetch_model(ref, rec, layout)
        for image in (digest, *model_images(rec).values()):
            for d, _ in layout.image_blobs(image):
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
    reg.blobs.add_to_index(named + [{**descriptor(MANIFEST, reg.blobs.read(digest)), "annotations": ann}]
                           + reg.model_descriptors(rec, rec.tag))
    if rec.variant is not None and rec.tag:
        reg.tag(stored, rec.variant)
    return stored


def _pushed_record(layout: Layout, digest: str, fetched: list, ref: str) -> Record:
    """The record artifact among the fetched referrers that names this image (the newest, if more than one build
    made the same image). A weights-free serving image is shared by every model on its base: when the reference is
    a tag, the model image its ``<tag>-model`` names picks the record (``_fetch_remote`` fetched it as "model-tag")."""
    model = next((files.get("digest") for kind, _, files in fetched if kind == "model-tag"), None)
    found = []
    for kind, _, files in fetched:
        if kind != "record" or remote.RECORD_FILE not in files:
            continue
        try:
            rec = Record.model_validate_json(layout.read(files[remote.RECORD_FILE]))
        except ValueError as e:
            raise EvidenceError(f"{ref}: its record artifact is not a forge record ({str(e).splitlines()[0]})",
                                hint="Push it again with this forge version.") from None
        if rec.image_digest == digest and (model is None or rec.model_image_digest == model):
            found.append(rec)
    if not found:
        raise UsageError(f"{ref} has no forge record among its referrers: it was not pushed by a forge that records "
                         "itself (or not by forge)",
                         hint="Push it again with `forge build … --publish-to`, or pull its files with --to DIR.")
    return max(found, key=lambda r: r.created_at)


def _fetch_model(ref: str, rec: Record, layout: Layout) -> None:
    """A record's model image (skopeo, digests preserved and checked) and its ModelPack manifest (whose blobs are the
    model image's, and its config, checked against their digests) from the record's repository into ``layout``."""
    r, _ = remote.parse_ref(ref)
    remote.fetch_image(r, rec.model_image_digest, layout.root, "model")
    client = remote.Client(r)
    got = client.get_manifest(rec.modelpack_digest) if rec.modelpack_digest else None
    if got is None:
        raise EvidenceError(f"{ref}: the record's ModelPack manifest {rec.modelpack_digest} is not in the registry",
                            hint="Push the record again from the machine that built it, then pull.")
    layout.put_bytes(got[0], rec.modelpack_digest)   # refused unless it hashes to the record's digest
    pack = json.loads(got[0])
    for blob in [pack["config"], *pack["layers"]]:
        if not layout.has(blob["digest"]):
            layout.put_bytes(client.get_blob(blob["digest"]), blob["digest"])


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
    if not what.startswith("sha256:") and (model := client.get_manifest(f"{what}-model")) is not None:
        evidence.append(("model-tag", "", {"digest": sha256_bytes(model[0])}))   # which model this tag serves
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


def _extract(layout: Layout, image_digest: str, evidence: dict, dest: Path, model_image: str | None = None) -> dict:
    """Copy out of an already verified layout: the model files from the image's last layer (baked weights) or from
    every layer of the model image (container.weights: image), and the evidence."""
    dest.mkdir(parents=True, exist_ok=True)
    if model_image is None:   # forge writes baked weights as the image's last layer
        layers, prefix = [json.loads(layout.read(image_digest))["layers"][-1]["digest"]], MODEL_PREFIX
    else:
        layers, prefix = [la["digest"] for la in json.loads(layout.read(model_image))["layers"]], MODELS_PREFIX
    written = []
    for weights in layers:
        with tarfile.open(layout.blob_path(weights)) as tf:
            for m in tf:
                name = member_path(m.name)
                if not m.isfile() or not name.startswith(prefix):
                    continue
                rel = Path(name[len(prefix):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ToolError(f"weights layer {weights} holds an unsafe path {m.name!r}")
                if model_image is not None and rel.parts[0] == ".forge":   # the serving entrypoint's file, not the model's
                    continue
                (dest / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(m) as src, open(dest / "model" / rel, "wb") as out:
                    while chunk := src.read(4 << 20):
                        out.write(chunk)
                written.append(str(rel))
    for kind, (_, files) in evidence.items():
        for name, digest in files.items():
            (dest / "evidence" / kind).mkdir(parents=True, exist_ok=True)
            (dest / "evidence" / kind / Path(name).name).write_bytes(layout.read(digest))
    return {"image": image_digest, "weights_layer": layers[-1], "model_files": sorted(written),
            "evidence": sorted(evidence), **({"model_image": model_image, "weights_layers": layers} if model_image else {})}
