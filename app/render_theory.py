"""The Theory page's figures: Leviathan et al.'s curves, with the Compare page's measured points on them.

Pure functions, no streamlit. The formulas are ``lab.theory``'s: expected tokens
per step E(a, K) and the speedup with draft cost c and verify cost v(K).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go

from app.render import FIGURE_MARGIN, KIND_COLOURS, drafter_colours
from app.render_compare import not_measured_as_text
from lab.theory import expected_speedup, expected_tokens_per_step


CURVE_POINTS = 201


SLOWER_FILL = "rgba(208, 71, 63, 0.10)"


@dataclass(frozen=True)
class MeasuredPoint:
    """One drafter x K of a comparison, placed on Leviathan's curves.

    acceptance: a fitted from the measured mean acceptance length;
    acceptance_rate: vLLM's accepted/drafted, for reference;
    cost_ratio: c as measured; measured: the decode speedup;
    predicted: expected_speedup(a, K, c), Leviathan's model (v = 1, r = 1);
    efficiency = measured / predicted.
    verify_cost: v(K), a bare forward pass over K+1 tokens in plain steps;
    draft_rate: r, the share of steps at which the drafter proposed anything;
    predicted_v: the model with that v(K) and r (``lab.studies.compare``);
    efficiency_v = measured / predicted_v. NaN where the comparison did not
    measure v(K) (a results file written before it did).
    """

    drafter: str
    k: int
    acceptance: float
    acceptance_rate: float
    mean_acceptance_length: float
    cost_ratio: float
    measured: float
    predicted: float
    verify_cost: float = math.nan
    draft_rate: float = math.nan
    predicted_v: float = math.nan

    @property
    def efficiency(self) -> float:
        return self.measured / self.predicted if self.predicted else math.nan

    @property
    def efficiency_v(self) -> float:
        return self.measured / self.predicted_v if self.predicted_v and not math.isnan(self.predicted_v) else math.nan

    @property
    def label(self) -> str:
        return f"{self.drafter}, K={self.k}"


def measured_points(summary: pd.DataFrame) -> list[MeasuredPoint]:
    """The summary rows with a finite a, c and decode speedup (rows where nothing was drafted are left out)."""
    points = []
    for _, row in summary.iterrows() if not summary.empty else []:
        a, c, measured = (float(row[name]) for name in ("fitted_acceptance", "cost_ratio", "decode_speedup"))
        if any(math.isnan(v) for v in (a, c, measured)):
            continue
        k = int(row["k"])
        extra = {field: float(row.get(name, math.nan)) for field, name in (
            ("verify_cost", "bare_verify_cost"), ("draft_rate", "draft_rate"), ("predicted_v", "predicted_speedup_v"))}
        points.append(MeasuredPoint(str(row["drafter"]), k, a, float(row["acceptance_rate"]),
                                    float(row["mean_acceptance_length"]), c, measured, expected_speedup(a, k, c),
                                    **extra))
    return points


def break_even_acceptance(k: int, cost_ratio: float, verify_cost: float = 1.0) -> float | None:
    """The a at which the expected speedup is exactly 1 for K, c and v; None when no a in [0, 1] reaches it.

    For K = 1 this is a = c + v - 1 (a = c in Leviathan's v = 1). Below it,
    speculation is slower than the target alone; 0 when even a = 0 pays (v < 1).
    """
    if expected_speedup(1.0, k, cost_ratio, verify_cost) < 1.0:
        return None
    if expected_speedup(0.0, k, cost_ratio, verify_cost) >= 1.0:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_speedup(mid, k, cost_ratio, verify_cost) < 1.0:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _grid() -> list[float]:
    return [i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)]


def tokens_per_step_figure(k: int, acceptance: float | None = None, reference_ks: Sequence[int] = (1, 2, 8)) -> go.Figure:
    """Expected tokens per target step (1 - a^(K+1)) / (1 - a) over a: K bold, a few other K thin, K = inf dashed."""
    grid = _grid()
    figure = go.Figure()
    for other in sorted(set(reference_ks) - {k}):
        figure.add_trace(go.Scatter(x=grid, y=[expected_tokens_per_step(a, other) for a in grid], mode="lines",
                                    name=f"K={other}", line=dict(width=1, color="#b0b4bb"),
                                    hovertemplate=f"K={other}, a=%{{x:.2f}}: %{{y:.2f}} tokens<extra></extra>"))
    limit = [1 / (1 - a) if a < 0.95 else None for a in grid]
    figure.add_trace(go.Scatter(x=grid, y=limit, mode="lines", name="K=∞: 1/(1−a)", line=dict(width=1, dash="dot", color="#888"),
                                hovertemplate="K=∞, a=%{x:.2f}: %{y:.2f} tokens<extra></extra>"))
    figure.add_trace(go.Scatter(x=grid, y=[expected_tokens_per_step(a, k) for a in grid], mode="lines", name=f"K={k}",
                                line=dict(width=3, color=KIND_COLOURS["bonus"]),
                                hovertemplate=f"K={k}, a=%{{x:.2f}}: %{{y:.2f}} tokens<extra></extra>"))
    if acceptance is not None:
        value = expected_tokens_per_step(acceptance, k)
        figure.add_trace(go.Scatter(x=[acceptance], y=[value], mode="markers+text", text=[f"{value:.2f}"],
                                    textposition="top left", marker=dict(size=11, color=KIND_COLOURS["bonus"]),
                                    name=f"a={acceptance:.2f}", showlegend=False, hoverinfo="skip"))
    figure.update_layout(
        title=f"Tokens per target step, K={k}",
        xaxis=dict(title="acceptance rate a (per drafted token)", range=[0, 1]),
        yaxis=dict(title="tokens per target step", range=[0, max(k + 1.5, 4)]),
        height=460,
        margin=FIGURE_MARGIN,
        legend=dict(orientation="h", yanchor="top", y=-0.22),
    )
    return figure


def speedup_theory_figure(
    k: int,
    cost_ratio: float,
    points: Sequence[MeasuredPoint] = (),
    acceptance: float | None = None,
    own_curves: bool = False,
    verify_cost: float = 1.0,
) -> go.Figure:
    """Predicted walltime speedup over a for K, c and v, the region where speculation is slower shaded,
    and measured runs: a filled marker at the measured decode speedup, a hollow one at Leviathan's prediction
    for the run's own K and c (v = 1, r = 1), and a dash at the prediction with its measured v(K) and draft
    rate r where known, joined by a dotted line.

    own_curves: also draw each run's own Leviathan curve (thin, dotted).
    """
    grid = _grid()
    curve = [expected_speedup(a, k, cost_ratio, verify_cost) for a in grid]
    with_v = "" if verify_cost == 1 else f", v={verify_cost:.2f}"
    figure = go.Figure()
    even = break_even_acceptance(k, cost_ratio, verify_cost)
    slower_to = 1.0 if even is None else even
    if slower_to > 0:
        figure.add_vrect(x0=0, x1=slower_to, fillcolor=SLOWER_FILL, line_width=0, layer="below",
                         annotation_text="slower than the target alone", annotation_position="top left")
    colours = drafter_colours([p.drafter for p in points])
    symbols = _k_symbols([p.k for p in points])
    if own_curves:
        for point in points:
            figure.add_trace(go.Scatter(x=grid, y=[expected_speedup(a, point.k, point.cost_ratio) for a in grid],
                                        mode="lines", line=dict(width=1, dash="dot", color=colours[point.drafter]),
                                        name=f"prediction for {point.label}, c={point.cost_ratio:.2f}",
                                        showlegend=False, hoverinfo="skip"))
    figure.add_trace(go.Scatter(x=grid, y=curve, mode="lines", name=f"predicted, K={k}, c={cost_ratio:.2f}{with_v}",
                                line=dict(width=3, color=KIND_COLOURS["bonus"]),
                                hovertemplate=f"K={k}, c={cost_ratio:.2f}{with_v}, a=%{{x:.2f}}: %{{y:.2f}}×<extra></extra>"))
    figure.add_hline(y=1.0, line_dash="dash", line_color="#555")
    k1_even = cost_ratio + verify_cost - 1  # K = 1: (1 + a) / (c + v) = 1
    if 0 <= k1_even <= 1:
        figure.add_vline(x=k1_even, line_dash="dot", line_color=KIND_COLOURS["rejected"],
                         annotation_text="a = c" if verify_cost == 1 else "a = c + v − 1",
                         annotation_position="bottom right")
    for point in points:
        colour = colours[point.drafter]
        predictions = [point.predicted] + ([] if math.isnan(point.predicted_v) else [point.predicted_v])
        span = [min(predictions + [point.measured]), max(predictions + [point.measured])]
        figure.add_trace(go.Scatter(x=[point.acceptance, point.acceptance], y=span,
                                    mode="lines", line=dict(color=colour, dash="dot", width=1.5),
                                    showlegend=False, hoverinfo="skip"))
        figure.add_trace(go.Scatter(x=[point.acceptance], y=[point.predicted], mode="markers",
                                    marker=dict(symbol=f"{symbols[point.k]}-open", size=12, color=colour, line=dict(width=2)),
                                    name=f"{point.label}: predicted", legendgroup=point.label, showlegend=False,
                                    hovertemplate=(f"{html.escape(point.label)}<br>Leviathan predicts {point.predicted:.2f}× "
                                                   f"for a={point.acceptance:.2f}, c={point.cost_ratio:.3f} "
                                                   "(v = 1, r = 1)<extra></extra>")))
        efficiency_v = "" if math.isnan(point.efficiency_v) else f", efficiency_v {point.efficiency_v:.0%}"
        figure.add_trace(go.Scatter(x=[point.acceptance], y=[point.measured], mode="markers",
                                    marker=dict(symbol=symbols[point.k], size=12, color=colour, line=dict(color="#222", width=1)),
                                    name=point.label, legendgroup=point.label,
                                    hovertemplate=(f"{html.escape(point.label)}<br>measured {point.measured:.2f}× "
                                                   f"(Leviathan {point.predicted:.2f}×, efficiency {point.efficiency:.0%}"
                                                   f"{efficiency_v})<br>a={point.acceptance:.2f} (fitted), "
                                                   f"c={point.cost_ratio:.3f}<extra></extra>")))
        if not math.isnan(point.predicted_v):  # on top: near 100 % efficiency_v it sits on the filled marker
            figure.add_trace(go.Scatter(
                x=[point.acceptance], y=[point.predicted_v], mode="markers",
                marker=dict(symbol="line-ew-open", size=24, color=colour, line=dict(width=3, color=colour)),
                name=f"{point.label}: predicted with v, r", legendgroup=point.label, showlegend=False,
                hovertemplate=(f"{html.escape(point.label)}<br>predicted {point.predicted_v:.2f}× with the measured "
                               f"v(K)={point.verify_cost:.2f} and r={point.draft_rate:.0%}<extra></extra>")))
    if points:  # what the marker shapes mean, once
        for name, marker in (("hollow: Leviathan (v = 1, r = 1)", dict(symbol="circle-open", size=10, color="#555")),
                             ("dash: with the measured v(K) and r",
                              dict(symbol="line-ew-open", size=14, color="#555", line=dict(width=3, color="#555")))):
            if name.startswith("dash") and all(math.isnan(p.predicted_v) for p in points):
                continue
            figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=marker, name=name,
                                        hoverinfo="skip"))
    if acceptance is not None:
        value = expected_speedup(acceptance, k, cost_ratio, verify_cost)
        figure.add_trace(go.Scatter(x=[acceptance], y=[value], mode="markers+text", text=[f"{value:.2f}×"],
                                    textposition="top left", marker=dict(size=11, color=KIND_COLOURS["bonus"]),
                                    showlegend=False, hoverinfo="skip"))
    values = curve + [p.measured for p in points] + [p.predicted for p in points]
    values += [p.predicted_v for p in points if not math.isnan(p.predicted_v)]
    figure.update_layout(
        title=f"Speedup, K={k}, c={cost_ratio:.2f}{with_v}",
        xaxis=dict(title="acceptance rate a (per drafted token)", range=[0, 1]),
        yaxis=dict(title="speedup over the target alone", range=[0, max(2.0, max(values) * 1.1)]),
        height=460,
        margin=FIGURE_MARGIN,
        legend=dict(orientation="h", yanchor="top", y=-0.22),
    )
    return figure


K_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "pentagon", "hexagon", "star", "cross")


def _k_symbols(ks: Sequence[int]) -> dict[int, str]:
    """One marker shape per K (colour stays the drafter's)."""
    return {k: K_SYMBOLS[i % len(K_SYMBOLS)] for i, k in enumerate(sorted(set(ks)))}


def points_table(points: Sequence[MeasuredPoint]) -> pd.DataFrame:
    """The measured runs next to Leviathan's prediction and to the one with their measured v(K) and r.

    The v(K) columns read "n/a" for a comparison that did not measure it.
    """
    return not_measured_as_text(pd.DataFrame(
        [
            {  # the two efficiencies first, so that a narrow page shows them without scrolling
                "drafter": p.drafter,
                "K": p.k,
                "measured": p.measured,
                "predicted (Leviathan)": p.predicted,
                "efficiency": p.efficiency,
                "v(K), bare": p.verify_cost,
                "draft rate r": p.draft_rate,
                "predicted with v, r": p.predicted_v,
                "efficiency_v": p.efficiency_v,
                "a (fitted)": p.acceptance,
                "c (measured)": p.cost_ratio,
                "acceptance rate (vLLM)": p.acceptance_rate,
                "mean acceptance length": p.mean_acceptance_length,
                "a < c": "yes" if p.acceptance < p.cost_ratio else "",
            }
            for p in points
        ]
    ))
