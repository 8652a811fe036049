"""Executors run the steps of a build wherever they run; ``forge.orchestrate.build`` only plans and hands them out.

The driver (``forge.orchestrate.build.execute``, the one scheduler) submits a ``StepRequest`` for every step whose upstream steps are
committed -- several at once when they are independent -- and takes ``StepDone`` answers back in the
order they finish. A request names the step, the recipe (path and digest: a remote executor ships the bytes
and checks them against it) and the *keys* of the committed upstream entries; the executor computes the step's key where the step runs (device, GPUs,
tool versions are key material: ``forge.executors.runner.key_material``), reuses a committed entry or
runs, hashes, writes the manifest and commits with one rename, and answers with the committed key.
Progress comes back as ``Event``\\s while the step runs.

Executors: ``LocalExecutor`` (in this process, one step at a time: the default) and
``ProcessExecutor`` (each step in a ``python -m forge.executors.process`` worker: the seam's test).
A distributed executor implements the same three methods; its workers share only the step cache.

May import: forge.core, forge.gpu, forge.recipe, forge.steps, forge.store.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

from forge.core import errors

__all__ = ["StepRequest", "StepDone", "Event", "EventSink", "Executor", "error_to_json", "error_from_json"]


@dataclass(frozen=True)
class StepRequest:
    step: str
    recipe_path: str
    recipe_digest: str            # the worker refuses a recipe whose bytes changed since planning
    ci: bool
    cache_root: str
    upstream: dict[str, str] = field(default_factory=dict)   # upstream step -> key of its committed entry
    force: bool = False           # rebuild even when the key is committed (replace that entry)
    variant: str | None = None    # the recipe's variant (load_recipe(..., variant=...))
    overrides: dict = field(default_factory=dict)   # programmatic overrides (load_recipe(..., overrides=...))
    cache_remote: str | None = None   # oci://HOST/REPO: the remote step cache (forge.store.remote), or None
    cache_remote_mode: str = "readwrite"   # "readwrite" (pull and push) or "read" (pull only)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StepRequest":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class StepDone:
    step: str
    key: str
    status: str                   # HIT (reused), REMOTE (pulled from the remote step cache) or BUILT
    seconds: float


@dataclass(frozen=True)
class Event:
    step: str
    kind: str                     # "start" (the step will run or be pulled: key known), "progress" or "warning"
    key: str | None = None
    message: str = ""
    completed: float | None = None
    total: float | None = None
    unit: str | None = None       # None: items; "B": bytes (the CLI shows size, rate and ETA)


EventSink = Callable[[Event], None]


class Executor(Protocol):
    def submit(self, request: StepRequest, events: EventSink, resolved=None) -> None:
        """Queue a step whose upstream entries are committed; its progress goes to ``events``. Returns at once.
        ``resolved``: the request's resolved recipe (``forge.recipe.resolve.Resolved``), for an executor that runs
        the step in this process; one whose workers run elsewhere resolves the request's recipe there."""

    def next_done(self) -> StepDone:
        """Block until one submitted step finished; raise its ForgeError if it failed."""

    def close(self) -> None:
        """Stop what is still running (a build stopped early); nothing half-done is committed."""


def error_to_json(e: BaseException) -> dict:
    if isinstance(e, errors.ForgeError):
        out = {"type": type(e).__name__, "message": e.message, "hint": e.hint}
        if isinstance(e, errors.RecipeError):
            out["problems"] = e.problems
        return out
    return {"type": "internal", "message": f"{type(e).__name__}: {e}", "hint": None}


def error_from_json(d: dict, step: str) -> errors.ForgeError:
    """The worker's error as the same ForgeError class (so the exit code and hint survive the trip)."""
    cls = getattr(errors, d.get("type", ""), None)
    if isinstance(cls, type) and issubclass(cls, errors.ForgeError):
        if cls is errors.RecipeError:
            return errors.RecipeError(d.get("problems") or [d["message"]], hint=d.get("hint"))
        return cls(d["message"], hint=d.get("hint"))
    return errors.StepError(f"step {step} failed in its worker: {d.get('message')}",
                            hint="Rerun with the local executor and FORGE_DEBUG=1 for the traceback.")
