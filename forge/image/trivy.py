"""Trivy: the CLI invocation and a tolerant parser of its JSON report (SchemaVersion 2).

Trivy's report schema is omitempty throughout: any key may be missing or null and new keys appear
between releases. The parser keeps only what forge's policy needs and ignores the rest.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forge.core.errors import ToolError

INSTALL_HINT = ("Install Trivy (https://trivy.dev: `apt-get install trivy` from Aqua's apt repository, "
                "`brew install trivy`, or the release binary), or set `scan.required: false` to record the "
                "artifact as unscanned (it can then never be validated).")


class _Tolerant(BaseModel):
    # No Python validators on the hot path: a 20,000-finding report must parse in well under a second.
    # Fields are Optional as in Trivy's schema; properties normalise them.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


def _sev(value: str | None) -> str:
    return value.upper() if value else "UNKNOWN"


class _PkgIdentifier(_Tolerant):
    purl: str | None = Field(None, alias="PURL")


class Vulnerability(_Tolerant):
    id_: str | None = Field(None, alias="VulnerabilityID")
    pkg_name_: str | None = Field(None, alias="PkgName")
    pkg_path: str | None = Field(None, alias="PkgPath")
    pkg_identifier: _PkgIdentifier | None = Field(None, alias="PkgIdentifier")
    installed_version_: str | None = Field(None, alias="InstalledVersion")
    fixed_version_: str | None = Field(None, alias="FixedVersion")
    status_: str | None = Field(None, alias="Status")
    severity_: str | None = Field(None, alias="Severity")
    title_: str | None = Field(None, alias="Title")

    id = property(lambda self: self.id_ or "")
    pkg_name = property(lambda self: self.pkg_name_ or "")
    installed_version = property(lambda self: self.installed_version_ or "")
    fixed_version = property(lambda self: self.fixed_version_ or "")
    status = property(lambda self: self.status_ or "")
    severity = property(lambda self: _sev(self.severity_))
    title = property(lambda self: self.title_ or "")
    purl = property(lambda self: self.pkg_identifier.purl if self.pkg_identifier else None)


class Secret(_Tolerant):
    rule_id_: str | None = Field(None, alias="RuleID")
    severity_: str | None = Field(None, alias="Severity")
    title_: str | None = Field(None, alias="Title")
    start_line: int | None = Field(None, alias="StartLine")

    rule_id = property(lambda self: self.rule_id_ or "")
    severity = property(lambda self: _sev(self.severity_))
    title = property(lambda self: self.title_ or "")


class Misconfiguration(_Tolerant):
    id_: str | None = Field(None, alias="ID")
    avd_id: str | None = Field(None, alias="AVDID")
    title_: str | None = Field(None, alias="Title")
    severity_: str | None = Field(None, alias="Severity")
    status_: str | None = Field(None, alias="Status")

    id = property(lambda self: self.id_ or "")
    title = property(lambda self: self.title_ or "")
    severity = property(lambda self: _sev(self.severity_))
    status = property(lambda self: self.status_ or "")


class Result(_Tolerant):
    target_: str | None = Field(None, alias="Target")
    class_: str | None = Field(None, alias="Class")
    type_: str | None = Field(None, alias="Type")
    vulnerabilities_: list[Vulnerability] | None = Field(None, alias="Vulnerabilities")
    secrets_: list[Secret] | None = Field(None, alias="Secrets")
    misconfigurations_: list[Misconfiguration] | None = Field(None, alias="Misconfigurations")

    target = property(lambda self: self.target_ or "")
    vulnerabilities = property(lambda self: self.vulnerabilities_ or [])
    secrets = property(lambda self: self.secrets_ or [])
    misconfigurations = property(lambda self: self.misconfigurations_ or [])


class _TrivyInfo(_Tolerant):
    version: str | None = Field(None, alias="Version")


class Report(_Tolerant):
    schema_version: int | None = Field(None, alias="SchemaVersion")
    trivy: _TrivyInfo | None = Field(None, alias="Trivy")
    created_at: str | None = Field(None, alias="CreatedAt")
    artifact_name: str | None = Field(None, alias="ArtifactName")
    artifact_type: str | None = Field(None, alias="ArtifactType")
    results_: list[Result] | None = Field(None, alias="Results")

    results = property(lambda self: self.results_ or [])


def parse_report(data: bytes | str | dict, *, source: str = "report") -> Report:
    """Parse Trivy JSON; a report that is not Trivy's SchemaVersion 2 is a ToolError naming the source.

    """
    try:
        obj = data if isinstance(data, dict) else json.loads(data)
    except json.JSONDecodeError as e:
        raise ToolError(f"{source}: Trivy's report is not JSON ({e.msg} at line {e.lineno})") from None
    try:
        report = Report.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "model_type" and not first["loc"]:
            raise ToolError(f"{source}: Trivy's report is not a JSON object") from None
        where = ".".join(str(x) for x in first["loc"])
        raise ToolError(f"{source}: Trivy's report has an unexpected shape at {where}: {first['msg']}") from None
    if report.schema_version not in (None, 2):
        raise ToolError(f"{source}: Trivy report SchemaVersion {report.schema_version} is not supported (forge reads 2)",
                        hint="Use a Trivy release from 0.20 on, which writes SchemaVersion 2.")
    return report


# ---------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class TrivyOptions:
    """Air-gapped and DB options, from the recipe (scan.trivy) or the environment (TRIVY_* are read by Trivy)."""

    skip_db_update: bool = False
    offline_scan: bool = False
    cache_dir: str | None = None
    db_repository: str | None = None
    skip_version_check: bool = True
    disable_telemetry: bool = True
    misconfig: bool = False
    timeout: str = "15m"

    def global_flags(self) -> list[str]:
        flags = []
        if self.cache_dir:
            flags += ["--cache-dir", self.cache_dir]
        return flags

    def scan_flags(self) -> list[str]:
        flags = ["--timeout", self.timeout]
        if self.skip_db_update:
            flags.append("--skip-db-update")
        if self.offline_scan:
            flags.append("--offline-scan")
        if self.db_repository:
            flags += ["--db-repository", self.db_repository]
        if self.skip_version_check:
            flags.append("--skip-version-check")
        if self.disable_telemetry:
            flags.append("--disable-telemetry")
        return flags


def find_trivy() -> str:
    path = shutil.which("trivy")
    if path is None:
        raise ToolError("trivy is not on PATH: the scan step cannot run", hint=INSTALL_HINT)
    return path


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ToolError(f"could not run {cmd[0]}: {e}", hint=INSTALL_HINT) from None
    if proc.returncode != 0:
        raise ToolError(f"`trivy {what}` failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}",
                        hint="With no network, pre-load Trivy's DB and set scan.trivy.skip_db_update and offline_scan.")
    return proc


def version(opts: TrivyOptions) -> dict:
    """{"version": ..., "db_updated_at": ...} from `trivy version --format json`."""
    trivy = find_trivy()
    proc = _run([trivy, *opts.global_flags(), "version", "--format", "json"], "version")
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ToolError(f"`trivy version --format json` printed no JSON: {proc.stdout[:200]!r}") from None
    db = info.get("VulnerabilityDB") or {}
    return {"version": info.get("Version"), "db_updated_at": db.get("UpdatedAt"), "db_version": db.get("Version")}


def image_scanners(opts: TrivyOptions) -> tuple[str, ...]:
    """The scanners run on a serving image (a model image: ``scan_secrets``, secrets only)."""
    return ("vuln", "secret", *(("misconfig",) if opts.misconfig else ()))


def scan_secrets(image_input: Path, report_path: Path, opts: TrivyOptions) -> Report:
    """A model image (weights, config, tokenizer: no packages to have vulnerabilities): the secret scanner only."""
    if not image_input.exists():
        raise ToolError(f"image input {image_input} does not exist")
    trivy = find_trivy()
    _run([trivy, *opts.global_flags(), "image", "--input", str(image_input), "--format", "json", "--scanners", "secret",
          *opts.scan_flags(), "--quiet", "--output", str(report_path)], "image")
    return parse_report(report_path.read_bytes(), source=str(report_path))


def scan_image(image_input: Path, report_path: Path, sbom_path: Path, opts: TrivyOptions) -> Report:
    """Scan an OCI layout directory or a docker-archive tar; write the JSON report and a CycloneDX SBOM."""
    if not image_input.exists():
        raise ToolError(f"image input {image_input} does not exist")
    trivy = find_trivy()
    scanners = ",".join(image_scanners(opts))
    # No --severity, --ignore-unfixed or --exit-code: the policy is forge's, decided on the full report.
    _run([trivy, *opts.global_flags(), "image", "--input", str(image_input), "--format", "json", "--list-all-pkgs",
          "--scanners", scanners, *opts.scan_flags(), "--quiet", "--output", str(report_path)], "image")
    report = parse_report(report_path.read_bytes(), source=str(report_path))
    # The SBOM comes from the same scan: `trivy convert` turns a --list-all-pkgs JSON report into CycloneDX.
    _run([trivy, *opts.global_flags(), "convert", "--format", "cyclonedx", "--output", str(sbom_path),
          str(report_path)], "convert")
    return report
