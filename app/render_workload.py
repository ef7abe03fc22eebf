"""The Workload page's figures: latency and throughput against load per policy, the break-even marked.

Pure builders over ``lab.simulate.WorkloadMap.as_dict()``: a run and a saved
result draw the same.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

OFF_STYLE = {"color": "#444", "dash": "dot"}
RECOMMENDED_STYLE = {"color": "#1f4e9c", "width": 4}


def _name(label: str, data: dict) -> str:
    return f"{label} (recommended)" if label == data.get("recommended") else label


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


LEGEND = {"orientation": "h", "yanchor": "top", "y": -0.3, "xanchor": "left", "x": 0}
"""Legends go below the plot, horizontal, so they never cover the lines at a narrow width."""
MARGIN = {"t": 50, "b": 110}


def _loads(data: dict) -> list[float]:
    return [level[data["load_kind"]] for level in data["levels"]]


def _mark_break_even(figure: go.Figure, data: dict) -> None:
    """A dashed line at the break-even load, labelled inside the plot (left of the line in the right half of the
    axis, right of it in the left half, so no edge clips it). On the log axis of a concurrency sweep a plotly
    annotation takes log10(x) while a shape takes x (one call giving both put the label, and the axis's range,
    near 10^x)."""
    load = data.get("break_even_load")
    if load is None:
        return
    figure.add_vline(x=load, line_dash="dash", line_color="#c0392b")
    log_axis = data["load_kind"] == "concurrency" and load > 0
    scale = (lambda x: math.log10(x)) if log_axis else (lambda x: x)
    loads = [x for x in _loads(data) if not log_axis or x > 0]
    low, high = scale(min(loads)), scale(max(loads))
    left_half = high <= low or (scale(load) - low) / (high - low) < 0.5
    figure.add_annotation(x=scale(load), y=1, yref="paper", yanchor="top", xanchor="left" if left_half else "right",
                          xshift=4 if left_half else -4, showarrow=False,
                          text=f"break-even ({data['break_even_policy']})", font={"color": "#c0392b"},
                          bgcolor="rgba(255,255,255,0.7)")


def _style(figure: go.Figure, data: dict, title: str, y_title: str) -> None:
    """Title, legend below, and on a concurrency sweep a log axis ticked at exactly the simulated loads."""
    figure.update_layout(title=title, xaxis_title=_axis(data), yaxis_title=y_title, height=460, margin=MARGIN,
                         legend=LEGEND)
    if data["load_kind"] == "concurrency":
        loads = _loads(data)
        figure.update_xaxes(type="log", tickmode="array", tickvals=loads, ticktext=[f"{x:g}" for x in loads],
                            minor={"showgrid": False, "ticks": ""})
    else:
        figure.update_xaxes(tickmode="array", tickvals=_loads(data))


def _drawing_order(data: dict) -> list[tuple[str, list[tuple[float, dict]]]]:
    """The series with the recommended policy last, so it is drawn on top (a trial found it hidden)."""
    series = _series(data)
    return sorted(series.items(), key=lambda item: item[0] == data.get("recommended"))


def _line(label: str, data: dict) -> dict | None:
    """Off dotted; the recommended policy thick and black-edged blue; the rest plotly's own."""
    if label == "off":
        return OFF_STYLE
    return RECOMMENDED_STYLE if label == data.get("recommended") else None


def latency_figure(data: dict, percentile: str = "p50") -> go.Figure:
    """End-to-end latency (seconds) against load, one line per policy; off dotted, the recommended one on top."""
    figure = go.Figure()
    for label, points in _drawing_order(data):
        figure.add_scatter(x=[x for x, _ in points], y=[r[f"latency_{percentile}_s"] for _, r in points],
                           mode="lines+markers", name=_name(label, data), line=_line(label, data))
    _mark_break_even(figure, data)
    _style(figure, data, f"Latency {percentile} per request", "seconds")
    return figure


def throughput_figure(data: dict) -> go.Figure:
    """Output tokens per second against load, one line per policy; the recommended one on top."""
    figure = go.Figure()
    for label, points in _drawing_order(data):
        figure.add_scatter(x=[x for x, _ in points], y=[r["tokens_per_s"] for _, r in points], mode="lines+markers",
                           name=_name(label, data), line=_line(label, data))
    _mark_break_even(figure, data)
    _style(figure, data, "Throughput", "output tokens/s")
    return figure


def level_rows(data: dict) -> list[dict]:
    """One table row per load: off, the recommended policy and the best one there (seconds, tokens/s). The
    recommended policy is the one never far from the best at any load: where it trails, this row shows by how
    much (a trial's recommendation was 10 % slower than off at one load, which a best-only table hid)."""
    kind = data["load_kind"]
    rows = []
    for level in data["levels"]:
        mine = next(r for r in level["runs"] if r["policy"] == data["recommended"])
        rows.append({kind: level[kind], "off p50 (s)": level["off"]["latency_p50_s"],
                     "off p99 (s)": level["off"]["latency_p99_s"], "off tokens/s": level["off"]["tokens_per_s"],
                     "recommended p50 (s)": mine["latency_p50_s"], "recommended p99 (s)": mine["latency_p99_s"],
                     "recommended tokens/s": mine["tokens_per_s"], "best policy": level["best"]["policy"],
                     "best p50 (s)": level["best"]["latency_p50_s"], "best p99 (s)": level["best"]["latency_p99_s"],
                     "best tokens/s": level["best"]["tokens_per_s"]})
    return rows


def table_columns(data: dict) -> dict:
    """st.column_config-style formats for level_rows: latency in seconds to 2 decimals (3 significant digits
    printed 36 beside 36.1), tokens/s to 1 decimal.
    Plain dicts (no streamlit here); the page wraps them in st.column_config.NumberColumn."""
    columns = {f"{who} {p} (s)": {"format": "%.2f"} for who in ("off", "recommended", "best") for p in ("p50", "p99")}
    columns.update({f"{who} tokens/s": {"format": "%.1f"} for who in ("off", "recommended", "best")})
    columns[data["load_kind"]] = {"format": "%d" if data["load_kind"] == "concurrency" else "%g"}
    return columns
