"""Plan and run the step graph against the store.

A step's key is computed from its key material (see ``key_material``). Downstream keys need the
upstream *output* digests, so a step below a MISS is PENDING in a plan: if the upstream step
rebuilds to identical bytes, the downstream step is still a HIT (early cut-off).
"""
from __future__ import annotations

import os
import platform
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from forge import __version__, steplog
from forge.digests import digest_of, list_files, tree_digest
from forge.errors import UsageError
from forge.host import tool_versions  # noqa: F401  (host probes live in forge.host; re-exported for callers)
from forge.recipe.load import LoadedRecipe
from forge.steps import StepContext, StepSpec, active_steps, step_names
from forge.store import Entry, Store

HIT, MISS, PENDING, FORCED = "HIT", "MISS", "PENDING", "FORCED"

# Test hook: stop (SIGSTOP self) after a step wrote its outputs and before it is committed, so a
# test can SIGKILL a build at its most dangerous instant. Never set in normal use.
_HANG_ENV = "FORGE_TEST_STOP_BEFORE_COMMIT"


@dataclass
class PlannedStep:
    spec: StepSpec
    status: str
    key: str | None = None
    entry: Entry | None = None
    material: dict | None = field(default=None, repr=False)


def key_material(spec: StepSpec, loaded: LoadedRecipe, store: Store, upstream: dict[str, str]) -> dict:
    """Everything that can change the step's output. Reads file digests through the memo only."""
    data = {}
    for label, path in spec.data(loaded).items():
        data[label] = tree_digest(store.memo.tree(path)) if path.is_dir() else "sha256:" + store.memo.file(path).sha256
    return {
        "step": spec.name,
        "step_version": spec.version,
        "config": spec.config(loaded),
        "identity": spec.identity(loaded),
        "inputs": {name: upstream[name] for name in spec.depends},
        "data": data,
        "tools": tool_versions(spec.tools),
    }


def _check_force(force: set[str]) -> None:
    unknown = force - set(step_names()) - {"*"}
    if unknown:
        raise UsageError(f"--force names unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(step_names())}")


def plan(loaded: LoadedRecipe, store: Store, force: set[str] = frozenset()) -> list[PlannedStep]:
    _check_force(set(force))
    digests: dict[str, str] = {}
    out: list[PlannedStep] = []
    for spec in active_steps(loaded):
        if any(d not in digests for d in spec.depends):
            out.append(PlannedStep(spec, PENDING))
            continue
        material = key_material(spec, loaded, store, digests)
        key = digest_of(material).removeprefix("sha256:")
        entry = store.get(key)
        if entry is not None and not ({"*", spec.name} & set(force)):
            digests[spec.name] = entry.output_digest
            out.append(PlannedStep(spec, HIT, key, entry, material))
        else:
            out.append(PlannedStep(spec, FORCED if entry is not None else MISS, key, None, material))
    return out


@dataclass
class StepResult:
    name: str
    status: str          # HIT (reused) or BUILT
    key: str
    output_digest: str
    seconds: float
    entry: Entry
    log: Path | None = None  # the step's log file (library output while it ran), when it was ever built here


Reporter = Callable[..., None]


def build(loaded: LoadedRecipe, store: Store, *, force: set[str] = frozenset(),
          on_start: Callable[[StepSpec, str], Reporter] | None = None,
          on_done: Callable[[StepResult], None] | None = None) -> list[StepResult]:
    """Run the graph: reuse HITs, build MISSes in dependency order. Returns one result per step."""
    _check_force(set(force))
    results: dict[str, StepResult] = {}
    for spec in active_steps(loaded):
        t0 = time.monotonic()
        upstream = {d: results[d].output_digest for d in spec.depends}
        material = key_material(spec, loaded, store, upstream)
        key = digest_of(material).removeprefix("sha256:")
        forced = bool({"*", spec.name} & set(force))
        entry = None if forced else store.get(key)
        status = "HIT"
        if entry is None:
            with store.lock(key):  # a concurrent build of the same key: wait, then reuse its output
                entry = None if forced else store.get(key)
                if entry is None:
                    report = on_start(spec, key) if on_start else (lambda *a, **k: None)
                    entry = _run_step(spec, key, material, loaded, store, results, report, replace=forced)
                    status = "BUILT"
        store.touch(entry)
        log = store.log_path(spec.name, key)
        result = StepResult(spec.name, status, key, entry.output_digest, time.monotonic() - t0, entry,
                            log if log.exists() else None)
        results[spec.name] = result
        if on_done:
            on_done(result)
        if (check := spec.checker()) is not None:
            check(entry)  # e.g. the gate: its verdict is cached either way, a failing one stops the build
    return list(results.values())


def _run_step(spec: StepSpec, key: str, material: dict, loaded: LoadedRecipe, store: Store,
              results: dict[str, StepResult], report: Reporter, *, replace: bool = False) -> Entry:
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    with store.staging(key) as staged:
        ctx = StepContext(
            recipe=loaded,
            inputs={d: results[d].entry.out for d in spec.depends},
            input_manifests={d: results[d].entry.manifest for d in spec.depends},
            out=staged / "out",
            downloads=store.root / "downloads",
            report=report,
        )
        with steplog.capture(store.log_path(spec.name, key)):  # library output -> the step's log
            facts = spec.runner()(ctx) or {}
        files = _hash_outputs(staged / "out", store, report)
        if os.environ.get(_HANG_ENV) == spec.name:
            (store.root / f"{spec.name}.stopped").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        manifest = {
            "step": spec.name,
            "recipe": {"name": loaded.recipe.name, "path": str(loaded.path), "digest": loaded.digest},
            "inputs": material,
            "output": {
                "digest": tree_digest({rel: e for rel, e in files.items() if rel not in spec.volatile}),
                "files": {rel: {"size": e.size, "sha256": e.sha256} for rel, e in files.items()},
            },
            "facts": facts,
            "forge_version": __version__,
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "started_at": started.isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - t0, 3),
        }
        return store.commit(key, staged, manifest, replace=replace)


def _hash_outputs(out: Path, store: Store, report: Reporter) -> dict:
    rels = list_files(out)
    total, done, files = sum((out / rel).stat().st_size for rel in rels), 0, {}
    for rel in rels:
        report("hashing outputs", completed=done, total=total, unit="B")
        files[rel] = store.memo.file(out / rel)
        done += files[rel].size
    report("hashing outputs", completed=done, total=total, unit="B")
    return files
