"""Figures, tables and HTML for the Compare, Theory and Step-through pages. Pure functions, no streamlit.

Inputs are ``lab`` objects: a ``lab.studies.compare.Comparison`` (its ``summary()`` has
one row per drafter x K), ``lab.trace.Step`` events with their
``PositionDetail`` rows, and the Leviathan formulas of ``lab.theory``. Words
follow the lab's vocabulary: draft / target, accepted, rejected, corrected,
bonus, acceptance rate, mean acceptance length, per-position acceptance.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.render import KIND_COLOURS, count, format_number, token_text
from lab.studies.compare import BASELINE, Comparison
from lab.drafters import num_layers
from lab.theory import expected_speedup, expected_tokens_per_step
from lab.trace import PositionDetail, Step

PROMPT_SEPARATOR = "---"
"""A line holding only this separates pasted prompts (a blank line may sit inside one prompt)."""

DRAFTER_PALETTE = ("#3a78c9", "#e0912f", "#2e9d5b", "#9b59b6", "#d0473f", "#17a2b8", "#8c564b", "#e377c2")
DRAFT_COLOUR = "#9b59b6"  # time spent drafting
VERIFY_COLOUR = "#8a8f98"  # time spent in the target's verify pass (the target's class colour)
SLOWER_FILL = "rgba(208, 71, 63, 0.10)"
PREVIEW_CHARS = 70
CURVE_POINTS = 201

FIGURE_MARGIN = dict(l=10, r=10, t=50, b=10)


# ---------------------------------------------------------------- prompts


def split_prompts(text: str) -> list[str]:
    """Pasted text -> prompts: blocks separated by a line holding only ``---``; empty blocks dropped."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip() == PROMPT_SEPARATOR:
            blocks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    blocks.append("\n".join(current))
    return [block.strip() for block in blocks if block.strip()]


def preview(text: str, chars: int = PREVIEW_CHARS) -> str:
    """The start of a prompt on one line, for tables and labels."""
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1] + "…"


# ---------------------------------------------------------------- comparison tables


def drafter_colours(drafters: Sequence[str]) -> dict[str, str]:
    """One colour per drafter label, stable in the order given."""
    return {name: DRAFTER_PALETTE[i % len(DRAFTER_PALETTE)] for i, name in enumerate(dict.fromkeys(drafters))}


def identical_text(fraction: float | None, prompts: int) -> str:
    """The greedy exactness check of one drafter x K: "yes (3/3)", "2/3 (see note)", "— (sampling)".

    A partial match is not a bare "no": in bf16/fp16 outputs can part at a
    near-tie (the page's note explains, and fp32 is token-exact), so the cell
    points to the note instead of contradicting the exactness guarantee.
    """
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return "— (sampling)"
    same = round(fraction * prompts)
    return f"yes ({same}/{prompts})" if same == prompts else f"{same}/{prompts} (see note)"


NOT_MEASURED = "n/a"
VERIFY_COST_COLUMNS = ("v(K), bare", "predicted with v, r", "efficiency_v")
"""Columns that need the bare verify cost v(K), which results files written before the lab measured it lack."""


def column(summary: pd.DataFrame, name: str) -> pd.Series:
    """A summary column as floats; all NaN when the summary predates it (an older results file)."""
    if name in summary:
        return summary[name].astype(float)
    return pd.Series(math.nan, index=summary.index, dtype=float)


def not_measured_as_text(table: pd.DataFrame, columns: Sequence[str] = VERIFY_COST_COLUMNS) -> pd.DataFrame:
    """Columns with no value in any row become "n/a" text (kept numeric, and formatted, when any row has one)."""
    for name in columns:
        if name in table and table[name].isna().all():
            table[name] = NOT_MEASURED
    return table


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as shown: one row per drafter x K, people's column names, numbers kept numeric.

    Rates stay fractions (the page formats them as percentages); "identical to
    target" becomes text (``identical_text``); the best K per drafter (highest
    speedup) is starred where its speedup is at least 1. The verify-cost columns (``lab.studies.compare``'s module
    docstring) read "n/a" for a comparison that did not measure v(K).
    """
    if summary.empty:
        return pd.DataFrame()
    best = best_k_by_drafter(summary, at_least=1.0)
    return not_measured_as_text(pd.DataFrame(
        {
            "drafter": summary["drafter"],
            "K": summary["k"].astype(int),
            "best K": [("★" if best.get(d) == k else "") for d, k in zip(summary["drafter"], summary["k"])],
            "identical to target": [identical_text(f, n) for f, n in zip(summary["identical_to_target"], summary["prompts"])],
            "speedup": summary["speedup"].astype(float),
            "acceptance rate": summary["acceptance_rate"].astype(float),
            "mean acceptance length": summary["mean_acceptance_length"].astype(float),
            "tokens/s": summary["tokens_per_s"].astype(float),
            "target tokens/s": summary["target_tokens_per_s"].astype(float),
            "decode speedup": summary["decode_speedup"].astype(float),
            "c": summary["cost_ratio"].astype(float),
            "tokens per pass": column(summary, "tokens_per_pass"),
            "draft rate r": column(summary, "draft_rate"),
            "verify cost in the loop": column(summary, "verify_cost_ratio"),
            "v(K), bare": column(summary, "bare_verify_cost"),
            "predicted (Leviathan)": column(summary, "predicted_speedup"),
            "efficiency": column(summary, "efficiency"),
            "predicted with v, r": column(summary, "predicted_speedup_v"),
            "efficiency_v": column(summary, "efficiency_v"),
            "prompts": summary["prompts"].astype(int),
        }
    ))


COMPACT_COLUMNS = ("drafter", "K", "acceptance rate", "mean acceptance length", "tokens/s", "speedup",
                   "identical to target")


def compact_summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's headline columns (``COMPACT_COLUMNS``), narrow enough to read without scrolling.

    K becomes text so that each drafter's best K carries its star ("4 ★");
    every other column is as in ``summary_table``.
    """
    table = summary_table(summary)
    if table.empty:
        return table
    compact = table[list(COMPACT_COLUMNS)].copy()
    compact["K"] = [f"{k} ★" if star else str(k) for k, star in zip(table["K"], table["best K"])]
    return compact


def best_k_by_drafter(summary: pd.DataFrame, column: str = "speedup", at_least: float | None = None) -> dict[str, int]:
    """For each drafter, the K with the highest ``column`` (NaN rows ignored).

    at_least: leave out a drafter whose best value is below it (1.0 for speedup: a star on a K that loses to
    the target alone would read as advice to use it). The table and the chart star the same Ks through this.
    """
    best: dict[str, int] = {}
    for drafter, rows in summary.groupby("drafter", sort=False):
        values = rows[column].astype(float)
        if values.notna().any() and (at_least is None or values.max() >= at_least):
            best[str(drafter)] = int(rows.loc[values.idxmax(), "k"])
    return best


RUN_COLUMN_NAMES = {
    "output_tokens": "output tokens", "acceptance_rate": "acceptance rate",
    "mean_acceptance_length": "mean acceptance length", "tokens_per_s": "tokens/s", "decode_speedup": "decode speedup",
    "cost_ratio": "c", "identical_to_target": "identical to target", "wall_s": "wall time (s)",
}


def runs_table(comparison: Comparison) -> pd.DataFrame:
    """The per-prompt breakdown: ``Comparison.runs_frame()`` with each prompt's start and a cancelled column."""
    frame = comparison.runs_frame()
    if frame.empty:
        return frame
    texts = [preview(comparison.prompts[i]) for i in frame["prompt"]]
    frame["prompt"] = frame["prompt"] + 1
    frame["cancelled"] = [r.cancelled for r in comparison.runs]
    frame["prompt text"] = texts  # the numbers first (they fit without a sideways scroll), the prompt's start last
    return frame.rename(columns=RUN_COLUMN_NAMES)


def run_label(comparison: Comparison, index: int) -> str:
    """A run's name in a picker: "prompt 2 · prompt-lookup (n 1-3), K=4"."""
    record = comparison.runs[index]
    what = BASELINE if record.drafter == BASELINE else f"{record.drafter}, K={record.k}"
    return f"prompt {record.prompt_index + 1} · {what}" + (" (cancelled)" if record.cancelled else "")


def format_count(value: int | None) -> str:
    """A parameter count as people say it: 135M, 1.78B."""
    if value is None:
        return "—"
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    if value >= 1e6:
        return f"{value / 1e6:.0f}M"
    return f"{value:,}"


def format_bytes(value: int | None) -> str:
    """Bytes in MiB or GiB."""
    if value is None:
        return "—"
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    return f"{value / 2**20:.0f} MiB"


def drafter_cost(name: str, target, draft=None, exit_layer: int | None = None, draft_vocab: int | None = None) -> dict:
    """What a drafter adds to the target: ``{"parameters", "weight_bytes", "note"}`` (0 when it adds no weights).

    target, draft: ``lab.models.LoadedModel`` (draft only for "draft-model").
    draft_vocab: the trimmed vocabulary N of a draft model or EAGLE head (None: full).
    """
    trimmed = f"; its LM head scores only the target's {draft_vocab:,} most frequent tokens" if draft_vocab else ""
    if name == "draft-model":
        return {"parameters": int(draft.num_parameters), "weight_bytes": int(draft.weight_bytes),
                "note": f"its own weights ({draft.name}) and KV cache{trimmed}"}
    if name == "eagle":
        from lab.drafters.eagle import find_head, load_head

        head, _ = load_head(find_head(target.name))
        params = sum(p.numel() for p in head.parameters())
        return {"parameters": params, "weight_bytes": head.num_bytes(),
                "note": f"one decoder layer over the target's hidden states; decodes with the target's LM head{trimmed}"}
    if name == "layer-skip":
        layers = num_layers(target.model)
        exit_at = exit_layer if exit_layer is not None else max(1, layers // 4)
        return {"parameters": 0, "weight_bytes": 0,
                "note": f"shares the target's weights (its first {exit_at} of {layers} layers); adds a KV cache for them"}
    if name == "prompt-lookup":
        return {"parameters": 0, "weight_bytes": 0, "note": "no weights: matches the last n-gram in the prompt and output"}
    raise ValueError(f"drafter cost requires draft-model, eagle, layer-skip or prompt-lookup; got {name!r}")


def cost_rows(drafter_costs: dict[str, dict], summary: pd.DataFrame) -> list[dict]:
    """What each drafter costs: parameters and weight memory it adds, and its measured c per K.

    drafter_costs: ``{label: {"parameters": int | None, "weight_bytes": int | None,
    "note": str}}`` as the Compare page records it in ``Comparison.settings``.
    c = draft time per drafted token / the target alone's time per decode step
    (``lab.studies.compare``); a drafter's c can differ with K.
    """
    rows = []
    labels = list(dict.fromkeys(list(drafter_costs) + (list(summary["drafter"]) if not summary.empty else [])))
    for label in labels:
        measured = summary[summary["drafter"] == label] if not summary.empty else summary
        c_text = ", ".join(
            f"{format_number(float(c), 3)} (K={int(k)})" for k, c in zip(measured.get("k", []), measured.get("cost_ratio", []))
        )
        cost = drafter_costs.get(label)
        if cost is None:  # e.g. a results file written without them
            added = {"parameters added": "—", "memory added": "—", "what it uses": "not recorded"}
        else:
            added = {
                "parameters added": format_count(cost["parameters"]) if cost.get("parameters") else "none",
                "memory added": format_bytes(cost["weight_bytes"]) if cost.get("weight_bytes") else "none",
                "what it uses": cost.get("note", ""),
            }
        rows.append({"drafter": label} | added | {"c, measured": c_text or "—"})
    return rows


# ---------------------------------------------------------------- comparison figures


def per_position_figure(summary: pd.DataFrame, k: int | None = None) -> go.Figure:
    """Per-position acceptance curves, one per drafter (vLLM convention: accepted at position i / drafts).

    k: the K whose curve each drafter shows; None: each drafter's largest K
    (it covers the most positions).
    """
    colours = drafter_colours(list(summary["drafter"]) if not summary.empty else [])
    figure = go.Figure()
    for drafter, rows in (summary.groupby("drafter", sort=False) if not summary.empty else []):
        chosen = rows[rows["k"] == k] if k is not None else rows[rows["k"] == rows["k"].max()]
        if chosen.empty:
            continue
        row = chosen.iloc[0]
        rates = list(row["per_position_acceptance"] or [])
        figure.add_trace(
            go.Scatter(
                x=list(range(1, len(rates) + 1)),
                y=rates,
                mode="lines+markers",
                name=f"{drafter} (K={int(row['k'])})",
                line=dict(color=colours[drafter], width=2.5),
                hovertemplate=f"{html.escape(str(drafter))}<br>position %{{x}}: %{{y:.0%}} of drafts accepted<extra></extra>",
            )
        )
    figure.update_layout(
        title="Per-position acceptance",
        xaxis=dict(title="draft position", tickmode="linear", tick0=1, dtick=1),  # positions start at 1, as on Live
        yaxis=dict(title="drafts accepted up to here", range=[0, 1.05], tickformat=".0%"),
        height=420,
        margin=FIGURE_MARGIN,
        legend=dict(orientation="h", yanchor="top", y=-0.2),
    )
    if not figure.data:
        _note(figure, "nothing was drafted")
    return figure


def speedup_figure(summary: pd.DataFrame) -> go.Figure:
    """Speedup over the target alone, grouped by K, one bar colour per drafter; a line at 1x."""
    colours = drafter_colours(list(summary["drafter"]) if not summary.empty else [])
    figure = go.Figure()
    for drafter, rows in (summary.groupby("drafter", sort=False) if not summary.empty else []):
        rows = rows.sort_values("k")
        figure.add_trace(
            go.Bar(
                x=[f"K={int(k)}" for k in rows["k"]],
                y=rows["speedup"].astype(float),
                name=str(drafter),
                marker_color=colours[drafter],
                text=[format_number(float(v), 2, "×") for v in rows["speedup"]],
                textposition="outside",
                customdata=list(zip(rows["decode_speedup"].astype(float), rows["tokens_per_s"].astype(float))),
                hovertemplate=(
                    f"{html.escape(str(drafter))}, %{{x}}<br>speedup %{{y:.2f}}× (decode only %{{customdata[0]:.2f}}×)"
                    "<br>%{customdata[1]:.1f} tokens/s<extra></extra>"
                ),
            )
        )
    figure.add_hline(y=1.0, line_dash="dash", line_color="#555")
    top = max([1.2] + [float(v) * 1.2 for v in (summary["speedup"] if not summary.empty else []) if not math.isnan(float(v))])
    figure.update_layout(
        title="Speedup over the target alone",
        barmode="group",
        xaxis=dict(title="K (draft tokens per step)"),
        yaxis=dict(title="speedup (1 = target alone)", range=[0, top]),
        height=420,
        margin=FIGURE_MARGIN,
        legend=dict(orientation="h", yanchor="top", y=-0.2),
    )
    if not figure.data:
        _note(figure, "no finished run")
    return figure


def acceptance_vs_k_figure(summary: pd.DataFrame) -> go.Figure:
    """Acceptance rate (top) and speedup (bottom) against K per drafter; each drafter's best K starred where it wins."""
    # room between the panels: at 0.06 the acceptance axis's "0%" sat next to the speedup axis's top tick
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.16)
    colours = drafter_colours(list(summary["drafter"]) if not summary.empty else [])
    best = best_k_by_drafter(summary, at_least=1.0) if not summary.empty else {}
    panels = ((1, "acceptance_rate"), (2, "speedup"))
    for drafter, rows in (summary.groupby("drafter", sort=False) if not summary.empty else []):
        rows = rows.sort_values("k")
        colour = colours[drafter]
        ks = rows["k"].astype(int).tolist()
        for row_number, column in panels:
            figure.add_trace(
                go.Scatter(x=ks, y=rows[column].astype(float), mode="lines+markers", name=str(drafter),
                           legendgroup=str(drafter), showlegend=row_number == 1, line=dict(color=colour, width=2.5),
                           hovertemplate=f"{html.escape(str(drafter))}, K=%{{x}}: %{{y:.2f}}<extra></extra>"),
                row=row_number, col=1,
            )
        if drafter in best:
            chosen = rows[rows["k"] == best[drafter]].iloc[0]
            for row_number, column in panels:
                figure.add_trace(
                    go.Scatter(
                        x=[best[drafter]], y=[float(chosen[column])], mode="markers",
                        marker=dict(symbol="star", size=17, color=colour, line=dict(color="#222", width=1)),
                        name=f"best K for {drafter}", legendgroup=str(drafter), showlegend=False,
                        hovertemplate=(f"best K for {html.escape(str(drafter))}: {best[drafter]} "
                                       f"({float(chosen['speedup']):.2f}×)<extra></extra>"),
                    ),
                    row=row_number, col=1,
                )
    figure.add_hline(y=1.0, line_dash="dash", line_color="#555", row=2, col=1)
    figure.update_yaxes(title="acceptance", range=[0, 1.05], tickformat=".0%", nticks=3, row=1, col=1)
    figure.update_yaxes(title="speedup", rangemode="tozero", nticks=4, row=2, col=1)
    figure.update_xaxes(title="K (draft tokens per step)", tickmode="linear", dtick=1, row=2, col=1)
    # a short title, the star's meaning below it: in a third of the page the long title was cut at "speedup"
    figure.update_layout(title=dict(text="Against K<br><sup>acceptance, speedup; ★ best K if it beats the target</sup>"),
                         height=420, margin=FIGURE_MARGIN | dict(t=60),
                         legend=dict(orientation="h", yanchor="top", y=-0.2))
    if summary.empty:
        _note(figure, "no finished run")
    return figure


# ---------------------------------------------------------------- timeline


@dataclass(frozen=True)
class TimeSplit:
    """Where a run's decode time went: totals in ms and the share spent drafting."""

    steps: int
    draft_ms: float
    verify_ms: float

    @property
    def draft_share(self) -> float:
        total = self.draft_ms + self.verify_ms
        return self.draft_ms / total if total else math.nan

    @property
    def verify_ms_per_step(self) -> float:
        return self.verify_ms / self.steps if self.steps else math.nan


def time_split(draft_ms: Sequence[float], verify_ms: Sequence[float]) -> TimeSplit:
    return TimeSplit(len(verify_ms), float(sum(draft_ms)), float(sum(verify_ms)))


def timeline_figure(
    draft_ms: Sequence[float],
    verify_ms: Sequence[float],
    title: str = "Time per step",
    baseline_ms_per_step: float | None = None,
    accepted: Sequence[int] | None = None,
) -> go.Figure:
    """Time per draft-verify step, stacked: drafting then verifying (ms).

    baseline_ms_per_step: the target alone's mean time per step, drawn as a
    dashed line (what one token costs without speculation).
    accepted: tokens committed per step, shown in the hover.
    """
    steps = list(range(1, len(verify_ms) + 1))
    hover_extra = [f"<br>{count(n, 'token')} committed" for n in accepted] if accepted is not None else [""] * len(steps)
    figure = go.Figure(
        [
            go.Bar(x=steps, y=list(draft_ms), name="drafting", marker_color=DRAFT_COLOUR,
                   customdata=hover_extra, hovertemplate="step %{x}: drafting %{y:.1f} ms%{customdata}<extra></extra>"),
            go.Bar(x=steps, y=list(verify_ms), name="verifying (target pass + acceptance)", marker_color=VERIFY_COLOUR,
                   customdata=hover_extra, hovertemplate="step %{x}: verifying %{y:.1f} ms%{customdata}<extra></extra>"),
        ]
    )
    if baseline_ms_per_step is not None and not math.isnan(baseline_ms_per_step):
        figure.add_hline(y=baseline_ms_per_step, line_dash="dash", line_color="#333",
                         annotation_text=f"target alone: {baseline_ms_per_step:.0f} ms per token",
                         annotation_position="top right")
    figure.update_layout(
        title=title,
        barmode="stack",
        bargap=0.15,
        xaxis=dict(title="step"),
        yaxis=dict(title="ms", rangemode="tozero"),
        height=340,
        margin=FIGURE_MARGIN,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"),
    )
    if not steps:
        _note(figure, "no step yet")
    return figure


# ---------------------------------------------------------------- theory


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


# ---------------------------------------------------------------- step-through

STEP_CSS = """
.sd-cycle { display: flex; flex-wrap: wrap; gap: 0.7rem; margin: 0.3rem 0 0.8rem 0; }
.sd-card { width: 12.2rem; border: 1px solid rgba(128,128,128,0.35); border-top: 5px solid #8a8f98;
  border-radius: 0.5rem; padding: 0.5rem 0.65rem; font-size: 0.86rem; line-height: 1.35; }
.sd-card.sd-accepted { border-top-color: #2e9d5b; }
.sd-card.sd-rejected { border-top-color: #d0473f; }
.sd-card.sd-unchecked { border-top-color: #c9ccd1; opacity: 0.55; }
.sd-card.sd-not-emitted { border-top-color: #2e9d5b; opacity: 0.55; }
.sd-card.sd-corrected { border-top-color: #e0912f; }
.sd-card.sd-bonus { border-top-color: #3a78c9; }
.sd-card.sd-target { border-top-color: #8a8f98; }
.sd-head { display: flex; justify-content: space-between; opacity: 0.75; font-size: 0.78rem; }
.sd-token { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 1.05rem;
  margin: 0.25rem 0; white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.sd-token code, .sd-top code { background: rgba(128,128,128,0.13); border-radius: 3px; padding: 0 3px; }
.sd-probs { margin-bottom: 0.3rem; }
/* fixed layout: a long token is cut with an ellipsis, and a bar never leaves its cell (nor the card) */
.sd-top { width: 100%; table-layout: fixed; border-collapse: collapse; margin: 0.2rem 0 0.35rem 0; font-size: 0.8rem; }
.sd-top td { padding: 1px 2px; border: none; white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.sd-top td.sd-p { text-align: right; width: 2.7rem; }
.sd-top td.sd-bar { width: 3rem; padding-left: 4px; }
.sd-top td.sd-bar span { display: inline-block; max-width: 100%; height: 0.55rem; background: #3a78c9; opacity: 0.55;
  border-radius: 2px; }
.sd-top tr.sd-drafted td { font-weight: 700; }
.sd-decision { font-weight: 700; margin-top: 0.15rem; }
.sd-accepted .sd-decision, .sd-not-emitted .sd-decision { color: #2e9d5b; }
.sd-rejected .sd-decision { color: #d0473f; }
.sd-reason { font-size: 0.8rem; opacity: 0.85; }
"""

SPACE_MARK = "␣"


def visible_token(text: str) -> str:
    """Token text with spaces, newlines and tabs made visible (not escaped): "\nThe" -> "↵The"."""
    if text == "":
        return "∅"
    return text.replace(" ", SPACE_MARK).replace("\n", "↵").replace("\t", "⇥")


def shown_token(text: str) -> str:
    """Token text for a card, escaped, with spaces, newlines and tabs made visible."""
    return visible_token(html.escape(text)) if text else visible_token(text)


def cut_words(step: Step, eos_token_ids: Sequence[int] = ()) -> str:
    """What cut a step's output short, in words: "end of text" when it ends with an EOS, else the budget."""
    if not eos_token_ids:
        return "end of text or token budget"
    return "end of text" if step.emitted and step.emitted[-1] in eos_token_ids else "token budget"


def num_emitted_accepted(step: Step) -> int:
    """Accepted drafted tokens that made it into the output: fewer than num_accepted when an EOS or the budget
    cut the step inside its accepted draft (the rest were verified, and count as accepted, but are not emitted)."""
    return min(step.num_accepted, len(step.emitted))


def decision_reason(detail: PositionDetail, greedy: bool, draft_text: str, argmax_text: str) -> str:
    """Why the target kept or refused one drafted token, in words and numbers.

    greedy: accepted iff the drafted token is the target's most likely one.
    sampling: accepted iff the uniform draw u < min(1, target prob / draft prob)
    (a deterministic drafter has draft prob 1).
    """
    draft_text, argmax_text = visible_token(draft_text), visible_token(argmax_text)
    if greedy:
        if detail.accepted:
            return f"The target's most likely token is “{argmax_text}”, the drafted one: accepted."
        return (f"The target's most likely token is “{argmax_text}”, not the drafted “{draft_text}”: rejected; "
                f"the target's “{argmax_text}” replaces it.")
    draft_prob = 1.0 if detail.draft_prob is None else detail.draft_prob
    source = " (a deterministic drafter: draft prob 1)" if detail.draft_prob is None else ""
    ratio = detail.target_prob / draft_prob if draft_prob > 0 else math.inf
    uniform = detail.uniform if detail.uniform is not None else math.nan
    relation = "<" if detail.accepted else "≥"
    verdict = "accepted" if detail.accepted else "rejected"
    return (f"Target/draft = {detail.target_prob:.3f} / {draft_prob:.3f}{source} = {ratio:.2f}, so accept with "
            f"probability {detail.acceptance_prob:.2f}; uniform draw u = {uniform:.3f} {relation} "
            f"{detail.acceptance_prob:.2f}: {verdict}.")


def final_token_note(step: Step, greedy: bool, eos_token_ids: Sequence[int] = ()) -> str:
    """How the target's own token of a step came about."""
    if step.final_token is None:
        return f"The step was cut before the target's own token ({cut_words(step, eos_token_ids)})."
    if step.final_kind == "target":
        return "No draft this step (the drafter had nothing to propose): the target produced this token alone."
    if step.final_kind == "bonus":
        how = "its most likely token" if greedy else "a sample from its distribution"
        return (f"All {len(step.drafted)} drafted tokens were accepted. The same target pass also gave the distribution "
                f"after the last one, so this token is free: {how} there.")
    if greedy:
        return "The target's most likely token at the first rejected position replaces the drafted one."
    return ("Sampled from the residual norm(max(0, target − draft)) at the first rejected position: what the target "
            "wants there beyond what the draft already proposed. This keeps the output distributed as the target's.")


def _top_table(detail: PositionDetail, tokenizer, context: Sequence[int]) -> str:
    rows = []
    for token, prob in detail.target_top:
        marker = ' class="sd-drafted"' if token == detail.draft_token else ""
        width_pct = max(1.0, 100 * prob)  # of the bar's cell, so a probability near 1 still fits the card
        rows.append(f"<tr{marker}><td><code>{shown_token(token_text(tokenizer, context, token))}</code></td>"
                    f'<td class="sd-p">{prob:.3f}</td>'
                    f'<td class="sd-bar"><span style="width:{width_pct:.0f}%"></span></td></tr>')
    return f'<table class="sd-top">{"".join(rows)}</table>'


def step_cards_html(step: Step, tokenizer, context_ids: Sequence[int], greedy: bool,
                    eos_token_ids: Sequence[int] = ()) -> str:
    """One card per drafted position (checked ones with probabilities and the decision), then the target's own token.

    context_ids: the committed tokens before this step (the last few suffice).
    eos_token_ids: the target's EOS tokens, to say what cut a step short.
    Needs ``step.details`` (a run with ``DecodeConfig(record_details=True)``). Accepted tokens after an EOS (or the
    budget) inside the draft are shown as verified, not emitted: ``lab.metrics`` counts them as accepted, like vLLM.
    """
    context = [int(i) for i in context_ids]
    emitted_accepted = num_emitted_accepted(step)
    cards = []
    for i, token in enumerate(step.drafted):
        here = context + list(step.drafted[:i])
        text = token_text(tokenizer, here, token)
        if i < len(step.details):
            detail = step.details[i]
            kind = "accepted" if detail.accepted else "rejected"
            decision = "✓ accepted" if detail.accepted else "✗ rejected"
            reason = decision_reason(detail, greedy, text, token_text(tokenizer, here, detail.target_top[0][0]
                                                                      if detail.target_top else token))
            if detail.accepted and i >= emitted_accepted:
                cut = cut_words(step, eos_token_ids)
                kind, decision = "not-emitted", f"✓ verified, not emitted (after {cut})"
                reason += (f" It comes after the {cut}, so it is not part of the output; the lab still counts it as "
                           "accepted, as vLLM does.")
            draft_prob = "— (deterministic)" if detail.draft_prob is None else f"{detail.draft_prob:.3f}"
            body = (f'<div class="sd-probs">draft prob {draft_prob} · target prob {detail.target_prob:.3f}</div>'
                    f"<div>target's top {len(detail.target_top)}:</div>{_top_table(detail, tokenizer, here)}"
                    f'<div class="sd-decision">{html.escape(decision)}</div>'
                    f'<div class="sd-reason">{html.escape(reason)}</div>')
        else:
            kind = "unchecked"
            body = ('<div class="sd-decision">not checked</div>'
                    '<div class="sd-reason">Discarded: it follows a rejected token, so the target never judged it.</div>')
        label = "not emitted" if kind == "not-emitted" else kind
        cards.append(f'<div class="sd-card sd-{kind}"><div class="sd-head"><span>draft position {i + 1}</span>'
                     f'<span>{label}</span></div><div class="sd-token"><code>{shown_token(text)}</code></div>{body}</div>')
    final = step.final_token
    kind = step.final_kind if final is not None else "unchecked"
    position = step.num_accepted + 1
    final_context = context + list(step.emitted[:-1]) if final is not None else context
    final_text = shown_token(token_text(tokenizer, final_context, final)) if final is not None else "—"
    cards.append(f'<div class="sd-card sd-{kind}"><div class="sd-head"><span>position {position}: the target\'s own token</span>'
                 f'<span>{kind}</span></div><div class="sd-token"><code>{final_text}</code></div>'
                 f'<div class="sd-reason">{html.escape(final_token_note(step, greedy, eos_token_ids))}</div></div>')
    return f'<div class="sd-cycle">{"".join(cards)}</div>'


def step_headline(step: Step, eos_token_ids: Sequence[int] = ()) -> str:
    """One line about a step: drafted, accepted (and how many of those were emitted), and the target's own token."""
    if not step.drafted:
        return f"Step {step.index + 1}: no draft; the target produced {count(len(step.emitted), 'token')} itself."
    accepted = f"accepted {step.num_accepted}"
    emitted_accepted = num_emitted_accepted(step)
    if emitted_accepted < step.num_accepted:
        accepted += (f" ({emitted_accepted} emitted, {step.num_accepted - emitted_accepted} verified after the "
                     f"{cut_words(step, eos_token_ids)})")
    if step.final_token is None:
        final = f"cut at the {cut_words(step, eos_token_ids)}"
    else:
        final = {"bonus": "plus a bonus token", "corrected": "then a corrected token",
                 "target": "then the target's token"}[step.final_kind]
    return (f"Step {step.index + 1}: drafted {len(step.drafted)}, {accepted}, {final}: "
            f"{count(len(step.emitted), 'token')} in one target pass")


def cache_note(step: Step, committed_len: int) -> str:
    """The caches' lengths after rollback, and why they are what they are."""
    draft = ("" if step.draft_cache_len is None else
             f" The draft's cache holds {step.draft_cache_len} tokens; it is cropped to the committed prefix at its next proposal.")
    return (f"After rollback the target's KV cache holds {step.target_cache_len} tokens: all {committed_len} committed "
            f"tokens (prompt and output) but the last, which is the first input of the next verify pass. "
            f"The K/V of rejected draft tokens were cropped away.{draft}")


def _note(figure: go.Figure, text: str) -> None:
    figure.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")

