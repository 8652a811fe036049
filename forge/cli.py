"""The `forge` command line. Output only: every decision lives in the step and library modules."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from forge import __version__
from forge.errors import ExitCode, ForgeError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="forge: build quantized, eval-gated, scanned LLM serving images from a recipe.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and prune the step cache.")
app.add_typer(cache_app, name="cache")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", envvar="FORGE_CACHE_DIR", show_envvar=True,
                                                  help="Step cache root (default: $XDG_CACHE_HOME/forge).")]
Ci = Annotated[bool, typer.Option("--ci", envvar="FORGE_CI", help="CI mode: unpinned inputs are errors, not warnings.")]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
NOT_YET = ("eval", "package", "scan", "publish")


def _store(cache_dir: Path | None):
    from forge.store import Store, default_cache_dir

    return Store(cache_dir or default_cache_dir())


def _load(recipe: Path, ci: bool):
    from forge.recipe.load import load_recipe

    loaded = load_recipe(recipe, ci=ci)
    for w in loaded.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    return loaded


@app.command()
def validate(recipe: RecipeArg, ci: Ci = False) -> None:
    """Check a recipe (schema, files, model source, target GPU). Exit 0 if valid, 2 if not."""
    loaded = _load(recipe, ci)
    out.print(f"[green]✓[/] {recipe}: valid ({loaded.recipe.name}, {loaded.digest[:19]}…)", highlight=False)


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (for yaml-language-server and other editors)."""
    from forge.recipe.schema import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def plan(recipe: RecipeArg, cache_dir: CacheDir = None, ci: Ci = False,
         json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the steps with their cache keys and HIT/MISS status. Runs nothing."""
    from forge.build import plan as make_plan

    loaded = _load(recipe, ci)
    steps = make_plan(loaded, _store(cache_dir))
    if json_out:
        sys.stdout.write(json.dumps([{"step": p.spec.name, "status": p.status, "key": p.key,
                                      "depends": list(p.spec.depends)} for p in steps], indent=2) + "\n")
        return
    table = Table(title=f"plan: {loaded.recipe.name}", title_justify="left")
    for col in ("step", "status", "key", "depends on", "what it does"):
        table.add_column(col)
    colors = {"HIT": "green", "MISS": "yellow", "PENDING": "dim", "FORCED": "yellow"}
    for p in steps:
        table.add_row(p.spec.name, f"[{colors[p.status]}]{p.status}[/]", (p.key or "after upstream")[:16],
                      ", ".join(p.spec.depends) or "-", p.spec.summary)
    out.print(table)
    out.print(f"[dim]not in this forge build yet: {', '.join(NOT_YET)}[/]")


@app.command()
def build(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML file.", show_default=False)] = None,
    cache_dir: CacheDir = None,
    ci: Ci = False,
    force: Annotated[Optional[str], typer.Option(
        "--force", is_flag=False, flag_value="*", metavar="[STEP]",
        help="Rebuild STEP even if cached (all steps when no STEP is given; put it after the recipe).")] = None,
) -> None:
    """Build a recipe: run the steps whose inputs changed, reuse the rest."""
    from forge.build import build as run_build

    if recipe is None and force and force != "*" and Path(force).suffix in (".yaml", ".yml"):
        recipe, force = Path(force), "*"   # `forge build --force recipe.yaml`
    if recipe is None:
        raise UsageError("missing RECIPE", hint="Usage: forge build RECIPE [--force [STEP]]")
    t0 = time.monotonic()
    loaded = _load(recipe, ci)
    store = _store(cache_dir)
    out.print(f"[bold]{loaded.recipe.name}[/] · recipe {loaded.digest[7:19]} · cache {store.root}", highlight=False)
    results = run_build(loaded, store, force={force} if force else set(), on_start=_on_start, on_done=_on_done)
    built = sum(r.status == "BUILT" for r in results)
    out.print(f"[green]done[/] in {time.monotonic() - t0:.1f}s: {built} built, {len(results) - built} reused. "
              f"Output: {results[-1].entry.out}", highlight=False)
    out.print(f"[dim]not in this forge build yet: {', '.join(NOT_YET)}; the artifact is not validated.[/]")


_progress = None


def _on_start(spec, key):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    global _progress
    _progress = Progress(SpinnerColumn(), TextColumn("{task.fields[step]:<10}"), TextColumn("{task.description}"),
                         TimeElapsedColumn(), console=out, transient=True)
    _progress.start()
    task = _progress.add_task("starting", step=spec.name, total=None)

    def report(message: str, *, completed: float | None = None, total: float | None = None) -> None:
        _progress.update(task, description=message, completed=completed, total=total)

    return report


def _on_done(result) -> None:
    global _progress
    if _progress is not None:
        _progress.stop()
        _progress = None
    mark = "[green]✓[/]" if result.status == "HIT" else "[cyan]✓[/]"
    out.print(f"  {mark} {result.name:<10} {result.status:<6} {result.key[:12]}  {result.seconds:6.2f}s  "
              f"{result.output_digest[7:19]}", highlight=False)


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = None,
             json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List cached step outputs."""
    store = _store(cache_dir)
    rows = []
    for e in store.entries():
        size = sum(f["size"] for f in e.manifest["output"]["files"].values())
        rows.append({"key": e.key, "step": e.step, "recipe": e.manifest["recipe"]["name"], "bytes": size,
                     "created": e.manifest["started_at"], "seconds": e.manifest["seconds"],
                     "output_digest": e.output_digest})
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=f"cache: {store.root}", title_justify="left")
    for col in ("key", "step", "recipe", "size", "created", "build time"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"][:16], r["step"], r["recipe"], _human(r["bytes"]), r["created"], f"{r['seconds']:.1f}s")
    out.print(table)


@cache_app.command("prune")
def cache_prune(
    cache_dir: CacheDir = None,
    older_than: Annotated[float, typer.Option(help="Remove entries not used for this many days.")] = 30.0,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
) -> None:
    """Remove interrupted-build debris and entries unused for --older-than days (or --all)."""
    store = _store(cache_dir)
    removed = store.prune(older_than_s=older_than * 86400, everything=all_, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for what, path, size in removed:
        out.print(f"  {verb} {what:<10} {path.name[:16]}  {_human(size)}", highlight=False)
    out.print(f"{verb} {len(removed)} item(s), {_human(sum(s for *_, s in removed))}")


@app.command()
def version() -> None:
    """Print forge's version."""
    out.print(f"forge {__version__}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    try:
        app()
    except ForgeError as e:
        if _progress is not None:
            _progress.stop()
        err.print(f"[red]error:[/] {e.message}", highlight=False, soft_wrap=True)
        if e.hint:
            err.print(f"[dim]hint:[/] {e.hint}", highlight=False, soft_wrap=True)
        sys.exit(int(e.exit_code))
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: nothing partial was committed; rerun to continue")
        sys.exit(130)
    except Exception:
        if os.environ.get("FORGE_DEBUG"):
            raise
        import traceback

        err.print(f"[red]internal error[/] (a bug in forge): {traceback.format_exc(limit=1).strip().splitlines()[-1]}",
                  highlight=False)
        err.print("[dim]hint:[/] rerun with FORGE_DEBUG=1 for the traceback, and report it.")
        sys.exit(int(ExitCode.UNEXPECTED))
