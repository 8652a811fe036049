"""The embedded registry: an SQLite index beside an OCI layout blob store, no server.

    $FORGE_REGISTRY_DIR  (default $XDG_DATA_HOME/forge/registry)
      index.sqlite       artifacts, tags, status events (WAL; every write one IMMEDIATE transaction)
      index.sqlite.lock  serializes the index's first opens (forge.core.sqlitedb)
      oci/               OCI image layout: the images and their evidence artifacts (``subject`` → image)

Writers store blobs first (content-addressed, renamed into place once their digest is proven), then
index.json (under a lock), then the SQLite row, last: a record is only ever visible with everything it
names already stored. Two publishes of the same build resolve to one row (the id is a digest of what was
built); concurrent publishes of different builds each get theirs.
"""
from __future__ import annotations

import json
import re
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from forge.core.errors import EvidenceError, UsageError
from forge.core.sqlitedb import connect, open_wal
from forge.oci.layout import (
    EMPTY_BYTES, MANIFEST, REF_NAME, Layout, artifact_manifest, descriptor, manifest_bytes, sha256_bytes)
from forge.registry.record import (EVIDENCE_TYPES, PROMOTABLE, PROXY, PROXY_HINT, Collected, Evidence, Record,
                                   model_images)
from forge.core import options as env
from forge.registry.evidence import GATE_FILE, PROVENANCE_FILE, SCAN_FILE, derive

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, tag TEXT, status TEXT NOT NULL, image_digest TEXT,
    created_at TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS artifacts_name ON artifacts(name, created_at);
CREATE TABLE IF NOT EXISTS tags (name TEXT NOT NULL, tag TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (name, tag));
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, at TEXT NOT NULL,
    status TEXT NOT NULL, detail TEXT NOT NULL);
"""
RECORD_ANNOTATION = "dev.forge.record"
EVIDENCE_FILE = {"provenance": "provenance.intoto.json"}
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def default_registry_dir() -> Path:
    return env.current().registry_dir


class LocalRegistry:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_registry_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = Layout(self.root / "oci").init()
        open_wal(self.root / "index.sqlite", SCHEMA).close()

    # ------------------------------------------------------------------ writing
    def store(self, collected: Collected) -> Record:
        """Copy the image and write the evidence into the blob store; return the record with its evidence."""
        rec = collected.record
        subject = None
        if collected.image_layout is not None:
            src = Layout(collected.image_layout)
            for digest, _ in src.image_blobs(rec.image_digest):
                self.blobs.put_file(src.blob_path(digest), digest)
            subject = descriptor(MANIFEST, self.blobs.read(rec.image_digest))
            rec = rec.model_copy(update={"image_size": sum(
                self.blobs.blob_path(d).stat().st_size for d, _ in self.blobs.image_blobs(rec.image_digest))})
        if collected.model_layout is not None:   # container.weights: image: the model image and its ModelPack
            src = Layout(collected.model_layout)
            for manifest in model_images(rec).values():
                for digest, _ in src.image_blobs(manifest):
                    self.blobs.put_file(src.blob_path(digest), digest)
        self.blobs.put_bytes(EMPTY_BYTES)   # the config blob every evidence manifest names
        evidence, named = [], []
        for item in collected.evidence:
            contents = item.contents if item.contents is not None else tuple(f.read_bytes() for f in item.files)
            files = {f.name: data for f, data in zip(item.files, contents)}
            evidence.append(self._attach(item.kind, files, subject, rec))
        evidence.append(self._attach("provenance", {EVIDENCE_FILE["provenance"]: collected.provenance}, subject, rec))
        for ev in evidence:
            named.append({**descriptor(MANIFEST, self.blobs.read(ev.manifest_digest)), "artifactType": ev.artifact_type,
                          "annotations": {RECORD_ANNOTATION: rec.id}})
        if subject is not None:
            ann = {**rec.annotations, RECORD_ANNOTATION: rec.id}   # a variant's dev.forge.* (none for a plain recipe)
            if rec.tag:
                ann[REF_NAME] = f"{rec.name}:{rec.tag}"
            named.append({**subject, "annotations": ann})
        named += self.model_descriptors(rec, rec.tag)
        self.blobs.add_to_index(named)
        return rec.model_copy(update={"evidence": tuple(evidence)})

    def model_descriptors(self, rec: Record, tag: str | None) -> list[dict]:
        """index.json entries of a record's model image and ModelPack manifest, named <name>:<tag>-model and
        <name>:<tag>-modelpack beside the serving image's <name>:<tag> (none for baked weights)."""
        out = []
        for role, digest in model_images(rec).items():
            suffix = "-model" if role == "model image" else "-modelpack"
            data = self.blobs.read(digest)
            kind = json.loads(data).get("artifactType")
            out.append({**descriptor(MANIFEST, data), **({"artifactType": kind} if kind else {}),
                        "annotations": {RECORD_ANNOTATION: rec.id,
                                        **({REF_NAME: f"{rec.name}:{tag}{suffix}"} if tag else {})}})
        return out

    def _attach(self, kind: str, files: dict[str, bytes], subject: dict | None, rec: Record) -> Evidence:
        layers, digests = [], {}
        for name, data in sorted(files.items()):
            digests[name] = self.blobs.put_bytes(data)
            media = "application/json" if name.endswith(".json") else \
                "text/html" if name.endswith(".html") else "text/markdown"
            if kind in ("sbom", "provenance", "recipe", "record"):
                media = EVIDENCE_TYPES[kind]
            layers.append(descriptor(media, data, annotations={"org.opencontainers.image.title": name}))
        # no timestamp: the same build's evidence is the same bytes, so a republish adds nothing
        manifest = artifact_manifest(EVIDENCE_TYPES[kind], layers, subject,
                                     {RECORD_ANNOTATION: rec.id, "dev.forge.evidence": kind})
        digest = self.blobs.put_bytes(manifest_bytes(manifest))
        return Evidence(kind=kind, artifact_type=EVIDENCE_TYPES[kind], manifest_digest=digest, files=digests)

    @contextmanager
    def publishing(self, rid: str) -> Iterator[None]:
        """Held while one build is stored and recorded: a concurrent publish of the same build waits, then
        finds the record (evidence carries times and paths, so two unserialised copies would differ)."""
        from filelock import FileLock

        (self.root / "locks").mkdir(exist_ok=True)
        with FileLock(str(self.root / "locks" / f"{rid}.lock")):
            yield

    def get(self, rid: str) -> Record | None:
        with self._db() as db:
            row = db.execute("SELECT record FROM artifacts WHERE id = ?", (rid,)).fetchone()
        return Record.model_validate_json(row[0]) if row else None

    def insert(self, rec: Record) -> tuple[Record, bool]:
        """Record it; (the stored record, True if new). A record already present is left as it is."""
        with self._db() as db:
            row = db.execute("SELECT record FROM artifacts WHERE id = ?", (rec.id,)).fetchone()
            if row is not None:
                return Record.model_validate_json(row[0]), False
            db.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (rec.id, rec.name, rec.tag, rec.status, rec.image_digest, rec.created_at, rec.model_dump_json()))
            if rec.tag:
                db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (rec.name, rec.tag, rec.id))
            self._event(db, rec.id, rec.status, rec.reason or "published")
        return rec, True

    def update(self, rec: Record, detail: str) -> Record:
        with self._db() as db:
            db.execute("UPDATE artifacts SET status = ?, record = ? WHERE id = ?", (rec.status, rec.model_dump_json(), rec.id))
            self._event(db, rec.id, rec.status, detail)
        return rec

    def tag(self, rec: Record, tag: str, media_type: str = MANIFEST, artifact_type: str | None = None) -> bool:
        """Point ``name:tag`` at this record's manifest (index.json and the tags table): a variant's tag, a
        matrix's. The tag moves if another record held it; False if it already named this one."""
        with self._db() as db:
            row = db.execute("SELECT id FROM tags WHERE name = ? AND tag = ?", (rec.name, tag)).fetchone()
        named = {**descriptor(media_type, self.blobs.read(rec.image_digest)),
                 **({"artifactType": artifact_type} if artifact_type else {}),
                 "annotations": {**rec.annotations, REF_NAME: f"{rec.name}:{tag}", RECORD_ANNOTATION: rec.id}}
        self.blobs.add_to_index([named, *self.model_descriptors(rec, tag)])   # idempotent: equal ones are not added twice
        if row is not None and row[0] == rec.id:
            return False
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (rec.name, tag, rec.id))
            self._event(db, rec.id, rec.status, f"tagged {rec.name}:{tag}")
        return True

    def promote(self, rec: Record, tag: str, *, accept_proxy_eval: bool = False) -> Record:
        """Give a validated artifact another tag (e.g. prod); the tag moves if another artifact held it. A
        proxy-validated one only with ``accept_proxy_eval`` (recorded on the record and in its history)."""
        if rec.kind == "matrix":
            raise UsageError(f"{rec.name}:{rec.tag} is a variant matrix, which no runtime can run",
                             hint="Promote the variant to deploy (`forge registry select` names it).")
        proxy = rec.status == PROXY or rec.accepted_proxy_eval
        if rec.status == PROXY and not accept_proxy_eval:
            raise UsageError(f"{rec.name} {rec.short()} is {PROXY}: {rec.reason}", hint=PROXY_HINT)
        if rec.status not in PROMOTABLE and rec.status != PROXY:
            why = f": {rec.reason}" if rec.reason else ""
            raise UsageError(f"{rec.name} {rec.short()} is {rec.status}{why}; only a validated artifact can be promoted",
                             hint="Fix what stopped it and build again; `forge registry show` has its evidence.")
        if not _TAG.match(tag):
            raise UsageError(f"--to {tag!r} is not a valid tag", hint="Tags are [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.")
        self.blobs.add_to_index([{**descriptor(MANIFEST, self.blobs.read(rec.image_digest)),
                                  "annotations": {REF_NAME: f"{rec.name}:{tag}", RECORD_ANNOTATION: rec.id}},
                                 *self.model_descriptors(rec, tag)])
        updated = rec.model_copy(update={"status": "promoted", "accepted_proxy_eval": proxy,
                                         "promoted_tags": tuple(sorted({*rec.promoted_tags, tag}))})
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (rec.name, tag, rec.id))
            db.execute("UPDATE artifacts SET status = ?, record = ? WHERE id = ?",
                       (updated.status, updated.model_dump_json(), rec.id))
            self._event(db, rec.id, "promoted", f"tagged {rec.name}:{tag}" +
                        (" (--accept-proxy-eval: gated on a proxy's numbers)" if proxy else ""))
        return updated

    # ------------------------------------------------------------------ reading
    def ls(self, status: str | None = None, name: str | None = None) -> list[Record]:
        q, args = "SELECT record FROM artifacts WHERE 1=1", []
        if status:
            q, args = q + " AND status = ?", [*args, status]
        if name:
            q, args = q + " AND name = ?", [*args, name]
        with self._db() as db:
            return [Record.model_validate_json(r[0]) for r in db.execute(q + " ORDER BY created_at DESC, id", args)]

    def events(self, rec: Record) -> list[tuple[str, str, str]]:
        with self._db() as db:
            return list(db.execute("SELECT at, status, detail FROM events WHERE id = ? ORDER BY seq", (rec.id,)))

    def resolve(self, ref: str) -> Record:
        """NAME, NAME:TAG, NAME@sha256:…, sha256:… (image digest) or a record-id prefix (6+ hex)."""
        with self._db() as db:
            rows: list = []
            name, _, digest = ref.partition("@")
            if digest or ref.startswith("sha256:"):
                digest = digest or ref
                rows = db.execute("SELECT record FROM artifacts WHERE image_digest = ? AND (? = '' OR name = ?) "
                                  "ORDER BY created_at DESC", (digest, name if digest != ref else "",
                                                               name if digest != ref else "")).fetchall()
            elif ":" in ref:
                name, _, tag = ref.partition(":")
                rows = db.execute("SELECT a.record FROM tags t JOIN artifacts a ON a.id = t.id "
                                  "WHERE t.name = ? AND t.tag = ?", (name, tag)).fetchall()
            else:
                rows = db.execute("SELECT record FROM artifacts WHERE name = ? AND "   # a matrix is not an image
                                  "json_extract(record, '$.kind') IS NOT 'matrix' ORDER BY created_at DESC",
                                  (ref,)).fetchall()[:1]
                if not rows and re.fullmatch(r"[0-9a-f]{6,64}", ref):
                    rows = db.execute("SELECT record FROM artifacts WHERE id LIKE ?", (ref + "%",)).fetchall()
                    if len(rows) > 1:
                        raise UsageError(f"{ref!r} matches {len(rows)} artifacts", hint="Give more of the id.")
        if not rows:
            raise UsageError(f"no artifact {ref!r} in the registry at {self.root}",
                             hint="`forge registry ls` lists what is recorded.")
        return Record.model_validate_json(rows[0][0])

    def verify(self, rec: Record) -> list[tuple[str, str, str]]:
        """Re-hash every blob of the image and of every piece of evidence, check every digest the record names
        (eval verdict, scan verdict, SBOM, provenance) is among its evidence, and re-derive the status from the
        stored evidence (``forge.registry.evidence``): (digest, role, problem) for each thing that does not hold."""
        problems = []
        checks: list[tuple[str, str]] = []
        if rec.image_digest:
            if (p := self.blobs.verify(rec.image_digest)) is not None:
                return [(rec.image_digest, f"{rec.kind} manifest", p)]
            images = [rec.image_digest]
            if rec.kind == "matrix":   # the index, then every variant image it lists
                images = [d["digest"] for d in json.loads(self.blobs.read(rec.image_digest))["manifests"]]
                checks += [(d, f"variant {d[7:19]} manifest") for d in images]
            for image in images:
                if self.blobs.verify(image) is None:
                    checks += [(d, f"image {role}") for d, role in self.blobs.image_blobs(image)][1:]
        problems += self._model_problems(rec, checks)
        for ev in rec.evidence:
            checks.append((ev.manifest_digest, f"{ev.kind} manifest"))
            checks += [(d, f"{ev.kind} {name}") for name, d in ev.files.items()]
        for digest, role in checks:
            if (p := self.blobs.verify(digest)) is not None:
                problems.append((digest, role, p))
        # every digest the record names is among its evidence files (the blobs re-hashed above)
        recorded = {"eval-verdict": rec.eval_digest, "scan-report": rec.scan_digest, "sbom": rec.sbom_digest,
                    "provenance": rec.provenance_digest}
        kinds = {ev.kind: ev for ev in rec.evidence}
        if "recipe" in kinds:   # records from before forge kept the recipe have none; one that has it must match
            recorded["recipe"] = rec.recipe_digest
        for kind, want in recorded.items():
            if want and (kind not in kinds or want not in kinds[kind].files.values()):
                problems.append((want, kind, "the record's digest is not among the evidence files"))
        if rec.kind != "matrix":
            problems += self._status_problems(rec)
        return problems

    def _model_problems(self, rec: Record, checks: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """container.weights: image: the model image and ModelPack manifests are here and whole (their blobs are
        added to ``checks``), and the ModelPack's layers are the model image's, by digest (no byte stored twice)."""
        if rec.weights == "image" and not (rec.model_image_digest and rec.modelpack_digest):
            return [(rec.id, "model image", "the record says its weights are a model image but names no model "
                                            "image and ModelPack digest")]
        problems, layers = [], {}
        for role, digest in model_images(rec).items():
            if (p := self.blobs.verify(digest)) is not None:
                problems.append((digest, f"{role} manifest", p))
                continue
            blobs = list(self.blobs.image_blobs(digest))[1:]
            checks += [(d, f"{role} {what}") for d, what in (blobs if role == "model image" else blobs[:1])]  # the
            layers[role] = [la["digest"] for la in json.loads(self.blobs.read(digest)).get("layers", [])]  # shards once
        if len(layers) == 2 and layers["model image"] != layers["modelpack"]:
            problems.append((rec.modelpack_digest, "modelpack manifest", "its layers are not the model image's"))
        return problems

    def _status_problems(self, rec: Record) -> list[tuple[str, str, str]]:
        """Re-derive the status from the stored evidence (``forge.registry.evidence.derive``, as publish did):
        a status, or a record of how it was derived, that the evidence does not support is a problem."""
        names = {"eval-verdict": GATE_FILE, "scan-report": SCAN_FILE, "provenance": PROVENANCE_FILE}
        found: dict[str, tuple[str, bytes]] = {}
        for ev in rec.evidence:
            if ev.kind not in names:
                continue
            digest = ev.files.get(names[ev.kind])
            if digest is None or not self.blobs.has(digest):
                return [(digest or ev.manifest_digest, f"{ev.kind} {names[ev.kind]}",
                         "missing: the status cannot be re-derived")]
            found[ev.kind] = (digest, self.blobs.read(digest))
        if "provenance" not in found:
            return [(rec.id, "provenance", "the record has no provenance: its status cannot be re-derived")]
        files = {k: f"{k} {names[k]} (blob {d})" for k, (d, _) in found.items()}
        try:
            derived = derive(gate=found["eval-verdict"][1] if "eval-verdict" in found else None,
                             scan=found["scan-report"][1] if "scan-report" in found else None,
                             provenance=found["provenance"][1], image_digest=rec.image_digest,
                             ships=(rec.engine, rec.target_gpu), where=files.get, also=model_images(rec))
        except EvidenceError as e:
            return [(rec.id, "status", e.message)]
        problems = []
        promoted_as = ("validated", PROXY) if rec.accepted_proxy_eval else ("validated",)
        if not (derived.status == rec.status or (rec.status == "promoted" and derived.status in promoted_as)):
            negative = {"eval-verdict": derived.eval_verdict in ("fail", "ungated"),
                        "scan-report": derived.scan_verdict in ("fail", "unscanned"),
                        "provenance": derived.evidence["provenance"]["said"] not in ("names the image", "no image to name")}
            decisive = next((k for k in negative if k in found and negative[k]), None) or \
                next(k for k in ("eval-verdict", "scan-report", "provenance") if k in found)
            said = f" ({derived.reason})" if derived.reason else ""
            problems.append((found[decisive][0], f"status ({files[decisive]})",
                             f"recorded as {rec.status}, but the evidence says {derived.status}{said}"))
        if rec.status_evidence and _said(rec.status_evidence) != _said(derived.evidence):
            problems.append((rec.id, "status_evidence", "the record's account of how its status was derived does "
                                                        "not match its evidence"))
        return problems

    def referrers(self, rec: Record) -> list[dict]:
        """Descriptors of the artifacts in the layout whose ``subject`` is this record's image."""
        if not rec.image_digest:
            return []
        out = []
        for d in self.blobs.index()["manifests"]:
            if d.get("artifactType") and self.blobs.has(d["digest"]):
                m = json.loads(self.blobs.read(d["digest"]))
                if m.get("subject", {}).get("digest") == rec.image_digest:
                    out.append({k: d[k] for k in ("mediaType", "digest", "size", "artifactType")} |
                               {"annotations": m.get("annotations", {})})
        return out

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = connect(self.root / "index.sqlite")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @staticmethod
    def _event(db: sqlite3.Connection, rid: str, status: str, detail: str) -> None:
        db.execute("INSERT INTO events (id, at, status, detail) VALUES (?, ?, ?, ?)",
                   (rid, datetime.now(timezone.utc).isoformat(timespec="seconds"), status, detail))


def _said(evidence: dict) -> dict:
    """What a status_evidence says, without its wording: each piece's digest and verdict, and the image."""
    return {"image": evidence.get("image"), **{k: (v.get("digest"), v.get("said")) for k, v in evidence.items()
                                               if isinstance(v, dict)}}


__all__ = ["LocalRegistry", "default_registry_dir", "sha256_bytes"]
