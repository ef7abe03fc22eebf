"""The Workload page: an AppTest run on sliders and the example costs (nothing loads, nothing is timed),
and its figures on a hand-made map."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from app import render_workload
from app_util import app_on, click, key
from lab.simulate import AcceptanceProfile, StepCosts, Traffic, map_workload

COSTS = StepCosts({(1, 1): 20.0, (1, 5): 22.0, (16, 1): 40.0, (16, 5): 160.0}, {1: 0.2, 16: 0.4})


def small_map() -> dict:
    return map_workload(Traffic("closed", num_requests=40, output_tokens=16), [1, 4, 16],
                        AcceptanceProfile.uniform(0.6), COSTS, drafter="prompt-lookup").as_dict()


def test_figures_draw_every_policy_and_mark_the_break_even():
    data = small_map()
    figure = render_workload.latency_figure(data)
    names = {run["policy"] for run in data["levels"][0]["runs"]}
    assert {trace.name for trace in figure.data} == names - {data["recommended"]} | {f"{data['recommended']} (recommended)"}
    # the recommended policy is drawn last (on top) and thick: a trial found its light line hidden
    assert figure.data[-1].name == f"{data['recommended']} (recommended)" and figure.data[-1].line.width == 4
    assert data["break_even_load"] is not None
    (label,) = [a for a in figure.layout.annotations if "break-even" in (a.text or "")]
    # a concurrency sweep's axis is log: the label sits at log10 of the load, inside the loads' range (1..16)
    assert label.x == pytest.approx(math.log10(data["break_even_load"])) and 0 <= label.x <= math.log10(16)
    assert len(render_workload.level_rows(data)) == 3
    assert len(render_workload.throughput_figure(data).data) == len(figure.data)


def test_figures_keep_legends_below_and_tick_the_simulated_loads():
    """Legends horizontal under the plot (they covered it at 900 px); the log axis ticked at exactly 1, 4, 16
    (it showed a stray 9, crowded minor ticks and no 16); the label inside the plot on the line's open side."""
    data = small_map()
    for figure in (render_workload.latency_figure(data, "p99"), render_workload.throughput_figure(data)):
        assert figure.layout.legend.orientation == "h" and figure.layout.legend.y < 0
        axis = figure.layout.xaxis
        assert list(axis.tickvals) == [1, 4, 16] and list(axis.ticktext) == ["1", "4", "16"]
        (label,) = [a for a in figure.layout.annotations if "break-even" in (a.text or "")]
        left_half = math.log10(data["break_even_load"]) < math.log10(16) / 2
        assert label.xanchor == ("left" if left_half else "right") and label.yanchor == "top"
    columns = render_workload.table_columns(data)
    assert columns["off p50 (s)"] == {"format": "%.2f"} and columns["best tokens/s"] == {"format": "%.1f"}
    assert set(columns) == set(render_workload.level_rows(data)[0]) - {"best policy"}


def test_the_page_simulates_and_shows_the_decision_and_the_configuration():
    at = app_on("workload", loads="1,4,16", requests=40, output_tokens=16)
    assert not at.exception, at.exception
    at = click(at, "Simulate")
    assert not at.exception, at.exception
    decision = [s.value for s in at.success]
    assert decision and decision[0].endswith(".")
    assert any("would flip" in m.value or "flips it" in m.value or "flip" in m.value for m in at.markdown)
    codes = [c.value for c in at.code]
    assert any("--speculative-config" in c or "no --speculative-config" in c for c in codes)
    assert len(at.get("plotly_chart")) == 3


def test_bad_loads_are_said_in_words_and_the_rest_of_the_form_stays():
    """A trial found an invalid load hid the acceptance and costs sections below it, and a fractional concurrency
    cut to an integer."""
    at = app_on("workload", loads="1,-4")
    assert not at.exception
    assert any("loads require values > 0" in e.value for e in at.error)
    assert [r.label for r in at.radio][:3] == ["Traffic", "Acceptance", "Step costs"]  # still on screen
    assert next(b for b in at.button if b.label == "Simulate").disabled
    at = app_on("workload", loads="1,2.5")
    assert any("whole numbers of clients" in e.value and "'1,2.5'" in e.value for e in at.error)
    # a map simulated before stays, said to be the last one, not an answer to the form as it stands
    at.session_state[key("workload.loads")] = "1,4"
    at = click(at.run(), "Simulate")
    assert not any("from the last Simulate" in c.value for c in at.caption)
    at.session_state[key("workload.loads")] = "1,-4"
    at = at.run()
    assert at.success and any("from the last Simulate" in c.value for c in at.caption)


def test_an_overloaded_rate_is_flagged_under_the_decision():
    at = app_on("workload", traffic="Poisson arrivals (requests/s)", loads="1,64", requests=60, output_tokens=32)
    at = click(at, "Simulate")
    assert not at.exception, at.exception
    assert any("At 64 requests/s, requests arrive faster than any policy can serve them" in w.value
               for w in at.warning)


def test_costs_timed_on_a_busy_machine_say_so_and_offer_a_new_timing(tmp_path, monkeypatch):
    """Cached machine costs timed beside other work stay slow until re-timed: the page says so, with a button,
    and still simulates on them; the CLI's helper reads the same line."""
    from app.app_pages.workload import COSTS as SOURCES
    from lab.simulate import measure
    from lab.simulate.costs import ContextCosts

    tables = ContextCosts({1: {64: 20.0, 768: 30.0}, 16: {64: 40.0, 768: 90.0}},
                          {1: {64: 50.0, 768: 600.0}, 16: {64: 800.0, 768: 9000.0}}, {1: 100, 16: 100})
    costs = dataclasses.replace(COSTS, model="smollm2-135m", overhead_ms={1: 1.0, 16: 2.0}, by_context=tables,
                                context_rule="sum")
    path = tmp_path / "workload.json"
    busy = "Measured while the machine was busy: other processes kept 1.20 of 2 cores busy; rerun for a clean figure."
    path.write_text(json.dumps(costs.as_dict() | {"load_warning": busy}))
    monkeypatch.setattr(measure, "costs_path", lambda *args, **kwargs: path)
    assert measure.timing_warning("smollm2-135m", "prompt-lookup") == busy
    at = app_on("workload", costs=SOURCES[0], loads="1,4,16", requests=40, output_tokens=16)
    assert not at.exception, at.exception
    assert any(busy in w.value and "time the machine again" in w.value for w in at.warning)
    assert [b.label for b in at.button if b.label == "Time this machine again"]
    assert any("timed at 64-768 tokens a row" in c.value for c in at.caption)
    at = click(at, "Simulate")
    assert not at.exception, at.exception
    assert [s.value for s in at.success]
    path.write_text(json.dumps(costs.as_dict() | {"load_warning": None}))
    assert measure.timing_warning("smollm2-135m", "prompt-lookup") is None


def test_the_table_shows_the_recommended_policy_beside_off_and_the_best():
    """A minimax recommendation can trail at one load (a trial's was 10 % slower than off there): the table
    shows its own figures at every load, in the page and on the command line."""
    from lab.cli.workload import format_workload

    data = small_map()
    for level, row in zip(data["levels"], render_workload.level_rows(data)):
        mine = next(r for r in level["runs"] if r["policy"] == data["recommended"])
        assert row["recommended p50 (s)"] == mine["latency_p50_s"]
        assert row["recommended tokens/s"] == mine["tokens_per_s"]
    text = format_workload(data | {"target": "t", "drafter": "prompt-lookup", "acceptance_source": "sliders",
                                   "costs_source": "example"})
    assert f"recommended: {data['recommended']}" in text
    first = data["levels"][0]
    mine = next(r for r in first["runs"] if r["policy"] == data["recommended"])
    assert f"{mine['latency_p50_s']:.3f}/{mine['latency_p99_s']:.3f}" in text
