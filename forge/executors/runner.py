"""Run one step where it runs: its key from key material probed here, reuse or build, commit atomically.

Every executor's worker ends up in ``run_step``; ``forge.orchestrate.build.plan`` uses ``key_material`` under
``no_probes()`` (a plan starts no external tool).
"""
from __future__ import annotations

import os
import platform
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from forge import __version__
from forge.core import options as env, steplog
from forge.core.digests import digest_of, list_files, tree_digest
from forge.executors import Event, EventSink, StepDone, StepRequest
from forge.gpu import host_fit
from forge.steps import StepContext, StepSpec, tool_versions
from forge.store.layered import Stores
from forge.store.local import Entry, Store

if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved

__all__ = ["key_material", "key_of", "run_step", "stores_of"]



def key_material(spec: StepSpec, loaded: "Resolved", store: Store, upstream: dict[str, str]) -> dict:
    """Everything that can change the step's output. Reads file digests through the memo only.
    ``upstream``: upstream step -> output digest. Raises ``Unprobed`` under ``no_probes()``."""
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


def key_of(material: dict) -> str:
    return digest_of(material).removeprefix("sha256:")


def run_step(spec: StepSpec, loaded: "Resolved", stores: Stores, upstream: dict[str, Entry], *,
             force: bool = False, events: EventSink = lambda e: None) -> StepDone:
    """Reuse the committed entry of the step's key from any layer of ``stores`` (local, then remote), or build
    and commit it (one builder per key: a concurrent build of the same key waits on the lock, then reuses); what
    is built here is written through to a writable remote layer before it is returned."""
    t0 = time.monotonic()
    store = stores.local
    material = key_material(spec, loaded, store, {d: e.output_digest for d, e in upstream.items()})
    key = key_of(material)

    def warn(message: str) -> None:
        events(Event(spec.name, "warning", key, message))

    def report(message: str, *, completed: float | None = None, total: float | None = None,
               unit: str | None = None) -> None:
        events(Event(spec.name, "progress", key, message, completed, total, unit))

    found = None if force else store.get(key)
    status = "HIT"
    if found is None:
        with store.lock(key):
            found = None if force else store.get(key)
            if found is None:
                events(Event(spec.name, "start", key))
                hit = stores.find(key, spec.name, report, warn, local=not force)
                if hit is None:
                    built = _build(spec, key, material, loaded, store, upstream, report, replace=force)
                    hit = stores.written(built, report, warn)
                found, status = hit.entry, hit.status
    store.touch(found)
    return StepDone(spec.name, key, status, time.monotonic() - t0)


def stores_of(request: StepRequest, store: Store) -> Stores:
    """The layered stores a request names (every executor's worker passes them to ``run_step``)."""
    return Stores.of(store, request.cache_remote, request.cache_remote_mode)


def _build(spec: StepSpec, key: str, material: dict, loaded: "Resolved", store: Store,
           upstream: dict[str, Entry], report, *, replace: bool) -> Entry:
    # refused with the numbers, before a weight loads (a streamed quantize: with the snapshot's real shards)
    host_fit.require(getattr(loaded, "host_needs", ()), spec.name, {d: e.out for d, e in upstream.items()})
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    with store.staging(key) as staged:
        ctx = StepContext(
            recipe=loaded,
            inputs={d: e.out for d, e in upstream.items()},
            input_manifests={d: e.manifest for d, e in upstream.items()},
            out=staged / "out",
            downloads=store.root / "downloads",
            report=report,
            upstream=dict(upstream),
        )
        with steplog.capture(store.log_path(spec.name, key)):  # library output -> the step's log
            facts = spec.runner()(ctx) or {}
        files = _hash_outputs(staged / "out", store, report)
        # test hook (FORGE_TEST_STOP_BEFORE_COMMIT): stop (SIGSTOP self) after the step wrote its outputs and before
        # they are committed, so a test can SIGKILL a build at its most dangerous instant. Never set in normal use.
        if env.current().stop_before_commit == spec.name:
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


def _hash_outputs(out: Path, store: Store, report) -> dict:
    rels = list_files(out)
    total, done, files = sum((out / rel).stat().st_size for rel in rels), 0, {}
    for rel in rels:
        report("hashing outputs", completed=done, total=total, unit="B")
        files[rel] = store.memo.file(out / rel)
        done += files[rel].size
    report("hashing outputs", completed=done, total=total, unit="B")
    return files
