"""The Theory page's MoE trap section: hidden by default, three figures when shown, a bad file refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import render_moe, state

PAGE = str(Path(__file__).resolve().parent.parent / "app" / "app_pages" / "theory.py")
RESULT = {"moe": {"name": "m", "ks": [0, 1, 4], "v": [1.0, 1.4, 2.0], "experts_touched": [4.0, 6.5, 10.5],
                  "num_experts": 16, "top_k": 4},
          "dense": {"name": "d", "ks": [0, 1, 4], "v": [1.0, 1.05, 1.2]}, "settings": {"batch_size": 1}}


def test_the_moe_section_draws_experts_verify_cost_and_break_even():
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["theory:moe_cost"] = RESULT
    at.run()
    assert len(at.get("plotly_chart")) == 3 and not at.exception  # the two curves and chain-or-tree; the MoE section hidden until asked for
    at.toggle(key=state.widget_key("theory.moe")).set_value(True).run()
    assert len(at.get("plotly_chart")) == 6 and not at.exception


def test_break_even_moves_against_the_dense_target():
    # K = 1, c = 0: break-even a = v - 1, so 0.4 on the MoE and 0.05 on the dense target.
    figure = render_moe.break_even_figure(RESULT, 0.0)
    moe, dense = figure.data
    assert moe.y[0] == pytest.approx(0.4, abs=1e-6) and dense.y[0] == pytest.approx(0.05, abs=1e-6)


def test_a_file_that_is_not_a_moe_cost_result_is_refused():
    with pytest.raises(ValueError, match="not a moe-cost result"):
        render_moe.parse_moe_cost(json.dumps({"moe": {"v": [1]}}), "x.json")
    assert render_moe.parse_moe_cost(json.dumps(RESULT))["moe"]["top_k"] == 4


def test_figures_name_the_prediction_and_keep_legends_below():
    """A readable legend name (the formula in hover and caption), horizontal legends under each plot."""
    figures = (render_moe.experts_figure(RESULT), render_moe.verify_cost_figure(RESULT),
               render_moe.break_even_figure(RESULT, 0.0))
    uniform = figures[0].data[1]
    assert uniform.name == "uniform routing (prediction)" and render_moe.UNIFORM_FORMULA in uniform.hovertemplate
    assert all(f.layout.legend.orientation == "h" and f.layout.legend.y < 0 for f in figures)


def test_break_even_floors_a_noisy_v_below_1():
    """A dense v(2) = 0.93 (timing noise) would give break-even a = 0; floored at 1 it is c's own break-even."""
    noisy = {**RESULT, "dense": {"name": "d", "ks": [0, 1, 2], "v": [1.0, 1.05, 0.93]}}
    dense = render_moe.break_even_figure(noisy, 0.2).data[1]
    from app.render_theory import break_even_acceptance
    assert dense.y[1] == pytest.approx(break_even_acceptance(2, 0.2, 1.0)) and dense.y[1] > 0.1
    assert list(dense.customdata[1]) == pytest.approx([0.93, 1.0])


def test_the_two_loaders_on_the_theory_page_have_distinct_labels():
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    at.toggle(key=state.widget_key("theory.moe")).set_value(True).run()
    labels = [e.label for e in at.expander]
    assert "Load a moe-cost result (JSON)" in labels and "Load a Compare results file (JSON)" in labels
    assert "Load a results file" not in labels
    assert labels.index("Load a moe-cost result (JSON)") < labels.index("Load a Compare results file (JSON)")
