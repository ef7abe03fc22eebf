"""The MoE trap's figures: experts touched per verify pass against K, v(K) of a MoE and its dense twin, and the
break-even acceptance that moves with them. Pure functions over a ``python -m lab moe-cost --json`` result; no
streamlit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from app.render import FIGURE_MARGIN
from app.render_theory import break_even_acceptance
from lab.routing import uniform_experts_touched

MEASURED_FILE = Path(__file__).resolve().parent.parent / "assets" / "moe" / "moe_cost.json"
"""The lab's own measurement (``python -m lab moe-cost``, see docs/README.md), shown until a file is loaded."""
V_MIN = 1.0
"""The floor on v(K) for the break-even, as the Theory page's sliders (``V_MIN`` there): a pass over K+1 tokens does at
least one step's work, so a measured v below 1 is timing noise (the dense v(2) of the shipped file is 0.93)."""
LEGEND = {"orientation": "h", "yanchor": "top", "y": -0.25, "xanchor": "left", "x": 0}
"""Legends go below the plot, horizontal, so the plot keeps the full width (a side legend squeezed it to ~90 px)."""
MARGIN = {**FIGURE_MARGIN, "b": 100}
HEIGHT = 380
UNIFORM_FORMULA = "E(1 − (1 − k/E)^(B(K+1)))"
"""Distinct experts per layer expected under uniform routing: E experts, top k, B rows, K+1 tokens per row."""
COLOURS = {"moe": "#d0473f", "dense": "#3a78c9", "active_dense": "#8a8f98", "uniform": "#8e5bb5"}


def parse_moe_cost(text: str, name: str = "file") -> dict[str, Any]:
    """A moe-cost JSON result, checked. Raises ValueError saying what the file lacks."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{name} is not JSON ({error}); load the output of `python -m lab moe-cost --json`") from None
    moe = data.get("moe") if isinstance(data, dict) else None
    if not isinstance(moe, dict) or not isinstance(data.get("dense"), dict) or not all(
            key in moe for key in ("ks", "v", "experts_touched", "num_experts", "top_k")):
        raise ValueError(f"{name} is not a moe-cost result: it needs 'moe' (ks, v, experts_touched, num_experts, "
                         "top_k) and 'dense' (v); write one with `python -m lab moe-cost --json`")
    return data


def load_measured() -> dict[str, Any] | None:
    """The shipped measurement, or None when it is absent."""
    return parse_moe_cost(MEASURED_FILE.read_text(), MEASURED_FILE.name) if MEASURED_FILE.is_file() else None


def experts_figure(data: dict[str, Any]) -> go.Figure:
    """Distinct experts per layer a pass of K+1 tokens routes to, measured and under uniform routing, vs K."""
    moe = data["moe"]
    ks, batch = moe["ks"], data.get("settings", {}).get("batch_size", 1)
    smooth = list(range(min(ks), max(ks) + 1))
    figure = go.Figure()
    figure.add_scatter(x=ks, y=moe["experts_touched"], mode="lines+markers", name="measured (router hooks)",
                       line=dict(color=COLOURS["moe"]))
    figure.add_scatter(x=smooth, y=[uniform_experts_touched(moe["num_experts"], moe["top_k"], batch * (k + 1))
                                    for k in smooth],
                       mode="lines", name="uniform routing (prediction)",
                       line=dict(color=COLOURS["uniform"], dash="dash"),
                       hovertemplate="K=%{x}: %{y:.2f} experts<extra>uniform routing " + UNIFORM_FORMULA + "</extra>")
    figure.add_hline(y=moe["num_experts"], line=dict(color="#999", dash="dot"), annotation_text="all experts")
    figure.update_layout(title=f"Experts each layer reads per verify pass (E={moe['num_experts']}, k={moe['top_k']}, "
                               f"batch {batch})", xaxis_title="K (draft tokens verified)",
                         yaxis_title="distinct experts per layer", margin=MARGIN, yaxis_rangemode="tozero",
                         legend=LEGEND, height=HEIGHT)
    return figure


def verify_cost_figure(data: dict[str, Any]) -> go.Figure:
    """v(K): a pass over K+1 tokens in one-token steps, for the MoE, its dense source and (if timed) the active-size dense."""
    figure = go.Figure()
    for key, label in (("moe", "MoE"), ("dense", "dense source"), ("active_dense", "dense, about the active size")):
        if key in data:
            model = data[key]
            figure.add_scatter(x=model["ks"], y=model["v"], mode="lines+markers", name=f"{label}: {model['name']}",
                               line=dict(color=COLOURS[key]))
    figure.update_layout(title="Verify cost v(K) in one-token steps", xaxis_title="K", yaxis_title="v(K)",
                         margin=MARGIN, yaxis_rangemode="tozero", legend=LEGEND, height=HEIGHT)
    return figure


def break_even_figure(data: dict[str, Any], cost_ratio: float) -> go.Figure:
    """Leviathan's break-even a at each K ≥ 1 with the measured v(K) floored at ``V_MIN``, MoE against dense, for
    draft cost c. The hover shows the measured v next to the v used."""
    figure = go.Figure()
    for key, label in (("moe", "MoE"), ("dense", "dense source")):
        model = data[key]
        points = [(k, v, break_even_acceptance(k, cost_ratio, max(v, V_MIN)))
                  for k, v in zip(model["ks"], model["v"]) if k >= 1]
        figure.add_scatter(x=[k for k, _, _ in points], y=[1.0 if a is None else a for _, _, a in points],
                           customdata=[[v, max(v, V_MIN)] for _, v, _ in points],
                           mode="lines+markers", name=label, line=dict(color=COLOURS[key]),
                           hovertemplate="K=%{x}: break-even a=%{y:.2f} (measured v=%{customdata[0]:.2f}, used "
                                         "%{customdata[1]:.2f})<extra>" + label + "</extra>")
    figure.update_layout(title=f"Break-even acceptance a (c = {cost_ratio:.2f}); 1.0 = never pays",
                         xaxis_title="K", yaxis_title="break-even a", yaxis_range=[0, 1.02], margin=MARGIN,
                         legend=LEGEND, height=HEIGHT)
    return figure
