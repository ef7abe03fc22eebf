"""Figures and tables of the Serve page: a real engine at rising concurrency. Pure functions, no streamlit.

Input is a serve bench as its JSON dict: ``lab.studies.serve_bench.ServeBench.as_dict()``,
which is also what ``python -m lab serve-bench --out F`` writes, so a fresh run
and a loaded file draw through the same code. Missing numbers are None.

``levels`` holds one summary per (endpoint, concurrency) with ``vllm bench
serve``'s field names; ``comparison`` one row per concurrency with
latency_speedup (off median e2el / on median e2el) and throughput_speedup (on
output tokens/s / off); ``crossover_concurrency`` is the smallest concurrency
whose latency speedup is below 1. Concurrency goes on a log2 axis labelled with
plain numbers, as on the Batch page.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.render import format_number
from lab.results_files import parse_results
from app.render_batch import (
    CROSSOVER_COLOUR,
    FIGURE_MARGIN,
    LATENCY_COLOUR,
    LEGEND_BELOW,
    SLOWER_FILL,
    THROUGHPUT_COLOUR,
    number,
)

ENDPOINT_COLOURS = ("#2e9d5b", "#8a8f98", "#3a78c9", "#e0912f")  # on, off, then any others
LEVEL_PALETTE = ("#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b", "#041d40")


def load_bench(text: str | bytes) -> dict[str, Any]:
    """A serve bench's JSON text as its dict. Raises ``lab.results_files.ResultsFileError`` (a ValueError) when it
    is not JSON or not a serve bench, naming the first wrong field (``lab.results_files.SERVE_BENCH``)."""
    return parse_results(text, "serve_bench")


def labels(bench: dict) -> list[str]:
    return [e["label"] for e in bench["settings"]["endpoints"]]


def rows_of(bench: dict, label: str) -> list[dict]:
    return sorted((r for r in bench["levels"] if r["label"] == label), key=lambda r: r["max_concurrency"])


def _x(levels: list[int]) -> list[float]:
    return [math.log2(c) for c in levels]


def _concurrency_axis(figure: go.Figure, levels: list[int], **where) -> None:
    figure.update_xaxes(title="concurrent requests", tickmode="array", tickvals=_x(levels),
                        ticktext=[str(c) for c in levels], zeroline=False, **where)


def headline(bench: dict) -> str:
    """Two or three sentences: the speedups at the lowest and highest level, and where the crossover is."""
    comparison = bench.get("comparison") or []
    if not comparison:
        return "One endpoint only: no speedup to compute (give an endpoint with speculation off too)."
    first, last = comparison[0], comparison[-1]
    on, off = labels(bench)[:2]
    lines = [f"At concurrency {first['max_concurrency']}, the median request on **{on}** finished "
             f"{format_number(number(first['latency_speedup']), 2, '×')} as fast as on **{off}**, and the server "
             f"produced {format_number(number(first['throughput_speedup']), 2, '×')} the tokens per second."]
    crossover = bench.get("crossover_concurrency")
    if crossover is None:
        lines.append(f"Speculation shortened the median request at every level measured (up to "
                     f"{last['max_concurrency']}).")
    elif crossover == first["max_concurrency"]:
        lines.append("It made the median request slower at every level measured: on this server speculation does "
                     "not pay for latency at all.")
    else:
        at = next(r for r in comparison if r["max_concurrency"] == crossover)
        lines.append(f"From concurrency {crossover} on it made the median request slower "
                     f"({format_number(number(at['latency_speedup']), 2, '×')}).")
        if number(at["throughput_speedup"]) >= 1:
            lines.append(f"Throughput there still looked like a gain ({number(at['throughput_speedup']):.2f}×).")
    return " ".join(lines)


def speedup_figure(bench: dict) -> go.Figure:
    """On over off against concurrency: median latency and throughput; the crossover marked."""
    comparison = bench.get("comparison") or []
    levels = [r["max_concurrency"] for r in comparison]
    latency = [number(r["latency_speedup"]) for r in comparison]
    throughput = [number(r["throughput_speedup"]) for r in comparison]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=_x(levels), y=latency, customdata=levels, mode="lines+markers",
                                name="median request latency: what a user feels",
                                line=dict(color=LATENCY_COLOUR, width=3), marker=dict(size=9),
                                hovertemplate="concurrency %{customdata}: %{y:.2f}× as fast<extra></extra>"))
    figure.add_trace(go.Scatter(x=_x(levels), y=throughput, customdata=levels, mode="lines+markers",
                                name="output tokens/s: what the server counts",
                                line=dict(color=THROUGHPUT_COLOUR, width=3, dash="dot"), marker=dict(size=9, symbol="square"),
                                hovertemplate="concurrency %{customdata}: %{y:.2f}× the tokens/s<extra></extra>"))
    known = [v for v in latency + throughput if not math.isnan(v)]
    bottom, top = min([0.0] + known), max([1.3] + [1.15 * v for v in known])
    figure.add_hrect(y0=bottom, y1=1.0, fillcolor=SLOWER_FILL, line_width=0, layer="below")
    figure.add_hline(y=1.0, line_color="#555", line_dash="dash", annotation_text="1× = no gain",
                     annotation_position="bottom left")
    crossover = bench.get("crossover_concurrency")
    if crossover is not None:  # the label goes towards the middle, so the plot's edge does not cut it
        middle = (min(_x(levels)) + max(_x(levels))) / 2 if levels else 0.0
        figure.add_vline(x=math.log2(crossover), line_color=CROSSOVER_COLOUR, line_width=2,
                         annotation_text=f"crossover: speculation stops paying for latency (concurrency {crossover})",
                         annotation_font_color=CROSSOVER_COLOUR,
                         annotation_position="top left" if math.log2(crossover) > middle else "top right")
    _concurrency_axis(figure, levels)
    if levels:
        pad = 0.3 if len(levels) > 1 else 1.0
        figure.update_xaxes(range=[min(_x(levels)) - pad, max(_x(levels)) + pad])
    figure.update_yaxes(title="speedup of speculation (on / off)", range=[bottom, top])
    figure.update_layout(title="Speedup against concurrency", height=440, margin=FIGURE_MARGIN, legend=LEGEND_BELOW)
    return figure


def latency_throughput_figure(bench: dict) -> go.Figure:
    """Left: median (solid) and p95 (dotted) request latency against concurrency; right: output tokens/s."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Request latency (end to end)", "Output throughput"))
    levels: set[int] = set()
    for i, label in enumerate(labels(bench)):
        rows = rows_of(bench, label)
        xs = [r["max_concurrency"] for r in rows]
        levels |= set(xs)
        colour = ENDPOINT_COLOURS[i % len(ENDPOINT_COLOURS)]
        figure.add_trace(go.Scatter(x=_x(xs), y=[number(r["median_e2el_ms"]) / 1e3 for r in rows], customdata=xs,
                                    mode="lines+markers", name=f"{label}: median", line=dict(color=colour, width=3),
                                    hovertemplate="concurrency %{customdata}: %{y:.2f} s<extra>" + label + "</extra>"),
                         row=1, col=1)
        figure.add_trace(go.Scatter(x=_x(xs), y=[number(r["p95_e2el_ms"]) / 1e3 for r in rows], customdata=xs,
                                    mode="lines", name=f"{label}: p95", line=dict(color=colour, width=1.5, dash="dot"),
                                    hovertemplate="concurrency %{customdata}: p95 %{y:.2f} s<extra>" + label + "</extra>"),
                         row=1, col=1)
        figure.add_trace(go.Scatter(x=_x(xs), y=[number(r["output_throughput"]) for r in rows], customdata=xs,
                                    mode="lines+markers", name=f"{label}: tokens/s", showlegend=False,
                                    line=dict(color=colour, width=3), marker=dict(symbol="square"),
                                    hovertemplate="concurrency %{customdata}: %{y:.1f} tokens/s<extra>" + label + "</extra>"),
                         row=1, col=2)
    ordered = sorted(levels)
    for col in (1, 2):
        _concurrency_axis(figure, ordered, row=1, col=col)
    crossover = bench.get("crossover_concurrency")
    if crossover is not None:
        figure.add_vline(x=math.log2(crossover), line_color=CROSSOVER_COLOUR, line_width=2, row=1, col=1)
    figure.update_yaxes(title="seconds", rangemode="tozero", row=1, col=1)
    figure.update_yaxes(title="output tokens/s", rangemode="tozero", row=1, col=2)
    figure.update_layout(height=420, margin=FIGURE_MARGIN, legend=LEGEND_BELOW)
    return figure


def tradeoff_figure(bench: dict) -> go.Figure:
    """Median request latency against output tokens/s, one curve per endpoint, points labelled by concurrency."""
    figure = go.Figure()
    for i, label in enumerate(labels(bench)):
        rows = rows_of(bench, label)
        figure.add_trace(go.Scatter(
            x=[number(r["output_throughput"]) for r in rows], y=[number(r["median_e2el_ms"]) / 1e3 for r in rows],
            text=[f"c{r['max_concurrency']}" for r in rows], textposition="top center", mode="lines+markers+text",
            name=label, line=dict(color=ENDPOINT_COLOURS[i % len(ENDPOINT_COLOURS)], width=3),
            hovertemplate="%{text}: %{x:.1f} tokens/s, median %{y:.2f} s<extra>" + label + "</extra>"))
    figure.update_xaxes(title="output tokens/s (the server)", rangemode="tozero")
    figure.update_yaxes(title="median request latency, s (a user)", rangemode="tozero")
    figure.update_layout(title="Latency against throughput (lower right is better)", height=420,
                         margin=FIGURE_MARGIN, legend=LEGEND_BELOW)
    return figure


def acceptance_figure(bench: dict) -> go.Figure:
    """Per-position acceptance of each endpoint that reported it, one line per concurrency level."""
    figure = go.Figure()
    drawn = 0
    for label in labels(bench):
        for i, row in enumerate(rows_of(bench, label)):
            rates = row.get("spec_decode_per_position_acceptance_rates") or []
            if not rates:
                continue
            drawn += 1
            figure.add_trace(go.Scatter(
                x=list(range(1, len(rates) + 1)), y=rates, mode="lines+markers",
                name=f"{label}, concurrency {row['max_concurrency']}",
                line=dict(color=LEVEL_PALETTE[i % len(LEVEL_PALETTE)], width=2)))
    if not drawn:
        figure.add_annotation(text="no per-position figures: the engine exposes no per-position counters on /metrics",
                              showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_xaxes(title="draft position", dtick=1)
    figure.update_yaxes(title="accepted per draft", range=[0, 1.05])
    figure.update_layout(title="Per-position acceptance (the engine's counters)", height=380, margin=FIGURE_MARGIN,
                         legend=LEGEND_BELOW)
    return figure


TABLE_FIELDS = {
    "label": "endpoint", "max_concurrency": "concurrency", "completed": "completed", "failed": "failed",
    "output_throughput": "output tokens/s", "request_throughput": "requests/s",
    "median_ttft_ms": "TTFT p50 (ms)", "p95_ttft_ms": "TTFT p95 (ms)", "median_itl_ms": "ITL p50 (ms)",
    "median_tpot_ms": "TPOT p50 (ms)", "median_e2el_ms": "latency p50 (ms)", "p95_e2el_ms": "latency p95 (ms)",
    "spec_decode_acceptance_rate": "acceptance rate (%)", "spec_decode_acceptance_length": "mean acceptance length",
    "spec_decode_source": "acceptance from",
}


def summary_table(bench: dict) -> pd.DataFrame:
    """One row per endpoint and level, the headline fields under readable names, plus the note or first error."""
    rows = []
    for label in labels(bench):
        for row in rows_of(bench, label):
            line = {name: row.get(field) for field, name in TABLE_FIELDS.items()}
            line["per-position acceptance"] = " ".join(f"{x:.2f}" for x in row.get("spec_decode_per_position_acceptance_rates") or [])
            line["note"] = "; ".join(row.get("errors") or []) or row.get("spec_decode_note") or ""
            rows.append(line)
    return pd.DataFrame(rows, columns=[*TABLE_FIELDS.values(), "per-position acceptance", "note"])


def summary_csv(bench: dict) -> str:
    """Every summary field of every level (not the per-request records), one row each."""
    frame = pd.DataFrame([{k: (";".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()
                           if k != "requests"} for row in bench["levels"]])
    return frame.to_csv(index=False)


def lab_table(bench: dict) -> pd.DataFrame | None:
    """The engine at its lowest concurrency beside the lab's own engine on the same prompts (``bench["lab"]``), or None."""
    lab = bench.get("lab")
    comparison = bench.get("comparison") or []
    if not lab or not comparison:
        return None
    first = comparison[0]
    on, off = labels(bench)[:2]
    row = next(r for r in bench["levels"] if r["label"] == on and r["max_concurrency"] == first["max_concurrency"])
    rate = row.get("spec_decode_acceptance_rate")
    engine = {"engine": f"the server, concurrency {first['max_concurrency']}",
              "tokens/s off": first[f"output_throughput_{off}"], "tokens/s on": first[f"output_throughput_{on}"],
              "speedup": first["throughput_speedup"], "acceptance rate (%)": rate,
              "mean acceptance length": row.get("spec_decode_acceptance_length"),
              "per-position acceptance": " ".join(f"{x:.2f}" for x in row.get("spec_decode_per_position_acceptance_rates") or [])}
    ours = {"engine": f"the lab ({lab.get('precision')}, K={lab.get('k')})",
            "tokens/s off": lab.get("tokens_per_s_off"), "tokens/s on": lab.get("tokens_per_s_on"),
            "speedup": lab.get("speedup"),
            "acceptance rate (%)": None if lab.get("acceptance_rate") is None else 100 * lab["acceptance_rate"],
            "mean acceptance length": lab.get("mean_acceptance_length"),
            "per-position acceptance": " ".join(f"{x:.2f}" for x in lab.get("per_position_acceptance") or [])}
    return pd.DataFrame([engine, ours])
