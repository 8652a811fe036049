"""One error hierarchy. Every user-facing failure is a ForgeError carrying an exit code and a hint.

The CLI entry point is the only place that turns these into output; anything else that escapes
is a bug and exits 1 (with the traceback only under FORGE_DEBUG=1).
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    INVALID = 2          # invalid recipe or usage
    EVAL_GATE = 3        # eval gate failed
    SCAN_GATE = 4        # scan gate failed
    TOOL = 5             # required external tool missing or failed
    SMOKE_TEST = 6       # the built image failed its smoke test


class ForgeError(Exception):
    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(ForgeError):
    exit_code = ExitCode.INVALID


class RecipeError(ForgeError):
    """One or more problems in a recipe; each problem is a located message."""

    exit_code = ExitCode.INVALID

    def __init__(self, problems: list[str], *, hint: str | None = None):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems), hint=hint)


class EvalGateError(ForgeError):
    exit_code = ExitCode.EVAL_GATE


class ScanGateError(ForgeError):
    exit_code = ExitCode.SCAN_GATE


class ToolError(ForgeError):
    exit_code = ExitCode.TOOL


class EvidenceError(ToolError):
    """Evidence a decision rests on cannot be trusted: a file that is missing, unreadable, unparseable or empty,
    or whose bytes no longer match the digest recorded for it (a committed step output edited in place, a
    registry blob). Nothing is decided from it (exit 5); the message names the file."""


class ResourceError(ToolError):
    """What cannot fit this host (memory), refused with the numbers before it is tried (exit 5), instead of
    being found out by the kernel."""


class StepError(ForgeError):
    """A step failed for a reason that is not the user's recipe (corrupt input, library failure)."""

    exit_code = ExitCode.UNEXPECTED


class SmokeTestError(ForgeError):
    """The built image did not serve: it exited, never became healthy, or answered a request with an error.
    The message carries the HTTP status, the response body and the tail of the server's log."""

    exit_code = ExitCode.SMOKE_TEST
