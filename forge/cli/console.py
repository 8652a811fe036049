"""Everything forge prints, rendered in one place: tables, per-step progress, the gate table, the build summary.

Functions here take plain data (rows of strings, step results, the gate's verdict.json, a registry
Record) and decide only *how* it looks:

- On a terminal, tables are boxed and fit the window; in a pipe or a CI log (stdout is not a TTY) they
  are plain columns as wide as their content: no box drawing, no cell ever cut to "…", no colour codes
  unless forced (FORCE_COLOR / TTY_COMPATIBLE, as rich honours them).
- Progress is one live line per running step (rich.progress), with bytes, MB/s and ETA when a step
  reports ``unit="B"``; in a pipe each new phase of a step is one plain line instead.
- ``out``/``err`` write to the real terminal even while a step's library output is captured into its
  log file (see forge.core.steplog).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                           TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table
from rich.text import Text

from forge.core import steplog

__all__ = ["out", "err", "plain", "table", "StepProgress", "gate_table", "publish_line", "summary", "error", "human",
           "variant_plan", "variant_table", "variant_checks"]

out = Console(file=steplog.terminal("stdout"), soft_wrap=True)
err = Console(file=steplog.terminal("stderr"), soft_wrap=True)


def plain(console: Console = out) -> bool:
    """True when the console's stream is not a terminal (a pipe, a file, a CI log)."""
    try:
        return not console.file.isatty()
    except (ValueError, OSError):
        return True


def human(n: float) -> str:
    """A byte count for people: 512 B, 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------- tables

def table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, title: str | None = None,
          right: Iterable[str] = (), console: Console = out) -> None:
    """Print a table. Cells may carry rich markup (colours); they are never truncated in a pipe."""
    flat = plain(console)
    right = set(right)
    t = Table(box=None if flat else box.HEAVY_HEAD, show_edge=not flat, pad_edge=not flat,
              title=None if flat else title, title_justify="left", header_style="bold")
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left", no_wrap=flat)
    for row in rows:
        t.add_row(*row)
    if not flat:
        console.print(t)
        return
    if title:
        console.print(title, markup=False, highlight=False)
    # as wide as the content: a console of exactly that width renders every cell whole
    width = Measurement.get(console, console.options.update(width=1 << 20), t).maximum
    wide = Console(file=console.file, width=max(width, 1), force_terminal=console.is_terminal,
                   no_color=console.no_color, highlight=False)
    wide.print(t)


# ---------------------------------------------------------------------- per-step progress

class _WhenSized(ProgressColumn):
    """Show a rich column only for tasks with a known total (and, if given, only for that unit)."""

    def __init__(self, column: ProgressColumn, *units: str | None):
        super().__init__()
        self.column, self.units = column, units

    def render(self, task):
        if not task.fields.get("sized") or (self.units and task.fields.get("unit") not in self.units):
            return Text("")
        return self.column.render(task)


class StepProgress:
    """One live line per running step. ``start(step)`` returns the step's Reporter; ``done`` prints its result line."""

    def __init__(self, console: Console = out):
        self.console = console
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._said: dict[str, str] = {}

    def _live(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.fields[step]:<10}"), TextColumn("{task.description}"),
                _WhenSized(BarColumn(bar_width=24)), _WhenSized(DownloadColumn(), "B"),
                _WhenSized(MofNCompleteColumn(), None), _WhenSized(TransferSpeedColumn(), "B"),
                _WhenSized(TimeRemainingColumn()), TimeElapsedColumn(),
                console=self.console, transient=True, redirect_stdout=False, redirect_stderr=False)
            self._progress.start()
        return self._progress

    def start(self, step: str) -> Callable[..., None]:
        """Begin a step's line; the returned reporter follows the steps' Reporter protocol."""
        flat = plain(self.console)
        if not flat:
            self._tasks[step] = self._live().add_task("starting", step=step, total=None, unit=None,
                                                          sized=False)

        def report(message: str, *, completed: float | None = None, total: float | None = None,
                   unit: str | None = None) -> None:
            if flat:
                if completed is None and self._said.get(step) != message:   # phases, not every tick
                    self._said[step] = message
                    self.console.print(f"  [dim]·[/] {step:<10} [dim]{escape(message)}[/]", highlight=False)
                return
            if step in self._tasks and self._progress is not None:
                sized = total is not None   # a phase without a total hides the last phase's bar and rate
                self._progress.update(self._tasks[step], description=escape(message), completed=completed if sized else 0,
                                      total=total, unit=unit, sized=sized)
        return report

    def done(self, name: str, status: str, key: str, seconds: float, output_digest: str) -> None:
        """Close the step's line and print its result line (format relied on by scripts: name, status, key)."""
        self._finish(name)
        mark = "[green]✓[/]" if status in ("HIT", "REMOTE") else "[cyan]✓[/]"   # REMOTE: pulled from the remote cache
        self.console.print(f"  {mark} {name:<10} {status:<6} {key[:12]}  {seconds:6.2f}s  {output_digest[7:19]}",
                           highlight=False)

    def _finish(self, name: str) -> None:
        self._said.pop(name, None)
        if name in self._tasks and self._progress is not None:
            self._progress.remove_task(self._tasks.pop(name))
        if not self._tasks:
            self.stop()

    def stop(self) -> None:
        """Remove every live line (also on failure, before the error is printed)."""
        self._tasks.clear()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# ---------------------------------------------------------------------- the gate, publish and the summary

def gate_table(verdict: dict, console: Console = out) -> None:
    """The eval gate's verdict (verdict.json as the gate step writes it): one row per rule, then reported metrics.
    An ``invalid`` rule shows why (non-finite documents, by id); numbers that could not be computed show n/a."""
    from forge.evaluation.gatestats import num, rejudge

    rules = verdict.get("rules", [])
    if not rules:
        head = "[yellow]no gate rules: nothing was gated (recorded as ungated, never validated)[/]"
    else:
        head = "[green]eval gate passed[/]" if rejudge(verdict).passed else "[red]eval gate failed[/]"
    rows = []
    for r in rules:
        decision = r["decision"] + (f": {r.get('reason')}" if r["decision"] == "invalid" else "") \
            + (" (underpowered)" if r.get("underpowered") else "")
        colour = "green" if r["passed"] else "red"
        rows.append([f"{r['task']}.{r['metric']}", f"{r['kind']} {num(r['threshold'], 'g')}", num(r.get("baseline")),
                     num(r.get("candidate")), f"{num(r.get('degradation'), '+.4g')} ({num(r.get('ci_low'), '+.4g')} .. "
                     f"{num(r.get('ci_high'), '+.4g')})", str(r["n"]), f"[{colour}]{escape(decision)}[/]"])
    for m in verdict.get("reported", []):
        b, c = m.get("baseline"), m.get("candidate")
        delta = c - b if num(b) != "n/a" and num(c) != "n/a" else None
        rows.append([f"{m['task']}.{m['metric']}", "reported", num(b), num(c), f"{num(delta, '+.4g')} (delta)", "",
                     "[dim]not gated[/]"])
    console.print(f"  {head}", highlight=False)
    if rows:
        table(("metric", "rule", "baseline", "candidate", "degradation (95% CI)", "n", "decision"), rows,
              right=("baseline", "candidate", "n"), console=console)


_STATUS_COLOURS = {"validated": "green", "promoted": "green", "rejected": "red", "unscanned": "yellow",
                   "ungated": "yellow", "proxy-validated": "yellow"}


def publish_line(record, registry_root: Path, console: Console = out) -> None:
    """The publish step's result line (format relied on by scripts: 'publish', status, name:tag)."""
    colour = _STATUS_COLOURS.get(record.status, "cyan")
    ref = f"{record.name}:{record.tag}" if record.tag else record.short()
    console.print(f"  [{colour}]●[/] publish    {record.status:<10} {ref}"
                  + (f"  → {record.remote}" if record.remote else "") + f"  ({registry_root})", highlight=False)


def summary(record, *, registry_root: Path, reports: dict[str, list[Path]], logs: dict[str, Path],
            built: int, reused: int, seconds: float, console: Console = out) -> None:
    """The end of a build: what was recorded, the image, where every report and step log is; timing last.

    ``reports``: a label (eval gate, quantize, scan) -> its report files; ``logs``: step name -> its log file
    (only logs with something in them are listed).
    """
    colour = _STATUS_COLOURS.get(record.status, "cyan")
    lines: list[tuple[str, str]] = [
        ("status", f"[{colour}]{record.status}[/]" + (f" [dim]({escape(record.reason)})[/]" if record.reason else "")),
        ("record", f"{escape(record.name)}:{record.tag}" if record.tag else f"{escape(record.name)} (not promotable)"),
        ("", f"[dim]forge registry show {record.short()} --registry-dir {escape(str(registry_root))}[/]"),
    ]
    if record.image_digest:
        size = f" ({human(record.image_size)})" if record.image_size else ""
        lines.append(("image", f"{record.image_digest}{size}" + (" (weights-free serving image)"
                                                                  if record.model_image_digest else "")))
    if record.model_image_digest:   # container.weights: image
        lines.append(("model image", f"{record.model_image_digest} (mounted at /models)"))
        lines.append(("modelpack", f"{record.modelpack_digest}"))
    if record.remote:
        lines.append(("pushed", escape(record.remote)))
    for label, files in reports.items():
        if files:
            lines.append((label, _files(files)))
    for i, (step, path) in enumerate((s, p) for s, p in logs.items() if p.is_file() and p.stat().st_size):
        lines.append(("step logs" if i == 0 else "", f"{step:<14} {escape(str(path))}"))
    console.print("[bold]summary[/]", highlight=False)
    for label, value in lines:
        console.print(f"  {label:<10} {value}", highlight=False)
    console.print(f"[green]done[/] in {seconds:.1f}s: {built} built, {reused} reused", highlight=False)


def _files(files: Sequence[Path]) -> str:
    """Files in one directory as DIR/{a, b}; else each path."""
    parents = {f.parent for f in files}
    if len(files) > 1 and len(parents) == 1:
        return escape(f"{files[0].parent}/{{{', '.join(f.name for f in files)}}}")
    return escape(", ".join(str(f) for f in files))


# ---------------------------------------------------------------------- variants

_PLAN_COLOURS = {"HIT": "green", "MISS": "yellow", "PENDING": "dim", "FORCED": "yellow"}


def variant_plan(nodes, *, title: str, console: Console = out) -> None:
    """The graph of a recipe's variants (``forge.orchestrate.variants.PlanNode``): each node once, shared ones marked."""
    steps = {n.id: n.step for n in nodes}
    rows = [(n.step, f"shared by: {', '.join(n.variants)}" if n.shared else n.variants[0],
             f"[{_PLAN_COLOURS[n.status]}]{n.status}[/]", n.key[:16] if n.key else (escape(n.reason or "after upstream")),
             ", ".join(steps[d] for d in n.depends) or "-") for n in nodes]
    table(("step", "variants", "status", "key", "depends on"), rows, title=title, console=console)
    shared = sum(n.shared for n in nodes)
    console.print(f"[dim]{len(nodes)} nodes, {shared} shared; then publish each variant (always runs: records it "
                  "and its status)[/]", highlight=False)


def _gate_cell(verdict: dict | None) -> str:
    """The gate's decision and the degradation of its first failing (else first) rule."""
    if verdict is None:
        return "[dim]no gate[/]"
    from forge.evaluation.gatestats import num, rejudge

    rules = verdict.get("rules", [])
    if not rules:
        return "[yellow]ungated[/]"
    shown = next((r for r in rules if not r["passed"]), rules[0])
    delta = f" {shown['metric']} " + (shown["decision"] if shown["decision"] == "invalid"
                                      else num(shown.get("degradation"), "+.3g"))
    return ("[green]pass[/]" if rejudge(verdict).passed else "[red]FAIL[/]") + escape(delta)


def variant_table(rows: dict, console: Console = out) -> None:
    """One row per variant: ``rows`` maps a variant to (its registry Record, its gate's verdict.json or None)."""
    lines = []
    for name, (rec, verdict) in rows.items():
        colour = _STATUS_COLOURS.get(rec.status, "cyan")
        lines.append((escape(name), rec.target_gpu, rec.engine or "-", rec.method, _gate_cell(verdict),
                      f"[{colour}]{rec.status}[/]", (rec.image_digest or "-")[:19],
                      escape(f"{rec.name}:{rec.tag}") if rec.tag else "-"))
    table(("variant", "GPU", "engine", "method", "gate", "status", "image", "tag"), lines, title="variants",
          console=console)


def variant_checks(checked, console: Console = out) -> None:
    """``forge validate`` of a recipe with variants: one line per variant (``forge.orchestrate.variants.Checked``)."""
    for c in checked:
        if c.error is not None:
            console.print(f"[red]✗[/] {escape(c.name)}: {escape(c.error.message)}", highlight=False, soft_wrap=True)
            continue
        t, fit = c.resolved.recipe.target, c.fit
        fits = "" if fit is None else (f"; fits {fit.gpu}: {fit.weights_gb:.1f} GB weights, {fit.headroom_gb:.1f} GB "
                                       f"headroom")
        console.print(f"[green]✓[/] {escape(c.name)}: valid ({t.gpu}, {t.engine}, {c.resolved.recipe.quantize.method})"
                      f"{fits}", highlight=False)
        for w in c.warnings:
            console.print(f"  [yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


def error(message: str, hint: str | None = None, log: Path | None = None, console: Console = err) -> None:
    """A user-facing error: the message, its hint, and the failed step's log file when there is one."""
    console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        console.print(f"[dim]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)
    if log is not None:
        console.print(f"[dim]log:[/] {escape(str(log))}  (the failed step's library output and traceback)",
                      highlight=False, soft_wrap=True)
