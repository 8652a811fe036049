"""A record's status as a function of its evidence: one derivation, used by publish and by ``registry verify``.

    validated = at least one gated rule ran and every rule passed on finite numbers (the eval verdict,
                re-judged), the candidate was evaluated on the engine and GPU the image ships for (the
                verdict's evaluated_on), the scan passed (the scan verdict), and the provenance names the image.
    proxy-validated = all of that, but the candidate's numbers came from another engine or device (a vLLM L4
                image gated by transformers on a CPU): a proxy's verdict, which promote and deploy refuse
                unless told --accept-proxy-eval.

``derive`` reads the evidence *bytes* (publish: the step outputs, each checked against its step manifest;
verify: the blobs the record names, each checked against its digest) and returns the status, its reason,
and ``status_evidence``: which file, by digest, said what. The record stores that, so anyone holding the
blobs can re-derive the status; verify does, and a status the evidence does not support is a mismatch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from forge.core.errors import EvidenceError
from forge.oci.layout import sha256_bytes
from forge.evaluation.gatestats import parse_verdict, rejudge
from forge.gpu.catalog import gpus as catalog
from forge.steps.scan import read_verdict

__all__ = ["Derived", "derive", "decide", "proxy_reason", "through_image", "RULE", "PROXY", "GATE_FILE", "SCAN_FILE",
           "PROVENANCE_FILE"]

GATE_FILE = "verdict.json"                 # forge.steps.gate.VERDICT, in the eval-verdict evidence
SCAN_FILE = "verdict.json"                 # forge.steps.scan.VERDICT, in the scan-report evidence
PROVENANCE_FILE = "provenance.intoto.json"
RULE = ("validated: at least one gated rule ran and every rule passed on finite numbers (eval verdict, "
        "re-judged) for a candidate evaluated on the engine and GPU the image ships for (else proxy-validated), "
        "the scan passed (scan verdict), and the provenance names the image")
PROXY = "proxy-validated"
# whose numerics each serving engine's scores are: the CPU image serves with transformers, like lm-eval's hf backend
NUMERICS_OF_ENGINE = {"cpu": "transformers"}


@dataclass(frozen=True)
class Derived:
    status: str
    reason: str
    eval_verdict: str       # pass | fail | ungated | none
    scan_verdict: str       # pass | fail | unscanned | none
    evidence: dict          # status_evidence: the rule, and per piece of evidence its file, digest and what it said


def derive(*, gate: bytes | None, scan: bytes | None, provenance: bytes, image_digest: str | None,
           ships: tuple[str | None, str | None] = (None, None),
           where: Callable[[str], str] = lambda kind: kind, also: dict[str, str] | None = None) -> Derived:
    """The status the evidence supports. ``gate``/``scan``: the eval and scan verdict files' bytes (None: the
    build has no such step); ``ships``: (engine, target GPU) of the image, as the record names them; ``also``:
    {role: digest} the provenance must name besides the image (container.weights: image: the model image and its
    ModelPack manifest);
    ``where(kind)`` names a piece in an error. Raises EvidenceError (exit 5) for a verdict or provenance that
    cannot be read as one."""
    evidence: dict = {"rule": RULE, "image": image_digest}
    gate_said = scan_said = None
    if gate is not None:
        judged = rejudge(parse_verdict(gate, where("eval-verdict")))
        gate_said = {"rules": judged.rules, "passed": judged.passed, "failed": list(judged.failed)}
        on = _candidate_evaluated_on(gate)
        proxy = proxy_reason(on, *ships, image=image_digest) if image_digest is not None else None
        evidence["eval-verdict"] = {"file": GATE_FILE, "digest": sha256_bytes(gate), **gate_said,
                                    "said": _gate_word(gate_said), "evaluated_on": on,
                                    "ships": {"engine": ships[0], "gpu": ships[1]}, "proxy": proxy,
                                    "through_image": through_image(on, image_digest)}
    if scan is not None:
        scan_said = read_verdict(scan, where("scan-report"))
        evidence["scan-report"] = {"file": SCAN_FILE, "digest": sha256_bytes(scan), **scan_said,
                                   "said": _scan_word(scan_said)}
    subject, problem = _subject(provenance, image_digest, where("provenance"), also or {})
    evidence["provenance"] = {"file": PROVENANCE_FILE, "digest": sha256_bytes(provenance), "subject": subject,
                              "said": problem or ("names the image" if image_digest else "no image to name")}
    status, reason = decide(gate_said, scan_said, image_digest is not None, problem)
    if status == "validated" and evidence["eval-verdict"]["proxy"]:
        status, reason = PROXY, (f"gated on a proxy: {evidence['eval-verdict']['proxy']}; its numbers are not the "
                                 "shipped engine's (promote and deploy need --accept-proxy-eval)")
    return Derived(status, reason, "none" if gate_said is None else _gate_word(gate_said),
                   "none" if scan_said is None else _scan_word(scan_said), evidence)


def decide(gate: dict | None, scan: dict | None, has_image: bool, provenance_problem: str | None = None
           ) -> tuple[str, str]:
    """(status, reason) from what the eval verdict (``{rules, passed, failed}``) and the scan verdict
    (``{status, passed, summary, reason}``) say; None: the build has no such step."""
    ungated = gate is not None and not gate.get("rules")
    if gate is not None and not ungated and gate.get("passed") is not True:
        failed = "; ".join(gate.get("failed") or []) or "see the gate summary"
        return "rejected", f"eval gate failed: {failed}"
    if scan is not None and scan.get("status") != "unscanned" and scan.get("passed") is not True:
        summary = str(scan.get("summary") or "see the scan summary")   # the scan's own words: "failed: 3 …"
        return "rejected", "scan gate " + (summary if summary.startswith("failed") else f"failed: {summary}")
    if provenance_problem:
        return "rejected", f"provenance: {provenance_problem}"
    nothing_gated = "eval.gate has no rules: nothing was gated, so the artifact is never validated"
    if not has_image:
        if ungated:
            return "ungated", nothing_gated + "; the recipe has no container section: no image to ship"
        return ("gated" if gate is not None else "built"), "the recipe has no container section: no image to ship"
    if ungated:
        return "ungated", nothing_gated
    if scan is None or scan.get("status") == "unscanned":
        return "unscanned", (scan or {}).get("reason") or "the image was not scanned"
    if gate is None:
        return "scanned", "the recipe has no eval gate; only a gated and scanned image is validated"
    return "validated", ""


def through_image(evaluated_on: dict | None, image: str | None) -> bool:
    """Whether the candidate's numbers came from this very image, served (eval.candidate: image), by digest."""
    through = evaluated_on.get("through") if isinstance(evaluated_on, dict) else None
    return isinstance(through, dict) and through.get("kind") == "image" and image is not None \
        and through.get("image") == image


def proxy_reason(evaluated_on: dict | None, engine: str | None, gpu: str | None, *, image: str | None = None
                 ) -> str | None:
    """Why the candidate's scores are not the shipped engine's on the shipped GPU; None when they are. Fails closed:
    a verdict that does not say where the candidate ran, or an image whose engine or GPU is not known, is a proxy;
    so is a candidate served from another image than ``image``, the one the record ships."""
    if not isinstance(evaluated_on, dict) or not evaluated_on.get("engine"):
        return "the verdict does not say where the candidate was evaluated"
    through = evaluated_on.get("through")
    if isinstance(through, dict) and through.get("kind") == "image" and image is not None \
            and through.get("image") != image:
        return f"evaluated through the image {through.get('image')}; the record ships {image}"
    ran, device = evaluated_on["engine"], evaluated_on.get("device")
    gpus = [g for g in evaluated_on.get("gpus") or [] if isinstance(g, str)]
    said = f"evaluated with {ran} ({evaluated_on.get('backend')}) on {', '.join(gpus) or device}; the image serves " \
           f"{engine} on {gpu}"
    if engine is None or gpu is None or ran != NUMERICS_OF_ENGINE.get(engine, engine):
        return said
    if gpu in catalog() and catalog()[gpu].is_cpu:
        return None if device == "cpu" else said
    names = catalog()[gpu].smi if gpu in catalog() else ()
    return None if device == "cuda" and any(g in names for g in gpus) else said


def _candidate_evaluated_on(gate: bytes) -> dict | None:
    try:
        on = json.loads(gate).get("evaluated_on")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return on.get("candidate") if isinstance(on, dict) and isinstance(on.get("candidate"), dict) else None


def _gate_word(said: dict) -> str:
    return "ungated" if not said["rules"] else ("pass" if said["passed"] else "fail")


def _scan_word(said: dict) -> str:
    return "unscanned" if said["status"] == "unscanned" else ("pass" if said["passed"] else "fail")


def _subject(provenance: bytes, image_digest: str | None, where: str,
             also: dict[str, str]) -> tuple[str | None, str | None]:
    """(the digest the provenance's first subject names, why it does not name the image and every digest of
    ``also``, or None when it does)."""
    try:
        statement = json.loads(provenance)
        named = ["sha256:" + s["digest"]["sha256"] for s in statement["subject"]]
        digest = named[0]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise EvidenceError(f"{where} is not an in-toto statement naming a subject by sha256",
                            hint="Publish the build again; the provenance is written by forge.") from None
    if image_digest is not None and digest != image_digest:
        return digest, f"it names {digest}, not the image {image_digest}"
    if missing := [f"the {role} {d}" for role, d in also.items() if d not in named]:
        return digest, f"it does not name {', '.join(missing)}"
    return digest, None
