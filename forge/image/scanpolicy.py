"""forge's scan policy, decided on a parsed Trivy report (Trivy's exit code is never the policy).

- A vulnerability blocks when its severity is in ``fail_on``, unless ``ignore_unfixed`` drops it
  (Trivy's meaning: status affected, will_not_fix, fix_deferred or end_of_life) or an unexpired entry
  of the ignore file matches it.
- Secrets always block, whatever the severities and the ignore file say: a secret in an image must be
  removed from it, not accepted.
- The ignore file uses Trivy's ``.trivyignore.yaml`` format (id, paths, purls, expired_at, statement).
  An expired entry stops ignoring and is reported.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forge.core.errors import UsageError
from forge.image.trivy import Report

UNFIXED_STATUSES = frozenset({"affected", "will_not_fix", "fix_deferred", "end_of_life"})
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")


@dataclass(frozen=True)
class IgnoreEntry:
    id: str
    paths: tuple[str, ...] = ()
    purls: tuple[str, ...] = ()
    expired_at: dt.date | None = None
    statement: str = ""
    kind: str = "vulnerabilities"
    line: int = 0

    def expired(self, today: dt.date) -> bool:
        return self.expired_at is not None and today >= self.expired_at


def load_ignore_file(path: Path) -> list[IgnoreEntry]:
    """Read a .trivyignore.yaml; errors name the file, line and key."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        doc = YAML(typ="rt").load(path.read_text())
    except (OSError, YAMLError) as e:
        raise UsageError(f"{path}: cannot read the ignore file: {e}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise UsageError(f"{path}:1: the ignore file is a mapping with keys vulnerabilities, secrets, misconfigurations, licenses")
    entries: list[IgnoreEntry] = []
    for kind in doc:
        if kind not in ("vulnerabilities", "secrets", "misconfigurations", "licenses"):
            line = doc.lc.key(kind)[0] + 1
            raise UsageError(f"{path}:{line}: {kind}: unknown section; valid: vulnerabilities, secrets, misconfigurations, licenses")
        for i, item in enumerate(doc[kind] or []):
            line = doc[kind].lc.item(i)[0] + 1
            if not isinstance(item, dict) or not item.get("id"):
                raise UsageError(f"{path}:{line}: {kind}[{i}]: each entry needs an `id`")
            unknown = set(item) - {"id", "paths", "purls", "expired_at", "statement"}
            if unknown:
                raise UsageError(f"{path}:{line}: {kind}[{i}]: unknown key(s) {', '.join(sorted(unknown))}; "
                                 "valid: id, paths, purls, expired_at, statement")
            exp = item.get("expired_at")
            if exp is not None and not isinstance(exp, dt.date):
                try:
                    exp = dt.date.fromisoformat(str(exp))
                except ValueError:
                    raise UsageError(f"{path}:{line}: {kind}[{i}].expired_at: {exp!r} is not a date (YYYY-MM-DD)") from None
            if isinstance(exp, dt.datetime):
                exp = exp.date()
            entries.append(IgnoreEntry(id=str(item["id"]), paths=tuple(map(str, item.get("paths") or ())),
                                       purls=tuple(map(str, item.get("purls") or ())), expired_at=exp,
                                       statement=str(item.get("statement") or ""), kind=kind, line=line))
    return entries


def _purl_matches(pattern: str, purl: str | None) -> bool:
    """Trivy's rule: type/namespace/name must match; version and qualifiers only when the pattern has them."""
    if not purl:
        return False
    p_base, _, p_quals = pattern.partition("?")
    f_base, _, f_quals = purl.partition("?")
    p_name, _, p_ver = p_base.partition("@")
    f_name, _, f_ver = f_base.partition("@")
    if p_name != f_name or (p_ver and p_ver != f_ver):
        return False
    wanted = set(filter(None, p_quals.split("&")))
    return wanted <= set(filter(None, f_quals.split("&")))


def _path_matches(patterns: tuple[str, ...], *candidates: str | None) -> bool:
    return any(fnmatch.fnmatchcase(c.lstrip("/"), p.lstrip("/")) for p in patterns for c in candidates if c)


@dataclass
class Finding:
    kind: str             # vulnerability | secret | misconfiguration
    id: str
    severity: str
    target: str
    package: str = ""
    installed: str = ""
    fixed: str = ""
    status: str = ""
    title: str = ""
    decision: str = ""    # blocking | ignored | unfixed | below-threshold
    reason: str = ""


@dataclass
class Verdict:
    passed: bool
    summary: str
    fail_on: list[str]
    ignore_unfixed: bool
    counts: dict[str, dict[str, int]]          # kind -> severity -> count (all findings)
    status_counts: dict[str, int]              # vulnerability status -> count
    blocking: list[Finding] = field(default_factory=list)
    ignored: list[Finding] = field(default_factory=list)
    unfixed_dropped: int = 0
    expired_ignores: list[dict] = field(default_factory=list)
    unused_ignores: list[dict] = field(default_factory=list)
    trivy: dict = field(default_factory=dict)
    model_image: dict | None = None            # container.weights: image: its secrets-only scan (add_model_image)

    def to_json(self) -> dict:
        out = asdict(self)
        if out["model_image"] is None:   # a baked image's verdict is what it was
            del out["model_image"]
        return out


def add_model_image(v: Verdict, report: Report, scanners: tuple[str, ...]) -> Verdict:
    """Join the model image's scan to the serving image's verdict. A model image holds weights, a config and a
    tokenizer, no packages: it is scanned for secrets only, and any secret blocks, as in the serving image."""
    found = [Finding("secret", s.rule_id, s.severity, f"model image: {r.target}", title=s.title, decision="blocking",
                     reason="secrets are always fatal") for r in report.results for s in r.secrets]
    v.model_image = {"scanners": {"serving image": list(scanners), "model image": ["secret"]}, "secrets": len(found)}
    if found:
        what = f"{len(found)} secret(s) in the model image"
        v.summary = f"{v.summary} and {what}" if not v.passed else f"failed: {what}"
        v.passed = False
        v.blocking = [*v.blocking, *found]
    return v


def judge(report: Report, *, fail_on: tuple[str, ...] = ("CRITICAL", "HIGH"), ignore_unfixed: bool = True,
          ignores: list[IgnoreEntry] = (), today: dt.date | None = None, trivy_info: dict | None = None) -> Verdict:
    today = today or dt.date.today()
    fail = {s.upper() for s in fail_on}
    active = [e for e in ignores if not e.expired(today)]
    expired = [e for e in ignores if e.expired(today)]
    by_id: dict[tuple[str, str], list[IgnoreEntry]] = {}
    for e in active:
        by_id.setdefault((e.kind, e.id), []).append(e)
    used: set[int] = set()

    def ignore_for(kind: str, fid: str, purl: str | None, *paths: str | None) -> IgnoreEntry | None:
        for e in by_id.get((kind, fid), ()):
            if e.paths and not _path_matches(e.paths, *paths):
                continue
            if e.purls and not any(_purl_matches(p, purl) for p in e.purls):
                continue
            used.add(id(e))
            return e
        return None

    def decide(f: Finding, entry: IgnoreEntry | None) -> None:
        if entry is not None:
            f.decision, f.reason = "ignored", entry.statement or "in the ignore file"
            ignored.append(f)
        else:
            f.decision = "blocking"
            blocking.append(f)

    counts: dict[str, Counter] = {"vulnerability": Counter(), "secret": Counter(), "misconfiguration": Counter()}
    statuses: Counter = Counter()
    blocking: list[Finding] = []
    ignored: list[Finding] = []
    unfixed = 0
    for result in report.results:
        for v in result.vulnerabilities:
            counts["vulnerability"][v.severity] += 1
            statuses[v.status or "unknown"] += 1
            if v.severity not in fail:
                continue
            if ignore_unfixed and v.status in UNFIXED_STATUSES:
                unfixed += 1
                continue
            f = Finding("vulnerability", v.id, v.severity, result.target, v.pkg_name, v.installed_version,
                        v.fixed_version, v.status, v.title)
            decide(f, ignore_for("vulnerabilities", v.id, v.purl, v.pkg_path, result.target))
        for s in result.secrets:
            counts["secret"][s.severity] += 1
            line = f":{s.start_line}" if s.start_line else ""
            blocking.append(Finding("secret", s.rule_id, s.severity, f"{result.target}{line}", title=s.title,
                                    decision="blocking", reason="secrets are always fatal"))
        for m in result.misconfigurations:
            counts["misconfiguration"][m.severity] += 1
            if m.status.upper() == "PASS" or m.severity not in fail:
                continue
            f = Finding("misconfiguration", m.avd_id or m.id, m.severity, result.target, title=m.title)
            decide(f, ignore_for("misconfigurations", m.id, None, result.target) or (
                ignore_for("misconfigurations", m.avd_id, None, result.target) if m.avd_id else None))

    passed = not blocking
    n_secrets = sum(1 for f in blocking if f.kind == "secret")
    if passed:
        summary = f"passed: no {'/'.join(s for s in SEVERITIES if s in fail)} findings" + (
            f" ({len(ignored)} ignored by the ignore file)" if ignored else "")
    else:
        parts = [f"{n_secrets} secret(s)"] if n_secrets else []
        if len(blocking) - n_secrets:
            parts.append(f"{len(blocking) - n_secrets} {'/'.join(s for s in SEVERITIES if s in fail)} finding(s)")
        summary = "failed: " + " and ".join(parts)
    describe = lambda e: {"kind": e.kind, "id": e.id, "expired_at": e.expired_at.isoformat() if e.expired_at else None,
                          "statement": e.statement, "line": e.line}
    return Verdict(
        passed=passed, summary=summary, fail_on=sorted(fail, key=SEVERITIES.index) if fail <= set(SEVERITIES) else sorted(fail),
        ignore_unfixed=ignore_unfixed,
        counts={k: dict(c) for k, c in counts.items()}, status_counts=dict(statuses),
        blocking=blocking, ignored=ignored, unfixed_dropped=unfixed,
        expired_ignores=[describe(e) for e in expired],
        unused_ignores=[describe(e) for e in active if id(e) not in used and e.kind != "secrets"],
        trivy=trivy_info or {"version": report.trivy.version if report.trivy else None},
    )


def markdown(v: Verdict, *, limit: int = 50) -> str:
    """A Markdown summary (fit for $GITHUB_STEP_SUMMARY): the verdict and the findings that decided it."""
    icon = "✅" if v.passed else "❌"
    lines = [f"### {icon} Trivy scan {v.summary}", ""]
    sev = v.counts.get("vulnerability", {})
    lines.append("Vulnerabilities: " + ", ".join(f"{s} {sev.get(s, 0)}" for s in SEVERITIES)
                 + f" · fail on {', '.join(v.fail_on)} · ignore unfixed: {'yes' if v.ignore_unfixed else 'no'}"
                 + (f" ({v.unfixed_dropped} unfixed dropped)" if v.unfixed_dropped else ""))
    decided = v.blocking if not v.passed else v.ignored
    if decided:
        lines += ["", "| decision | kind | id | severity | package | installed | fixed | target |",
                  "|---|---|---|---|---|---|---|---|"]
        for f in decided[:limit]:
            lines.append(f"| {f.decision} | {f.kind} | {f.id} | {f.severity} | {f.package} | {f.installed} | "
                         f"{f.fixed or '-'} | {f.target} |")
        if len(decided) > limit:
            lines.append(f"| … | {len(decided) - limit} more in verdict.json | | | | | | |")
    for e in v.expired_ignores:
        lines.append(f"\n⚠️ ignore entry {e['id']} (line {e['line']}) expired on {e['expired_at']}: no longer ignored")
    return "\n".join(lines) + "\n"
