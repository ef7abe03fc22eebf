"""The Workload page's figures: latency and throughput against load per policy, the break-even marked.

Pure builders over ``lab.simulate.WorkloadMap.as_dict()``: a run and a saved
result draw the same.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

OFF_STYLE = {"color": "#444", "dash": "dot"}


def _series(data: dict) -> dict[str, list[tuple[float, dict]]]:
    """policy label -> [(load, its run's figures)] in load order."""
    kind = data["load_kind"]
    out: dict[str, list[tuple[float, dict]]] = {}
    for level in data["levels"]:
        for run in level["runs"]:
            out.setdefault(run["policy"], []).append((level[kind], run))
    return out


def _axis(data: dict) -> str:
    return "concurrent requests" if data["load_kind"] == "concurrency" else "arrival rate (requests/s)"


def _mark_break_even(figure: go.Figure, data: dict) -> None:
    """A dashed line at the break-even load, labelled. On the log axis of a concurrency sweep a plotly annotation
    takes log10(x) while a shape takes x (one call giving both put the label, and the axis's range, near 10^x)."""
    load = data.get("break_even_load")
    if load is None:
        return
    figure.add_vline(x=load, line_dash="dash", line_color="#c0392b")
    log_axis = data["load_kind"] == "concurrency" and load > 0
    figure.add_annotation(x=math.log10(load) if log_axis else load, y=1, yref="paper", yanchor="bottom",
                          xanchor="right", showarrow=False, text=f"break-even ({data['break_even_policy']})",
                          font={"color": "#c0392b"})


def latency_figure(data: dict, percentile: str = "p50") -> go.Figure:
    """End-to-end latency (seconds) against load, one line per policy; off dotted."""
    figure = go.Figure()
    for label, points in _series(data).items():
        figure.add_scatter(x=[x for x, _ in points], y=[r[f"latency_{percentile}_s"] for _, r in points],
                           mode="lines+markers", name=label, line=OFF_STYLE if label == "off" else None)
    _mark_break_even(figure, data)
    figure.update_layout(title=f"Latency {percentile} per request", xaxis_title=_axis(data), yaxis_title="seconds",
                         height=380, margin={"t": 50, "b": 40})
    if data["load_kind"] == "concurrency":
        figure.update_xaxes(type="log")
    return figure


def throughput_figure(data: dict) -> go.Figure:
    """Output tokens per second against load, one line per policy."""
    figure = go.Figure()
    for label, points in _series(data).items():
        figure.add_scatter(x=[x for x, _ in points], y=[r["tokens_per_s"] for _, r in points], mode="lines+markers",
                           name=label, line=OFF_STYLE if label == "off" else None)
    _mark_break_even(figure, data)
    figure.update_layout(title="Throughput", xaxis_title=_axis(data), yaxis_title="output tokens/s", height=380,
                         margin={"t": 50, "b": 40})
    if data["load_kind"] == "concurrency":
        figure.update_xaxes(type="log")
    return figure


def level_rows(data: dict) -> list[dict]:
    """One table row per load: off against the best policy (seconds, tokens/s)."""
    kind = data["load_kind"]
    return [{kind: level[kind], "off p50 (s)": level["off"]["latency_p50_s"], "off p99 (s)": level["off"]["latency_p99_s"],
             "off tokens/s": level["off"]["tokens_per_s"], "best policy": level["best"]["policy"],
             "best p50 (s)": level["best"]["latency_p50_s"], "best p99 (s)": level["best"]["latency_p99_s"],
             "best tokens/s": level["best"]["tokens_per_s"]} for level in data["levels"]]
