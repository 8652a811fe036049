"""`forge build` watches itself: the build runs in a forked child, this process only waits for it.

Steps that hold weights (reference, quantize, eval) run in the build's process with the default executor. When the
kernel's OOM killer ends that process (SIGKILL: nothing can be caught, flushed or printed), the terminal used to just
end. The parent, which holds nothing, survives it and says what happened: which step was running, the child's peak
RSS, what to do; exit 5, like any other resource refusal. Every other outcome is the child's own exit status (its
messages are already printed; it shares the terminal). ``FORGE_NO_SUPERVISOR=1`` runs the build in one process.

The child tells the parent which step it is in through a pipe (``step_started``): a name per line, the last one
wins. The fork happens before anything starts a thread (rich's live display, torch's pools).
"""
from __future__ import annotations

import os
import signal
import sys

from forge.core import options
from forge.core.errors import ResourceError

__all__ = ["supervised", "step_started", "killed_message", "stop_on_sigterm", "Terminated"]

_PIPE: int | None = None   # the child's end: where step_started writes


def step_started(name: str) -> None:
    """Tell the watching parent (if any) that step ``name`` is now running."""
    if _PIPE is not None:
        try:
            os.write(_PIPE, f"{name}\n".encode())
        except OSError:
            pass


def killed_message(step: str | None, peak_rss_bytes: float) -> ResourceError:
    where = f"during step {step}" if step else "before its first step"
    return ResourceError(f"the build was killed by the kernel (out of memory?) {where} at {peak_rss_bytes / 1e9:.1f} "
                         "GB peak RSS; nothing of that step was committed (the steps before it are cached)",
                         hint="`forge fit RECIPE` gives what each step needs on this CPU; build where that much memory "
                              "is free (a GPU machine, or one without the other processes), then rerun: finished steps "
                              "are reused.")


class Terminated(BaseException):
    """SIGTERM reached the build (a CI job cancelled, a ``kill``): raised where the build is, so that the servers it
    started are stopped and its staging removed, as on Ctrl-C. Dying of the signal, as before, left a smoke test's
    server running with nobody to stop it (it has its own session). Not a KeyboardInterrupt: click would take it."""


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises Terminated in this process; a process forked from it dies of it as usual."""
    me = os.getpid()

    def handler(signum, _frame) -> None:
        if os.getpid() != me:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()
    signal.signal(signal.SIGTERM, handler)


def supervised() -> int | None:
    """Fork. In the child: None (go on and build). In the parent: wait, and return the exit code to leave with, after
    saying why when the child was killed by SIGKILL."""
    global _PIPE
    if options.current().no_supervisor or not hasattr(os, "fork"):
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _PIPE = write_end
        _die_with(parent)
        return None
    os.close(write_end)
    # Ctrl-C reaches the whole foreground process group: the child stops cleanly (exit 130) and the parent waits
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
    _, status, usage = os.wait4(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        steps = pipe.read().decode(errors="replace").split()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL:
            from forge.cli import console   # only on this path: the parent imports nothing else

            e = killed_message(steps[-1] if steps else None, usage.ru_maxrss * 1024)
            console.error(e.message, e.hint)
            return int(e.exit_code)
        return 128 + sig
    return os.WEXITSTATUS(status)


def _die_with(parent: int) -> None:
    """The child is killed when the parent is (a CI job's timeout SIGKILLs the process it started): no build goes on
    behind a terminal that has ended (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # the parent died before the line above
        os._exit(int(ResourceError.exit_code))
