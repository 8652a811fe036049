"""Scan policy on reports in Trivy's format (forge's own, and Trivy's golden ones where ../shared exists), the
ignore file, and the Trivy invocation contract."""
from __future__ import annotations

import datetime as dt
import json
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.core.errors import ToolError, UsageError
from forge.image.scanpolicy import judge, load_ignore_file
from forge.image.trivy import TrivyOptions, parse_report

DATA = Path(__file__).parent / "data" / "trivy"             # forge's own reports, in Trivy's format
GOLDEN = REPO.parent / "shared" / "fixtures" / "trivy"         # Trivy's own golden reports, beside the project
golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=(
    f"Trivy's golden reports are not here ({GOLDEN} does not exist, as in a bare clone); "
    "tests/data/trivy covers the same cases"))
FAKE_BIN = Path(__file__).parent / "fake_bin"
ALL = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")

# Severity and status counts and number of secrets of each of forge's reports (see tests/data/trivy/README.md).
EXPECTED = {
    "debian-12": ({"CRITICAL": 1, "HIGH": 2, "MEDIUM": 3, "LOW": 3, "UNKNOWN": 1},
                  {"fixed": 3, "affected": 4, "will_not_fix": 1, "fix_deferred": 1, "end_of_life": 1}, 0),
    "debian-12-high-critical": ({"CRITICAL": 1, "HIGH": 2}, {"fixed": 2, "will_not_fix": 1}, 0),
    "debian-12-ignore-unfixed": ({"HIGH": 2, "MEDIUM": 1}, {"fixed": 3}, 0),
    "debian-12-clean": ({}, {}, 0),
    "python-serving": ({"CRITICAL": 1, "HIGH": 2, "MEDIUM": 2}, {"fixed": 5}, 0),
    "secrets": ({}, {}, 2),
    "misconfig": ({}, {}, 0),
    "nulls-and-unknown-fields": ({"UNKNOWN": 1, "HIGH": 1}, {"unknown": 1, "fixed": 1}, 0),
    "no-results": ({}, {}, 0),
}

# The same counts read by hand off Trivy's own golden reports (an extra check where ../shared exists).
EXPECTED_GOLDEN = {
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


def load(name, where=DATA):
    return parse_report((where / f"{name}.json").read_bytes(), source=name)


def raw(name):
    return json.loads((DATA / f"{name}.json").read_text())


def vuln_keys(report):
    return {(v.id, v.pkg_name, v.installed_version) for r in report.results for v in r.vulnerabilities}


def blocking_keys(verdict):
    return {(f.id, f.package, f.installed) for f in verdict.blocking}


def _counts(report):
    v = judge(report, fail_on=ALL, ignore_unfixed=False)
    return v.counts["vulnerability"], v.status_counts, sum(v.counts["secret"].values())


def test_every_fixture_is_covered():
    assert {p.stem for p in DATA.glob("*.json")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_per_severity_and_status(name):
    assert _counts(load(name)) == EXPECTED[name]


def test_high_critical_equals_trivys_own_severity_filter():
    v = judge(load("debian-12"), fail_on=("HIGH", "CRITICAL"), ignore_unfixed=False)
    assert blocking_keys(v) == vuln_keys(load("debian-12-high-critical"))
    assert not v.passed and len(v.blocking) == 3


def test_ignore_unfixed_equals_trivys_own_filter():
    v = judge(load("debian-12"), fail_on=ALL, ignore_unfixed=True)
    assert blocking_keys(v) == vuln_keys(load("debian-12-ignore-unfixed"))
    assert v.unfixed_dropped == 7   # affected 4, will_not_fix, fix_deferred, end_of_life


@pytest.mark.parametrize("status", ["affected", "will_not_fix", "fix_deferred", "end_of_life"])
def test_ignore_unfixed_drops_exactly_trivys_statuses(status):
    report = raw("debian-12-high-critical")
    for v in report["Results"][0]["Vulnerabilities"]:
        if v["PkgName"] == "libc6":
            v["Status"] = status
    # CRITICAL zlib1g is will_not_fix already; libc6 becomes `status`; openssh stays fixed
    assert [f.package for f in judge(parse_report(report), ignore_unfixed=True).blocking] == ["openssh-client"]
    assert len(judge(parse_report(report), ignore_unfixed=False).blocking) == 3


@pytest.mark.parametrize("fail_on", [(), ("LOW",), ALL])
def test_secrets_fail_whatever_the_severity_settings(fail_on, tmp_path):
    ignore = tmp_path / "ignore.yaml"
    ignore.write_text("secrets:\n  - id: hugging-face-access-token\n  - id: private-key\n")
    v = judge(load("secrets"), fail_on=fail_on, ignore_unfixed=True, ignores=load_ignore_file(ignore))
    assert not v.passed and v.summary == "failed: 2 secret(s)"
    assert [(f.id, f.target) for f in v.blocking] == [("hugging-face-access-token", "/opt/forge/.env:2"),
                                                      ("private-key", "/root/.ssh/id_ed25519:1")]
    assert all(f.kind == "secret" for f in v.blocking)


def test_clean_image_passes():
    v = judge(load("debian-12-clean"))
    assert v.passed and v.summary == "passed: no CRITICAL/HIGH findings"


def test_python_serving_image_findings():
    v = judge(load("python-serving"))
    assert [(f.package, f.severity, f.target) for f in v.blocking] == [
        ("torch", "CRITICAL", "Python"), ("transformers", "HIGH", "Python"),
        ("stdlib", "HIGH", "usr/local/bin/registry-helper")]
    assert v.blocking[0].fixed == "2.6.0"
    assert judge(load("python-serving"), fail_on=("MEDIUM",)).summary == "failed: 2 MEDIUM finding(s)"


def test_misconfigurations_block_on_failures_only(tmp_path):
    v = judge(load("misconfig"), fail_on=ALL)
    assert [(f.kind, f.id, f.severity) for f in v.blocking] == [("misconfiguration", "AVD-DS-0002", "HIGH"),
                                                                 ("misconfiguration", "AVD-DS-0026", "LOW")]
    assert v.counts["misconfiguration"] == {"HIGH": 1, "LOW": 1, "MEDIUM": 1}   # the PASS is counted, not judged
    ignore = tmp_path / "i.yaml"
    ignore.write_text("misconfigurations:\n  - id: DS002\n    statement: runs as root by design\n")
    assert judge(load("misconfig"), ignores=load_ignore_file(ignore)).passed


def test_parser_tolerates_nulls_missing_and_unknown_fields():
    report = load("nulls-and-unknown-fields")
    assert report.trivy is None and [r.target for r in report.results] == [
        "forge.local/smollm2-135m-demo:7f2314aebb13 (debian 12.7)", "", ""]
    v = judge(report, fail_on=ALL, ignore_unfixed=False)
    assert [(f.id, f.severity, f.fixed, f.status) for f in v.blocking] == [
        ("CVE-2026-10001", "UNKNOWN", "", ""), ("CVE-2026-10002", "HIGH", "11.0.0", "fixed")]
    assert v.trivy == {"version": None}
    assert judge(load("no-results"), fail_on=ALL).passed and load("no-results").results == []
    assert judge(parse_report({"SchemaVersion": 2}), fail_on=ALL).passed
    with pytest.raises(ToolError, match="SchemaVersion 1 is not supported"):
        parse_report({**raw("debian-12"), "SchemaVersion": 1})
    with pytest.raises(ToolError, match="not JSON"):
        parse_report(b"{oops", source="r.json")
    with pytest.raises(ToolError, match="not a JSON object"):
        parse_report(b"[]", source="r.json")


def test_ignore_file_ids_paths_purls_and_expiry(tmp_path):
    today = dt.date(2026, 11, 23)
    f = tmp_path / ".trivyignore.yaml"
    f.write_text(
        "vulnerabilities:\n"
        "  - id: CVE-2024-2961\n"
        "    purls: ['pkg:deb/debian/libc6']\n"           # version-less purl: matches libc6 at any version
        "    statement: fixed in our next base bump\n"
        "    expired_at: 2027-01-01\n"
        "  - id: CVE-2024-6387\n"
        "    purls: ['pkg:deb/debian/openssh-server']\n"  # another package: does not match openssh-client
        "  - id: CVE-2024-6387\n"
        "    paths: ['nowhere/*']\n"                       # a path that matches nothing
        "  - id: CVE-2000-0001\n"
        "    expired_at: 2026-01-01\n"
        "    statement: long gone\n")
    v = judge(load("debian-12"), ignores=load_ignore_file(f), today=today)
    assert [(x.package, x.decision, x.reason) for x in v.ignored] == [
        ("libc6", "ignored", "fixed in our next base bump")]
    assert [(x.package, x.decision) for x in v.blocking] == [("openssh-client", "blocking")]
    assert [e["id"] for e in v.expired_ignores] == ["CVE-2000-0001"]
    assert [e["id"] for e in v.unused_ignores] == ["CVE-2024-6387", "CVE-2024-6387"]
    # once expired, the libc6 entry stops ignoring
    v2 = judge(load("debian-12"), ignores=load_ignore_file(f), today=dt.date(2027, 1, 1))
    assert len(v2.blocking) == 2 and {e["id"] for e in v2.expired_ignores} == {"CVE-2024-2961", "CVE-2000-0001"}


def test_ignore_file_path_glob_matches_lang_package_paths(tmp_path):
    f = tmp_path / "i.yaml"
    f.write_text("vulnerabilities:\n"
                 "  - id: CVE-2025-32434\n    paths: ['usr/local/lib/python3.11/site-packages/torch-*']\n"
                 "  - id: CVE-2024-3568\n    paths: ['usr/lib/python3/dist-packages/*']\n")   # not where it is
    v = judge(load("python-serving"), ignores=load_ignore_file(f))
    assert [x.package for x in v.ignored] == ["torch"]
    assert [x.package for x in v.blocking] == ["transformers", "stdlib"]


def test_ignore_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "i.yaml"
    f.write_text("vulnerabilities:\n  - id: CVE-1\n    expires: 2027-01-01\n")
    with pytest.raises(UsageError, match=r"i.yaml:2: vulnerabilities\[0\]: unknown key\(s\) expires"):
        load_ignore_file(f)
    f.write_text("vulns:\n  - id: CVE-1\n")
    with pytest.raises(UsageError, match="i.yaml:1: vulns: unknown section"):
        load_ignore_file(f)


# ------------------------------------------------------------------ Trivy's own golden reports (extra check)


@golden
def test_every_golden_report_is_covered():
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(EXPECTED_GOLDEN)


@golden
@pytest.mark.parametrize("name", sorted(EXPECTED_GOLDEN))
def test_golden_counts_per_severity_and_status(name):
    assert _counts(load(name, GOLDEN)) == EXPECTED_GOLDEN[name]


@golden
def test_golden_alpine39_at_high_critical_equals_trivys_own_filter():
    v = judge(load("alpine-39", GOLDEN), fail_on=("HIGH", "CRITICAL"), ignore_unfixed=False)
    assert blocking_keys(v) == vuln_keys(load("alpine-39-high-critical", GOLDEN))
    assert not v.passed and len(v.blocking) == 2


@golden
def test_golden_centos7_ignore_unfixed_equals_trivys_own_filter():
    v = judge(load("centos-7", GOLDEN), fail_on=ALL, ignore_unfixed=True)
    assert blocking_keys(v) == vuln_keys(load("centos-7-ignore-unfixed", GOLDEN))
    assert v.unfixed_dropped == 1


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
    return {"PATH": path, "FAKE_TRIVY_REPORT": str(DATA / f"{fixture}.json"),
            "FAKE_TRIVY_LOG": str(tmp_path / "trivy.log")}


def _calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / "trivy.log").read_text().splitlines()]


def test_trivy_invocation_contract_with_air_gapped_options(tmp_path, oci_layout, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), scan={
        "fail_on": ["CRITICAL"], "trivy": {"skip_db_update": True, "offline_scan": True,
                                           "cache_dir": "/var/cache/trivy", "db_repository": "mirror.local/trivy-db"}})
    out = tmp_path / "out"
    proc = forge_cli("scan", "--input", str(oci_layout), "--recipe", str(recipe), "--out", str(out),
                     env=_env(tmp_path, "debian-12-clean"))
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
    proc = forge_cli("scan", "--input", str(oci_layout), "--out", str(out), env=_env(tmp_path, "python-serving"))
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
                     env=_env(tmp_path, "debian-12-clean")).returncode == 0
    oci_archive = tmp_path / "oci.tar"
    (tmp_path / "oci-layout").write_text("{}")
    with tarfile.open(oci_archive, "w") as tf:
        tf.add(tmp_path / "oci-layout", arcname="oci-layout")
    proc = forge_cli("scan", "--input", str(oci_archive), "--out", str(tmp_path / "o2"), env=_env(tmp_path, "debian-12-clean"))
    assert proc.returncode == 5 and "oci-archive tars are not supported" in proc.stderr


def test_no_trivy_on_path_exits_5_with_install_hint(tmp_path, oci_layout):
    proc = forge_cli("scan", "--input", str(oci_layout), "--out", str(tmp_path / "o"),
                     env=_env(tmp_path, "debian-12", with_trivy=False))
    assert proc.returncode == 5
    assert "trivy is not on PATH" in proc.stderr and "scan.required: false" in proc.stderr
    assert not (tmp_path / "o" / "verdict.json").exists()


def test_judge_existing_report_cli(tmp_path):
    ok = forge_cli("scan", "--report", str(DATA / "debian-12.json"), "--fail-on", "LOW,MEDIUM", "--out",
                   str(tmp_path / "o"), "--json")
    assert ok.returncode == 4
    verdict = json.loads(ok.stdout)
    assert verdict["unfixed_dropped"] == 5 and [f["package"] for f in verdict["blocking"]] == ["libssl3"]
    bad = forge_cli("scan", "--report", str(DATA / "debian-12.json"), "--fail-on", "SEVERE")
    assert bad.returncode == 2 and "unknown severity SEVERE" in bad.stderr


def test_trivy_options_default_flags():
    assert TrivyOptions().scan_flags() == ["--timeout", "15m", "--skip-version-check", "--disable-telemetry"]
