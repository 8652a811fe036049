"""Benchmark: parse and judge a Trivy report with N findings (default 20,000). Prints JSON.

The report is generated from a finding of forge's Trivy-format fixture (tests/data/trivy/debian-12.json), varied in id, package,
severity and status, so its shape is what Trivy prints. Goal: under 1 s for 20,000 findings.

    .venv/bin/python bench/scan_policy.py [--findings 20000] [--runs 5]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "trivy" / "debian-12.json"
SEVERITIES = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]
STATUSES = ["fixed", "affected", "will_not_fix", "fix_deferred", "end_of_life"]


def generate(n: int) -> bytes:
    base = json.loads(FIXTURE.read_text())
    template = base["Results"][0]["Vulnerabilities"][0]
    vulns = []
    for i in range(n):
        v = copy.deepcopy(template)
        v["VulnerabilityID"] = f"CVE-2026-{i:05d}"
        v["PkgName"] = f"pkg{i % 700}"
        v["Severity"] = SEVERITIES[i % 5]
        v["Status"] = STATUSES[(i // 5) % 5]
        vulns.append(v)
    base["Results"][0]["Vulnerabilities"] = vulns
    return json.dumps(base).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--findings", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from forge.image.scanpolicy import judge, markdown
    from forge.image.trivy import parse_report

    data = generate(args.findings)
    samples, parse_s, judge_s = [], [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        report = parse_report(data)
        t1 = time.perf_counter()
        verdict = judge(report, fail_on=("CRITICAL", "HIGH"), ignore_unfixed=True)
        markdown(verdict)
        t2 = time.perf_counter()
        samples.append(t2 - t0)
        parse_s.append(t1 - t0)
        judge_s.append(t2 - t1)
    print(json.dumps({
        "benchmark": "scan_policy", "findings": args.findings, "report_bytes": len(data), "runs": args.runs,
        "parse_and_judge_s_median": round(statistics.median(samples), 3),
        "parse_s_median": round(statistics.median(parse_s), 3), "judge_s_median": round(statistics.median(judge_s), 3),
        "blocking": len(verdict.blocking), "goal_s": 1.0,
        "ratio_to_goal": round(statistics.median(samples) / 1.0, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
