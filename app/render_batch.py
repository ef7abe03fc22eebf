"""Figures and tables of the Batch page: speculation against batch size. Pure functions, no streamlit.

Input is a batch-size sweep as its JSON dict: ``lab.studies.batch_sweep.SweepResult.as_dict()``,
which is also what ``SweepResult.to_json()`` and ``python -m lab bench --out F``
write, so a fresh run and a loaded file draw through the same code. In that
dict missing numbers (NaN: nothing drafted, no time measured) are None.

Per batch size (``results[i]``): latency_speedup = off p50 latency over on p50
latency per request (> 1: a user waits less), throughput_speedup = on tokens/s
over off tokens/s for the whole batch (> 1: the server produces more); the
modes off (the target alone), on (the drafter at K) and auto (the K the policy
chose for that batch size before running it) each carry latency p50/p95, TTFT
and tokens/s. The crossover is the smallest batch size whose latency speedup is
below 1 (``SweepResult.crossover_batch_size``).

A sweep may be partial: settings["status"] is "cancelled" (the Cancel
button) or "stopped" (the page reran while sweeping) and
settings["batch_sizes_planned"] lists what was asked for; ``results`` holds
the batch sizes that finished. It may carry ``peer_batch_1``: transformers'
assisted generation at batch 1 on the same models and prompts
(``lab.studies.peer.PeerReport.summary``), or {"skipped": why}. Under a constraint
settings["constraint"] names it and each mode counts its ``outputs_valid``.

Batch sizes go on a log2 axis drawn as plain numbers: x = log2(B), ticks
labelled B, so lines and annotations use ordinary linear coordinates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.render import format_number
from lab.results_files import parse_results

MODES = ("off", "on", "auto")
MODE_COLOURS = {"off": "#8a8f98", "on": "#2e9d5b", "auto": "#3a78c9"}
LATENCY_COLOUR = "#e0912f"  # what a user feels
THROUGHPUT_COLOUR = "#3a78c9"  # what the server counts
SLOWER_FILL = "rgba(208, 71, 63, 0.08)"
CROSSOVER_COLOUR = "#d0473f"
CROSSOVER_TEXT = "speculation stops paying for latency here"
BATCH_PALETTE = ("#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
CONSTRAINT_LABELS = {"json_schema": "JSON schema", "regex": "regex", "any_json": "any JSON"}  # lab.grammar's kinds
FIGURE_MARGIN = dict(l=10, r=10, t=60, b=10)
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.22)


# ---------------------------------------------------------------- reading a sweep


def load_sweep(text: str | bytes) -> dict[str, Any]:
    """A sweep's JSON text (Download JSON here, or ``python -m lab bench --out F``) as its dict.

    Raises ``lab.results_files.ResultsFileError`` (a ValueError) when the text is not JSON or not a
    batch-size sweep, naming the first wrong field (``lab.results_files.SWEEP``).
    """
    return parse_results(text, "sweep")


def number(value: Any) -> float:
    """A JSON number as a float; None (NaN in the sweep) becomes NaN."""
    return math.nan if value is None else float(value)


def batch_sizes(sweep: dict) -> list[int]:
    return [int(r["batch_size"]) for r in sweep["results"]]


def crossover(sweep: dict, measure: str = "latency") -> int | None:
    """The smallest batch size whose ``measure`` ("latency" or "throughput") speedup is below 1; None if none.

    Computed from the results (as ``SweepResult.crossover_batch_size`` is), so a
    hand-edited or partial file cannot disagree with its own curve.
    """
    return next((int(r["batch_size"]) for r in sweep["results"] if number(r.get(f"{measure}_speedup")) < 1.0), None)


def mode_value(result: dict, mode: str, field: str) -> float:
    return number((result.get(mode) or {}).get(field))


def auto_share_of_best(result: dict) -> tuple[float, float]:
    """Auto's latency and throughput as fractions of the better fixed choice's (on or off); 1.0 = as good.

    Latency: best p50 / auto p50; throughput: auto tokens/s / best tokens/s.
    Above 1 only by noise (auto ran separately from on and off).
    """
    latency = number(result.get("auto_latency_vs_best"))
    return (1.0 / latency if latency and not math.isnan(latency) else math.nan,
            number(result.get("auto_throughput_vs_best")))


def better_fixed_choice(result: dict) -> str:
    """ "on" or "off": which fixed mode gave the shorter p50 latency at this batch size."""
    return "on" if mode_value(result, "on", "latency_p50_s") < mode_value(result, "off", "latency_p50_s") else "off"


def acceptance_spread(sweep: dict) -> float | None:
    """The largest difference, over draft positions, between batch sizes' per-position acceptance (None: < 2 curves).

    Greedy outputs do not depend on the batch, so neither should acceptance;
    what remains comes from the mix of requests (prompts are cycled to fill
    whole batches) and, below fp32, from rounding that flips a near-tie.
    """
    curves = [list(r["on"].get("per_position_acceptance_rate") or []) for r in sweep["results"]]
    curves = [[number(v) for v in c] for c in curves if c]
    if len(curves) < 2:
        return None
    positions = min(len(c) for c in curves)
    if positions == 0:
        return None
    return max(max(c[i] for c in curves) - min(c[i] for c in curves) for i in range(positions))


def outputs_differ(sweep: dict) -> dict[str, int | None]:
    """Greedy requests whose output differs, summed over batch sizes.

    on_vs_off: speculative vs the target alone at the same batch size.
    <mode>_vs_batch_1: each mode at B > 1 vs the target alone at batch 1 on the same prompt.
    None where the sweep did not measure it (sampling, or no batch size 1).
    """
    def total(values: list) -> int | None:
        known = [int(v) for v in values if v is not None]
        return sum(known) if known else None

    out = {"on_vs_off": total([r.get("outputs_differ_on_vs_off") for r in sweep["results"]])}
    for mode in MODES:
        out[f"{mode}_vs_batch_1"] = total([(r.get(mode) or {}).get("outputs_differ_from_batch_1")
                                           for r in sweep["results"] if int(r["batch_size"]) > 1])
    return out


def planned_batch_sizes(sweep: dict) -> list[int]:
    """The batch sizes the sweep was asked for (files written before the lab recorded them: the finished ones)."""
    planned = (sweep.get("settings") or {}).get("batch_sizes_planned")
    return [int(b) for b in planned] if planned else batch_sizes(sweep)


def partial_text(sweep: dict) -> str | None:
    """What a cancelled or stopped sweep holds, in one sentence; None for a complete one.

    "Cancelled: a partial sweep. Batch sizes 1, 2 of 1, 2, 4, 8 finished; 4, 8 did not run."
    """
    status = (sweep.get("settings") or {}).get("status") or "complete"
    if status == "complete":
        return None
    done, planned = batch_sizes(sweep), planned_batch_sizes(sweep)
    missing = [b for b in planned if b not in done]
    how = {"cancelled": "Cancelled", "stopped": "Stopped because the page reran while sweeping (an input changed)"}
    sizes = "Batch size" + ("s " if len(done) > 1 else " ")
    text = (f"{how.get(status, status.capitalize())}: a partial sweep. {sizes}{', '.join(map(str, done))} "
            f"of {', '.join(map(str, planned))} finished")
    return text + (f"; {', '.join(map(str, missing))} did not run." if missing else ".")


def constraint_text(sweep: dict) -> str | None:
    """The constraint every output was held to ("any JSON", "regex `[0-9]+`"), None without one."""
    constraint = (sweep.get("settings") or {}).get("constraint")
    if not constraint:
        return None
    kind = CONSTRAINT_LABELS.get(constraint.get("kind"), str(constraint.get("kind")))
    source = " ".join(str(constraint.get("source") or "").split())
    shown = source if len(source) <= 60 else source[:59] + "…"
    return f"{kind} `{shown}`" if shown else kind


def outputs_valid(sweep: dict) -> dict[str, tuple[int, int]] | None:
    """Per mode, (outputs that satisfy the constraint, requests), summed over batch sizes; None when not counted."""
    out = {}
    for mode in MODES:
        runs = [r.get(mode) or {} for r in sweep["results"]]
        valid = [run.get("outputs_valid") for run in runs]
        if any(v is not None for v in valid):
            out[mode] = (sum(int(v or 0) for v in valid), sum(int(run.get("num_requests") or 0) for run in runs))
    return out or None


def peer(sweep: dict) -> dict | None:
    """The peer at batch 1 (``peer_batch_1``): a ``lab.studies.peer.PeerReport.summary`` or {"skipped": why}; None: absent."""
    found = sweep.get("peer_batch_1")
    return found if isinstance(found, dict) else None


def peer_table(found: dict) -> pd.DataFrame:
    """Ours against transformers' assisted generation at batch 1: tokens/s alone and speculative, and the speedup
    of each over its own greedy decoding, one row per decoder."""
    return pd.DataFrame([
        {"decoder": "ours (lab.decode)", "greedy tokens/s": number(found.get("ours_baseline_tokens_per_s")),
         "speculative tokens/s": number(found.get("ours_speculative_tokens_per_s")),
         "speedup over its own greedy": number(found.get("speedup")),
         "tokens per target pass": number(found.get("ours_tokens_per_target_pass"))},
        {"decoder": "transformers' assisted generation", "greedy tokens/s": number(found.get("hf_greedy_tokens_per_s")),
         "speculative tokens/s": number(found.get("hf_assisted_tokens_per_s")),
         "speedup over its own greedy": number(found.get("hf_speedup")),
         "tokens per target pass": number(found.get("hf_tokens_per_target_pass"))},
    ])


def peer_identical_text(found: dict) -> str:
    """The three greedy exactness counts of the peer run, e.g. "ours speculative = ours alone: 4/4; ..."."""
    n = found.get("num_prompts")
    pairs = (("ours speculative = ours alone", "speculative_identical_to_baseline"),
             ("ours alone = transformers' greedy", "baseline_identical_to_hf_greedy"),
             ("transformers' assisted = its greedy", "hf_assisted_identical_to_hf_greedy"))
    return "; ".join(f"{what}: {'n/a' if found.get(name) is None else found[name]}/{n}" for what, name in pairs)


PEER_PAIRS = {"speculative_vs_baseline": "ours speculative vs ours alone",
              "baseline_vs_hf_greedy": "ours alone vs transformers' greedy",
              "hf_assisted_vs_hf_greedy": "transformers' assisted vs its greedy"}


def peer_mismatch_text(found: dict, shown: int = 4) -> str:
    """The peer's greedy outputs that differ: "ours alone vs transformers' greedy on spec_bench/7 from token 11"; ""."""
    mismatches = found.get("mismatches") or []
    parts = [f"{PEER_PAIRS.get(m.get('pair'), m.get('pair'))} on {m.get('prompt')} from token "
             f"{m.get('first_difference_at')}" for m in mismatches[:shown]]
    return "; ".join(parts) + (f" and {len(mismatches) - shown} more" if len(mismatches) > shown else "")


def headline(sweep: dict) -> str:
    """The sweep in two or three plain sentences: the gain at the smallest batch, where it stops, what throughput hid."""
    results = sweep["results"]
    first = results[0]
    lines = [
        f"At batch size {first['batch_size']}, with speculation ({sweep.get('drafter')}, K={sweep.get('k')}) the "
        f"median request finished {format_number(number(first.get('latency_speedup')), 2, '×')} as fast and the "
        f"batch produced {format_number(number(first.get('throughput_speedup')), 2, '×')} the tokens per second."
    ]
    latency_at = crossover(sweep, "latency")
    if latency_at is None:
        lines.append(f"It shortened the median request at every batch size measured (up to {results[-1]['batch_size']}).")
    else:
        at = next(r for r in results if int(r["batch_size"]) == latency_at)
        if latency_at == int(first["batch_size"]):  # the first sentence gave the figure already
            lines.append(f"So speculation did not pay for latency even at batch size {latency_at}.")
        else:
            lines.append(f"From batch size {latency_at} on it made the median request slower "
                         f"({number(at.get('latency_speedup')):.2f}×).")
        throughput = number(at.get("throughput_speedup"))
        if throughput >= 1.0:
            lines.append(f"Throughput there still looked like a gain ({throughput:.2f}×): measured in tokens per "
                         "second alone, the loss users feel is invisible.")
    return " ".join(lines)


# ---------------------------------------------------------------- figures


def _x(sizes: Sequence[int]) -> list[float]:
    return [math.log2(b) for b in sizes]


def _batch_axis(figure: go.Figure, sizes: Sequence[int], **where) -> None:
    figure.update_xaxes(title="batch size (concurrent requests)", tickmode="array", tickvals=_x(sizes),
                        ticktext=[str(b) for b in sizes], zeroline=False, **where)


def _note(figure: go.Figure, text: str) -> None:
    figure.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")


def speedup_figure(sweep: dict) -> go.Figure:
    """Speedup of speculation over the target alone against batch size: per-request latency (p50) and throughput.

    A line at 1 (below it speculation is slower, shaded); the latency crossover
    marked by a vertical line with ``CROSSOVER_TEXT``; the throughput crossover,
    when it falls elsewhere, by a dotted one.
    """
    results = sweep["results"]
    sizes = batch_sizes(sweep)
    latency = [number(r.get("latency_speedup")) for r in results]
    throughput = [number(r.get("throughput_speedup")) for r in results]
    figure = go.Figure()
    figure.add_trace(go.Scatter(
        x=_x(sizes), y=latency, customdata=sizes, mode="lines+markers",
        name="per-request latency (p50): what a user feels",
        line=dict(color=LATENCY_COLOUR, width=3), marker=dict(size=9),
        hovertemplate="batch %{customdata}: the median request finishes %{y:.2f}× as fast<extra></extra>",
    ))
    figure.add_trace(go.Scatter(
        x=_x(sizes), y=throughput, customdata=sizes, mode="lines+markers", name="throughput: what the server counts",
        line=dict(color=THROUGHPUT_COLOUR, width=3, dash="dot"), marker=dict(size=9, symbol="square"),
        hovertemplate="batch %{customdata}: %{y:.2f}× the tokens per second<extra></extra>",
    ))
    known = [v for v in latency + throughput if not math.isnan(v)]
    top = max([1.3] + [1.15 * v for v in known])
    bottom = min([0.0] + known)
    figure.add_hrect(y0=bottom, y1=1.0, fillcolor=SLOWER_FILL, line_width=0, layer="below")
    figure.add_hline(y=1.0, line_color="#555", line_dash="dash",
                     annotation_text="1× = no gain; below, speculation is slower", annotation_position="bottom left",
                     annotation_font_color="#555")
    latency_at, throughput_at = crossover(sweep, "latency"), crossover(sweep, "throughput")
    def side(batch_size: int) -> str:  # write the label towards the middle, so the plot's edge does not cut it
        return "left" if math.log2(batch_size) > (min(_x(sizes)) + max(_x(sizes))) / 2 else "right"

    if latency_at is not None:
        figure.add_vline(x=math.log2(latency_at), line_color=CROSSOVER_COLOUR, line_width=2,
                         annotation_text=f"{CROSSOVER_TEXT} (batch {latency_at})",
                         annotation_position=f"top {side(latency_at)}", annotation_font_color=CROSSOVER_COLOUR)
    if throughput_at is not None and throughput_at != latency_at:
        figure.add_vline(x=math.log2(throughput_at), line_color=THROUGHPUT_COLOUR, line_dash="dot", line_width=2,
                         annotation_text=f"throughput stops paying (batch {throughput_at})",
                         annotation_position=f"bottom {side(throughput_at)}", annotation_font_color=THROUGHPUT_COLOUR)
    if latency_at is None and results:
        figure.add_annotation(text="speculation pays for latency at every batch size measured", showarrow=False,
                              x=0.5, y=1.0, xref="paper", yref="paper", yanchor="bottom", font=dict(color="#2e9d5b"))
    _batch_axis(figure, sizes)
    span = _x(sizes)
    pad = 0.3 if len(sizes) > 1 else 1.0
    figure.update_xaxes(range=[min(span) - pad, max(span) + pad] if span else None)
    figure.update_yaxes(title="speedup of speculation (on / off)", range=[bottom, top])
    figure.update_layout(title=f"Speedup against batch size ({sweep.get('drafter')}, K={sweep.get('k')})",
                         height=460, margin=FIGURE_MARGIN, legend=LEGEND_BELOW)
    return figure


def mode_label(sweep: dict, mode: str) -> str:
    return {"off": "off (target alone)", "on": f"on (K={sweep.get('k')})", "auto": "auto (policy's K)"}[mode]


def absolute_figure(sweep: dict) -> go.Figure:
    """Per-request latency p50 (solid) and p95 (dashed), and throughput, for off / on / auto, against batch size.

    Auto is drawn as diamonds only: at most batch sizes its K is 0 or the
    configured K, so it is the off or the on run and would hide that line.
    One legend entry per mode; clicking it hides all of that mode's traces.
    """
    results = sweep["results"]
    sizes = batch_sizes(sweep)
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                           subplot_titles=("Per-request latency: p50 solid, p95 dashed (lower is better)",
                                           "Throughput, whole batch (higher is better)"))
    for mode in MODES:
        colour = MODE_COLOURS[mode]
        ks = [int((r.get(mode) or {}).get("k") or 0) for r in results]
        custom = list(zip(sizes, ks))
        style = (dict(mode="markers", marker=dict(symbol="diamond-open", size=13, line=dict(width=2.5)))
                 if mode == "auto" else dict(mode="lines+markers", marker=dict(size=7)))
        panels = [(1, "latency_p50_s", "solid", "latency p50", "%{y:.2f} s"),
                  (2, "tokens_per_s", "solid", "throughput", "%{y:.1f} tokens/s")]
        if mode != "auto":
            panels.insert(1, (1, "latency_p95_s", "dash", "latency p95", "%{y:.2f} s"))
        for number_of_trace, (col, field, dash, what, value) in enumerate(panels):
            figure.add_trace(go.Scatter(
                x=_x(sizes), y=[mode_value(r, mode, field) for r in results], customdata=custom,
                name=mode_label(sweep, mode), legendgroup=mode, showlegend=number_of_trace == 0,
                line=dict(color=colour, dash=dash, width=2.5 if dash == "solid" else 1.5), marker_color=colour,
                hovertemplate=f"{mode} (K=%{{customdata[1]}}), batch %{{customdata[0]}}: {what} {value}<extra></extra>",
                **style,
            ), row=1, col=col)
    for col in (1, 2):
        _batch_axis(figure, sizes, row=1, col=col)
    figure.update_yaxes(title="seconds per request", rangemode="tozero", row=1, col=1)
    figure.update_yaxes(title="tokens per second", rangemode="tozero", row=1, col=2)
    figure.update_layout(title="What each mode measured", height=460, margin=FIGURE_MARGIN, legend=LEGEND_BELOW)
    return figure


def batch_colours(sizes: Sequence[int]) -> dict[int, str]:
    """Light to dark blue with the batch size."""
    n = len(sizes)
    return {b: BATCH_PALETTE[round(i * (len(BATCH_PALETTE) - 1) / max(1, n - 1))] for i, b in enumerate(sizes)}


def acceptance_figure(sweep: dict) -> go.Figure:
    """Per-position acceptance of the on mode, one curve per batch size (they should lie on top of each other)."""
    results = sweep["results"]
    colours = batch_colours(batch_sizes(sweep))
    figure = go.Figure()
    # Equal curves would hide each other: earlier (smaller) batch sizes get wider lines and bigger markers,
    # so each shows as a ring around the next.
    for i, r in enumerate(results):
        rates = [number(v) for v in (r["on"].get("per_position_acceptance_rate") or [])]
        if not rates:
            continue
        b = int(r["batch_size"])
        size = 8 + 5 * (len(results) - 1 - i)
        figure.add_trace(go.Scatter(
            x=list(range(1, len(rates) + 1)), y=rates, mode="lines+markers", name=f"batch {b}",
            line=dict(color=colours[b], width=2 + 2 * (len(results) - 1 - i)), marker=dict(size=size),
            hovertemplate=f"batch {b}, position %{{x}}: %{{y:.0%}} of drafts accepted<extra></extra>",
        ))
    figure.update_layout(
        title="Per-position acceptance at each batch size",
        xaxis=dict(title="draft position", tickmode="linear", dtick=1),
        yaxis=dict(title="drafts accepted up to here", range=[0, 1.05], tickformat=".0%"),
        height=420, margin=FIGURE_MARGIN, legend=LEGEND_BELOW,
    )
    if not figure.data:
        _note(figure, "nothing was drafted")
    return figure


def policy_figure(sweep: dict) -> go.Figure:
    """Left: the K the auto policy chose per batch size (0 = off) before running it, and what it would choose after
    the whole sweep. Right: auto's latency and throughput as a share of the better fixed choice's (100 % = as good)."""
    results = sweep["results"]
    sizes = batch_sizes(sweep)
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                           subplot_titles=("K chosen by the policy (0 = speculation off)",
                                           "Auto against the better of on and off"))
    chosen = [int(r.get("auto_k") or 0) for r in results]
    better = [better_fixed_choice(r) for r in results]
    figure.add_trace(go.Bar(
        x=_x(sizes), y=chosen, customdata=list(zip(sizes, better)), name="K chosen before running that batch size",
        marker_color=MODE_COLOURS["auto"], text=[f"K={k}" if k else "off" for k in chosen],
        textposition=["inside" if k else "outside" for k in chosen], insidetextanchor="middle", width=0.5,
        hovertemplate="batch %{customdata[0]}: auto chose K=%{y}; the better fixed choice was "
                      "speculation %{customdata[1]}<extra></extra>",
    ), row=1, col=1)
    after = (sweep.get("policy_after_sweep") or {}).get("k_by_batch_size") or {}
    if after:
        figure.add_trace(go.Scatter(
            x=_x(sizes), y=[after.get(str(b)) for b in sizes], customdata=sizes, mode="markers",
            name="K it would choose after the whole sweep", marker=dict(symbol="diamond", size=12, color="#222"),
            hovertemplate="batch %{customdata}: K=%{y} with everything measured<extra></extra>",
        ), row=1, col=1)
    k = int(sweep.get("k") or 0)
    if k and sizes:
        span = _x(sizes)
        figure.add_trace(go.Scatter(
            x=[min(span) - 0.4, max(span) + 0.4], y=[k, k], mode="lines", name=f"configured K={k} (the on mode)",
            line=dict(color=MODE_COLOURS["on"], dash="dash", width=2), hoverinfo="skip",
        ), row=1, col=1)
    shares = [auto_share_of_best(r) for r in results]
    for index, (name, colour, dash) in enumerate((("latency p50", LATENCY_COLOUR, "solid"),
                                                  ("throughput", THROUGHPUT_COLOUR, "dot"))):
        figure.add_trace(go.Scatter(
            x=_x(sizes), y=[s[index] for s in shares], customdata=list(zip(sizes, better)), mode="lines+markers",
            name=f"auto's {name}, share of the best", line=dict(color=colour, width=2.5, dash=dash), marker=dict(size=8),
            hovertemplate=f"batch %{{customdata[0]}}: auto's {name} is %{{y:.0%}} of the better fixed choice's "
                          "(speculation %{customdata[1]})<extra></extra>",
        ), row=1, col=2)
    figure.add_hline(y=1.0, line_dash="dash", line_color="#555", row=1, col=2)
    for col in (1, 2):
        _batch_axis(figure, sizes, row=1, col=col)
    top_k = max([k, *chosen, *(v for v in after.values() if v is not None)]) if (chosen or k) else 1
    figure.update_yaxes(title="K (draft tokens per step)", range=[0, top_k + 1.2], dtick=1, row=1, col=1)
    known = [v for s in shares for v in s if not math.isnan(v)]
    figure.update_yaxes(title="share of the better fixed choice", tickformat=".0%",
                        range=[min([0.5] + known) - 0.05, max([1.1] + known) + 0.05], row=1, col=2)
    figure.update_layout(title="The auto-K policy", height=440, margin=FIGURE_MARGIN, legend=LEGEND_BELOW,
                         bargap=0.5)
    return figure


# ---------------------------------------------------------------- table and CSV


def sweep_table(sweep: dict) -> pd.DataFrame:
    """Every figure of the sweep, one row per batch size (seconds, tokens/s, ratios as plain numbers); under a
    constraint also each mode's outputs that satisfy it."""
    constrained = outputs_valid(sweep) is not None
    rows = []
    for r in sweep["results"]:
        latency_share, throughput_share = auto_share_of_best(r)
        per_position = [number(v) for v in (r["on"].get("per_position_acceptance_rate") or [])]
        row = {
            "batch size": int(r["batch_size"]),
            "requests": r.get("num_requests"),
            "latency speedup": number(r.get("latency_speedup")),
            "throughput speedup": number(r.get("throughput_speedup")),
            "TTFT speedup": number(r.get("ttft_speedup")),
        }
        for mode in MODES:
            row[f"latency p50 {mode} (s)"] = mode_value(r, mode, "latency_p50_s")
            row[f"latency p95 {mode} (s)"] = mode_value(r, mode, "latency_p95_s")
        for mode in MODES:
            row[f"tokens/s {mode}"] = mode_value(r, mode, "tokens_per_s")
        for mode in ("off", "on"):
            row[f"TTFT p50 {mode} (s)"] = mode_value(r, mode, "ttft_p50_s")
        row |= {
            "acceptance rate": mode_value(r, "on", "acceptance_rate"),
            "mean acceptance length": number(r.get("mean_acceptance_length")),
            "per-position acceptance": " ".join(format_number(v, 2) for v in per_position) or "—",
            "auto K": r.get("auto_k"),
            "auto predicted speedup": number(r.get("auto_predicted_speedup")),
            "auto latency, share of best": latency_share,
            "auto throughput, share of best": throughput_share,
            "better fixed choice": better_fixed_choice(r),
            "outputs differ on vs off": r.get("outputs_differ_on_vs_off"),
        }
        for mode in MODES:
            row[f"outputs differ from batch 1 ({mode})"] = (r.get(mode) or {}).get("outputs_differ_from_batch_1")
        if constrained:
            for mode in MODES:
                row[f"outputs valid ({mode})"] = (r.get(mode) or {}).get("outputs_valid")
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_csv(sweep: dict) -> str:
    """``sweep_table`` as CSV text, one line per batch size."""
    return sweep_table(sweep).to_csv(index=False)


def sweep_json(sweep: dict) -> str:
    """The sweep's JSON text, as ``SweepResult.to_json()`` writes it (loads back with ``load_sweep``)."""
    return json.dumps(sweep, indent=2)


def verify_cost_table(sweep: dict) -> pd.DataFrame:
    """Why the gain shrinks: the measured ms of a target pass of B rows x 1 token and of B rows x (K+1) tokens.

    From the sweep's cost model (calibration plus every step it ran). A ratio
    near 1 means verifying K+1 tokens is almost free (memory-bound); near K+1,
    it costs what K+1 plain steps cost and only accepted tokens pay it back.
    """
    costs = (sweep.get("cost_model") or {}).get("target_ms") or {}
    measured: dict[tuple[int, int], float] = {}
    for shape, ms in costs.items():
        rows, width = shape.split("x")
        measured[(int(rows), int(width))] = number(ms)
    width = int(sweep.get("k") or 0) + 1
    table = []
    for b in sorted({b for b, _ in measured}):
        one, full = measured.get((b, 1), math.nan), measured.get((b, width), math.nan)
        table.append({"batch size": b, "1 token per row (ms)": one, f"{width} tokens per row (ms)": full,
                      f"{width} tokens over 1": full / one if one else math.nan})
    return pd.DataFrame(table)
