"""Scan policy on Trivy's own golden reports, the ignore file, and the Trivy invocation contract."""
from __future__ import annotations

import copy
import datetime as dt
import json
import os
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.errors import ToolError, UsageError
from forge.scanpolicy import judge, load_ignore_file
from forge.trivy import TrivyOptions, parse_report

FIXTURES = REPO.parent / "shared" / "fixtures" / "trivy"
if not FIXTURES.is_dir():  # CI clones main with shared/ beside it
    FIXTURES = Path(os.environ.get("FORGE_TRIVY_FIXTURES", REPO / "shared" / "fixtures" / "trivy"))
FAKE_BIN = Path(__file__).parent / "fake_bin"

# Severity and status counts of each golden report, read off the reports by hand.
EXPECTED = {
    "alpine-310": ({"MEDIUM": 4}, {"fixed": 4}, 0),
    "alpine-39-high-critical": ({"CRITICAL": 2}, {"fixed": 2}, 0),
    "alpine-39-skip": ({}, {}, 0),
    "alpine-39": ({"MEDIUM": 4, "CRITICAL": 2}, {"fixed": 6}, 0),
    "centos-7-ignore-unfixed": ({"MEDIUM": 1, "LOW": 1}, {"fixed": 2}, 0),
    "centos-7": ({"LOW": 2, "MEDIUM": 1}, {"will_not_fix": 1, "fixed": 2}, 0),
    "debian-stretch": ({"LOW": 1, "MEDIUM": 4}, {"end_of_life": 1, "fixed": 4}, 0),
    "distroless-base": ({"MEDIUM": 2, "LOW": 2}, {"affected": 2, "fixed": 2}, 0),
    "distroless-python27": ({"MEDIUM": 2, "LOW": 2}, {"affected": 2, "fixed": 2}, 0),
    "fluentd-gems": ({"CRITICAL": 1, "HIGH": 1}, {"fixed": 2}, 0),
    "gomod-vex": ({"UNKNOWN": 4}, {"fixed": 4}, 0),
    "photon-30": ({"HIGH": 1, "CRITICAL": 2}, {"fixed": 3}, 0),
    "pip": ({"HIGH": 1, "MEDIUM": 1}, {"fixed": 2}, 0),
    "pylock": ({"HIGH": 1, "MEDIUM": 1}, {"fixed": 2}, 0),
    "secrets": ({}, {}, 2),
    "spring4shell-jre8": ({"LOW": 1}, {"fixed": 1}, 0),
    "ubuntu-1804": ({"LOW": 1, "MEDIUM": 4}, {"affected": 1, "fixed": 4}, 0),
}
ALL = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")


def load(name):
    return parse_report((FIXTURES / f"{name}.json").read_bytes(), source=name)


def vuln_keys(report):
    return {(v.id, v.pkg_name, v.installed_version) for r in report.results for v in r.vulnerabilities}


def blocking_keys(verdict):
    return {(f.id, f.package, f.installed) for f in verdict.blocking}


def test_every_fixture_is_covered():
    assert {p.stem for p in FIXTURES.glob("*.json")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_per_severity_and_status(name):
    severities, statuses, secrets = EXPECTED[name]
    v = judge(load(name), fail_on=ALL, ignore_unfixed=False)
    assert v.counts["vulnerability"] == severities
    assert v.status_counts == statuses
    assert sum(v.counts["secret"].values()) == secrets


def test_alpine39_at_high_critical_equals_trivys_own_filter():
    v = judge(load("alpine-39"), fail_on=("HIGH", "CRITICAL"), ignore_unfixed=False)
    assert blocking_keys(v) == vuln_keys(load("alpine-39-high-critical"))
    assert not v.passed and len(v.blocking) == 2


def test_centos7_ignore_unfixed_equals_trivys_own_filter():
    v = judge(load("centos-7"), fail_on=ALL, ignore_unfixed=True)
    assert blocking_keys(v) == vuln_keys(load("centos-7-ignore-unfixed"))
    assert v.unfixed_dropped == 1


@pytest.mark.parametrize("status", ["affected", "will_not_fix", "fix_deferred", "end_of_life"])
def test_ignore_unfixed_drops_exactly_trivys_statuses(status):
    raw = json.loads((FIXTURES / "alpine-39-high-critical.json").read_text())
    raw["Results"][0]["Vulnerabilities"][0]["Status"] = status
    assert len(judge(parse_report(raw), ignore_unfixed=True).blocking) == 1
    assert len(judge(parse_report(raw), ignore_unfixed=False).blocking) == 2


@pytest.mark.parametrize("fail_on", [(), ("LOW",), ALL])
def test_secrets_fail_whatever_the_severity_settings(fail_on, tmp_path):
    ignore = tmp_path / "ignore.yaml"
    ignore.write_text("secrets:\n  - id: aws-access-key-id\n  - id: mysecret\n")
    v = judge(load("secrets"), fail_on=fail_on, ignore_unfixed=True, ignores=load_ignore_file(ignore))
    assert not v.passed
    assert sorted(f.id for f in v.blocking) == ["aws-access-key-id", "mysecret"]
    assert all(f.kind == "secret" for f in v.blocking)


def test_clean_image_passes():
    v = judge(load("alpine-39-skip"))
    assert v.passed and v.summary.startswith("passed")


def test_python_image_findings():
    v = judge(load("pip"), fail_on=("HIGH",))
    assert [f.kind for f in v.blocking] == ["vulnerability"] and v.blocking[0].severity == "HIGH"


def test_parser_tolerates_nulls_missing_and_unknown_fields():
    raw = json.loads((FIXTURES / "alpine-39.json").read_text())
    mutated = copy.deepcopy(raw)
    mutated["BrandNewTopLevel"] = {"x": 1}
    mutated["Trivy"] = None
    mutated["Results"].append({"Target": None, "Class": "os-pkgs", "Vulnerabilities": None, "Packages": None})
    for v in mutated["Results"][0]["Vulnerabilities"]:
        v["FutureField"] = [1, 2]
        v["PkgIdentifier"] = None
        v["Layer"] = None
        v.pop("Title", None)
        v.pop("Status", None)
        v["FixedVersion"] = None
    mutated["Results"][0]["Vulnerabilities"][0]["Severity"] = None
    report = parse_report(mutated)
    v = judge(report, fail_on=ALL, ignore_unfixed=False)
    assert sum(v.counts["vulnerability"].values()) == 6
    assert v.counts["vulnerability"]["UNKNOWN"] == 1
    assert judge(parse_report({"SchemaVersion": 2}), fail_on=ALL).passed
    with pytest.raises(ToolError, match="SchemaVersion 1 is not supported"):
        parse_report({"SchemaVersion": 1})
    with pytest.raises(ToolError, match="not JSON"):
        parse_report(b"{oops", source="r.json")


def test_ignore_file_ids_paths_purls_and_expiry(tmp_path):
    today = dt.date(2026, 11, 23)
    f = tmp_path / ".trivyignore.yaml"
    f.write_text(
        "vulnerabilities:\n"
        "  - id: CVE-2019-14697\n"
        "    purls: ['pkg:apk/alpine/musl']\n"          # version-less purl: matches musl only
        "    statement: fixed in our next base bump\n"
        "    expired_at: 2027-01-01\n"
        "  - id: CVE-2019-14697\n"
        "    paths: ['nowhere/*']\n"                     # a path that matches nothing
        "  - id: CVE-2000-0001\n"
        "    expired_at: 2026-01-01\n"
        "    statement: long gone\n")
    v = judge(load("alpine-39"), ignores=load_ignore_file(f), today=today)
    assert [(x.package, x.decision) for x in v.ignored] == [("musl", "ignored")]
    assert [(x.package, x.decision) for x in v.blocking] == [("musl-utils", "blocking")]
    assert [e["id"] for e in v.expired_ignores] == ["CVE-2000-0001"]
    # once expired, the musl entry stops ignoring
    v2 = judge(load("alpine-39"), ignores=load_ignore_file(f), today=dt.date(2027, 1, 1))
    assert len(v2.blocking) == 2 and {e["id"] for e in v2.expired_ignores} == {"CVE-2019-14697", "CVE-2000-0001"}


def test_ignore_file_path_glob_matches_lang_package_paths(tmp_path):
    raw = json.loads((FIXTURES / "pip.json").read_text())
    high = next(v for r in raw["Results"] for v in r["Vulnerabilities"] if v["Severity"] == "HIGH")
    high["PkgPath"] = "usr/lib/python3/site-packages/requests-2.0.dist-info/METADATA"
    f = tmp_path / "i.yaml"
    f.write_text(f"vulnerabilities:\n  - id: {high['VulnerabilityID']}\n    paths: ['usr/lib/python3/site-packages/*']\n")
    assert judge(parse_report(raw), ignores=load_ignore_file(f)).passed


def test_ignore_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "i.yaml"
    f.write_text("vulnerabilities:\n  - id: CVE-1\n    expires: 2027-01-01\n")
    with pytest.raises(UsageError, match=r"i.yaml:2: vulnerabilities\[0\]: unknown key\(s\) expires"):
        load_ignore_file(f)
    f.write_text("vulns:\n  - id: CVE-1\n")
    with pytest.raises(UsageError, match="i.yaml:1: vulns: unknown section"):
        load_ignore_file(f)


# ------------------------------------------------------------------ the CLI and the Trivy contract


@pytest.fixture
def oci_layout(tmp_path) -> Path:
    d = tmp_path / "oci"
    (d / "blobs" / "sha256").mkdir(parents=True)
    (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (d / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    return d


def _env(tmp_path, fixture, with_trivy=True):
    path = (f"{FAKE_BIN}:" if with_trivy else "") + "/usr/bin:/bin"
    return {"PATH": path, "FAKE_TRIVY_REPORT": str(FIXTURES / f"{fixture}.json"),
            "FAKE_TRIVY_LOG": str(tmp_path / "trivy.log")}


def _calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / "trivy.log").read_text().splitlines()]


def test_trivy_invocation_contract_with_air_gapped_options(tmp_path, oci_layout, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), scan={
        "fail_on": ["CRITICAL"], "trivy": {"skip_db_update": True, "offline_scan": True,
                                           "cache_dir": "/var/cache/trivy", "db_repository": "mirror.local/trivy-db"}})
    out = tmp_path / "out"
    proc = forge_cli("scan", "--input", str(oci_layout), "--recipe", str(recipe), "--out", str(out),
                     env=_env(tmp_path, "alpine-39-skip"))
    assert proc.returncode == 0, proc.stderr
    version, image, convert = _calls(tmp_path)
    staged = Path(image[-1]).parent  # written next to --out, renamed into place when complete
    assert staged.parent == out.parent and staged.name.startswith(".out.") and not staged.exists()
    assert version == ["--cache-dir", "/var/cache/trivy", "version", "--format", "json"]
    assert image == ["--cache-dir", "/var/cache/trivy", "image", "--input", str(oci_layout), "--format", "json",
                     "--list-all-pkgs", "--scanners", "vuln,secret", "--timeout", "15m", "--skip-db-update",
                     "--offline-scan", "--db-repository", "mirror.local/trivy-db", "--skip-version-check",
                     "--disable-telemetry", "--quiet", "--output", str(staged / "trivy-report.json")]
    assert convert == ["--cache-dir", "/var/cache/trivy", "convert", "--format", "cyclonedx", "--output",
                       str(staged / "sbom.cdx.json"), str(staged / "trivy-report.json")]
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["passed"] and verdict["trivy"] == {"version": "0.58.1", "db_updated_at": "2026-11-20T06:12:33Z",
                                                      "db_version": 2}
    assert json.loads((out / "sbom.cdx.json").read_text())["bomFormat"] == "CycloneDX"


def test_scan_failure_exits_4_with_the_deciding_findings(tmp_path, oci_layout):
    out = tmp_path / "out"
    proc = forge_cli("scan", "--input", str(oci_layout), "--out", str(out), env=_env(tmp_path, "photon-30"))
    assert proc.returncode == 4
    assert "scan gate failed: 3 CRITICAL/HIGH finding(s)" in proc.stderr
    summary = (out / "summary.md").read_text()
    assert summary.startswith("### ❌ Trivy scan failed") and summary.count("| blocking |") == 3


def test_docker_archive_is_accepted_and_oci_archive_is_not(tmp_path):
    docker = tmp_path / "image.tar"
    (tmp_path / "manifest.json").write_text("[]")
    with tarfile.open(docker, "w") as tf:
        tf.add(tmp_path / "manifest.json", arcname="manifest.json")
    assert forge_cli("scan", "--input", str(docker), "--out", str(tmp_path / "o1"),
                     env=_env(tmp_path, "alpine-39-skip")).returncode == 0
    oci_archive = tmp_path / "oci.tar"
    (tmp_path / "oci-layout").write_text("{}")
    with tarfile.open(oci_archive, "w") as tf:
        tf.add(tmp_path / "oci-layout", arcname="oci-layout")
    proc = forge_cli("scan", "--input", str(oci_archive), "--out", str(tmp_path / "o2"), env=_env(tmp_path, "alpine-39-skip"))
    assert proc.returncode == 5 and "oci-archive tars are not supported" in proc.stderr


def test_no_trivy_on_path_exits_5_with_install_hint(tmp_path, oci_layout):
    proc = forge_cli("scan", "--input", str(oci_layout), "--out", str(tmp_path / "o"),
                     env=_env(tmp_path, "alpine-39", with_trivy=False))
    assert proc.returncode == 5
    assert "trivy is not on PATH" in proc.stderr and "scan.required: false" in proc.stderr
    assert not (tmp_path / "o" / "verdict.json").exists()


def test_judge_existing_report_cli(tmp_path):
    ok = forge_cli("scan", "--report", str(FIXTURES / "centos-7.json"), "--fail-on", "LOW,MEDIUM", "--out",
                   str(tmp_path / "o"), "--json")
    assert ok.returncode == 4
    verdict = json.loads(ok.stdout)
    assert verdict["unfixed_dropped"] == 1 and len(verdict["blocking"]) == 2
    bad = forge_cli("scan", "--report", str(FIXTURES / "centos-7.json"), "--fail-on", "SEVERE")
    assert bad.returncode == 2 and "unknown severity SEVERE" in bad.stderr


def test_trivy_options_default_flags():
    assert TrivyOptions().scan_flags() == ["--timeout", "15m", "--skip-version-check", "--disable-telemetry"]
