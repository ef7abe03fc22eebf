"""One step's token tree as a plotly figure: nodes coloured accepted / rejected, the accepted path drawn bold,
the draft probability on hover. Pure, no streamlit; the rows come from ``lab.tree_view``."""

from __future__ import annotations

import plotly.graph_objects as go

from lab.display import KIND_COLOURS
from lab.trace import Step
from lab.tree_view import tree_rows

ROOT_COLOUR = "#8a8f98"


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
            text=[r.text.replace("\n", "↵") or "∅" for r in shown], textposition="top center",
            hovertext=hover, hoverinfo="text",
            marker=dict(size=14, color=KIND_COLOURS.get(status, ROOT_COLOUR), line=dict(width=1, color="white"))))
    depth = max(r.depth for r in rows)
    figure.update_layout(
        title=f"Step {step.index + 1}: a tree of {step.tree_size} nodes, accepted depth {step.num_accepted}",
        height=max(260, 34 * (max(r.row for r in rows) + 2)), margin=dict(l=10, r=10, t=50, b=10),
        xaxis=dict(title="depth (tokens after the last committed one)", dtick=1, range=[-0.4, depth + 0.6]),
        yaxis=dict(visible=False, autorange="reversed"), legend=dict(orientation="h", y=-0.1))
    return figure
