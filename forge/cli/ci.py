"""forge as a CI step: GitHub Actions workflow commands (annotations) and the job's step summary.

Active only under ``--ci`` (or FORGE_CI) *and* GitHub Actions (GITHUB_ACTIONS=true); anywhere else every
function here does nothing, so the plain output stays the same. Annotations go to stdout, where the runner
reads workflow commands (https://docs.github.com/actions/reference/workflow-commands-for-github-actions):

    ::error file=recipes/x.yaml,line=4,col=10,title=forge: invalid recipe::target.gpu: unknown GPU …

- a recipe problem (RecipeError: ``file:line:col: key: message``) is an error at its location;
- a failed gate metric (an underpowered one cannot pass; its annotation says so) is an error at its rule in
  the recipe, naming the metric and the numbers; a failed scan is one error per deciding finding at the
  recipe's scan section; an unscanned image is a warning;
- the build's summary (status, gate and scan tables, steps, the report's path) is appended to
  $GITHUB_STEP_SUMMARY.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from forge.core import options as env

__all__ = ["enable", "active", "annotation", "recipe_annotations", "on_error", "on_build", "append_summary"]

_state = {"ci": False, "gates_annotated": False}
_LOCATED = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$", re.S)


def enable(on: bool) -> bool:
    """Called by the CLI when --ci / FORGE_CI is parsed; returns ``on`` (a typer option callback)."""
    _state["ci"] = _state["ci"] or bool(on)
    return on


def active() -> bool:
    return _state["ci"] and env.current().github_actions


def _data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _prop(text: str) -> str:
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def _workspace_path(path: str) -> str:
    """Annotations name files relative to the repository root (the workspace)."""
    p = Path(path)
    root = Path(env.current().github_workspace or os.getcwd()).resolve()
    try:
        return str(p.resolve().relative_to(root)) if p.is_absolute() or p.exists() else str(p)
    except ValueError:
        return str(p)


def annotation(level: str, message: str, *, file: str | None = None, line: int | None = None,
               col: int | None = None, title: str | None = None) -> str:
    props = [f"{k}={_prop(str(v))}" for k, v in (("file", file and _workspace_path(file)), ("line", line),
                                                   ("col", col), ("title", title)) if v]
    return f"::{level}{' ' + ','.join(props) if props else ''}::{_data(message)}"


def _located(level: str, where: str, message: str, title: str) -> str:
    """An annotation at ``where`` (``file:line:col`` prefix of a located message, as LoadedRecipe.where gives)."""
    m = _LOCATED.match(f"{where}: {message}" if where else message)
    if m is None:
        return annotation(level, f"{where}: {message}" if where else message, title=title)
    return annotation(level, m["msg"], file=m["file"], line=int(m["line"]), col=int(m["col"]), title=title)


def recipe_annotations(problems: list[str]) -> list[str]:
    out = []
    for problem in problems:
        m = _LOCATED.match(problem)
        if m is not None:
            out.append(annotation("error", m["msg"], file=m["file"], line=int(m["line"]), col=int(m["col"]),
                                  title="forge: invalid recipe"))
        else:   # "path: recipe file not found" and other unlocated problems
            file, sep, msg = problem.partition(": ")
            out.append(annotation("error", msg if sep else problem, file=file if sep else None,
                                  title="forge: invalid recipe"))
    return out


def _emit(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def append_summary(markdown: str) -> None:
    path = env.current().github_step_summary
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(markdown.rstrip("\n") + "\n\n")


def on_error(e) -> None:
    """The CLI's error handler: annotate a ForgeError the build did not annotate already."""
    from forge.core.errors import EvalGateError, RecipeError, ScanGateError

    if not active():
        return
    if isinstance(e, RecipeError):
        _emit(recipe_annotations(e.problems))
        append_summary("## ❌ forge: invalid recipe\n\n" + "\n".join(f"- `{p}`" for p in e.problems))
    elif not (isinstance(e, (EvalGateError, ScanGateError)) and _state["gates_annotated"]):
        _emit([annotation("error", e.message + (f"\n{e.hint}" if e.hint else ""),
                          title=f"forge: exit {int(e.exit_code)} ({e.exit_code.name.lower()})")])


def on_build(loaded, data: dict, report_path: Path | None, summaries: dict[str, str]) -> None:
    """After a build was published: annotate its gate and scan, and append its summary.

    ``data`` is the report's data (``forge.report.data_for``); ``summaries`` the gate's and the scan's own
    markdown summaries by step name."""
    if not active():
        return
    from forge.evaluation.gatestats import num

    lines = []
    gate = data.get("gate") or {}
    rules = list(loaded.recipe.eval.gate) if loaded.recipe.eval else []
    for r in gate.get("rules", []):
        i = next((i for i, rule in enumerate(rules) if (rule.task, rule.metric) == (r["task"], r["metric"])), None)
        where = loaded.where("eval", "gate", i) if i is not None else loaded.where("eval")
        name = f"{r['task']}.{r['metric']}"
        numbers = (f"{name}: baseline {num(r.get('baseline'))}, candidate {num(r.get('candidate'))}; degradation "
                   f"{num(r.get('degradation'), '+.4g')} (95% CI {num(r.get('ci_low'), '+.4g')} .. "
                   f"{num(r.get('ci_high'), '+.4g')}) vs limit {num(r.get('limit'), '+.4g')} ({r['kind']} "
                   f"{num(r.get('threshold'), 'g')}): {r['decision']}"
                   + (f": {r.get('reason')}" if r["decision"] == "invalid" else ""))
        power = f"; underpowered (n={r['n']}, MDE {num(r.get('mde'), '.3g')})" if r.get("underpowered") else ""
        if not r["passed"]:   # an underpowered rule cannot pass (forge.evaluation.gatestats): it is one of these
            lines.append(_located("error", where, numbers + power, f"eval gate failed: {name}"))
    scan = data.get("scan")
    if scan and scan["status"] == "unscanned":
        lines.append(_located("warning", loaded.where("scan"), scan["summary"] or "the image was not scanned",
                              "image not scanned: never validated"))
    elif scan and scan["passed"] is False:
        for f in scan["blocking"]:
            what = f"{f['id']} ({f['severity']}) in {f.get('package') or f['target']}"
            fixed = f"; fixed in {f['fixed']}" if f.get("fixed") else ""
            lines.append(_located("error", loaded.where("scan", "fail_on"),
                                  f"{what} {f.get('installed', '')}{fixed}: {f.get('title', '')}".strip(),
                                  f"scan gate failed: {f['id']}"))
    _emit(lines)
    _state["gates_annotated"] = True
    from forge.report import markdown

    append_summary(markdown(data, report_path, summaries))
