"""ProcessExecutor: each step in its own ``python -m forge.executors.process`` worker (``--executor process``).

It proves the executor seam the way a distributed executor will use it: the worker gets nothing but
a serialized ``StepRequest`` (on stdin), loads the recipe itself, computes the step's key from what
it probes *there*, and answers with JSON lines on its stdout -- events while it runs, then ``done``
(the committed key) or ``error`` (the ForgeError, class and hint kept). The step's own output goes to
stderr, so library prints cannot break the protocol. Independent submitted steps run in parallel,
up to ``max_parallel``; answers come back as the workers finish. A worker the kernel kills (SIGKILL: the OOM
killer's signal) is reported as that, with the worker's peak RSS (exit 5), where an in-process step would take
forge down with it.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from collections import deque
from dataclasses import asdict
from pathlib import Path

from forge.core import options as env, options as fenv
from forge.executors import Event, EventSink, StepDone, StepRequest, error_from_json, error_to_json
from forge.core.errors import ResourceError, StepError, UsageError
from forge.executors.local import committed
from forge.executors.runner import run_step, stores_of
from forge.recipe.resolve import resolve
from forge.steps.graph import spec_named
from forge.store.local import Store

__all__ = ["ProcessExecutor"]

_ROOT = str(Path(__file__).resolve().parents[2])   # the directory forge is imported from


class ProcessExecutor:
    def __init__(self, max_parallel: int = 2):
        self.max_parallel = max_parallel
        self._queue: deque[tuple[StepRequest, EventSink]] = deque()
        self._running: dict[int, tuple[StepRequest, subprocess.Popen, EventSink, list]] = {}
        self._sel = selectors.DefaultSelector()
        self.peak = 0                 # most workers that ran at once (independent steps run together)

    def submit(self, request: StepRequest, events: EventSink, resolved=None) -> None:
        self._queue.append((request, events))
        self._start()

    def _start(self) -> None:
        while self._queue and len(self._running) < self.max_parallel:
            req, events = self._queue.popleft()
            env = fenv.passthrough(())
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, fenv.current().pythonpath]))
            proc = subprocess.Popen([sys.executable, "-m", "forge.executors.process"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
            proc.stdin.write(req.to_json())
            proc.stdin.close()
            answer: list = []
            self._running[proc.pid] = (req, proc, events, answer)
            self._sel.register(proc.stdout, selectors.EVENT_READ, proc.pid)
            self.peak = max(self.peak, len(self._running))

    def next_done(self) -> StepDone:
        if not self._running and not self._queue:
            raise RuntimeError("next_done() with nothing submitted")
        while True:
            for sel_key, _ in self._sel.select():
                pid = sel_key.data
                req, proc, events, answer = self._running[pid]
                line = proc.stdout.readline()
                if line:
                    msg = json.loads(line)
                    if "event" in msg:
                        events(Event(**msg["event"]))
                    else:
                        answer.append(msg)
                    continue
                self._sel.unregister(proc.stdout)          # EOF: the worker is done
                _, status, usage = os.wait4(proc.pid, 0)   # its own peak RSS too (ru_maxrss, KiB on Linux)
                proc.returncode = code = os.waitstatus_to_exitcode(status)
                del self._running[pid]
                self._start()
                return _answer(req, answer, code, usage.ru_maxrss * 1024)

    def close(self) -> None:
        self._queue.clear()
        for _, proc, _, _ in self._running.values():
            proc.kill()
            proc.wait()
            self._sel.unregister(proc.stdout)
        self._running.clear()


def _answer(req: StepRequest, answer: list, code: int, peak_rss: int = 0) -> StepDone:
    if answer and "done" in answer[-1]:
        return StepDone(**answer[-1]["done"])
    if answer and "error" in answer[-1]:
        raise error_from_json(answer[-1]["error"], req.step)
    if code == -signal.SIGKILL:   # what the kernel's OOM killer sends; nothing is committed
        raise ResourceError(f"step {req.step} was killed by the kernel (out of memory?) at {peak_rss / 1e9:.1f} GB "
                            "peak RSS; nothing of it was committed",
                            hint="`forge fit RECIPE` gives what each step needs on this CPU; build where that much "
                                 "memory is free, or where a GPU is.")
    raise StepError(f"the worker of step {req.step} exited with code {code} and no answer")


def _worker() -> int:
    """Run the one step named on stdin; speak JSON lines on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg, default=str) + "\n")
        proto.flush()

    try:
        env.quiet_libraries()
        req = StepRequest.from_json(sys.stdin.read())
        store = Store(Path(req.cache_root))
        resolved = resolve(req.recipe_path, downloads=store.root / "downloads", ci=req.ci, variant=req.variant,
                           overrides=req.overrides)
        if resolved.digest != req.recipe_digest:
            raise UsageError(f"{req.recipe_path} changed while the build ran ({req.recipe_digest[:19]}… was planned)",
                             hint="Rerun the build.")
        upstream = {d: committed(store, k, d) for d, k in req.upstream.items()}
        done = run_step(spec_named(resolved, req.step), resolved, stores_of(req, store), upstream, force=req.force,
                        events=lambda e: send({"event": asdict(e)}))
        send({"done": asdict(done)})
        return 0
    except BaseException as e:  # noqa: BLE001 -- every failure goes back to the driver as an answer
        send({"error": error_to_json(e)})
        return 1


if __name__ == "__main__":
    sys.exit(_worker())
