"""scan: OCI image -> Trivy JSON report, CycloneDX SBOM, forge's verdict (verdict.json + summary.md).

Which scanners run on what: the serving image gets vuln + secret (+ misconfig when asked) and the SBOM; with
``container.weights: image`` the model image (weights, config, tokenizer: no packages) gets the secret scanner
only, its report beside the other (trivy-model-secrets.json), and verdict.json's ``model_image`` says so.

The policy is forge's (``forge.image.scanpolicy``), decided on the full report. The step joins the build
graph once the package step produces an image; until then ``forge scan`` runs it on any OCI layout
directory or docker-archive tar, or judges an existing Trivy report.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from forge.image import trivy
from forge.image.scanpolicy import IgnoreEntry, Verdict, add_model_image, judge, load_ignore_file, markdown
from forge.steps import StepContext, StepSpec, package, probe
from forge.core.errors import EvidenceError, ScanGateError
from forge.store.local import read_committed

REPORT, SBOM, VERDICT, SUMMARY = "trivy-report.json", "sbom.cdx.json", "verdict.json", "summary.md"
MODEL_REPORT = "trivy-model-secrets.json"   # container.weights: image: the model image's secrets-only report


def _config(loaded) -> dict:
    s = loaded.recipe.scan
    return {k: v for k, v in s.model_dump(mode="json").items() if k != "ignore_file"}


def _data(loaded) -> dict[str, Path]:
    s = loaded.recipe.scan
    return {"ignore_file": loaded.resolve_path(s.ignore_file)} if s.ignore_file else {}


def _identity(loaded) -> dict:
    """Trivy's version and its DB's UpdatedAt: a newer DB can find new vulnerabilities in the same image."""
    import shutil

    if shutil.which("trivy") is None:
        return {"trivy": "absent"}
    return {"trivy": probe("`trivy version` (its DB date is key material)", lambda: trivy.version(options_from_recipe(loaded)))}


SPEC = StepSpec(
    name="scan", summary="Trivy scan of the image under forge's policy (SBOM, verdict)",
    depends=("package",), tools=(), version=1, config=_config, data=_data, identity=_identity,
    enabled=lambda loaded: loaded.recipe.container is not None,
    run="forge.steps.scan:run", check="forge.steps.scan:check")


def run(ctx: StepContext) -> dict:
    import shutil

    loaded = ctx.recipe
    if shutil.which("trivy") is None:
        if loaded.recipe.scan.required:
            trivy.find_trivy()  # raises ToolError (exit 5) with the install hint
        status = {"status": "unscanned", "passed": None,
                  "reason": "trivy is not on PATH and the recipe sets scan.required: false"}
        (ctx.out / VERDICT).write_text(json.dumps(status, indent=2) + "\n")
        (ctx.out / SUMMARY).write_text("### ⚠️ Not scanned\n\nTrivy is not on PATH and the recipe sets "
                                       "`scan.required: false`: this artifact is unscanned and can never be validated.\n")
        return status
    ctx.report("trivy image --input (OCI layout)")
    opts = options_from_recipe(loaded)
    info = trivy.version(opts)
    image = package.Output.read(ctx.upstream["package"])
    report = trivy.scan_image(image.oci_dir, ctx.out / REPORT, ctx.out / SBOM, opts)
    model = None
    if image.weights == "image":   # the serving image above; the model image for secrets only
        ctx.report("trivy image --scanners secret --input (the model image)")
        model = trivy.scan_secrets(image.model_oci_dir, ctx.out / MODEL_REPORT, opts)
    verdict = write_verdict(report, ctx.out, Policy.from_recipe(loaded), info, model=model,
                            scanners=trivy.image_scanners(opts))
    return {"status": "scanned", "passed": verdict.passed, "summary": verdict.summary, "trivy": info,
            "expired_ignores": verdict.expired_ignores}


def check(entry) -> None:
    out = Output.read(entry)
    if out.passed is False:
        raise ScanGateError(f"scan gate {out.summary}", hint=f"Findings that decided it: {out.summary_md}")


@dataclass(frozen=True)
class Output:
    """The scan's verdict and evidence files as the registry and the pipeline read them: decided from
    verdict.json itself (``read_verdict``), checked against the digest the step manifest recorded."""
    status: str                       # "scanned" or "unscanned"
    passed: bool | None               # None: unscanned
    summary: str | None               # the verdict in the scan's words ("failed: 2 HIGH …")
    reason: str | None                # why unscanned
    verdict: Path                     # verdict.json (evidence)
    summary_md: Path
    report: Path | None               # the Trivy JSON report (scanned only)
    sbom: Path | None                 # CycloneDX SBOM (scanned only)
    data: bytes = b""                 # verdict.json's bytes, as checked against the step manifest

    @classmethod
    def read(cls, entry) -> "Output":
        out = entry.out
        data = read_committed(entry, VERDICT)
        said = read_verdict(data, str(out / VERDICT))
        return cls(said["status"], said["passed"], said["summary"], said["reason"], out / VERDICT, out / SUMMARY,
                   out / REPORT if (out / REPORT).exists() else None, out / SBOM if (out / SBOM).exists() else None,
                   data)

    def facts(self) -> dict:
        return {"status": self.status, "passed": self.passed, "summary": self.summary, "reason": self.reason}


def read_verdict(data: bytes, where: str) -> dict:
    """What a scan verdict.json says: {status, passed, summary, reason}. Fail closed: a scanned verdict passes
    only when it says ``passed: true`` and lists no blocking finding; one that is empty, not JSON, or says
    neither ``unscanned`` nor a pass/fail is an EvidenceError (exit 5) naming ``where``."""
    hint = "Rebuild the scan (forge build RECIPE --force scan); a scan verdict is never guessed."
    try:
        v = json.loads(data) if data.strip() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise EvidenceError(f"{where} is not JSON ({e}): there is no scan verdict to decide from", hint=hint) from None
    if not isinstance(v, dict):
        raise EvidenceError(f"{where} is {'empty' if not data.strip() else 'not a scan verdict'}: there is no scan "
                            "verdict to decide from", hint=hint)
    if v.get("status") == "unscanned":
        return {"status": "unscanned", "passed": None, "summary": v.get("summary"),
                "reason": str(v.get("reason") or "the image was not scanned")}
    if not isinstance(v.get("passed"), bool) or not isinstance(v.get("blocking", []), list):
        raise EvidenceError(f"{where} says neither that the image was unscanned nor whether it passed", hint=hint)
    blocking = v.get("blocking", [])
    summary = str(v.get("summary") or "")
    if v["passed"] and blocking:
        summary = f"failed: the verdict says passed, yet lists {len(blocking)} blocking finding(s)"
    said = {"status": "scanned", "passed": v["passed"] and not blocking, "summary": summary or None, "reason": None}
    if isinstance(v.get("model_image"), dict):   # container.weights: image: which scanners ran on which image
        said["scanners"] = v["model_image"].get("scanners")
    return said


@dataclass(frozen=True)
class Policy:
    fail_on: tuple[str, ...] = ("CRITICAL", "HIGH")
    ignore_unfixed: bool = True
    ignores: tuple[IgnoreEntry, ...] = ()

    @classmethod
    def from_recipe(cls, loaded) -> "Policy":
        s = loaded.recipe.scan
        ignores = tuple(load_ignore_file(loaded.resolve_path(s.ignore_file))) if s.ignore_file else ()
        return cls(fail_on=s.fail_on, ignore_unfixed=s.ignore_unfixed, ignores=ignores)


def options_from_recipe(loaded) -> trivy.TrivyOptions:
    t = loaded.recipe.scan.trivy
    return trivy.TrivyOptions(**t.model_dump())


@contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """Write into a sibling temp dir; replace out only when everything was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def scan(image_input: Path, out: Path, policy: Policy, opts: trivy.TrivyOptions) -> Verdict:
    """Run Trivy on an image and judge it; writes the report, SBOM, verdict and summary into out."""
    info = trivy.version(opts)
    with _atomic_dir(out) as tmp:
        report = trivy.scan_image(image_input, tmp / REPORT, tmp / SBOM, opts)
        verdict = write_verdict(report, tmp, policy, info)
    return verdict


def judge_report(report_path: Path, out: Path, policy: Policy) -> Verdict:
    """Judge an existing Trivy JSON report (for pipelines that run Trivy themselves)."""
    report = trivy.parse_report(report_path.read_bytes(), source=str(report_path))
    with _atomic_dir(out) as tmp:
        verdict = write_verdict(report, tmp, policy, {"version": report.trivy.version if report.trivy else None})
    return verdict


def write_verdict(report, out: Path, policy: Policy, info: dict, *, model=None, scanners: tuple[str, ...] = ()) -> Verdict:
    """Judge the serving image's report (and, ``model``, join the model image's secrets-only report to it)."""
    verdict = judge(report, fail_on=policy.fail_on, ignore_unfixed=policy.ignore_unfixed,
                    ignores=list(policy.ignores), trivy_info=info)
    if model is not None:
        verdict = add_model_image(verdict, model, scanners)
    (out / VERDICT).write_text(json.dumps(verdict.to_json(), indent=2, default=str))
    (out / SUMMARY).write_text(markdown(verdict))
    return verdict
