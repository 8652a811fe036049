"""The report's HTML: one self-contained file (plotly.js and the data inlined, no network at view time).

A Content-Security-Policy in the page forbids every fetch, so a report that tried to load anything
would show it as an error in the browser's console (the browser test checks there is none).
"""
from __future__ import annotations

import json
from functools import cache

from forge.report import figures

__all__ = ["render"]

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
       "font-src data:; connect-src 'none'")


@cache
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _env():
    from pathlib import Path

    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["size"] = _size
    env.filters["short"] = lambda d: (d or "-").removeprefix("sha256:")[:12]
    return env


def _size(n) -> str:
    """Bytes in decimal units, three significant digits (what registries and `du --si` show)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return str(n)


def _num(x, fmt: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "nan"
    return format(x, fmt)


def render(data: dict) -> str:
    """The HTML page for the data ``forge.report.gather`` returns."""
    plots = {}
    if data["gate"] and data["gate"].get("rules"):
        plots["gate"] = figures.div(figures.gate_forest(data["gate"]), "fig-gate")
    if data["quantize"] and data["quantize"]["layers"]:
        plots["quantize"] = figures.div(figures.quant_layers(data["quantize"]), "fig-quantize")
    if data["fit"] and data["fit"]["gpus"]:
        plots["memory"] = figures.div(figures.gpu_memory(data["fit"]), "fig-memory")
        plots["economics"] = figures.div(figures.gpu_economics(data["fit"]), "fig-economics")
    if data["image"] and data["image"]["layers"]:
        plots["image"] = figures.div(figures.image_layers(data["image"]), "fig-image")
    if any(s["built_seconds"] is not None for s in data["steps"]):
        plots["steps"] = figures.div(figures.step_times(data["steps"]), "fig-steps")
    target = next((g for g in (data["fit"] or {}).get("gpus", []) if g["gpu"] == (data["fit"] or {}).get("target")), None)
    return _env().get_template("report.html.j2").render(
        d=data, plots=plots, target=target, csp=CSP, plotly_js=_plotly_js(),
        data_json=_embedded_json(data))


def _embedded_json(data: dict):
    """The data as JSON inside a <script> element: non-finite numbers as null, no '<' to end the element."""
    from markupsafe import Markup

    def finite(x):
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    text = json.dumps(finite(data), default=str, sort_keys=True)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
