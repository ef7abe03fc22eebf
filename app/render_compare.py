"""The Compare page's figures and tables: summaries, per-position acceptance, speedups, costs, timelines.

Pure functions, no streamlit. Inputs are ``lab`` objects: a
``lab.studies.compare.Comparison`` (its ``summary()`` has one row per drafter x
K) and per-step draft and verify times. Words follow the lab's vocabulary:
draft / target, accepted, rejected, corrected, bonus, acceptance rate, mean
acceptance length, per-position acceptance. (The Theory page's figures are in
``app.render_theory``, the Step-through page's cards in ``app.render_step``.)
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.render import FIGURE_MARGIN, count, drafter_colours, figure_note, format_number
from lab.drafters import num_layers
from lab.studies.compare import BASELINE, Comparison


PROMPT_SEPARATOR = "---"
"""A line holding only this separates pasted prompts (a blank line may sit inside one prompt)."""


DRAFT_COLOUR = "#9b59b6"  # time spent drafting


VERIFY_COLOUR = "#8a8f98"  # time spent in the target's verify pass (the target's class colour)


PREVIEW_CHARS = 70


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
            "tree budget": [tree_text(b) for b in _tree_budgets(summary)],
            "mean tree size": [tree_size_text(b, n) for b, n in zip(_tree_budgets(summary), column(summary, "mean_tree_size"))],
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


TREE_COLUMNS = ("tree budget", "mean tree size")
"""Shown in the compact table after K when a row drafts token trees (``DrafterSpec.tree_budget`` > 0)."""


def _tree_budgets(summary: pd.DataFrame) -> list[int]:
    """Each row's tree budget N (0: a chain); 0 for a summary written before trees."""
    if "tree_budget" not in summary:
        return [0] * len(summary)
    return [int(b) if b == b else 0 for b in summary["tree_budget"]]


def tree_text(budget: int) -> str:
    """A tree budget for a table cell: "8", or "—" for a chain."""
    return str(budget) if budget else "—"


def tree_size_text(budget: int, size: float) -> str:
    """The mean tree size (draft nodes per verify pass) for a cell: "5.3", "—" for a chain or no tree drafted."""
    return "—" if not budget or math.isnan(size) else f"{size:.1f}"


def compact_summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's headline columns (``COMPACT_COLUMNS``), narrow enough to read without scrolling.

    K becomes text so that each drafter's best K carries its star ("4 ★");
    with a tree arm, "tree budget" and "mean tree size" (draft nodes per
    verify pass) follow K; every other column is as in ``summary_table``.
    """
    table = summary_table(summary)
    if table.empty:
        return table
    names = list(COMPACT_COLUMNS)
    if any(_tree_budgets(summary)):  # tree arms: what the tree did beside its chain
        names[2:2] = TREE_COLUMNS
    compact = table[names].copy()
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
    "k": "K", "output_tokens": "output tokens", "acceptance_rate": "acceptance rate",
    "mean_acceptance_length": "mean acceptance length", "tokens_per_s": "tokens/s", "decode_speedup": "decode speedup",
    "cost_ratio": "c", "identical_to_target": "identical to target", "wall_s": "wall time (s)",
}


def runs_table(comparison: Comparison) -> pd.DataFrame:
    """The per-prompt breakdown: ``Comparison.runs_frame()`` with each prompt's category (``settings["categories"]``:
    prompt index -> category, as the Compare page records it), its start, and a cancelled column."""
    frame = comparison.runs_frame()
    if frame.empty:
        return frame
    texts = [preview(comparison.prompts[i]) for i in frame["prompt"]]
    categories = comparison.settings.get("categories") or {}
    frame.insert(1, "category", [categories.get(str(i), "") for i in frame["prompt"]])  # results from before: ""
    frame["prompt"] = frame["prompt"] + 1
    frame["k"] = ["—" if d == BASELINE or k is None or k != k else str(int(k))  # the target alone has no K
                  for d, k in zip(frame["drafter"], frame["k"])]
    frame["cancelled"] = [r.cancelled for r in comparison.runs]
    frame["prompt text"] = texts  # the numbers first (they fit without a sideways scroll), the prompt's start last
    return frame.rename(columns=RUN_COLUMN_NAMES)


RUN_FORMATS = {
    "acceptance rate": "{:.1%}", "mean acceptance length": "{:.2f}", "tokens/s": "{:.1f}", "speedup": "{:.2f}×",
    "decode speedup": "{:.2f}×", "c": "{:.3f}", "wall time (s)": "{:.2f}",
}
"""How ``runs_display`` writes ``runs_table``'s numbers; a missing value (the target alone's speedup...) reads "—"."""


def runs_display(table: pd.DataFrame) -> pd.DataFrame:
    """``runs_table`` as ``st.dataframe`` shows it: numbers formatted by ``RUN_FORMATS`` and the target alone's empty
    cells as "—" (Streamlit draws a missing number as "None" whatever a Styler's na_rep says).

    The cells are text, right-justified with spaces to one width per column, so that a click on a header still
    sorts by value (a space sorts before a digit; "—" after every number).
    """
    shown = table.copy()
    if "identical to target" in shown:
        shown["identical to target"] = [
            "—" if v is None or v != v else ("yes" if v else "no") for v in shown["identical to target"]]
    for name, spec in RUN_FORMATS.items():
        if name in shown:
            cells = ["—" if v is None or v != v else spec.format(v) for v in shown[name]]
            width = max((len(c) for c in cells if c != "—"), default=0)
            shown[name] = [c if c == "—" else c.rjust(width) for c in cells]
    return shown


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


def drafter_cost(name: str, target, draft=None, exit_layer: int | None = None, draft_vocab: int | None = None,
                 head=None) -> dict:
    """What a drafter adds to the target: ``{"parameters", "weight_bytes", "note"}`` (0 when it adds no weights).

    target, draft: ``lab.models.LoadedModel`` (draft only for "draft-model").
    draft_vocab: the trimmed vocabulary N of a draft model or EAGLE head (None: full).
    head: the target's ``lab.drafters.eagle.EagleHead`` (only for "eagle"; the
    app loads it once, ``app.resources.eagle_head``). Raises ValueError for eagle without it.
    """
    trimmed = f"; its LM head scores only the target's {draft_vocab:,} most frequent tokens" if draft_vocab else ""
    if name == "draft-model":
        return {"parameters": int(draft.num_parameters), "weight_bytes": int(draft.weight_bytes),
                "note": f"its own weights ({draft.name}) and KV cache{trimmed}"}
    if name == "eagle":
        if head is None:
            raise ValueError("drafter cost of eagle requires the target's head; got none")
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
        figure_note(figure, "nothing was drafted")
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
        figure_note(figure, "no finished run")
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
                         height=420, margin=FIGURE_MARGIN | dict(t=60, l=64),  # l: a trial saw the y titles cut
                         legend=dict(orientation="h", yanchor="top", y=-0.2))
    figure.update_yaxes(automargin=True)
    if summary.empty:
        figure_note(figure, "no finished run")
    return figure


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
        figure_note(figure, "no step yet")
    return figure
