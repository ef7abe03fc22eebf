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
