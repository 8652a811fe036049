"""The report's plots, one plotly figure per function, each from one section of the gathered data.

Every figure is handed to the page as a <div> (``div``); plotly.js itself is inlined once by the renderer.
"""
from __future__ import annotations

PASS, FAIL, KEPT, MUTED, ACCENT = "#1a7f37", "#cf222e", "#bf8700", "#8c959f", "#0969da"
CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendDataToCloud"]}


def _go():
    import plotly.graph_objects as go

    return go


def _layout(fig, title: str, height: int = 360, **extra):
    fig.update_layout(title={"text": title, "x": 0, "font": {"size": 15}}, height=height, template="plotly_white",
                      margin={"l": 10, "r": 10, "t": 48, "b": 10}, legend={"orientation": "h", "y": -0.18},
                      font={"family": "system-ui, sans-serif"}, **extra)
    fig.update_yaxes(automargin=True)
    fig.update_xaxes(automargin=True)
    return fig


def div(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=CONFIG)


def gate_forest(gate: dict):
    """Each gated metric's degradation with its paired-bootstrap 95 % interval, against its limit."""
    go = _go()
    rules = [r for r in gate["rules"] if all(isinstance(r.get(k), (int, float))   # an invalid rule has no interval
                                             for k in ("degradation", "ci_low", "ci_high", "limit"))]
    names = [f"{r['task']}.{r['metric']}<br>({r['kind']} {r['threshold']:g})" for r in rules]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        name="degradation (95% CI)", x=[r["degradation"] for r in rules], y=names, mode="markers",
        marker={"size": 12, "color": [PASS if r["passed"] else FAIL for r in rules]},
        error_x={"type": "data", "symmetric": False, "array": [r["ci_high"] - r["degradation"] for r in rules],
                 "arrayminus": [r["degradation"] - r["ci_low"] for r in rules], "thickness": 2.5, "width": 8},
        customdata=[[r["ci_low"], r["ci_high"], r["decision"], r["mde"]] for r in rules],
        hovertemplate="%{y}<br>degradation %{x:+.4g}<br>95%% CI %{customdata[0]:+.4g} .. %{customdata[1]:+.4g}"
                      "<br>%{customdata[2]} · MDE %{customdata[3]:.3g}<extra></extra>"))
    fig.add_trace(go.Scatter(name="limit", x=[r["limit"] for r in rules], y=names, mode="markers",
                             marker={"symbol": "line-ns-open", "size": 30, "color": FAIL,
                                     "line": {"width": 3, "color": FAIL}},
                             hovertemplate="limit %{x:+.4g}<extra></extra>"))
    fig.add_vline(x=0, line={"color": MUTED, "dash": "dot"})
    return _layout(fig, "Eval gate: degradation vs limit (larger is worse)", height=140 + 70 * len(rules),
                   xaxis_title="degradation in the rule's units (0 = no change)")


def quant_layers(q: dict):
    """Relative weight error per layer; layers kept in higher precision shown apart."""
    go = _go()
    from plotly.subplots import make_subplots

    quantized = [row for row in q["layers"] if not row["kept"]]
    kept = [row for row in q["layers"] if row["kept"]]
    losses = [row for row in quantized if row.get("backend_error") is not None]
    fig = make_subplots(specs=[[{"secondary_y": bool(losses)}]])
    fig.add_trace(go.Bar(name="relative weight error ‖Wq−W‖/‖W‖", x=[row["layer"] for row in quantized],
                         y=[row["weight_rel_error"] for row in quantized], marker_color=ACCENT))
    if kept:
        fig.add_trace(go.Bar(name="kept in higher precision", x=[row["layer"] for row in kept], y=[0] * len(kept),
                             marker={"color": KEPT, "line": {"color": KEPT, "width": 6}},
                             hovertemplate="%{x}: not quantized<extra></extra>"))
    if losses:
        fig.add_trace(go.Scatter(name=f"{q['method'].upper()} loss (backend)", x=[row["layer"] for row in losses],
                                 y=[row["backend_error"] for row in losses], mode="lines+markers",
                                 line={"color": FAIL}), secondary_y=True)
        fig.update_yaxes(title_text="backend loss", secondary_y=True, type="log")
    # past ~60 layers the names are unreadable on the axis: they stay in the hover text
    fig.update_xaxes(tickangle=-60, tickfont={"size": 9}, showticklabels=len(q["layers"]) <= 60)
    fig.update_yaxes(title_text="relative weight error", secondary_y=False)
    return _layout(fig, f"Quantization ({q['method']}): error per layer", height=440)


def gpu_memory(fit: dict):
    """Per GPU: weights, KV cache and overhead stacked against the memory budget."""
    go = _go()
    rows = fit["gpus"]
    names = [_gpu_label(r["gpu"], fit["target"]) for r in rows]
    fig = go.Figure()
    for part, key, color in (("weights", "weights_gb", ACCENT), ("KV cache", "kv_cache_gb", "#8250df"),
                             ("runtime overhead", "overhead_gb", MUTED)):
        per_gpu = [r[key] / (1 if key == "overhead_gb" else r["tensor_parallel"]) for r in rows]
        fig.add_trace(go.Bar(name=part, y=names, x=per_gpu, orientation="h", marker_color=color,
                             hovertemplate="%{y}: " + part + " %{x:.2f} GB<extra></extra>"))
    fig.add_trace(go.Scatter(name="budget (VRAM × utilization)", y=names, x=[r["budget_gb"] for r in rows],
                             mode="markers", marker={"symbol": "line-ns-open", "size": 22, "color": FAIL,
                                                     "line": {"width": 3, "color": FAIL}},
                             hovertemplate="%{y}: budget %{x:.1f} GB<extra></extra>"))
    return _layout(fig, "Memory per GPU (GB)", height=120 + 34 * len(rows), barmode="stack", xaxis_title="GB")


def gpu_economics(fit: dict):
    """Decode roofline throughput and $ per million tokens on each GPU that can run the scheme."""
    go = _go()
    from plotly.subplots import make_subplots

    rows = fit["gpus"]
    names = [_gpu_label(r["gpu"], fit["target"]) for r in rows]
    colors = [ACCENT if r["gpu"] == fit["target"] else MUTED for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode roofline, tokens/s (all sequences)",
                                                        "$ per 1M output tokens"), horizontal_spacing=0.18)
    fig.add_trace(go.Bar(y=names, x=[r["decode_tok_s_aggregate"] for r in rows], orientation="h", marker_color=colors,
                         name="tokens/s", showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(y=names, x=[r["usd_per_million_tokens"] for r in rows], orientation="h", marker_color=colors,
                         name="$/1M tokens", showlegend=False), row=1, col=2)
    return _layout(fig, "Throughput and cost", height=120 + 34 * len(rows))


def image_layers(image: dict):
    go = _go()
    layers = image["layers"]
    labels = [f"{i}: {'weights' if layer['weights'] else (layer['created_by'][:40] or layer['digest'][7:19])}"
              for i, layer in enumerate(layers)]
    fig = go.Figure(go.Bar(x=[layer["size"] / 1e6 for layer in layers], y=labels, orientation="h",
                           marker_color=[KEPT if layer["weights"] else ACCENT for layer in layers],
                           hovertemplate="%{y}: %{x:.2f} MB<extra></extra>", name="layer size"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Image layers (MB, as stored)", height=120 + 30 * len(layers), xaxis_title="MB")


def step_times(steps: list[dict]):
    go = _go()
    ran = [s for s in steps if s["built_seconds"] is not None]
    fig = go.Figure(go.Bar(x=[s["built_seconds"] for s in ran], y=[s["step"] for s in ran], orientation="h",
                           marker_color=[MUTED if s["status"] == "HIT" else ACCENT for s in ran],
                           hovertemplate="%{y}: %{x:.1f} s to build<extra></extra>", name="build time"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Time each step took when it was built (s; grey: reused from the cache in this build)",
                   height=120 + 30 * len(ran), xaxis_title="seconds")


def _gpu_label(name: str, target: str) -> str:
    return f"<b>{name} (target)</b>" if name == target else name
