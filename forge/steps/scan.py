"""scan: OCI image -> Trivy JSON report, CycloneDX SBOM, forge's verdict (verdict.json + summary.md).

The policy is forge's (``forge.scanpolicy``), decided on the full report. The step joins the build
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

from forge import trivy
from forge.scanpolicy import IgnoreEntry, Verdict, judge, load_ignore_file, markdown

REPORT, SBOM, VERDICT, SUMMARY = "trivy-report.json", "sbom.cdx.json", "verdict.json", "summary.md"


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


def write_verdict(report, out: Path, policy: Policy, info: dict) -> Verdict:
    verdict = judge(report, fail_on=policy.fail_on, ignore_unfixed=policy.ignore_unfixed,
                    ignores=list(policy.ignores), trivy_info=info)
    (out / VERDICT).write_text(json.dumps(verdict.to_json(), indent=2, default=str))
    (out / SUMMARY).write_text(markdown(verdict))
    return verdict
