"""The build report: one self-contained HTML page a person can look at (gate, quantization, GPU fit, image, scan).

Public surface:
- ``html_for(loaded, results, collected, downloads)``: the page for a build's step results and its
  registry record-to-be (``forge build`` writes it at the end of every build and attaches it as evidence);
- ``html_for_recipe(loaded, store, registry)``: the page for what the step cache holds for a recipe;
- ``html_from_registry(registry, ref)``: the page attached to a registry record, checked against its digest;
- ``write(path, html)``: written atomically.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from forge.errors import UsageError

__all__ = ["html_for", "html_for_recipe", "html_from_registry", "write", "EVIDENCE_KIND", "FILE_NAME"]

EVIDENCE_KIND = "report"
FILE_NAME = "report.html"


def html_for(loaded, results: dict, collected=None, downloads: Path | None = None) -> str:
    from forge.report.gather import gather
    from forge.report.render import render

    record = collected.record if collected is not None else None
    provenance = collected.provenance if collected is not None else b""
    return render(gather(loaded, results, record, downloads=downloads, provenance=provenance))


def html_for_recipe(loaded, store, registry=None) -> str:
    """The report of the recipe's last build, from the cache: every step whose output is cached for the
    recipe as it is now (a build stopped at a gate has no image: the page says so)."""
    from forge.build import HIT, plan
    from forge.registry.record import collect

    results = {}
    for p in plan(loaded, store):
        if p.status == HIT:
            results[p.spec.name] = SimpleNamespace(name=p.spec.name, status=HIT, key=p.key, entry=p.entry,
                                                   output_digest=p.entry.output_digest,
                                                   seconds=float(p.entry.manifest.get("seconds", 0.0)))
    if not results:
        raise UsageError(f"{loaded.path}: nothing of this recipe is in the step cache at {store.root}",
                         hint="Build it first (forge build RECIPE), or pass --cache-dir where it was built.")
    collected = collect(loaded, results)
    if registry is not None and (rec := registry.get(collected.record.id)) is not None:
        collected = SimpleNamespace(record=rec, provenance=collected.provenance)   # its recorded status
    return html_for(loaded, results, collected, store.root / "downloads")


def html_from_registry(registry, ref: str) -> bytes:
    rec = registry.resolve(ref)
    ev = next((e for e in rec.evidence if e.kind == EVIDENCE_KIND), None)
    if ev is None:
        raise UsageError(f"{rec.name} {rec.short()} has no report attached (published before forge wrote reports)",
                         hint=f"Render it from the cache instead: forge report {rec.recipe_path}")
    digest = ev.files[FILE_NAME]
    if (problem := registry.blobs.verify(digest)) is not None:
        from forge.errors import ToolError

        raise ToolError(f"the report blob {digest} of {rec.name} {rec.short()} does not verify: {problem}",
                        hint="`forge registry verify` lists every bad blob; rebuild and publish again.")
    return registry.blobs.read(digest)


def write(path: Path, html: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(html.encode() if isinstance(html, str) else html)
    os.replace(tmp, path)
    return path
