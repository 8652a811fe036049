"""LocalExecutor: each step in this process, one at a time, in the order submitted (forge's default)."""
from __future__ import annotations

from collections import deque

from forge.executors import EventSink, StepDone, StepRequest
from forge.executors.runner import remote_of, run_step
from forge.recipe.load import LoadedRecipe
from forge.store.local import Entry, Store

__all__ = ["LocalExecutor", "committed"]


def committed(store: Store, key: str, step: str) -> Entry:
    """The committed entry an upstream key names (a request only carries keys)."""
    entry = store.get(key)
    if entry is None:
        from forge.core.errors import StepError

        raise StepError(f"upstream entry {key[:12]} of step {step} is not in the cache {store.root}",
                        hint="It was pruned while the build ran: rerun the build.")
    return entry


class LocalExecutor:
    def __init__(self, loaded: LoadedRecipe, store: Store):
        self.loaded, self.store = loaded, store
        self._queue: deque[tuple[StepRequest, EventSink]] = deque()

    def submit(self, request: StepRequest, events: EventSink) -> None:
        self._queue.append((request, events))

    def next_done(self) -> StepDone:
        from forge.steps.graph import spec_named

        req, events = self._queue.popleft()
        loaded = self._recipe(req)
        upstream = {d: committed(self.store, k, d) for d, k in req.upstream.items()}
        return run_step(spec_named(loaded, req.step), loaded, self.store, upstream, force=req.force, events=events,
                        remote=remote_of(req))

    def _recipe(self, req: StepRequest) -> LoadedRecipe:
        """The recipe the request names: this executor's own, or another variant / trial of it."""
        if (req.variant, req.overrides) == (self.loaded.variant, self.loaded.overrides):
            return self.loaded
        from forge.recipe.load import load_recipe

        return load_recipe(req.recipe_path, ci=req.ci, variant=req.variant, overrides=req.overrides)

    def close(self) -> None:
        self._queue.clear()
