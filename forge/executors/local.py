"""LocalExecutor: each step in this process, one at a time, in the order submitted (forge's default)."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from forge.executors import EventSink, StepDone, StepRequest
from forge.executors.runner import run_step, stores_of
from forge.steps.graph import spec_named
from forge.store.local import Entry, Store
from forge.core.errors import StepError
from forge.recipe.resolve import resolve

if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved

__all__ = ["LocalExecutor", "committed"]


def committed(store: Store, key: str, step: str) -> Entry:
    """The committed entry an upstream key names (a request only carries keys)."""
    entry = store.get(key)
    if entry is None:
        raise StepError(f"upstream entry {key[:12]} of step {step} is not in the cache {store.root}",
                        hint="It was pruned while the build ran: rerun the build.")
    return entry


class LocalExecutor:
    def __init__(self, store: Store):
        self.store = store
        self._queue: deque[tuple[StepRequest, EventSink, "Resolved"]] = deque()

    def submit(self, request: StepRequest, events: EventSink, resolved: "Resolved | None" = None) -> None:
        if resolved is None:
            resolved = resolve(request.recipe_path, downloads=self.store.root / "downloads", ci=request.ci,
                               variant=request.variant, overrides=request.overrides)
        self._queue.append((request, events, resolved))

    def next_done(self) -> StepDone:
        req, events, resolved = self._queue.popleft()
        upstream = {d: committed(self.store, k, d) for d, k in req.upstream.items()}
        return run_step(spec_named(resolved, req.step), resolved, stores_of(req, self.store), upstream,
                        force=req.force, events=events)

    def close(self) -> None:
        self._queue.clear()
