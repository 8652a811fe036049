"""The `forge` command line. Output only: every decision lives in the step and library modules."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from forge import __version__, console, env, steplog
from forge.console import err, out
from forge.errors import ExitCode, ForgeError, UsageError
from forge.methods import NAMES as METHOD_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="forge: build quantized, eval-gated, scanned LLM serving images from a recipe.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and prune the step cache.")
app.add_typer(cache_app, name="cache")
registry_app = typer.Typer(no_args_is_help=True, help="Find, verify, pull and promote published artifacts.")
app.add_typer(registry_app, name="registry")

CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", envvar="FORGE_CACHE_DIR", show_envvar=True,
                                                  help="Step cache root (default: $XDG_CACHE_HOME/forge).")]
def _ci_mode(on: bool) -> bool:   # issue 18 hook: --ci also turns on GitHub Actions annotations (forge/ci.py)
    from forge import ci

    return ci.enable(on)


Ci = Annotated[bool, typer.Option("--ci", envvar="FORGE_CI", callback=_ci_mode,
                                  help="CI mode: unpinned inputs are errors, not warnings; under GitHub Actions, "
                                       "workflow annotations and the job summary.")]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
VariantOpt = Annotated[Optional[list[str]], typer.Option(
    "--variant", metavar="NAME", help="Only this variant of the recipe (repeatable; default: all its variants).")]
RegistryDir = Annotated[Optional[Path], typer.Option("--registry-dir", envvar="FORGE_REGISTRY_DIR", show_envvar=True,
                                                     help="Embedded registry root (default: $XDG_DATA_HOME/forge/registry).")]


def _store(cache_dir: Path | None):
    from forge.store import Store, default_cache_dir

    return Store(cache_dir or default_cache_dir())


def _load(recipe: Path, ci: bool, cache_dir: Path | None = None):
    """Load a recipe and check its target-GPU contract; print warnings."""
    from forge.fit import check_recipe
    from forge.recipe.load import load_recipe

    loaded = load_recipe(recipe, ci=ci)
    if loaded.recipe.quantize.method == "auto":   # each candidate checked as its own trial (forge.auto)
        from forge.auto import check_recipe
    report, warnings = check_recipe(loaded, _store(cache_dir).root / "downloads")
    for w in (*loaded.warnings, *warnings):
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    return loaded, report


@app.command()
def validate(recipe: RecipeArg, ci: Ci = False, cache_dir: CacheDir = None, variant: VariantOpt = None) -> None:
    """Check a recipe (schema, files, model source, target-GPU contract and fit; every variant against the GPU it
    names). Exit 0 if valid, 2 if not."""
    from forge import variants

    if variant or variants.has_variants(recipe, ci=ci):
        checked = variants.check(recipe, _store(cache_dir).root / "downloads", ci=ci, selected=variant)
        console.variant_checks(checked)
        if bad := [c for c in checked if c.error is not None]:
            raise UsageError(f"{recipe}: {len(bad)} of {len(checked)} variant(s) invalid: "
                             f"{', '.join(c.name for c in bad)}", hint=bad[0].error.hint)
        return
    loaded, report = _load(recipe, ci, cache_dir)
    from forge.sources import check_local_weights

    check_local_weights(loaded)   # safetensors headers against file sizes; a build checks them in its resolve step
    fits = "" if report is None else (f"; fits {report.gpu}: {report.weights_gb:.1f} GB weights, "
                                      f"{report.headroom_gb:.1f} GB headroom, up to {report.max_seqs_at_max_model_len} "
                                      f"sequences at max_model_len")
    out.print(f"[green]✓[/] {recipe}: valid ({loaded.recipe.name}, {loaded.digest[:19]}…){fits}", highlight=False)


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (for yaml-language-server and other editors)."""
    from forge.recipe.schema import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def plan(recipe: RecipeArg, cache_dir: CacheDir = None, ci: Ci = False,
         json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
         variant: VariantOpt = None) -> None:
    """List the steps with their cache keys and HIT/MISS status (for a recipe with variants: the graph of all
    variants, shared steps once). Runs nothing: no step, no external tool."""
    from forge.build import plan as make_plan
    from forge import variants

    if variant or variants.has_variants(recipe, ci=ci):
        store = _store(cache_dir)
        checked = _variants(recipe, ci, store, variant)
        nodes = variants.plan([c.loaded for c in checked], store)
        if json_out:
            sys.stdout.write(json.dumps({"variants": [c.name for c in checked], "nodes": [
                {"id": n.id, "step": n.step, "variants": n.variants, "shared": n.shared, "status": n.status,
                 "key": n.key, "reason": n.reason, "depends": n.depends} for n in nodes]}, indent=2) + "\n")
            return
        console.variant_plan(nodes, title=f"plan: {checked[0].loaded.recipe.name} ({len(checked)} variants)")
        return
    loaded, _ = _load(recipe, ci, cache_dir)
    if loaded.recipe.quantize.method == "auto":
        return _plan_auto(loaded, _store(cache_dir), json_out)
    steps = make_plan(loaded, _store(cache_dir))
    if json_out:
        sys.stdout.write(json.dumps([{"step": p.spec.name, "status": p.status, "key": p.key, "reason": p.reason,
                                      "depends": list(p.spec.depends)} for p in steps], indent=2) + "\n")
        return
    colors = {"HIT": "green", "MISS": "yellow", "PENDING": "dim", "FORCED": "yellow"}
    console.table(("step", "status", "key", "depends on", "what it does"),
                  [(p.spec.name, f"[{colors[p.status]}]{p.status}[/]", p.key[:16] if p.key else (p.reason or "after upstream"),
                    ", ".join(p.spec.depends) or "-", p.spec.summary) for p in steps],
                  title=f"plan: {loaded.recipe.name}")
    out.print(f"[dim]then publish → {loaded.recipe.publish.registry} (always runs: records the build and its status)[/]",
              highlight=False)


def _plan_auto(loaded, store, json_out: bool) -> None:
    """`forge plan` of a method: auto recipe: the trials a walk may need, cheapest first (forge.auto)."""
    from forge import auto

    p = auto.plan(loaded, store)
    if json_out:
        sys.stdout.write(json.dumps(p, indent=2) + "\n")
        return
    verdicts = {"pass": "[green]passes[/]", "fail": "[red]fails[/]", None: "-"}
    console.table(("#", "scheme", "$/1M tok", "weights", "cached", "gate"),
                  [(str(i), t["scheme"], f"{t['usd_per_million_tokens']:.4g}" if t["usd_per_million_tokens"] else "-",
                    console.human(t["fit_weight_bytes"]), "yes" if t["cached"] else "no", verdicts[t["gate"]])
                   for i, t in enumerate(p["trials"], 1)], title=f"method: auto plan: {loaded.recipe.name} "
                                                                f"({p['gpu']}/{p['engine']})")
    out.print(f"[dim]walked cheapest first, stopping at the first that passes; a scheme that just fails is retried "
              f"with its most damaged layers in BF16 (up to {p['mix_steps']} more trials each)"
              + (f"; at most {p['max_trials']} trials" if p["max_trials"] else "") + "[/]", highlight=False)
    for s in p["skipped"]:
        out.print(f"[dim]not legal here: {escape(s['candidate'])}: {escape(s['why'])}[/]", highlight=False)


def _trial_line(trial) -> None:
    """One line per method: auto trial as the walk finishes it."""
    verdict = "[green]passed[/]" if trial.passed else "[red]failed[/]"
    _progress.console.print(f"[bold]trial[/] {escape(trial.name)}: gate {verdict}"
                            f"{' (cached)' if trial.cached else ''} · {trial.seconds:.1f} s", highlight=False)


@app.command()
def build(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML file.", show_default=False)] = None,
    cache_dir: CacheDir = None,
    ci: Ci = False,
    force: Annotated[Optional[str], typer.Option(
        "--force", is_flag=False, flag_value="*", metavar="[STEP]",
        help="Rebuild STEP even if cached (all steps when no STEP is given; put it after the recipe).")] = None,
    registry_dir: RegistryDir = None,
    publish_to: Annotated[Optional[str], typer.Option(
        "--publish-to", envvar="FORGE_PUBLISH_TO", metavar="local|oci://HOST/REPO",
        help="Publish here instead of the recipe's publish.registry (the recipe digest, and so the image, stay the same).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the record, steps, reports and logs as JSON on stdout "
                                                          "(forge's progress lines go to stderr).")] = False,
    report_dir: Annotated[Optional[Path], typer.Option(
        "--report-dir", envvar="FORGE_REPORT_DIR", show_envvar=True,
        help="Write report.html, junit.xml and summary.md here (default: <cache>/reports/<recipe name>).")] = None,
    cache_remote: Annotated[Optional[str], typer.Option(
        "--cache-remote", envvar="FORGE_CACHE_REMOTE", show_envvar=True, metavar="oci://HOST/REPO",
        help="Remote step cache in an OCI registry: pull a step's output before building it, push what this build "
             "makes. Unreachable: a warning, and the build goes on locally.")] = None,
    cache_remote_mode: Annotated[str, typer.Option(
        "--cache-remote-mode", envvar="FORGE_CACHE_REMOTE_MODE", show_envvar=True, metavar="readwrite|read",
        help="read: pull only (untrusted builds never push).")] = "readwrite",
    executor: Annotated[str, typer.Option(
        "--executor", metavar="local|ray", help="Where steps run: in this process, or as tasks on a Ray cluster "
                                                "(needs --cache-remote; pip install 'forge-llm[ray]').")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", show_envvar=True,
        help="The Ray cluster of --executor ray (default: the one started on this machine).")] = None,
    variant: VariantOpt = None,
) -> None:
    """Build a recipe: run the steps whose inputs changed, reuse the rest, then publish the result and its status."""
    from forge import env, pipeline

    global _progress

    if recipe is None and force and force != "*" and Path(force).suffix in (".yaml", ".yml"):
        recipe, force = Path(force), "*"   # `forge build --force recipe.yaml`
    if recipe is None:
        raise UsageError("missing RECIPE", hint="Usage: forge build RECIPE [--force [STEP]]")
    t0 = time.monotonic()
    shown = err if json_out else out   # with --json, stdout holds only the JSON
    _progress = console.StepProgress(shown)
    from forge import variants

    remote = None
    if cache_remote:
        from forge.cache_remote import RemoteCache

        remote = RemoteCache.parse(cache_remote, cache_remote_mode)   # a bad URL or mode: exit 2 before building
    if variant or variants.has_variants(recipe, ci=ci):
        return _build_variants(recipe, ci, cache_dir, variant, force, registry_dir, publish_to, json_out, report_dir, t0,
                               executor=executor, ray_address=ray_address, remote=remote)
    loaded, _ = _load(recipe, ci, cache_dir)
    pipeline.check_target(publish_to)
    store = _store(cache_dir)
    runner = _executor(executor, ray_address, loaded, store, remote)
    shown.print(f"[bold]{loaded.recipe.name}[/] · recipe {loaded.digest[7:19]} · cache {store.root}", highlight=False)

    def on_start(spec, key):
        return _progress.start(spec.name)

    def on_done(result) -> None:
        _progress.done(result.name, result.status, result.key, result.seconds, result.output_digest)
        if result.name == "gate":
            from forge.steps import gate

            console.gate_table(json.loads(gate.Output.read(result.entry).verdict.read_text()), console=shown)

    run, extra = pipeline.run, {}
    if loaded.recipe.quantize.method == "auto":   # walk the trials, then build the chosen one (forge.auto)
        from forge import auto

        run, extra = auto.run, {"on_trial": _trial_line}
    try:
        outcome = run(loaded, store, force={force} if force else set(), registry_dir=registry_dir,
                      publish_to=publish_to, executor=runner, on_start=on_start, on_done=on_done,
                      on_publish=lambda: _progress.start("publish"), **extra,
                      report_dir=report_dir or store.root / "reports" / loaded.recipe.name,
                      cache_remote=remote)
    finally:
        _progress.stop()
    for warning in outcome.build.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    _print_outcome(outcome, t0, json_out)
    if outcome.decision is not None:
        _progress.console.print(f"[bold]method: auto[/] {escape(outcome.decision.why)} Decision report: "
                                f"{outcome.decision.files[-1]}", highlight=False)
    if outcome.error is not None:
        raise outcome.error   # already recorded as rejected, with its reason


def _executor(name: str, ray_address: str | None, loaded, store, remote):
    """The executor --executor names (None: the pipeline's default, in this process)."""
    if name == "local":
        return None
    if name == "ray":
        from forge.executors.ray import RayExecutor

        return RayExecutor(loaded, store, address=ray_address, cache_remote=remote)
    raise UsageError(f"--executor {name!r} is not an executor", hint="Use --executor local (default) or --executor ray.")


def _variants(recipe: Path, ci: bool, store, selected: list[str] | None):
    """The recipe's (selected) variants, each checked against its GPU; warnings printed, problems exit 2."""
    from forge import variants

    checked = variants.load_variants(recipe, store.root / "downloads", ci=ci, selected=selected)
    for c in checked:
        for w in c.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)} (in variant {c.name!r})", highlight=False, soft_wrap=True)
    return checked


def _build_variants(recipe, ci, cache_dir, selected, force, registry_dir, publish_to, json_out, report_dir, t0, *,
                    executor: str, ray_address: str | None, remote) -> None:
    from forge import pipeline

    store = _store(cache_dir)
    checked = _variants(recipe, ci, store, selected)
    pipeline.check_target(publish_to)
    first = checked[0].loaded
    runner = _executor(executor, ray_address, first, store, remote)
    shown = _progress.console
    shown.print(f"[bold]{first.recipe.name}[/] · {len(checked)} variant(s): {', '.join(c.name for c in checked)} · "
                f"recipe {first.digest[7:19]} · cache {store.root}", highlight=False)

    def on_done(name, result, _variants) -> None:
        _progress.done(name, result.status, result.key, result.seconds, result.output_digest)
        if result.name == "gate":
            from forge.steps import gate

            console.gate_table(json.loads(gate.Output.read(result.entry).verdict.read_text()), console=shown)

    try:
        outcome = pipeline.run_variants(
            [c.loaded for c in checked], store, force={force} if force else set(), registry_dir=registry_dir,
            publish_to=publish_to, on_start=lambda name, spec, key: _progress.start(name), on_done=on_done,
            on_publish=lambda name: _progress.start(f"publish · {name}"), executor=runner, cache_remote=remote,
            report_dir=report_dir or store.root / "reports" / first.recipe.name)
    finally:
        _progress.stop()
    for warning in outcome.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    for o in outcome.variants.values():
        console.publish_line(o.record, o.registry_root, console=shown)
    rows = {name: (o.record, o.gate and json.loads(o.gate.verdict.read_text())) for name, o in outcome.variants.items()}
    console.variant_table(rows, console=shown)
    results = {r.key: r for o in outcome.variants.values() for r in o.results}
    built = sum(r.status == "BUILT" for r in results.values())
    shown.print(f"[green]done[/] in {time.monotonic() - t0:.1f}s: {len(results)} steps for {len(checked)} variants, "
                f"{built} built, {len(results) - built} reused", highlight=False)
    if json_out:
        sys.stdout.write(json.dumps({
            "variants": {name: {"record": o.record.model_dump(mode="json"), "steps": [
                {"step": r.name, "status": r.status, "key": r.key, "output_digest": r.output_digest} for r in o.results]}
                for name, o in outcome.variants.items()},
            "matrix": outcome.matrix.model_dump(mode="json") if outcome.matrix else None,
            "registry": str(next(iter(outcome.variants.values())).registry_root),
            "seconds": round(time.monotonic() - t0, 3)}, indent=2) + "\n")
    if outcome.error is not None:
        raise outcome.error   # every variant is recorded (the failed ones as rejected); the exit code says a gate failed


def _print_outcome(outcome, t0: float, json_out: bool) -> None:
    rec, root = outcome.record, outcome.registry_root
    results = outcome.build.by_name
    shown = _progress.console
    console.publish_line(rec, root, console=shown)
    built = sum(r.status == "BUILT" for r in results.values())
    reports, logs = _reports(results), {name: r.log for name, r in results.items() if r.log is not None}
    if outcome.report is not None:   # the HTML build report (forge/report), attached to the record as evidence
        if outcome.report.error is not None:
            from rich.markup import escape

            err.print(f"[yellow]warning:[/] the build report was not written ({escape(outcome.report.error)}); the "
                      "record stands. Rerun with FORGE_DEBUG=1 for the traceback, and report it.", highlight=False)
        else:
            reports["build report"] = [outcome.report.html]
    console.summary(rec, registry_root=root, reports=reports, logs=logs, built=built,
                    reused=len(results) - built, seconds=time.monotonic() - t0, console=shown)
    if outcome.report is not None and outcome.report.data is not None:
        from forge import ci

        ci.on_build(outcome.build_recipe, outcome.report.data,
                    outcome.report.html if outcome.report.error is None else None, outcome.report_summaries)
    if json_out:
        steps = [{"step": r.name, "status": r.status, "key": r.key, "seconds": round(r.seconds, 3),
                  "output_digest": r.output_digest, "output": str(r.entry.out),
                  "log": str(r.log) if r.log else None} for r in results.values()]
        sys.stdout.write(json.dumps({"record": rec.model_dump(mode="json"), "registry": str(root), "steps": steps,
                                     "reports": {k: [str(p) for p in v] for k, v in reports.items()},
                                     "seconds": round(time.monotonic() - t0, 3)}, indent=2) + "\n")


def _reports(results: dict) -> dict[str, list[Path]]:
    """Where each step's human-readable evidence is (only the files that exist), through the steps' readers."""
    from forge.steps import gate, quantize, scan

    found = {}
    if "gate" in results:
        g = gate.Output.read(results["gate"].entry)
        found["eval gate"] = [g.summary, g.verdict, g.junit]
    if "quantize" in results:
        found["quantize"] = sorted(quantize.Output.read(results["quantize"].entry).reports, key=lambda p: p.suffix != ".md")
    if "scan" in results:
        sc = scan.Output.read(results["scan"].entry)
        found["scan"] = [sc.summary_md, sc.verdict, sc.report, sc.sbom]
    return {label: [p for p in paths if p is not None and p.is_file()] for label, paths in found.items()}


_progress = console.StepProgress()


@app.command("report")
def report_cmd(
    ref: Annotated[str, typer.Argument(
        help="A recipe YAML (its last build, from the step cache) or a registry REF (the report attached to the "
             "record: NAME, NAME:TAG, NAME@sha256:…, a record id prefix).", show_default=False, metavar="REF|RECIPE")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the HTML page.")] = Path("report.html"),
    cache_dir: CacheDir = None, registry_dir: RegistryDir = None,
) -> None:
    """Write the build report: one self-contained HTML page (gate, quantization, target GPU, image, scan, steps)."""
    from forge import report as reports

    recipe = Path(ref)
    if recipe.suffix in (".yaml", ".yml") or recipe.is_file():
        loaded, _ = _load(recipe, False, cache_dir)
        html = reports.html_for_recipe(loaded, _store(cache_dir), _registry(registry_dir))
    else:
        html = reports.html_from_registry(_registry(registry_dir), ref)
    path = reports.write(output, html)
    out.print(f"[green]✓[/] wrote {path} ({console.human(path.stat().st_size)}; self-contained, open it in a browser)",
              highlight=False)


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
    console.table(("key", "step", "recipe", "size", "created", "build time"),
                  [(r["key"][:16], r["step"], r["recipe"], console.human(r["bytes"]), r["created"], f"{r['seconds']:.1f}s")
                   for r in rows], title=f"cache: {store.root}", right=("size", "build time"))


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
        out.print(f"  {verb} {what:<10} {path.name[:16]}  {console.human(size)}", highlight=False)
    out.print(f"{verb} {len(removed)} item(s), {console.human(sum(s for *_, s in removed))}")


@app.command("fit")
def fit_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML (or use --model/--gpu/--method).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Model source: a dir with config.json, a config.json, gguf://, hf://.")] = None,
    gpu: Annotated[Optional[list[str]], typer.Option(help="GPU from the catalog; repeat to compare, 'all' for every one.")] = None,
    method: Annotated[Optional[str], typer.Option(help=" | ".join(METHOD_NAMES))] = None,
    bits: Annotated[Optional[int], typer.Option(help="4 or 8 (gptq)")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Quantization group size (4-bit default 128).")] = None,
    kv_cache: Annotated[Optional[str], typer.Option(help="auto (BF16) | fp8")] = None,
    engine: Annotated[Optional[str], typer.Option(help="vllm | tgi | trtllm | cpu, or a plugin's engine")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Tokens of context per sequence.")] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(help="Concurrent sequences.")] = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="Fraction of VRAM the engine may use.")] = None,
    tensor_parallel: Annotated[Optional[int], typer.Option(help="GPUs per replica (default 1; the report names the smallest that fits).")] = None,
    price: Annotated[Optional[float], typer.Option(help="USD per GPU-hour (default: catalog; FORGE_GPU_PRICES).")] = None,
    list_gpus: Annotated[bool, typer.Option("--list", help="List the GPU catalog and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Capacity plan: does the model fit the GPU, how many sequences, what decode speed and cost."""
    from dataclasses import replace

    from forge import fit as fitmod
    from forge.catalog import gpus

    catalog = gpus()
    if list_gpus:
        _print_catalog(catalog, json_out)
        return
    downloads = _store(cache_dir).root / "downloads"
    if recipe is not None:
        loaded, _ = _load(recipe, False, cache_dir)
        base = fitmod.plan_from_recipe(loaded.recipe)
        source, base_dir, names = loaded.recipe.model.source, loaded.base_dir, [loaded.recipe.target.gpu]
    elif model and gpu:
        base, source, base_dir, names = fitmod.Plan(), model, Path.cwd(), []
    else:
        raise UsageError("give a RECIPE, or --model SOURCE with --gpu NAME (and optionally --method)",
                         hint="forge fit --model ./llama-3-8b --gpu L4 --method awq")
    if gpu:
        names = list(catalog) if gpu == ["all"] else gpu
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise UsageError(f"unknown GPU {', '.join(unknown)}; known: {', '.join(catalog)}")
    overrides = {k: v for k, v in dict(method=method, bits=bits, group_size=group_size, kv_cache=kv_cache, engine=engine,
                                       max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                       gpu_memory_utilization=gpu_memory_utilization,
                                       tensor_parallel=tensor_parallel).items() if v is not None}
    plan_ = replace(base, **overrides)
    try:
        shape = fitmod.source_shape(source, base_dir, downloads)
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot read the model's config from {source}: {e}") from None
    if shape is None:
        raise UsageError(f"config.json of {source} is not available offline", hint="Download it or pass --model DIR.")
    reports = [fitmod.fit(shape, catalog[n], plan_, price=price) for n in names if not catalog[n].is_cpu]
    if json_out:
        sys.stdout.write(json.dumps({"model": {"source": source, **shape.__dict__, "params": shape.total_params},
                                     "plan": plan_.__dict__, "fits": [r.to_json() for r in reports]}, indent=2) + "\n")
    else:
        _print_fit(shape, plan_, reports)
    if reports and not any(r.fits for r in reports):
        raise typer.Exit(int(ExitCode.INVALID))


def _print_catalog(catalog, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps({n: g.__dict__ for n, g in catalog.items()}, indent=2) + "\n")
        return
    rows = [(n, f"{g.memory_gib:.0f} GiB", f"{g.bandwidth_gbs:.0f} GB/s",
             ".".join(map(str, g.compute_capability)) if g.compute_capability else "-", "yes" if g.fp8 else "no",
             f"{g.price_per_hour:.2f}") for n, g in catalog.items()]
    console.table(("gpu", "memory", "bandwidth", "compute cap.", "FP8", "$/h"), rows, title="GPU catalog",
                  right=("memory", "bandwidth", "$/h"))


def _print_fit(shape, plan_, reports) -> None:
    out.print(f"[bold]{shape.architecture}[/] {shape.total_params / 1e9:.2f} B params · {plan_.method}"
              f"{f' W{plan_.bits}' if plan_.bits else ''} · KV {shape.kv_bytes_per_token(1 if plan_.kv_cache == 'fp8' else 2) / 1024:.0f} KiB/token"
              f" · max_model_len {plan_.max_model_len} × {plan_.max_num_seqs} seqs", highlight=False)
    columns = ("gpu", "fits", "TP", "weights", "KV", "headroom", "seqs", "ctx", "tok/s/seq", "tok/s", "$/Mtok", "kernel")
    rows = []
    for r in reports:
        if not r.scheme_ok:
            fits = "[red]illegal[/]"
        elif r.fits:
            fits = "[green]yes[/]"
        else:
            fits = f"[red]no[/] (TP {r.tp_needed})" if r.tp_needed else "[red]no[/]"
        rows.append((r.gpu, fits, str(r.tensor_parallel), f"{r.weights_gb:.1f} GB", f"{r.kv_cache_gb:.1f} GB",
                     f"{r.headroom_gb:.1f} GB", str(r.max_seqs_at_max_model_len), str(r.max_context_at_max_num_seqs),
                     f"{r.decode_tok_s_per_seq:.0f}", f"{r.decode_tok_s_aggregate:.0f}",
                     f"{r.usd_per_million_tokens:.3f}" if r.usd_per_million_tokens else "-", escape(r.scheme_mode)))
    console.table(columns, rows, right=[c for c in columns if c not in ("gpu", "fits", "kernel")])
    out.print("[dim]seqs: concurrent sequences at max_model_len · ctx: max context at max_num_seqs · tok/s: decode "
              "roofline (bandwidth-bound, average context max_model_len/2) · $/Mtok at that throughput[/]")
    notes = dict.fromkeys(note for r in reports for note in (r.scheme_message and f"{r.gpu}: {r.scheme_message}", *r.notes) if note)
    for note in notes:
        out.print(f"[dim]note: {note}[/]", highlight=False)


@app.command("scan")
def scan_cmd(
    image: Annotated[Optional[Path], typer.Option("--input", help="OCI layout directory or docker-archive tar to scan with Trivy.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Judge an existing Trivy JSON report instead of scanning.")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Take the policy (scan section) from this recipe.")] = None,
    fail_on: Annotated[Optional[str], typer.Option(help="Comma-separated severities that fail (default CRITICAL,HIGH).")] = None,
    ignore_unfixed: Annotated[Optional[bool], typer.Option("--ignore-unfixed/--no-ignore-unfixed", help="Drop findings with no fix (default: on).")] = None,
    ignore_file: Annotated[Optional[Path], typer.Option(help="A .trivyignore.yaml (id, paths, purls, expired_at, statement).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the report, SBOM, verdict.json and summary.md.")] = Path("forge-scan"),
    json_out: Annotated[bool, typer.Option("--json", help="Print verdict.json.")] = False,
) -> None:
    """Scan an image with Trivy (or judge a Trivy report) under forge's policy. Exit 4 when it fails."""
    from dataclasses import replace

    from forge.scanpolicy import SEVERITIES, load_ignore_file
    from forge.steps import scan as scanstep
    from forge.trivy import TrivyOptions

    if (image is None) == (report is None):
        raise UsageError("give exactly one of --input IMAGE (scan it) or --report REPORT.json (judge it)",
                         hint="forge scan --input build/oci-layout --recipe recipe.yaml")
    policy, opts = scanstep.Policy(), TrivyOptions()
    if recipe is not None:
        loaded, _ = _load(recipe, False)
        policy, opts = scanstep.Policy.from_recipe(loaded), scanstep.options_from_recipe(loaded)
    if fail_on is not None:
        sev = tuple(x.strip().upper() for x in fail_on.split(",") if x.strip())
        bad = [x for x in sev if x not in SEVERITIES]
        if bad:
            raise UsageError(f"--fail-on: unknown severity {', '.join(bad)}; valid: {', '.join(SEVERITIES)}")
        policy = replace(policy, fail_on=sev)
    if ignore_unfixed is not None:
        policy = replace(policy, ignore_unfixed=ignore_unfixed)
    if ignore_file is not None:
        if not ignore_file.is_file():
            raise UsageError(f"--ignore-file {ignore_file} does not exist")
        policy = replace(policy, ignores=tuple(load_ignore_file(ignore_file)))
    if image is not None:
        verdict = scanstep.scan(image, out_dir, policy, opts)
    else:
        if not report.is_file():
            raise UsageError(f"--report {report} does not exist")
        verdict = scanstep.judge_report(report, out_dir, policy)
    if json_out:
        sys.stdout.write((out_dir / scanstep.VERDICT).read_text() + "\n")
    else:
        out.print((out_dir / scanstep.SUMMARY).read_text(), markup=False, highlight=False)
        out.print(f"[dim]wrote {out_dir}/{scanstep.VERDICT} and {scanstep.SUMMARY}[/]", highlight=False)
    for e in verdict.expired_ignores:
        err.print(f"[yellow]warning:[/] ignore entry {e['id']} (line {e['line']}) expired on {e['expired_at']}; "
                  "it no longer ignores anything: fix the finding or renew the entry with a new expired_at", highlight=False)
    if not verdict.passed:
        from forge.errors import ScanGateError

        raise ScanGateError(f"scan gate {verdict.summary}",
                            hint=f"See {out_dir}/{scanstep.SUMMARY}. Fix or upgrade the packages, or accept a finding "
                                 "in the ignore file with a statement and an expired_at.")


@app.command("lock")
def lock_cmd(
    catalog: Annotated[Optional[Path], typer.Option(help="Base catalog (default: containers/bases.yaml found from the cwd).")] = None,
    base: Annotated[Optional[list[str]], typer.Option(help="Lock only these bases (repeatable).")] = None,
) -> None:
    """Resolve the published base images' tags to digests with skopeo and write bases.lock.json."""
    from forge.containers import find_catalog, lock_bases
    from forge.registry.remote import insecure_host

    path = lock_bases(catalog or find_catalog(Path.cwd()), base, plain_http=insecure_host,
                      on_locked=lambda n, image, digest: out.print(f"  {n:<20} {image} -> {digest}", highlight=False))
    out.print(f"wrote {path}")


@app.command()
def version() -> None:
    """Print forge's version."""
    out.print(f"forge {__version__}")


# ---------------------------------------------------------------------- registry

JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
RefArg = Annotated[str, typer.Argument(help="NAME, NAME:TAG, NAME@sha256:…, an image digest or a record id prefix.",
                                       show_default=False)]


def _registry(registry_dir: Path | None):
    from forge.registry import LocalRegistry

    return LocalRegistry(registry_dir)


@registry_app.command("ls")
def registry_ls(
    status: Annotated[Optional[str], typer.Option(help="Only artifacts with this status.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Only artifacts of this recipe name.")] = None,
    registry_dir: RegistryDir = None, json_out: JsonOut = False,
) -> None:
    """List recorded artifacts, newest first."""
    from forge.registry import STATUSES

    if status is not None and status not in STATUSES:
        raise UsageError(f"--status {status!r} is not a status", hint=f"One of: {', '.join(STATUSES)}.")
    reg = _registry(registry_dir)
    records = reg.ls(status, name)
    if json_out:
        sys.stdout.write(json.dumps([r.model_dump(mode="json") for r in records], indent=2) + "\n")
        return
    console.table(("id", "name:tag", "status", "method", "gpu", "eval", "scan", "image", "created"),
                  [(r.short(), escape(f"{r.name}:{r.tag}" if r.tag else r.name), r.status, r.method, r.target_gpu,
                    r.eval_verdict, r.scan_verdict, (r.image_digest or "-")[:19], r.created_at) for r in records],
                  title=f"registry: {reg.root}")


@registry_app.command("show")
def registry_show(ref: RefArg, registry_dir: RegistryDir = None, json_out: JsonOut = False) -> None:
    """Everything recorded about one artifact: digests, verdicts, evidence, status history."""
    reg = _registry(registry_dir)
    rec = reg.resolve(ref)
    data = rec.model_dump(mode="json") | {"events": [dict(zip(("at", "status", "detail"), e)) for e in reg.events(rec)],
                                          "referrers": reg.referrers(rec)}
    if json_out:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for k, v in data.items():
        if k in ("evidence", "events", "referrers", "tool_versions"):
            continue
        out.print(f"[bold]{k:<17}[/] {v}", highlight=False)
    out.print("[bold]evidence[/]")
    for ev in rec.evidence:
        out.print(f"  {ev.kind:<13} {ev.manifest_digest[:19]}  {', '.join(ev.files)}", highlight=False)
    out.print("[bold]history[/]")
    for e in data["events"]:
        out.print(f"  {e['at']}  {e['status']:<10} {e['detail']}", highlight=False)


@registry_app.command("verify")
def registry_verify(ref: RefArg, registry_dir: RegistryDir = None,
                    remote: Annotated[bool, typer.Option("--remote", help="Also re-hash what the OCI registry serves.")] = False,
                    ) -> None:
    """Re-hash every blob of the image and of its evidence against the recorded digests (exit 5 on a mismatch)."""
    from forge.errors import ToolError

    reg = _registry(registry_dir)
    rec = reg.resolve(ref)
    problems = reg.verify(rec)
    if remote:
        if not rec.remote:
            raise UsageError(f"{rec.name} {rec.short()} was not pushed to an OCI registry", hint="Drop --remote.")
        from forge.registry import remote as remote_mod

        client = remote_mod.Client(remote_mod.Remote.parse(rec.remote.split("@")[0]))
        problems += [(d, f"remote {role}", what) for d, role, what in client.verify(rec)]
    n = len(rec.evidence) + (1 if rec.image_digest else 0)
    if problems:
        for digest, role, what in problems:
            err.print(f"[red]✗[/] {role}: blob {digest}: {what}", highlight=False)
        raise ToolError(f"{rec.name} {rec.short()}: {len(problems)} blob(s) do not verify",
                        hint="The store was modified after publishing: rebuild and publish again; do not ship it.")
    out.print(f"[green]✓[/] {rec.name} {rec.short()}: image and {len(rec.evidence)} evidence artifact(s) verify "
              f"({n} manifests re-hashed with every blob they name{', here and in ' + rec.remote.split('@')[0] if remote else ''})",
              highlight=False)


@registry_app.command("promote")
def registry_promote(ref: RefArg, to: Annotated[str, typer.Option("--to", help="The tag to add (e.g. prod).")],
                     registry_dir: RegistryDir = None) -> None:
    """Tag a validated artifact (locally, and in its remote registry if it was pushed)."""
    from forge.registry import promote

    reg = _registry(registry_dir)
    rec = promote(reg, reg.resolve(ref), to)
    out.print(f"[green]✓[/] {rec.name}:{to} → {rec.image_digest}" + (f" (also {rec.remote.split('@')[0]}:{to})"
                                                                    if rec.remote else ""), highlight=False)


@registry_app.command("pull")
def registry_pull(
    ref: Annotated[str, typer.Argument(help="A local reference, or oci://HOST/REPO:TAG|@sha256:….", show_default=False)],
    to: Annotated[Path, typer.Option("--to", help="Empty directory to write model/ and evidence/ into.")],
    registry_dir: RegistryDir = None,
) -> None:
    """Write the artifact's weights and evidence to a directory, every blob checked against its digest."""
    from forge.registry import pull

    summary = pull(ref, to, _registry(registry_dir) if not ref.startswith("oci://") else None)
    out.print(f"[green]✓[/] {len(summary['model_files'])} model files and evidence "
              f"({', '.join(summary['evidence']) or 'none'}) → {to}", highlight=False)


@registry_app.command("referrers")
def registry_referrers(ref: RefArg, registry_dir: RegistryDir = None, json_out: JsonOut = False) -> None:
    """List the evidence artifacts that refer to the image (locally, and in the remote registry if pushed)."""
    reg = _registry(registry_dir)
    rec = reg.resolve(ref)
    found = {"local": reg.referrers(rec)}
    if rec.remote:
        from forge.registry import remote

        r = remote.Remote.parse(rec.remote.split("@")[0])
        found["remote"], found["remote_via"] = remote.Client(r).referrers(rec.image_digest)
    if json_out:
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return
    for where in ("local", "remote"):
        for d in found.get(where, []):
            out.print(f"  {where:<6} {d.get('artifactType', '?'):<45} {d['digest'][:19]}", highlight=False)


@registry_app.command("select")
def registry_select(
    model: Annotated[str, typer.Argument(help="The recipe name whose variant matrix to read.", show_default=False)],
    gpu_product: Annotated[str, typer.Option("--gpu-product", help="The node's nvidia.com/gpu.product label "
                                             "(GFD), e.g. NVIDIA-L4, NVIDIA-L4-SHARED, NVIDIA-A100-SXM4-40GB-MIG-1g.5gb.",
                                             show_default=False)],
    registry: Annotated[Optional[str], typer.Option("--registry", help="Read the matrix from this OCI repository "
                                                    "(oci://HOST/REPO, the recipe's publish.registry) instead of the "
                                                    "embedded registry.")] = None,
    registry_dir: RegistryDir = None, json_out: JsonOut = False,
) -> None:
    """Print the image digest to deploy on a node with this GPU; list every variant as runnable, runnable with
    less memory, or incompatible (on stderr). Exit 2 if no variant runs there or the label is unknown."""
    from forge.registry import matrix, select

    mx = matrix.load(model, None if registry else _registry(registry_dir), registry)
    sel = select.select(mx, gpu_product)
    if json_out:
        sys.stdout.write(json.dumps(sel.to_json(), indent=2) + "\n")
    else:
        if sel.chosen:
            sys.stdout.write(sel.chosen.digest + "\n")   # alone on stdout: DIGEST=$(forge registry select …)
        console.table(("variant", "verdict", "gpu", "status", "image", "why"),
                      [(escape(c.tag), c.verdict, c.gpu, c.status, c.digest[:19] or "-", escape(c.why))
                       for c in sel.candidates], console=err,
                      title=f"{mx.name} on {escape(sel.node.describe())} (matrix {mx.digest[:19]}, {escape(mx.where)})")
        if sel.chosen:
            err.print(f"[green]✓[/] deploy {escape(sel.chosen.tag)}: {escape(sel.chosen.image)}", highlight=False)
    if sel.chosen is None:
        raise UsageError(f"no variant of {model} runs on {gpu_product} ({sel.node.describe()})",
                         hint=f"Add a variant for {sel.node.gpu.name} to the recipe, or schedule on a GPU the "
                              "table lists as runnable.")



# ---------------------------------------------------------------------- deploy (issue 19: forge/deploy/)

@app.command("deploy")
def deploy_cmd(
    ref: Annotated[Optional[str], typer.Argument(help="A validated record: NAME, NAME:TAG, NAME@sha256:…, an image "
                                                      "digest or a record id prefix.", show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory to write (default: deploy/NAME).")] = None,
    replicas: Annotated[int, typer.Option(help="Replicas (the autoscaler's minimum).")] = 1,
    max_replicas: Annotated[Optional[int], typer.Option(help="Autoscaler maximum (default 4 x --replicas).")] = None,
    autoscale: Annotated[str, typer.Option(help="auto | keda | hpa | none (auto: KEDA where the engine has a queue metric).")] = "auto",
    namespace: Annotated[Optional[str], typer.Option(help="Namespace of every object (default: none set).")] = None,
    check_dir: Annotated[Optional[Path], typer.Option("--check", help="Re-validate a directory forge deploy wrote (e.g. after edits).")] = None,
    kube_version: Annotated[Optional[str], typer.Option(help="Kubernetes version whose schemas validate the objects.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="The record's recipe file, when it is no longer where it was built.")] = None,
    registry_dir: RegistryDir = None,
) -> None:
    """Kubernetes manifests (kustomize directory) for a validated artifact, validated offline; or --check DIR."""
    from forge import deploy

    kube = kube_version or deploy.KUBE_VERSION
    reg = _registry(registry_dir)
    if check_dir is not None:
        if ref is not None:
            raise UsageError("give either REF (generate) or --check DIR (re-validate), not both")
        count, problems = deploy.check(check_dir, reg, kube)
        if problems:
            for p in problems:
                err.print(f"[red]✗[/] {p}", highlight=False)
            raise UsageError(f"{check_dir}: {len(problems)} problem(s) in {count} object(s)",
                             hint="Fix them (or regenerate with forge deploy REF --out DIR).")
        out.print(f"[green]✓[/] {check_dir}: {count} objects valid (Kubernetes {kube} schemas, strict; KEDA and "
                  "Prometheus Operator CRD schemas; cross-object checks)", highlight=False)
        return
    if ref is None:
        raise UsageError("missing REF", hint="Usage: forge deploy REF [--out DIR] or forge deploy --check DIR")
    rec = reg.resolve(ref)
    opts = deploy.Options(replicas=replicas, max_replicas=max_replicas, autoscale=autoscale, namespace=namespace,
                          kube_version=kube, recipe=recipe)
    generated = deploy.generate(reg, [rec], opts)
    target = out_dir or Path("deploy") / rec.name
    files = deploy.write(generated, target)
    for note in generated.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(f"[green]✓[/] {rec.name} {rec.short()} → {target}: {', '.join(f.name for f in files)}", highlight=False)
    out.print(f"[dim]validated offline: Kubernetes {kube} schemas (strict), KEDA / Prometheus Operator CRD schemas, "
              f"cross-object checks. Apply: kubectl apply -k {target}[/]", highlight=False)


def main() -> None:
    try:
        app()
    except ForgeError as e:
        _progress.stop()
        from forge import ci

        ci.on_error(e)   # issue 18: a GitHub Actions annotation (at file:line for recipe problems) under --ci
        console.error(e.message, e.hint, steplog.log_of(e))
        sys.exit(int(e.exit_code))
    except KeyboardInterrupt as e:
        _progress.stop()
        console.error("interrupted: nothing partial was committed; rerun to continue", log=steplog.log_of(e))
        sys.exit(130)
    except Exception as e:
        _progress.stop()
        if env.flag("FORGE_DEBUG"):
            raise
        import traceback

        last = traceback.format_exc(limit=1).strip().splitlines()[-1]
        console.error(f"internal error (a bug in forge): {last}",
                      "rerun with FORGE_DEBUG=1 for the traceback, and report it.", steplog.log_of(e))
        sys.exit(int(ExitCode.UNEXPECTED))
