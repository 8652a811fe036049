"""What every `forge` command module shares: the typer apps, option types, helpers and consoles."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from forge.cli.console import err

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="forge: build quantized, eval-gated, scanned LLM serving images from a recipe.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and prune the step cache.")
app.add_typer(cache_app, name="cache")
registry_app = typer.Typer(no_args_is_help=True, help="Find, verify, pull and promote published artifacts.")
app.add_typer(registry_app, name="registry")

CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", envvar="FORGE_CACHE_DIR", show_envvar=True,
                                                  help="Step cache root (default: $XDG_CACHE_HOME/forge).")]
def _ci_mode(on: bool) -> bool:   # issue 18 hook: --ci also turns on GitHub Actions annotations (forge/cli/ci.py)
    from forge.cli import ci

    return ci.enable(on)


Ci = Annotated[bool, typer.Option("--ci", envvar="FORGE_CI", callback=_ci_mode,
                                  help="CI mode: unpinned inputs are errors, not warnings; under GitHub Actions, "
                                       "workflow annotations and the job summary.")]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
VariantOpt = Annotated[Optional[list[str]], typer.Option(
    "--variant", metavar="NAME", help="Only this variant of the recipe (repeatable; default: all its variants).")]
RegistryDir = Annotated[Optional[Path], typer.Option("--registry-dir", envvar="FORGE_REGISTRY_DIR", show_envvar=True,
                                                     help="Embedded registry root (default: $XDG_DATA_HOME/forge/registry).")]
AcceptProxyEval = Annotated[bool, typer.Option(
    "--accept-proxy-eval", help="Also a proxy-validated artifact: every gate passed, but the candidate was evaluated "
                                "on another engine or device than the image ships for (recorded on the record).")]


def _store(cache_dir: Path | None):
    from forge.store.local import Store, default_cache_dir

    return Store(cache_dir or default_cache_dir())


def _load(recipe: Path, ci: bool, cache_dir: Path | None = None, *, target: bool = True):
    """Resolve a recipe (forge.recipe.resolve: its target-GPU contract and fit included, unless ``target=False``, for
    commands that ask about other GPUs); print its warnings."""
    from forge.recipe.resolve import resolve

    resolved = resolve(recipe, downloads=_store(cache_dir).root / "downloads", ci=ci, target=target)
    warnings = list(resolved.warnings)
    if resolved.is_auto:   # each candidate resolved as its own trial (forge.orchestrate.auto)
        from forge.orchestrate.auto import check_recipe

        warnings += check_recipe(resolved)
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    return resolved


def _registry(registry_dir: Path | None):
    from forge.registry import LocalRegistry

    return LocalRegistry(registry_dir)
