"""One step's token tree as a plotly figure: nodes coloured accepted / rejected, the accepted path drawn bold,
the draft probability on hover. Pure, no streamlit; the rows come from ``lab.tree_view``.

Layout: depth left to right, siblings spread top to bottom with ``ROW_PX`` per leaf (the figure grows with the
number of leaves), each token's text beside its marker (right of it), the legend in one line above the plot.
"""

from __future__ import annotations

import plotly.graph_objects as go

from lab.display import KIND_COLOURS
from lab.trace import Step
from lab.tree_view import tree_rows

ROOT_COLOUR = "#8a8f98"

ROW_PX = 40
"""Vertical pixels per leaf: a 12 px label beside a 14 px marker, with room between siblings."""

DEPTH_SPAN = 0.8
"""Room to the right of the deepest node (in depth units) for its label."""

LABEL_CHARS = 14
"""A token's label is cut to this many characters (the hover shows it whole)."""

MARGIN = dict(l=20, r=20, t=96, b=56)
"""Pixels: the title and the legend above the plot, the depth ticks and title below."""


def label(text: str) -> str:
    """A token as a node's label: newlines as ↵, an empty token as ∅, cut to ``LABEL_CHARS`` (…)."""
    shown = text.replace("\n", "↵") or "∅"
    return shown if len(shown) <= LABEL_CHARS else shown[: LABEL_CHARS - 1] + "…"


def figure_height(leaves: int) -> int:
    """Pixels for a tree with ``leaves`` leaf rows: ``ROW_PX`` each, plus the margins; at least 260."""
    return max(260, ROW_PX * (leaves + 1) + MARGIN["t"] + MARGIN["b"])


def tree_figure(step: Step, tokenizer, context_ids: list[int]) -> go.Figure:
    """The tree of one step (``Step.tree``): depth left to right, the root (last committed token) at depth 0.

    Raises ValueError for a chain step.
    """
    rows = tree_rows(step, tokenizer, context_ids)
    at = {r.node: r for r in rows}
    path = set(step.tree_path) | {-1, -2}
    figure = go.Figure()
    for bold in (False, True):  # thin edges first, the accepted path over them
        xs, ys = [], []
        for r in rows:
            if r.parent is None or ((r.node in path and r.parent in path) != bold):
                continue
            parent = at[r.parent]
            xs += [parent.depth, r.depth, None]
            ys += [parent.row, r.row, None]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                    line=dict(color=KIND_COLOURS["accepted"] if bold else "rgba(128,128,128,0.5)",
                                              width=4 if bold else 1)))
    for status in ("root", "accepted", "rejected", "corrected", "bonus"):
        shown = [r for r in rows if r.status == status]
        if not shown:
            continue
        hover = [f"node {r.node if r.node >= 0 else ('root' if r.node == -1 else 'target')} · depth {r.depth}<br>"
                 f"token {r.token_id} {r.text!r}<br>"
                 + ("draft prob n/a" if r.draft_prob is None else f"draft prob {r.draft_prob:.3f}") for r in shown]
        figure.add_trace(go.Scatter(
            x=[r.depth for r in shown], y=[r.row for r in shown], mode="markers+text", name=status,
            text=[label(r.text) for r in shown], textposition="middle right", textfont=dict(size=12),
            hovertext=hover, hoverinfo="text", cliponaxis=False,
            marker=dict(size=14, color=KIND_COLOURS.get(status, ROOT_COLOUR), line=dict(width=1, color="white"))))
    depth = max(r.depth for r in rows)
    last_row = max(r.row for r in rows)
    figure.update_layout(
        title=dict(text=f"Step {step.index + 1}: a tree of {step.tree_size} nodes, accepted depth {step.num_accepted}",
                   y=1, yref="paper", yanchor="bottom", pad=dict(b=34)),
        height=figure_height(int(last_row) + 1), margin=MARGIN,
        xaxis=dict(title="depth (tokens after the last committed one)", dtick=1, range=[-0.3, depth + DEPTH_SPAN],
                   zeroline=False),
        yaxis=dict(visible=False, range=[last_row + 0.6, -0.6]),  # top to bottom, half a row spare at each end
        legend=dict(orientation="h", x=0, xanchor="left", y=1, yanchor="bottom"))
    return figure
