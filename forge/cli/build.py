"""`forge validate`, `schema`, `plan`, `build` and `report`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from forge.cli import console, supervise
from forge.cli._app import CacheDir, Ci, RecipeArg, RegistryDir, VariantOpt, _load, _registry, _store, app
from forge.cli.console import err, out
from forge.core.errors import UsageError


@app.command()
def validate(recipe: RecipeArg, ci: Ci = False, cache_dir: CacheDir = None, variant: VariantOpt = None,
             build_elsewhere: Annotated[bool, typer.Option(
                 "--build-elsewhere", help="The build runs on another machine: do not check that the steps which hold "
                                           "the model fit this host's memory.")] = False) -> None:
    """Check a recipe (schema, files, model source, target-GPU contract and fit, and that this host's memory holds
    the steps that load the model; every variant against the GPU it names). Exit 0 if valid, 2 if not."""
    from forge.recipe import resolve

    if variant or resolve.has_variants(recipe, ci=ci):
        checked = resolve.check(recipe, _store(cache_dir).root / "downloads", ci=ci, selected=variant,
                                here=not build_elsewhere)
        console.variant_checks(checked)
        if bad := [c for c in checked if c.error is not None]:
            raise UsageError(f"{recipe}: {len(bad)} of {len(checked)} variant(s) invalid: "
                             f"{', '.join(c.name for c in bad)}", hint=bad[0].error.hint)
        return
    loaded = _load(recipe, ci, cache_dir)
    from forge.model.sources import check_local_weights

    check_local_weights(loaded)   # safetensors headers against file sizes; a build checks them in its resolve step
    if not build_elsewhere:
        resolve.fits_here(loaded)     # the steps that hold the model, against this host's memory
    report = loaded.fit
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
    from forge.orchestrate.build import plan as make_plan
    from forge.recipe import resolve

    if variant or resolve.has_variants(recipe, ci=ci):
        store = _store(cache_dir)
        variants = _variants(recipe, ci, store, variant)
        nodes = make_plan(variants, store)
        if json_out:
            sys.stdout.write(json.dumps({"variants": [v.variant for v in variants], "nodes": [
                {"id": n.id, "step": n.step, "variants": n.variants, "shared": n.shared, "status": n.status,
                 "key": n.key, "reason": n.reason, "depends": n.depends} for n in nodes]}, indent=2) + "\n")
            return
        console.variant_plan(nodes, title=f"plan: {variants[0].recipe.name} ({len(variants)} variants)")
        return
    loaded = _load(recipe, ci, cache_dir)
    if loaded.is_auto:
        return _plan_auto(loaded, _store(cache_dir), json_out)
    steps = make_plan(loaded, _store(cache_dir))
    if json_out:
        sys.stdout.write(json.dumps([{"step": p.step, "status": p.status, "key": p.key, "reason": p.reason,
                                      "depends": list(p.spec.depends)} for p in steps], indent=2) + "\n")
        return
    colors = {"HIT": "green", "MISS": "yellow", "PENDING": "dim", "FORCED": "yellow"}
    console.table(("step", "status", "key", "depends on", "what it does"),
                  [(p.step, f"[{colors[p.status]}]{p.status}[/]", p.key[:16] if p.key else (p.reason or "after upstream"),
                    ", ".join(p.spec.depends) or "-", p.summary) for p in steps],
                  title=f"plan: {loaded.recipe.name}")
    out.print(f"[dim]then publish → {loaded.recipe.publish.registry} (always runs: records the build and its status)[/]",
              highlight=False)


def _plan_auto(loaded, store, json_out: bool) -> None:
    """`forge plan` of a method: auto recipe: the trials a walk may need, cheapest first (forge.orchestrate.auto)."""
    from forge.orchestrate import auto

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
        "--executor", metavar="local|process|ray",
        help="Where steps run: in this process; each in its own worker process, one at a time (a step the kernel "
             "kills for memory is then reported, with its peak RSS); or as tasks on a Ray cluster (needs "
             "--cache-remote; pip install 'forge-llm[ray]').")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", show_envvar=True,
        help="The Ray cluster of --executor ray (default: the one started on this machine).")] = None,
    variant: VariantOpt = None,
) -> None:
    """Build a recipe: run the steps whose inputs changed, reuse the rest, then publish the result and its status."""
    from forge.orchestrate import pipeline

    global _progress

    if recipe is None and force and force != "*" and Path(force).suffix in (".yaml", ".yml"):
        recipe, force = Path(force), "*"   # `forge build --force recipe.yaml`
    if recipe is None:
        raise UsageError("missing RECIPE", hint="Usage: forge build RECIPE [--force [STEP]]")
    t0 = time.monotonic()
    shown = err if json_out else out   # with --json, stdout holds only the JSON
    _progress = console.StepProgress(shown)
    from forge.recipe import resolve
    from forge.store.remote import RemoteCache

    store = _store(cache_dir)
    remote = RemoteCache.parse(cache_remote, cache_remote_mode) if cache_remote else None   # bad URL or mode: exit 2
    if variant or resolve.has_variants(recipe, ci=ci):
        return _build_variants(recipe, ci, cache_dir, variant, force, registry_dir, publish_to, json_out, report_dir, t0,
                               executor=executor, ray_address=ray_address, remote=remote)
    loaded = _load(recipe, ci, cache_dir)
    pipeline.check_target(publish_to)
    runner = _executor(executor, ray_address, loaded, store, remote)
    shown.print(f"[bold]{loaded.recipe.name}[/] · recipe {loaded.digest[7:19]} · cache {store.root}", highlight=False)

    def on_done(name, result, _variants) -> None:
        _progress.done(name, result.status, result.key, result.seconds, result.output_digest)
        if result.name == "gate":
            from forge.steps import gate

            console.gate_table(json.loads(gate.Output.read(result.entry).verdict.read_text()), console=shown)

    run, extra = pipeline.run, {}
    if loaded.is_auto:   # walk the trials, then build the chosen one (forge.orchestrate.auto)
        from forge.orchestrate import auto

        run, extra = auto.run, {"on_trial": _trial_line}
    try:
        outcome = run(loaded, store, force={force} if force else set(), registry_dir=registry_dir,
                      publish_to=publish_to, executor=runner, on_start=_started, on_done=on_done,
                      on_publish=lambda: _progress.start("publish"), **extra,
                      report_dir=report_dir or store.root / "reports" / loaded.recipe.name,
                      remote=remote)
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


def _started(name: str, spec, key):
    supervise.step_started(name)   # the watching parent names it if the kernel kills this process
    return _progress.start(name)


def _executor(name: str, ray_address: str | None, loaded, store, remote):
    """The executor --executor names (None: the pipeline's default, in this process)."""
    if name == "local":
        return None
    if name == "process":
        from forge.executors.process import ProcessExecutor

        return ProcessExecutor(max_parallel=1)   # one model in memory at a time
    if name == "ray":
        from forge.executors.ray import RayExecutor

        return RayExecutor(loaded, store, address=ray_address, cache_remote=remote)
    raise UsageError(f"--executor {name!r} is not an executor", hint="Use --executor local (default), process or ray.")


def _variants(recipe: Path, ci: bool, store, selected: list[str] | None):
    """The recipe's (selected) variants, each resolved against its GPU; warnings printed, problems exit 2."""
    from forge.recipe.resolve import resolve_all

    variants = resolve_all(recipe, store.root / "downloads", ci=ci, selected=selected)
    for v in variants:
        for w in v.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)} (in variant {v.variant!r})", highlight=False, soft_wrap=True)
    return variants


def _build_variants(recipe, ci, cache_dir, selected, force, registry_dir, publish_to, json_out, report_dir, t0, *,
                    executor: str, ray_address: str | None, remote) -> None:
    from forge.orchestrate import pipeline

    store = _store(cache_dir)
    checked = _variants(recipe, ci, store, selected)
    pipeline.check_target(publish_to)
    first = checked[0]
    runner = _executor(executor, ray_address, first, store, remote)
    shown = _progress.console
    shown.print(f"[bold]{first.recipe.name}[/] · {len(checked)} variant(s): {', '.join(c.variant for c in checked)} · "
                f"recipe {first.digest[7:19]} · cache {store.root}", highlight=False)

    def on_done(name, result, _variants) -> None:
        _progress.done(name, result.status, result.key, result.seconds, result.output_digest)
        if result.name == "gate":
            from forge.steps import gate

            console.gate_table(json.loads(gate.Output.read(result.entry).verdict.read_text()), console=shown)

    try:
        outcome = pipeline.run_variants(
            checked, store, force={force} if force else set(), registry_dir=registry_dir,
            publish_to=publish_to, on_start=_started, on_done=on_done,
            on_publish=lambda name: _progress.start(f"publish · {name}"), executor=runner, remote=remote,
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
        from forge.cli import ci

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
        from forge.orchestrate.build import HIT, plan

        loaded, store = _load(recipe, False, cache_dir), _store(cache_dir)
        cached = {p.step: p.entry for p in plan(loaded, store) if p.status == HIT}
        html = reports.html_for_recipe(loaded, cached, store, _registry(registry_dir))
    else:
        html = reports.html_from_registry(_registry(registry_dir), ref)
    path = reports.write(output, html)
    out.print(f"[green]✓[/] wrote {path} ({console.human(path.stat().st_size)}; self-contained, open it in a browser)",
              highlight=False)
