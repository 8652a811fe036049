"""`forge registry …`: find, verify, pull and promote published artifacts."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from forge.cli import console
from forge.cli._app import AcceptProxyEval, RegistryDir, _registry, registry_app
from forge.cli.console import err, out
from forge.core.errors import UsageError


JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
RefArg = Annotated[str, typer.Argument(help="NAME, NAME:TAG, NAME@sha256:…, an image digest or a record id prefix.",
                                       show_default=False)]



@registry_app.command("ls")
def registry_ls(
    status: Annotated[Optional[str], typer.Option(help="Only artifacts with this status (built, gated, scanned, "
                                                  "validated, proxy-validated, promoted, rejected, unscanned, ungated).")] = None,
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
                    r.eval_verdict + (" (proxy)" if r.eval_proxy else ""), r.scan_verdict, (r.image_digest or "-")[:19],
                    r.created_at) for r in records],
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
        out.print(f"[bold]{k:<17}[/] {escape(str(v))}", highlight=False)
    gated = (rec.status_evidence or {}).get("eval-verdict") or {}
    if gated:
        on = gated.get("evaluated_on") or {}
        where = (f"{on.get('engine')} (lm-eval {on.get('backend')}) on {', '.join(on.get('gpus') or []) or on.get('device')}"
                 if on else "not recorded")
        through = on.get("through") if isinstance(on.get("through"), dict) else {}
        if through:   # eval.candidate: image: the gate ran through a served image, by digest
            where += (f", through the image {str(through.get('image'))[:19]} ({through.get('engine')} "
                      f"{through.get('engine_version')}, {through.get('endpoint')})"
                      + (" — this image" if gated.get("through_image") else " — not this record's image"))
        out.print(f"[bold]{'evaluated on':<17}[/] {escape(where)}; ships {rec.engine} on {rec.target_gpu}"
                  + (" [yellow](a proxy's numbers)[/]" if rec.eval_proxy else ""), highlight=False)
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
    """Re-hash every blob of the image and of its evidence against the recorded digests, and re-derive the status
    from the stored evidence (exit 5 on any mismatch, naming the blob)."""
    from forge.core.errors import ToolError

    reg = _registry(registry_dir)
    rec = reg.resolve(ref)
    problems = reg.verify(rec)
    if remote:
        if not rec.remote:
            raise UsageError(f"{rec.name} {rec.short()} was not pushed to an OCI registry", hint="Drop --remote.")
        from forge.registry import remote as remote_mod

        client = remote_mod.Client(remote_mod.Remote.parse(rec.remote.split("@")[0]))
        problems += [(d, f"remote {role}", what) for d, role, what in remote_mod.verify(client, rec)]
    models = " (weights-free), model image, ModelPack" if rec.model_image_digest else ""
    n = len(rec.evidence) + (1 if rec.image_digest else 0) + (2 if rec.model_image_digest else 0)
    if problems:
        for digest, role, what in problems:
            err.print(f"[red]✗[/] {escape(role)}: blob {digest}: {escape(what)}", highlight=False, soft_wrap=True)
        raise ToolError(f"{rec.name} {rec.short()}: {len(problems)} blob(s) or status do not verify: "
                        + "; ".join(f"{role}: {digest}" for digest, role, _ in problems[:3]),
                        hint="The store was modified after publishing: rebuild and publish again; do not ship it.")
    status = "" if rec.kind == "matrix" else f"; status {rec.status} re-derived from the evidence"
    out.print(f"[green]✓[/] {rec.name} {rec.short()}: image{models} and {len(rec.evidence)} evidence artifact(s) verify "
              f"({n} manifests re-hashed with every blob they name{', here and in ' + rec.remote.split('@')[0] if remote else ''}"
              f"{status})", highlight=False)


@registry_app.command("promote")
def registry_promote(ref: RefArg, to: Annotated[str, typer.Option("--to", help="The tag to add (e.g. prod).")],
                     registry_dir: RegistryDir = None, accept_proxy_eval: AcceptProxyEval = False) -> None:
    """Tag a validated artifact (locally, and in its remote registry if it was pushed)."""
    from forge.registry import promote

    reg = _registry(registry_dir)
    rec = promote(reg, reg.resolve(ref), to, accept_proxy_eval=accept_proxy_eval)
    out.print(f"[green]✓[/] {rec.name}:{to} → {rec.image_digest}" + (f" (also {rec.remote.split('@')[0]}:{to})"
                                                                    if rec.remote else ""), highlight=False)


@registry_app.command("pull")
def registry_pull(
    ref: Annotated[str, typer.Argument(help="A local reference, or oci://HOST/REPO:TAG|@sha256:….", show_default=False)],
    to: Annotated[Optional[Path], typer.Option("--to", help="Empty directory to write model/ and evidence/ into. "
                                               "Without it, an oci:// record is taken into the local registry "
                                               "(then `forge registry show` and `forge deploy` work on it).")] = None,
    registry_dir: RegistryDir = None,
) -> None:
    """Take a pushed record into the local registry, or write an artifact's weights and evidence to a directory;
    every blob checked against its digest, the status re-derived from the evidence."""
    from forge.registry import pull, take_in

    if to is None:
        rec = take_in(ref, _registry(registry_dir), report=lambda msg, **_: out.print(f"  {msg}", highlight=False))
        out.print(f"[green]✓[/] {rec.name} {rec.short()} ({rec.status}, re-derived from its evidence) → "
                  f"{_registry(registry_dir).root}; deploy it with `forge deploy {rec.name}@{rec.image_digest}`",
                  highlight=False)
        return
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
        if sel.chosen:   # alone on stdout: DIGEST=$(forge registry select …); a weights-free serving image's model
            # image follows it on the same line: read -r IMAGE MODEL <<< "$(forge registry select …)"
            sys.stdout.write(" ".join(filter(None, (sel.chosen.digest, sel.chosen.model_image_digest))) + "\n")
        console.table(("variant", "verdict", "gpu", "status", "image", "why"),
                      [(escape(c.tag), c.verdict, c.gpu, c.status, c.digest[:19] or "-", escape(c.why))
                       for c in sel.candidates], console=err,
                      title=f"{mx.name} on {escape(sel.node.describe())} (matrix {mx.digest[:19]}, {escape(mx.where)})")
        if sel.chosen:
            mount = f" with the model image {escape(sel.chosen.model_image)} at /models" if sel.chosen.model_image else ""
            err.print(f"[green]✓[/] deploy {escape(sel.chosen.tag)}: {escape(sel.chosen.image)}{mount}", highlight=False)
    if sel.chosen is None:
        raise UsageError(f"no variant of {model} runs on {gpu_product} ({sel.node.describe()})",
                         hint=f"Add a variant for {sel.node.gpu.name} to the recipe, or schedule on a GPU the "
                              "table lists as runnable.")
