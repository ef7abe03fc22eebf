"""The Theory page's chain-or-tree figure: expected tokens per step and predicted speedup against the
nodes verified per pass, for a chain of N tokens and the best tree of N nodes (``lab.tree_theory``).
Pure, no streamlit."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.render import FIGURE_MARGIN, KIND_COLOURS
from lab.tree_theory import best_tree_for_cost

BUDGETS = list(range(1, 65))


def linear_verify_cost(slope: float):
    """v(N) = 1 + slope x N: a verify pass over N + 1 tokens, in one-token steps (slope 0: a GPU at batch 1)."""
    return lambda n: 1.0 + slope * n


def chain_tree_figure(acceptance: float, cost_ratio: float, decay: float, verify_cost) -> go.Figure:
    """Two panels over N = 1..64 nodes per verify pass: tokens per step, and speedup (tokens / (depth c + v(N))),
    each tree at the depth that pays best once the draft's cost per level is counted.

    verify_cost: N -> v(N). The chain of N tokens is the tree with sibling decay 0.
    """
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Tokens per target step", "Predicted speedup"))
    for name, s, colour in (("chain (N = K)", 0.0, KIND_COLOURS["target"]), ("best tree of N nodes", decay,
                                                                            KIND_COLOURS["accepted"])):
        best = [best_tree_for_cost(acceptance, n, cost_ratio, verify_cost(n), s) for n in BUDGETS]
        tokens = [p.expected_tokens for p, _ in best]
        speedups = [speedup for _, speedup in best]
        figure.add_scatter(x=BUDGETS, y=tokens, name=name, line=dict(color=colour), row=1, col=1, legendgroup=name)
        figure.add_scatter(x=BUDGETS, y=speedups, name=name, line=dict(color=colour), row=1, col=2,
                           legendgroup=name, showlegend=False)
    figure.add_hline(y=1.0, line_dash="dot", line_color="gray", row=1, col=2)
    figure.update_xaxes(title_text="draft tokens verified per pass (N)", type="log", tickvals=[1, 2, 4, 8, 16, 32, 64])
    figure.update_layout(height=340, margin=FIGURE_MARGIN, legend=dict(orientation="h", y=-0.25))
    return figure
