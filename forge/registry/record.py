"""What the registry records about one build: the artifact record, its status, and its evidence.

``collect`` reads finished step outputs (never re-runs anything) and derives the status from the
evidence files (``forge.registry.evidence.derive``, the same function ``registry verify`` re-runs):

    built → gated → scanned → validated → promoted      (or rejected, with its reason; unscanned; ungated)

Only a build whose eval gate ran at least one rule and passed every one *and* whose image passed the
scan gate, with provenance naming that image, is ``validated``; a recipe without an eval section stops at
``scanned``, one whose eval has no gate rules is ``ungated``, one that allowed a missing Trivy is
``unscanned``; none of them can be promoted. The record keeps ``status_evidence``: which files, by
digest, said what.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from forge import __version__
from forge.core.digests import digest_of
from forge.core.errors import EvidenceError
from forge.oci.layout import sha256_bytes, sha256_file
from forge.registry import annotate
from forge.registry.evidence import derive
from forge.steps import gate as gate_step, package as package_step, scan as scan_step

Status = Literal["built", "gated", "scanned", "validated", "proxy-validated", "promoted", "rejected", "unscanned",
                 "ungated"]
STATUSES: tuple[str, ...] = ("built", "gated", "scanned", "validated", "proxy-validated", "promoted", "rejected",
                             "unscanned", "ungated")
PROMOTABLE = ("validated", "promoted")
PROXY = "proxy-validated"   # every gate passed, but the candidate was evaluated on another engine or device
PROXY_HINT = ("Evaluate the candidate where the image runs (eval.backend: vllm on the target GPU), or pass "
              "--accept-proxy-eval to ship what a proxy's numbers gated.")

# artifactType of each kind of evidence attached to the image (and the media type of its files)
EVIDENCE_TYPES = {
    "eval-verdict": "application/vnd.forge.eval.verdict.v1+json",
    "scan-report": "application/vnd.forge.scan.report.v1+json",
    "sbom": "application/vnd.cyclonedx+json",
    "provenance": "application/vnd.in-toto+json",
    "report": "application/vnd.forge.report.v1+html",   # the HTML build report (forge.report)
    "auto-decision": "application/vnd.forge.auto.decision.v1+json",   # method: auto's trials (forge.orchestrate.auto)
    "recipe": "application/vnd.forge.recipe.v1+yaml",   # the recipe file's bytes (digest = the record's recipe_digest)
    "record": "application/vnd.forge.record.v1+json",   # the record itself, attached when pushed (forge.registry.remote)
}


class Evidence(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: str
    artifact_type: str
    manifest_digest: str = ""
    files: dict[str, str]          # file name -> blob digest


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    name: str
    tag: str | None                # None: nothing promotable (rejected, or no image)
    status: Status
    reason: str = ""
    image_digest: str | None
    image_size: int | None = None
    recipe_digest: str
    recipe_path: str
    model_source: str
    model_digest: str | None
    method: str
    target_gpu: str
    engine: str | None
    engine_version: str | None
    eval_verdict: str              # pass | fail | ungated | none
    eval_digest: str | None
    scan_verdict: str              # pass | fail | unscanned | none
    scan_digest: str | None
    sbom_digest: str | None
    provenance_digest: str | None = None
    status_evidence: dict = {}     # how the status was derived (forge.registry.evidence): files by digest, what each said
    tool_versions: dict[str, str]
    created_at: str
    forge_version: str = __version__
    evidence: tuple[Evidence, ...] = ()
    remote: str | None = None      # oci://host/repo@digest when pushed
    promoted_tags: tuple[str, ...] = ()
    accepted_proxy_eval: bool = False   # promoted although proxy-validated: someone said --accept-proxy-eval
    smoke_test: str | None = None  # passed | failed | "not smoke-tested: no L4 here" (why) | None: no image
    kind: Literal["image", "matrix"] = "image"   # matrix: a variant matrix (forge/registry/matrix.py), not runnable
    variant: str | None = None     # the recipe variant this image is (tagged <name>:<variant>), None for a plain recipe
    annotations: dict[str, str] = {}   # dev.forge.* (forge/registry/annotate.py): variants and matrices only
    weights: Literal["baked", "image"] = "baked"   # image: the weights are the model image, not in image_digest
    model_image_digest: str | None = None   # the model image (/models, one layer per shard), tagged <tag>-model
    modelpack_digest: str | None = None     # the ModelPack manifest over the model image's blobs

    def short(self) -> str:
        return self.id[:12]

    @property
    def eval_proxy(self) -> str | None:
        """Why the gate's numbers are a proxy's (another engine or device than the image ships for); None when the
        candidate was evaluated on the shipped engine and GPU, or nothing was gated."""
        return ((self.status_evidence or {}).get("eval-verdict") or {}).get("proxy")


@dataclass(frozen=True)
class EvidenceFiles:
    kind: str
    files: tuple[Path, ...]
    contents: tuple[bytes, ...] | None = None   # the files' bytes as the status was derived from them (stored as is)


@dataclass(frozen=True)
class Collected:
    """A record-to-be plus the files it is made from."""
    record: Record
    image_layout: Path | None = None
    evidence: tuple[EvidenceFiles, ...] = field(default=())
    provenance: bytes = b""


def collect(loaded, results: dict, finished_at: datetime | None = None) -> Collected:
    """Build the record for a (possibly stopped) build from its step results, by step name. The verdict files
    are read once, checked against their step manifests (an edited one is an EvidenceError, exit 5), and the
    status is derived from those bytes, which are the ones stored."""
    r = loaded.recipe
    gate_out = gate_step.Output.read(results["gate"].entry) if "gate" in results else None
    scan_out = scan_step.Output.read(results["scan"].entry) if "scan" in results else None
    image = package_step.Output.read(results["package"].entry) if "package" in results else None

    evidence: list[EvidenceFiles] = [_recipe_evidence(loaded)]
    eval_digest = scan_digest = sbom_digest = None
    if gate_out is not None:
        evidence.append(EvidenceFiles("eval-verdict", (gate_out.verdict,), (gate_out.data,)))
        eval_digest = sha256_bytes(gate_out.data)
    if scan_out is not None:
        files = tuple(f for f in (scan_out.report, scan_out.verdict) if f is not None and f.exists())
        evidence.append(EvidenceFiles("scan-report", files, tuple(
            scan_out.data if f == scan_out.verdict else f.read_bytes() for f in files)))
        scan_digest = sha256_bytes(scan_out.data)
        if scan_out.sbom is not None:
            evidence.append(EvidenceFiles("sbom", (scan_out.sbom,)))
            sbom_digest = sha256_file(scan_out.sbom)

    tools: dict[str, str] = {}
    for res in results.values():
        tools.update(res.entry.manifest.get("inputs", {}).get("tools", {}))
    if image is not None and loaded.base is not None and loaded.base.versions:   # what the image serves with
        built = results.get("base_image")
        measured = (built.entry.manifest.get("facts") or {}).get("versions") if built else None
        tools.update({f"image:{d}": v for d, v in (measured or dict(loaded.base.versions)).items()})
    quantize = results.get("quantize")
    model_digest = quantize.output_digest if quantize else None
    image_digest = image.manifest_digest if image else None
    ident = {"recipe": loaded.digest, "image": image_digest, "model": model_digest, "eval": eval_digest,
             "scan": scan_digest}
    rid = digest_of(ident).removeprefix("sha256:")
    record = Record(   # status "built" until derived below: the provenance does not depend on it
        id=rid, name=r.name, tag=None, status="built", image_digest=image_digest,
        recipe_digest=loaded.digest, recipe_path=str(loaded.path), model_source=r.model.source,
        model_digest=model_digest, method=r.quantize.method, target_gpu=r.target.gpu,
        engine=image.image.get("engine") if image else None,
        engine_version=loaded.base.engine_version if image and loaded.base else None,
        eval_verdict="none", eval_digest=eval_digest, scan_verdict="none", scan_digest=scan_digest,
        sbom_digest=sbom_digest, tool_versions=dict(sorted(tools.items())), smoke_test=_smoke_test(image),
        created_at=(finished_at or _last_step_finished(results) or datetime.now(timezone.utc)).isoformat(
            timespec="seconds"))
    if (variant := getattr(loaded, "variant", None)) is not None:   # a plain recipe's record stays as it was
        record = record.model_copy(update={"variant": variant, "annotations": annotate.for_variant(
            loaded, results, record.engine)})
    prov = provenance(record, loaded, results)
    where = {"eval-verdict": str(gate_out.verdict) if gate_out else "", "scan-report": str(scan_out.verdict)
             if scan_out else "", "provenance": "the provenance statement"}
    derived = derive(gate=gate_out.data if gate_out else None, scan=scan_out.data if scan_out else None,
                     provenance=prov, image_digest=image_digest, ships=(record.engine, record.target_gpu),
                     where=where.get)
    record = record.model_copy(update={
        "status": derived.status, "reason": derived.reason, "eval_verdict": derived.eval_verdict,
        "scan_verdict": derived.scan_verdict, "status_evidence": derived.evidence,
        "tag": rid[:12] if image_digest and derived.status != "rejected" else None,
        "provenance_digest": sha256_bytes(prov)})
    return Collected(record, image.oci_dir if image else None, tuple(evidence), prov)


def _recipe_evidence(loaded) -> EvidenceFiles:
    """The recipe's bytes, as built: a record deploys from the registry alone (``forge deploy`` on a machine
    without the recipe file reads them from here, checked against the record's recipe digest)."""
    path = Path(loaded.path)
    raw = path.read_bytes()
    if sha256_bytes(raw) != loaded.digest:
        raise EvidenceError(f"{path} changed while it was being built (it hashes to {sha256_bytes(raw)[:19]}…, the "
                            f"build read {loaded.digest[:19]}…)", hint="Build again from an unchanging recipe file.")
    return EvidenceFiles("recipe", (path,), (raw,))


def _last_step_finished(results: dict) -> datetime | None:
    """When the build's last step finished, from the step manifests (started_at + seconds): a rebuild whose steps
    are all reused is the same build, made at the same time, so its record-to-be, provenance and report are the
    same bytes (the report is then not drawn again)."""
    from datetime import timedelta

    ends = []
    for res in results.values():
        m = getattr(getattr(res, "entry", None), "manifest", None) or {}
        try:
            ends.append(datetime.fromisoformat(m["started_at"]) + timedelta(seconds=float(m.get("seconds") or 0)))
        except (KeyError, TypeError, ValueError):
            continue
    return max(ends) if ends else None


def _smoke_test(image) -> str | None:
    """What the package step's smoke test said, as the record keeps it: never passed when it did not run."""
    if image is None:
        return None
    said = image.image.get("smoke_test") or {}
    if said.get("passed") is None:
        return said.get("skipped") or "not smoke-tested"
    return "passed" if said["passed"] else "failed"


def provenance(record: Record, loaded, results: dict) -> bytes:
    """An in-toto Statement v1 with a SLSA v1 provenance predicate (unsigned: sign it downstream)."""
    subject_digest = record.image_digest or record.model_digest or record.recipe_digest
    deps = [{"uri": record.model_source, "digest": {"sha256": _hex(results["resolve"].output_digest)}}] \
        if "resolve" in results else []
    if "base_image" in results:
        deps.append({"uri": "forge-base", "digest": {"sha256": _hex(results["base_image"].output_digest)}})
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": record.name, "digest": {"sha256": _hex(subject_digest)}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": "https://forge.dev/build/v1",
                "externalParameters": {"recipe": {"path": record.recipe_path, "digest": record.recipe_digest}},
                "internalParameters": {"tool_versions": record.tool_versions},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": f"https://forge.dev/forge@{record.forge_version}"},
                "metadata": {"invocationId": record.id, "finishedOn": record.created_at},
                "byproducts": [{"name": name, "digest": {"sha256": _hex(res.output_digest)}}
                               for name, res in results.items()],
            },
        },
    }
    return json.dumps(statement, sort_keys=True, indent=1).encode()


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


