"""A step's log file: everything the libraries write while the step runs goes there, not to the terminal.

``capture(path)`` wraps one running step. For its duration file descriptors 1 and 2 point at the log,
so everything written to them lands there in order: subprocesses and C extensions, and every Python
stream on them (``sys.stdout``/``sys.stderr`` and whatever captured them at import time: tqdm bars,
``warnings``, ``logging`` and loguru handlers, ``print``). The Python stream objects are left in place
on purpose: a library imported during one step keeps a handle on ``sys.stderr`` after it, and that
handle must follow fd 2 to the next step's log, not point at a closed file. forge's own output goes
through ``terminal("stdout"|"stderr")``: file objects that always reach the real terminal, during a
capture through a saved duplicate of the original descriptor.

A step that raises leaves its log in place with the traceback appended; ``log_of(exc)`` gives its
path so the CLI can print it.
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["capture", "terminal", "log_of"]

_ATTR = "forge_step_log"
_saved: dict[str, IO[str]] = {}   # "stdout"/"stderr" -> the real terminal stream, while a capture runs


class _Terminal:
    """A file object for forge's own output: the terminal stream, even while a step's output is captured."""

    def __init__(self, which: str):
        self.which = which

    def _target(self) -> IO[str]:
        return _saved.get(self.which) or getattr(sys, self.which)

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()

    def fileno(self) -> int:
        return self._target().fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._target(), "encoding", None) or "utf-8"


def terminal(which: str) -> IO[str]:
    """The real stdout or stderr, for forge's own output (see the module doc)."""
    if which not in ("stdout", "stderr"):
        raise ValueError(which)
    return _Terminal(which)  # type: ignore[return-value]


def log_of(exc: BaseException) -> Path | None:
    """The log file of the step whose failure raised ``exc`` (None: it did not come from a step)."""
    return getattr(exc, _ATTR, None)


@contextmanager
def capture(path: Path) -> Iterator[Path]:
    """Send fds 1 and 2 to ``path`` (truncated) for the duration of the block."""
    if _saved:   # nested (a step running a step): the outer capture already sends everything to its log
        yield path
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    try:
        dups = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:   # no stdout/stderr to redirect (a daemon with closed fds): nothing can reach a terminal
        yield path
        return
    log = open(path, "w", buffering=1, encoding="utf-8", errors="replace")
    for which, fd in (("stdout", 1), ("stderr", 2)):
        encoding = getattr(getattr(sys, which), "encoding", None) or "utf-8"
        _saved[which] = os.fdopen(dups[fd], "w", buffering=1, encoding=encoding, errors="replace", closefd=False)
        os.dup2(log.fileno(), fd)
    try:
        yield path
    except BaseException as exc:
        log.write("\n" + "".join(traceback.format_exception(exc)))
        if log_of(exc) is None:
            try:
                setattr(exc, _ATTR, path)
            except AttributeError:
                pass
        raise
    finally:
        for stream in (sys.stdout, sys.stderr, log):   # what the step left buffered belongs to its log
            _flush(stream)
        for which, fd in (("stdout", 1), ("stderr", 2)):
            _flush(_saved[which])
            os.dup2(dups[fd], fd)
        _saved.clear()          # forge's output goes to fds 1/2 again, before the duplicates close
        for fd in dups.values():
            os.close(fd)
        log.close()


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass

