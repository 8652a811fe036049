"""The `forge` command line. Output only: every decision lives in the step and library modules.

The commands live in submodules (build, tools, registry), registered on the apps of ``forge.cli._app`` when
imported here, in the order ``forge --help`` lists them.

May import: every forge package.
"""
from __future__ import annotations

import sys

from forge.cli import console, supervise
from forge.core import options as env, steplog
from forge.cli import build, registry, tools  # noqa: F401  (registers the commands)
from forge.cli._app import app
from forge.core.errors import ExitCode, ForgeError

__all__ = ["app", "main"]


def main() -> None:
    if sys.argv[1:2] == ["build"] and (code := supervise.supervised()) is not None:
        sys.exit(code)   # the parent: the build ran in its child (forge.cli.supervise)
    supervise.stop_on_sigterm()
    try:
        app()
    except ForgeError as e:
        build._progress.stop()
        from forge.cli import ci

        ci.on_error(e)   # issue 18: a GitHub Actions annotation (at file:line for recipe problems) under --ci
        console.error(e.message, e.hint, steplog.log_of(e))
        sys.exit(int(e.exit_code))
    except (KeyboardInterrupt, supervise.Terminated) as e:
        build._progress.stop()
        said = "terminated (SIGTERM)" if isinstance(e, supervise.Terminated) else "interrupted"
        console.error(f"{said}: nothing partial was committed; rerun to continue", log=steplog.log_of(e))
        sys.exit(143 if isinstance(e, supervise.Terminated) else 130)
    except Exception as e:
        build._progress.stop()
        if env.current().debug:
            raise
        import traceback

        last = traceback.format_exc(limit=1).strip().splitlines()[-1]
        console.error(f"internal error (a bug in forge): {last}",
                      "rerun with FORGE_DEBUG=1 for the traceback, and report it.", steplog.log_of(e))
        sys.exit(int(ExitCode.UNEXPECTED))
