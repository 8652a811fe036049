"""`forge cache`, `fit`, `scan`, `lock`, `version` and `deploy`."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from forge import __version__
from forge.cli import console
from forge.cli._app import AcceptProxyEval, CacheDir, RegistryDir, _load, _registry, _store, app, cache_app
from forge.cli.console import err, out
from forge.core.errors import ExitCode, UsageError
from forge.gpu.methods import NAMES as METHOD_NAMES


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

    from forge.gpu import fit as fitmod
    from forge.gpu.catalog import gpus
    from forge.model.shape import source_shape

    catalog = gpus()
    if list_gpus:
        _print_catalog(catalog, json_out)
        return
    downloads = _store(cache_dir).root / "downloads"
    if recipe is not None:
        loaded = _load(recipe, False, cache_dir, target=not gpu)   # with --gpu, the fit on those GPUs decides
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
        shape = source_shape(source, base_dir, downloads)
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot read the model's config from {source}: {e}") from None
    if shape is None:
        raise UsageError(f"config.json of {source} is not available offline", hint="Download it or pass --model DIR.")
    reports = [fitmod.fit(shape, catalog[n], plan_, price=price) for n in names if not catalog[n].is_cpu]
    here = _build_here(shape)
    if json_out:
        sys.stdout.write(json.dumps({"model": {"source": source, **shape.__dict__, "params": shape.total_params},
                                     "plan": plan_.__dict__, "fits": [r.to_json() for r in reports],
                                     "build_on_this_cpu": here}, indent=2) + "\n")
    else:
        _print_fit(shape, plan_, reports)
        _print_build_here(here)
    if reports and not any(r.fits for r in reports):
        raise typer.Exit(int(ExitCode.INVALID))


def _build_here(shape) -> dict:
    """Host memory a CPU build of this model needs per method (forge.gpu.host_fit), and what this host has now."""
    from forge import backends
    from forge.gpu import host_fit
    from forge.gpu.methods import METHODS
    from forge.recipe.schema import Quantize

    rows = {}
    for name, m in METHODS.items():
        if name == "none" or "compressed-tensors" not in m.formats:   # what llm-compressor builds on a CPU
            continue
        q = Quantize(method=name)
        needs = host_fit.needs(shape, name, calibrates=m.calibrates != "nothing", evaluates=True, device="cpu",
                               streams=backends.streams(q, "cpu"), offloads=backends.offloads(q, "cpu"))
        rows[name] = {n.step: round(n.bytes / host_fit.GB, 1) for n in needs}
        rows[name].update({"quantize_offloaded": round(n.offloaded[0] / host_fit.GB, 1) for n in needs if n.offloaded})
    return {"available_gb": round(host_fit.available_bytes() / host_fit.GB, 1),
            "calibration_dtype": host_fit.calibration_dtype(4 * shape.total_params), "needs_gb": rows}


def _print_build_here(here: dict) -> None:
    avail = here["available_gb"]

    def quantize(n: dict) -> float:   # the figure the step runs at: held in memory when it fits, else offloaded
        return n["quantize"] if n["quantize"] <= avail or "quantize_offloaded" not in n else n["quantize_offloaded"]

    rows = [(m, f"{n['quantize']:.1f} GB",
             f"{n['quantize_offloaded']:.1f} GB" if "quantize_offloaded" in n else "-", f"{n['eval']:.1f} GB",
             "[green]yes[/]" if max(quantize(n), n["eval"]) <= avail else
             ("[yellow]without eval[/]" if quantize(n) <= avail else "[red]no[/]"))
            for m, n in here["needs_gb"].items()]
    console.table(("method", "quantize", "offloaded to disk", "eval (each side)", "fits here"), rows,
                  title=f"building on this CPU: {avail:.1f} GB available, calibration in {here['calibration_dtype']} "
                        "(forge/gpu/host_fit.py)", right=("quantize", "offloaded to disk", "eval (each side)"))


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

    from forge.image.scanpolicy import SEVERITIES, load_ignore_file
    from forge.steps import scan as scanstep
    from forge.image.trivy import TrivyOptions

    if (image is None) == (report is None):
        raise UsageError("give exactly one of --input IMAGE (scan it) or --report REPORT.json (judge it)",
                         hint="forge scan --input build/oci-layout --recipe recipe.yaml")
    policy, opts = scanstep.Policy(), TrivyOptions()
    if recipe is not None:
        loaded = _load(recipe, False)
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
        from forge.core.errors import ScanGateError

        raise ScanGateError(f"scan gate {verdict.summary}",
                            hint=f"See {out_dir}/{scanstep.SUMMARY}. Fix or upgrade the packages, or accept a finding "
                                 "in the ignore file with a statement and an expired_at.")


@app.command("lock")
def lock_cmd(
    catalog: Annotated[Optional[Path], typer.Option(help="Base catalog (default: containers/bases.yaml found from the cwd).")] = None,
    base: Annotated[Optional[list[str]], typer.Option(help="Lock only these bases (repeatable).")] = None,
) -> None:
    """Resolve the published base images' tags to digests with skopeo and write bases.lock.json."""
    from forge.image.bases import find_catalog, lock_bases
    from forge.oci.client import insecure_host

    path = lock_bases(catalog or find_catalog(Path.cwd()), base, plain_http=insecure_host,
                      on_locked=lambda n, image, digest: out.print(f"  {n:<20} {image} -> {digest}", highlight=False))
    out.print(f"wrote {path}")


@app.command()
def version() -> None:
    """Print forge's version."""
    out.print(f"forge {__version__}")



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
    model_mount: Annotated[str, typer.Option(help="auto | image-volume | copy: how a model image (container.weights: "
                                                  "image) reaches /models. auto: an image volume on Kubernetes >= 1.35, "
                                                  "else init containers copy it into an emptyDir; image-volume on "
                                                  "1.33-1.34 needs the ImageVolume feature gate.")] = "auto",
    registry_dir: RegistryDir = None, accept_proxy_eval: AcceptProxyEval = False,
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
                          kube_version=kube, recipe=recipe, accept_proxy_eval=accept_proxy_eval, model_mount=model_mount)
    generated = deploy.generate(reg, [rec], opts)
    target = out_dir or Path("deploy") / rec.name
    files = deploy.write(generated, target)
    for note in generated.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(f"[green]✓[/] {rec.name} {rec.short()} → {target}: {', '.join(f.name for f in files)}", highlight=False)
    out.print(f"[dim]validated offline: Kubernetes {kube} schemas (strict), KEDA / Prometheus Operator CRD schemas, "
              f"cross-object checks. Apply: kubectl apply -k {target}[/]", highlight=False)
