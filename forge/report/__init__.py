"""The build report: one self-contained HTML page a person can look at (gate, quantization, GPU fit, image, scan).

Public surface:
- ``BuildOutputs``: what ``forge build`` writes at the end of every build into its report directory
  (report.html, attached to the registry record as evidence ``report``; junit.xml; summary.md);
- ``data_for`` / ``render`` / ``html_for(loaded, results, collected)``: the data and the page for a
  build's step results and its registry record-to-be; ``markdown``: the short summary for CI;
- ``html_for_recipe(loaded, cached, store, registry)``: the page for what the step cache holds for a recipe;
- ``html_from_registry(registry, ref)``: the page attached to a registry record, checked against its digest;
- ``write(path, html)``: written atomically.

May import: forge.core, forge.gpu, forge.steps, forge.registry.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

from forge.core.errors import ToolError, UsageError
from forge import __version__
from forge.core import options
from forge.core.digests import digest_of
from forge.registry.record import collect
from forge.report.gather import gather
from forge.report.page import render as _render
from forge.steps import gate, scan

__all__ = ["BuildOutputs", "data_for", "render", "html_for", "html_for_recipe", "html_from_registry", "markdown",
           "write", "EVIDENCE_KIND", "FILE_NAME", "JUNIT", "SUMMARY"]

EVIDENCE_KIND = "report"
FILE_NAME, JUNIT, SUMMARY = "report.html", "junit.xml", "summary.md"
PAGES = "report-pages"   # in the step cache: drawn pages by their data (BuildOutputs._page); not reports/, the report dirs


def data_for(loaded, results: dict, collected=None) -> dict:
    record = collected.record if collected is not None else None
    provenance = collected.provenance if collected is not None else b""
    return gather(loaded, results, record, provenance=provenance)


def render(data: dict) -> str:
    return _render(data)


def html_for(loaded, results: dict, collected=None) -> str:
    return render(data_for(loaded, results, collected))


@dataclass
class BuildOutputs:
    """The report directory of one build: ``attach`` is handed to ``forge.registry.publish`` (it renders the
    page from the record-to-be and returns it as evidence); ``finish`` then writes junit.xml and summary.md."""
    out_dir: Path
    loaded: object
    results: dict
    data: dict | None = None

    @property
    def html(self) -> Path:
        return self.out_dir / FILE_NAME

    error: str | None = None

    def attach(self, collected) -> dict[str, Path]:
        """The page as evidence. A page that cannot be drawn never costs the build its record: the error is
        kept for the CLI to print (and raised under FORGE_DEBUG)."""
        try:
            self.data = data_for(self.loaded, self.results, collected)
            return {EVIDENCE_KIND: write(self.html, self._page())}
        except Exception as e:
            if options.current().debug:
                raise
            self.error = f"{type(e).__name__}: {e}"
            return {}

    def _page(self) -> bytes:
        """The page for ``self.data``, rendered once per distinct data: a rebuild whose steps are all HITs has the
        same data, and its page is read from the step cache's ``report-pages/`` (keyed by the data, forge's version
        and the template) instead of being drawn again."""
        root = getattr(self.loaded, "cache_root", None)
        if root is None:
            return render(self.data).encode()
        templates = Path(__file__).with_name("templates")
        key = digest_of({"data": self.data, "forge": __version__, "templates": {   # canonical JSON: any value
            p.name: digest_of(p.read_text()) for p in sorted(templates.glob("*.j2"))}}).removeprefix("sha256:")
        cached = Path(root) / PAGES / f"{key}.html"
        if cached.is_file():
            os.utime(cached)   # last used: `forge cache prune --older-than` keeps what rebuilds still read
            return cached.read_bytes()
        page = render(self.data).encode()
        write(cached, page)   # atomic: a concurrent build reads a whole page or none
        return page

    def finish(self) -> dict[str, str]:
        """junit.xml (the gate's) and summary.md beside the page; returns the gate's and scan's own summaries.

        An earlier build's files are removed first, whatever happens next: a page that was not drawn leaves no
        report.html, summary.md or junit.xml behind for CI to upload as this build's."""
        for name in (JUNIT, SUMMARY):
            (self.out_dir / name).unlink(missing_ok=True)
        if self.data is None or self.error is not None:   # this build wrote no page: any there is an earlier one's
            self.html.unlink(missing_ok=True)
        if self.data is None:
            return {}
        summaries = {}
        g = gate.Output.read(self.results["gate"].entry) if "gate" in self.results else None
        sc = scan.Output.read(self.results["scan"].entry) if "scan" in self.results else None
        for step, path in (("gate", g.summary if g else None), ("scan", sc.summary_md if sc else None)):
            if path is not None and path.is_file():
                summaries[step] = path.read_text()
        if g is not None:
            write(self.out_dir / JUNIT, g.junit.read_bytes())
        write(self.out_dir / SUMMARY, markdown(self.data, self.html if self.error is None else None, summaries))
        return summaries


def html_for_recipe(loaded, cached: dict, store, registry=None) -> str:
    """The report of the recipe's last build, from the cache: ``cached`` holds the entry of every step whose output is
    cached for the recipe as it is now, by step (a plan's HITs; a build stopped at a gate has no image: the page says
    so)."""
    results = {name: SimpleNamespace(name=name, status="HIT", key=entry.key, entry=entry,
                                     output_digest=entry.output_digest, seconds=float(entry.manifest.get("seconds", 0.0)))
               for name, entry in cached.items()}
    if not results:
        raise UsageError(f"{loaded.path}: nothing of this recipe is in the step cache at {store.root}",
                         hint="Build it first (forge build RECIPE), or pass --cache-dir where it was built.")
    collected = collect(loaded, results)
    # the status is the registry's: a build that was not published (not finished, or another registry) has none
    rec = registry.get(collected.record.id) if registry is not None else None
    collected = SimpleNamespace(record=rec, provenance=collected.provenance)
    return html_for(loaded, results, collected)


def html_from_registry(registry, ref: str) -> bytes:
    rec = registry.resolve(ref)
    ev = next((e for e in rec.evidence if e.kind == EVIDENCE_KIND), None)
    if ev is None:
        raise UsageError(f"{rec.name} {rec.short()} has no report attached (published before forge wrote reports)",
                         hint=f"Render it from the cache instead: forge report {rec.recipe_path}")
    digest = ev.files[FILE_NAME]
    if (problem := registry.blobs.verify(digest)) is not None:
        raise ToolError(f"the report blob {digest} of {rec.name} {rec.short()} does not verify: {problem}",
                        hint="`forge registry verify` lists every bad blob; rebuild and publish again.")
    return registry.blobs.read(digest)


def write(path: Path, html: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o644)   # a page to open and upload, not a secret
    with os.fdopen(fd, "wb") as f:
        f.write(html.encode() if isinstance(html, str) else html)
    os.replace(tmp, path)
    return path


def markdown(data: dict, report_path: Path | None, summaries: dict[str, str]) -> str:
    """A short markdown summary: status, the gate's and the scan's own tables, the steps, where the page is."""
    b = data["build"]
    icon = {"validated": "✅", "promoted": "✅", "rejected": "❌", "unscanned": "⚠️", "proxy-validated": "⚠️"}.get(
        b["status"], "ℹ️")
    parts = [f"## {icon} forge build `{b['name']}`: {b['status']}",
             f"{b['method']} for {b['gpu']} on {b['engine']} · recipe `{b['recipe_path']}`"
             + (f" · image `{b['image_digest']}`" if b.get("image_digest") else "")]
    if b.get("reason"):
        parts.append(f"> {b['reason']}")
    parts += [summaries[k].strip() for k in ("gate", "scan") if summaries.get(k)]
    rows = ["| step | this build | key | built in |", "|---|---|---|---|"]
    for s in data["steps"]:
        took = "-" if s["built_seconds"] is None else f"{s['built_seconds']:.1f} s"
        rows.append(f"| {s['step']} | {s['status']} | `{(s['key'] or '-')[:12]}` | {took} |")
    parts.append("\n".join(rows))
    if report_path is not None:
        parts.append(f"Report: `{report_path}` (uploaded with the job's artifacts)")
    return "\n\n".join(parts)
