"""The Compare, Theory and Step-through pages: pure figures and HTML, then AppTest runs of each page.

Pure helpers (``app.render_compare``) get hand-made inputs or a comparison of
tiny random models. The AppTest runs patch ``lab.models``'s loaders (the app's
only way to models) to return tiny random models, as ``test_app.py`` does, so a
page run takes about a second.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the app is not an installed package; its modules import as app.*
    sys.path.insert(0, str(ROOT))

import lab.studies.compare  # noqa: E402
import lab.models  # noqa: E402
from app import render, render_compare, render_step, render_theory, widgets  # noqa: E402
from app_util import app_on, click, html_of, key, started_jobs, tiny_loaded, tiny_models  # noqa: E402, F401
from conftest import tiny_tokenizer  # noqa: E402
from lab.studies.compare import BASELINE, Comparison, DrafterSpec, run_comparison  # noqa: E402
from lab.config import DecodeConfig  # noqa: E402
from lab.theory import expected_speedup  # noqa: E402
from lab.trace import PositionDetail, Step  # noqa: E402

TINY_PROMPTS = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4\n---\nt7 t8 t9 t7 t8 t9 t7 t8"


# ---------------------------------------------------------------- prompts and small formatters


@pytest.mark.parametrize(
    "text, prompts",
    [
        ("one prompt", ["one prompt"]),
        ("first\n---\nsecond", ["first", "second"]),
        ("a paragraph\n\nand another of the same prompt\n---\nnext", ["a paragraph\n\nand another of the same prompt", "next"]),
        ("  ---  \nonly\n---\n\n---\n", ["only"]),  # separators with spaces; empty blocks dropped
        ("a --- inside a line stays", ["a --- inside a line stays"]),
        ("", []),
    ],
)
def test_split_prompts(text, prompts):
    assert render_compare.split_prompts(text) == prompts


@pytest.mark.parametrize(
    "fraction, prompts, text",
    [(1.0, 3, "yes (3/3)"), (2 / 3, 3, "2/3 (see note)"), (math.nan, 2, "— (sampling)"), (None, 2, "— (sampling)")],
)
def test_identical_text(fraction, prompts, text):
    assert render_compare.identical_text(fraction, prompts) == text


@pytest.mark.parametrize("value, text", [(135_000_000, "135M"), (1_780_000_000, "1.78B"), (4_200, "4,200"), (None, "—")])
def test_format_count(value, text):
    assert render_compare.format_count(value) == text


# ---------------------------------------------------------------- theory helpers


@pytest.mark.parametrize("cost_ratio", [0.0, 0.1, 0.35, 0.9])
def test_break_even_is_a_equals_c_for_k_1(cost_ratio):
    # Leviathan: with K = 1 the speedup (1 + a) / (1 + c) is 1 exactly at a = c
    assert render_theory.break_even_acceptance(1, cost_ratio) == pytest.approx(cost_ratio, abs=1e-9)


@pytest.mark.parametrize("k, cost_ratio", [(2, 0.2), (4, 0.1), (8, 0.3)])
def test_break_even_gives_speedup_one(k, cost_ratio):
    a = render_theory.break_even_acceptance(k, cost_ratio)
    assert expected_speedup(a, k, cost_ratio) == pytest.approx(1.0, abs=1e-9)
    assert a > cost_ratio  # for K > 1 every drafted token costs c but later ones are accepted less often


def test_break_even_none_when_the_draft_costs_more_than_the_target():
    assert render_theory.break_even_acceptance(3, 1.2) is None


@pytest.mark.parametrize("cost_ratio, verify_cost", [(0.1, 1.3), (0.0, 1.5), (0.2, 1.0), (0.05, 1.8)])
def test_break_even_for_k_1_is_a_equals_c_plus_v_minus_1(cost_ratio, verify_cost):
    # (1 + a) / (c + v) = 1 at a = c + v - 1: a verify pass dearer than a step needs more acceptance to repay
    assert render_theory.break_even_acceptance(1, cost_ratio, verify_cost) == pytest.approx(
        cost_ratio + verify_cost - 1, abs=1e-9)


@pytest.mark.parametrize(
    "k, cost_ratio, verify_cost, even",
    [(1, 0.5, 2.6, None),  # (1 + a) / 3.1 < 1 even when every draft is accepted: never pays
     (4, 0.0, 0.5, 0.0)],  # v < 1, a corner of the slider: a free draft pays 2x even at a = 0
)
def test_break_even_at_the_edges_of_v(k, cost_ratio, verify_cost, even):
    assert render_theory.break_even_acceptance(k, cost_ratio, verify_cost) == even


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    """A hand-made ``Comparison.summary()``: every column, defaults filled in."""
    defaults = dict(prompts=2, acceptance_rate=0.5, mean_acceptance_length=2.0, per_position_acceptance=[0.6, 0.4],
                    tokens_per_s=20.0, target_tokens_per_s=10.0, speedup=2.0, decode_speedup=2.1, cost_ratio=0.1,
                    fitted_acceptance=0.6, predicted_speedup=2.2, efficiency=0.95, identical_to_target=1.0)
    return pd.DataFrame([defaults | row for row in rows])


def test_best_k_is_starred_once_per_drafter():
    summary = summary_frame([
        dict(drafter="a", k=2, speedup=1.5), dict(drafter="a", k=4, speedup=1.8), dict(drafter="a", k=8, speedup=1.2),
        dict(drafter="b", k=2, speedup=0.9), dict(drafter="b", k=4, speedup=math.nan),
    ])
    assert render_compare.best_k_by_drafter(summary) == {"a": 4, "b": 2}
    assert render_compare.best_k_by_drafter(summary, at_least=1.0) == {"a": 4}
    table = render_compare.summary_table(summary)
    assert list(table["best K"]) == ["", "★", "", "", ""]  # b's best K loses (0.9x): no star in the table
    assert list(table.columns[:4]) == ["drafter", "K", "best K", "identical to target"]
    figure = render_compare.acceptance_vs_k_figure(summary)
    stars = [t for t in figure.data if t.marker.symbol == "star"]
    # the chart stars what the table stars: the fresh-user trial saw stars on losing Ks below the 1x line
    assert sorted((t.x[0], round(t.y[0], 6)) for t in stars if t.yaxis == "y2") == [(4, 1.8)]


def test_compact_summary_keeps_the_headline_columns_and_stars_the_best_k():
    summary = summary_frame([dict(drafter="a", k=2, speedup=1.5), dict(drafter="a", k=4, speedup=1.8)])
    table = render_compare.compact_summary_table(summary)
    assert list(table.columns) == list(render_compare.COMPACT_COLUMNS)
    assert list(table["K"]) == ["2", "4 ★"]
    assert list(table["speedup"]) == [1.5, 1.8] and list(table["acceptance rate"]) == [0.5, 0.5]  # numbers stay numbers
    assert render_compare.compact_summary_table(summary_frame([]).iloc[0:0]).empty


def test_measured_points_carry_the_prediction_for_their_own_k_and_c():
    summary = summary_frame([
        dict(drafter="a", k=4, fitted_acceptance=0.7, cost_ratio=0.2, decode_speedup=1.4),
        dict(drafter="b", k=2, fitted_acceptance=math.nan),  # nothing drafted: left out
    ])
    (point,) = render_theory.measured_points(summary)
    assert point.predicted == pytest.approx(expected_speedup(0.7, 4, 0.2))
    assert point.efficiency == pytest.approx(1.4 / point.predicted)
    figure = render_theory.speedup_theory_figure(4, 0.1, [point], acceptance=0.5, own_curves=True)
    measured = [t for t in figure.data if t.name == "a, K=4"]
    assert len(measured) == 1 and measured[0].y[0] == pytest.approx(1.4)
    (band,) = figure.layout.shapes[:1]
    assert band.x1 == pytest.approx(render_theory.break_even_acceptance(4, 0.1))  # the "slower" region
    assert render_theory.points_table([point])["a < c"].tolist() == [""]


def test_measured_points_carry_the_verify_cost_and_efficiency_v():
    summary = summary_frame([dict(drafter="a", k=4, fitted_acceptance=0.7, cost_ratio=0.2, decode_speedup=1.2,
                                  bare_verify_cost=1.6, draft_rate=0.8, predicted_speedup_v=1.5)])
    (point,) = render_theory.measured_points(summary)
    assert (point.verify_cost, point.draft_rate, point.predicted_v) == (1.6, 0.8, 1.5)
    assert point.efficiency_v == pytest.approx(1.2 / 1.5) and point.efficiency == pytest.approx(1.2 / point.predicted)
    table = render_theory.points_table([point])
    assert table["v(K), bare"].tolist() == [1.6] and table["efficiency_v"].tolist() == [pytest.approx(0.8)]
    figure = render_theory.speedup_theory_figure(4, 0.2, [point], verify_cost=1.6)
    curve = [t for t in figure.data if t.name == "predicted, K=4, c=0.20, v=1.60"][0]
    assert curve.y[-1] == pytest.approx(expected_speedup(1.0, 4, 0.2, 1.6))  # the curve follows the v slider
    (dash,) = [t for t in figure.data if t.name == "a, K=4: predicted with v, r"]
    assert dash.y[0] == pytest.approx(1.5) and dash.marker.symbol == "line-ew-open"
    assert any(t.name == "dash: with the measured v(K) and r" for t in figure.data)  # the legend says what it is
    shapes = [s for s in figure.layout.shapes if s.type == "line" and s.x0 == s.x1]
    assert [s.x0 for s in shapes] == [pytest.approx(0.8)]  # K = 1 break-even: a = c + v - 1


def test_an_older_summary_without_verify_costs_reads_n_a():
    # a results file written before the lab timed bare verify passes: its summary has NaN (or no column at all)
    summary = summary_frame([dict(drafter="a", k=4, fitted_acceptance=0.7, cost_ratio=0.2, decode_speedup=1.2)])
    (point,) = render_theory.measured_points(summary)
    assert math.isnan(point.verify_cost) and math.isnan(point.efficiency_v)
    table = render_theory.points_table([point])
    assert [table[c].tolist() for c in render_compare.VERIFY_COST_COLUMNS] == [["n/a"]] * 3
    assert table["efficiency"].tolist() == [pytest.approx(point.efficiency)]  # Leviathan's stays a number
    full = render_compare.summary_table(summary)
    assert [full[c].tolist() for c in render_compare.VERIFY_COST_COLUMNS] == [["n/a"]] * 3
    assert math.isnan(full["tokens per pass"].iloc[0])  # absent column, not a verify cost: left empty
    figure = render_theory.speedup_theory_figure(4, 0.2, [point])
    assert not any("dash" in str(t.name) for t in figure.data)


def test_tokens_per_step_figure_draws_the_chosen_k_last_and_bold():
    figure = render_theory.tokens_per_step_figure(4, acceptance=0.5)
    curve = [t for t in figure.data if t.name == "K=4"][0]
    assert curve.y[0] == pytest.approx(1.0) and curve.y[-1] == pytest.approx(5.0)  # a = 0 and a = 1
    assert curve.line.width == 3


# ---------------------------------------------------------------- figures and tables of a tiny comparison


@pytest.fixture(scope="module")
def tiny_comparison(tiny_target) -> Comparison:
    specs = [DrafterSpec("prompt-lookup"), DrafterSpec("layer-skip", exit_layer=1)]
    config = DecodeConfig(max_new_tokens=10)
    return run_comparison(tiny_target, render_compare.split_prompts(TINY_PROMPTS), specs, [1, 3], config,
                          chat_template=False)


def test_comparison_figures_and_tables(tiny_comparison):
    summary = tiny_comparison.summary()
    drafters = list(dict.fromkeys(summary["drafter"]))
    curves = render_compare.per_position_figure(summary)
    assert [t.name for t in curves.data] == [f"{d} (K=3)" for d in drafters]  # one per drafter, its largest K
    assert all(list(t.x) == list(range(1, len(t.y) + 1)) for t in curves.data)
    assert curves.layout.xaxis.tick0 == 1 and curves.layout.xaxis.rangemode != "tozero"  # no empty position-0 tick
    bars = render_compare.speedup_figure(summary)
    assert [t.name for t in bars.data] == drafters and all(list(t.x) == ["K=1", "K=3"] for t in bars.data)
    table = render_compare.summary_table(summary)
    assert len(table) == 4 and set(table["identical to target"]) == {"yes (2/2)"}  # fp32 greedy: exact
    runs = render_compare.runs_table(tiny_comparison)
    assert len(runs) == 10 and sorted(set(runs["prompt"])) == [1, 2] and not runs["cancelled"].any()
    assert list(runs.columns)[:4] == ["prompt", "category", "drafter", "K"] and list(runs.columns)[-1] == "prompt text"
    assert set(runs["category"]) == {""}  # a comparison made outside the page records no categories
    assert "acceptance rate" in runs.columns and "acceptance_rate" not in runs.columns
    assert render_compare.run_label(tiny_comparison, 0) == f"prompt 1 · {BASELINE}"


def test_timeline_figure_stacks_drafting_and_verifying(tiny_comparison):
    record = next(r for r in tiny_comparison.runs if r.drafter != BASELINE)
    figure = render_compare.timeline_figure(record.draft_ms, record.verify_ms, baseline_ms_per_step=5.0)
    drafting, verifying = figure.data
    assert list(drafting.y) == record.draft_ms and list(verifying.y) == record.verify_ms
    assert figure.layout.barmode == "stack"
    split = render_compare.time_split(record.draft_ms, record.verify_ms)
    assert split.steps == len(record.verify_ms) and 0 <= split.draft_share <= 1
    assert any("no step yet" in a.text for a in render_compare.timeline_figure([], []).layout.annotations)


def test_cost_rows_say_what_each_drafter_adds(tiny_target, tiny_comparison):
    draft = SimpleNamespace(name="qwen2.5-coder-0.5b", num_parameters=630_000_000, weight_bytes=1_260_000_000)
    costs = {
        "prompt-lookup (n 1-3)": render_compare.drafter_cost("prompt-lookup", tiny_target),
        "layer-skip (exit 1)": render_compare.drafter_cost("layer-skip", tiny_target, exit_layer=1),
        "draft-model (qwen2.5-coder-0.5b)": render_compare.drafter_cost("draft-model", tiny_target, draft),
    }
    rows = {r["drafter"]: r for r in render_compare.cost_rows(costs, tiny_comparison.summary())}
    assert rows["prompt-lookup (n 1-3)"]["parameters added"] == "none"
    assert "shares the target's weights" in rows["layer-skip (exit 1)"]["what it uses"]
    assert "(K=1)" in rows["layer-skip (exit 1)"]["c, measured"] and "(K=3)" in rows["layer-skip (exit 1)"]["c, measured"]
    assert rows["draft-model (qwen2.5-coder-0.5b)"]["parameters added"] == "630M"
    assert rows["draft-model (qwen2.5-coder-0.5b)"]["memory added"] == "1.17 GiB"
    assert rows["draft-model (qwen2.5-coder-0.5b)"]["c, measured"] == "—"  # not in this comparison
    (unrecorded,) = render_compare.cost_rows({}, tiny_comparison.summary()[:1])
    assert unrecorded["parameters added"] == "—" and unrecorded["what it uses"] == "not recorded"


# ---------------------------------------------------------------- step-through cards


def detail(token, accepted, draft_prob=None, target_prob=0.5, top=((5, 0.5), (9, 0.3)), acceptance=1.0, uniform=None):
    return PositionDetail(token, draft_prob, target_prob, tuple(top), acceptance, uniform, accepted)


@pytest.mark.parametrize(
    "position, greedy, words",
    [
        (detail(5, True), True, ["“␣t5”", "accepted"]),  # spaces marked as in the cards' token tables
        (detail(6, False, target_prob=0.1, acceptance=0.0), True, ["not the drafted “␣t6”", "rejected"]),
        # prompt lookup under sampling: draft prob 1, accept with the target's probability
        (detail(5, True, target_prob=0.42, acceptance=0.42, uniform=0.3), False,
         ["0.420 / 1.000", "deterministic", "u = 0.300 < 0.42", "accepted"]),
        # a model draft more confident than the target: ratio below 1, a high draw rejects
        (detail(6, False, draft_prob=0.6, target_prob=0.3, acceptance=0.5, uniform=0.8), False,
         ["0.300 / 0.600", "= 0.50", "u = 0.800 ≥ 0.50", "rejected"]),
    ],
)
def test_decision_reason(position, greedy, words):
    reason = render_step.decision_reason(position, greedy, f" t{position.draft_token}", " t5")
    for word in words:
        assert word in reason


def test_step_cards_show_each_position_and_the_final_token():
    # 3 drafted: the first accepted, the second rejected (so the third was never checked), then the correction
    step = Step(0, (5, 6, 7), 1, (5, 9), "corrected", 1.0, 10.0, 12, 11,
                details=(detail(5, True), detail(6, False, target_prob=0.1, acceptance=0.0)))
    cards = render_step.step_cards_html(step, tiny_tokenizer(), [3, 4], greedy=True)
    assert [c.split('"')[0] for c in cards.split('class="sd-card sd-')[1:]] == ["accepted", "rejected", "unchecked", "corrected"]
    assert "not checked" in cards and "replaces the drafted one" in cards
    assert "␣t5" in cards and "␣t9" in cards  # token text with its leading space marked
    assert "<script" not in render_step.step_cards_html(
        Step(0, (), 0, (1,), "target", 0.0, 1.0, 3), SimpleNamespace(decode=lambda ids, **_: "<script>"), [], True
    )


@pytest.mark.parametrize(
    "step, words",
    [
        (Step(0, (5, 6), 2, (5, 6, 7), "bonus", 1.0, 1.0, 12), ["All 2 drafted tokens were accepted", "free"]),
        (Step(0, (), 0, (7,), "target", 0.0, 1.0, 12), ["No draft"]),
        (Step(0, (5, 6), 1, (5,), "corrected", 1.0, 1.0, 12), ["cut"]),
    ],
)
def test_final_token_note(step, words):
    for word in words:
        assert word in render_step.final_token_note(step, greedy=True)


def test_newline_token_in_a_reason_is_shown_as_a_return_mark():
    # the reason used to show a newline token as a blank: “\n” read as “ ” on the page
    reason = render_step.decision_reason(detail(5, True), True, "\n", "\n")
    assert "“↵”" in reason and "\n" not in reason


def test_eos_inside_the_accepted_draft_keeps_only_the_tokens_up_to_it():
    # drafted t1 (EOS) then t6, both accepted, t7 rejected: the output ends at the EOS, so only one token is kept;
    # t6 was verified and counts as accepted (lab.metrics, like vLLM) but is never emitted
    step = Step(4, (1, 6, 7), 2, (1,), "corrected", 1.0, 10.0, 30, None,
                details=(detail(1, True), detail(6, True), detail(7, False, target_prob=0.1, acceptance=0.0)))
    headline = render_step.step_headline(step, eos_token_ids=(1,))
    assert headline == ("Step 5: drafted 3, accepted 2 (1 emitted, 1 verified after the end of text), "
                        "cut at the end of text: 1 token in one target pass")
    assert ", (" not in headline
    cards = render_step.step_cards_html(step, tiny_tokenizer(), [3, 4], greedy=True, eos_token_ids=(1,))
    kinds = [c.split('"')[0] for c in cards.split('class="sd-card sd-')[1:]]
    assert kinds == ["accepted", "not-emitted", "rejected", "unchecked"]
    assert "verified, not emitted (after end of text)" in cards
    assert "cut before the target&#x27;s own token (end of text)" in cards


def test_probability_bars_are_sized_within_their_cell():
    # bars were 4.5 rem x probability wide and ran into the next card for probabilities near 1
    step = Step(0, (5,), 1, (5, 9), "bonus", 1.0, 10.0, 12, None, details=(detail(5, True, top=((5, 0.995), (9, 0.005))),))
    cards = render_step.step_cards_html(step, tiny_tokenizer(), [3, 4], greedy=True)
    assert "width:100%" in cards and "width:1%" in cards and "px" not in cards.split("sd-bar")[1][:60]
    assert "table-layout: fixed" in render_step.STEP_CSS


def test_cache_note_and_headline():
    step = Step(2, (5, 6, 7), 1, (5, 9), "corrected", 1.0, 10.0, 41, 40)
    assert "holds 41 tokens: all 42 committed" in render_step.cache_note(step, 42)
    assert "draft's cache holds 40" in render_step.cache_note(step, 42)
    assert render_step.step_headline(step).startswith("Step 3: drafted 3, accepted 1, then a corrected token")


# ---------------------------------------------------------------- AppTest with tiny models


def column_formats(dataframe) -> dict[str, str]:
    """The number formats the page gave the columns a dataframe has (Streamlit's column config)."""
    config = json.loads(dataframe.proto.columns or "{}")
    return {name: column["type_config"]["format"] for name, column in config.items()
            if name in dataframe.value.columns and (column.get("type_config") or {}).get("format")}


def compare_app(**widgets) -> AppTest:
    settings = dict(source="Paste prompts", pasted=TINY_PROMPTS, raw=True, max_new_tokens=8, ks=[1, 3])
    return app_on("compare", **(settings | widgets))


def test_compare_page_defaults_draw_without_loading(tiny_models):
    at = app_on("compare")
    assert at.title[0].value == "Compare drafters"
    assert at.selectbox(key=key("compare.target")).value == "smollm2-135m"
    assert at.multiselect(key=key("compare.drafters")).value == ["prompt-lookup", "layer-skip"]
    assert any("10 decodes" in c.value for c in at.caption)  # 2 preset prompts x (1 + 2 drafters x 2 K)
    assert tiny_models == []


def test_compare_run_shows_table_costs_charts_timeline_and_exports(tiny_models):
    at = click(compare_app(), "Run comparison")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(s.value.startswith("Complete: 10 runs on 2 prompts") for s in at.success)
    comparison = at.session_state["compare:comparison"]
    assert len(comparison.runs) == 10 and comparison.settings["status"] == "complete"
    summary_table = at.dataframe[0].value
    assert len(summary_table) == 4 and set(summary_table["identical to target"]) == {"yes (2/2)"}
    assert list(summary_table.columns) == list(render_compare.COMPACT_COLUMNS)  # no scrolling sideways
    formats = column_formats(at.dataframe[0])
    assert formats == {"acceptance rate": "percent", "mean acceptance length": "%.2f", "tokens/s": "%.1f",
                       "speedup": "%.2f×"}
    (all_columns,) = [e for e in at.expander if e.label == "All columns"]
    full_table = all_columns.dataframe[0].value  # every column, behind the expander
    assert list(full_table.columns) == list(render_compare.summary_table(comparison.summary()).columns)
    assert {"decode speedup", "c", "target tokens/s", "best K", "prompts"} <= set(full_table.columns)
    assert column_formats(all_columns.dataframe[0]).items() >= {
        "tokens per pass": "%.2f", "draft rate r": "percent", "verify cost in the loop": "%.2f", "v(K), bare": "%.2f",
        "predicted (Leviathan)": "%.2f×", "efficiency": "percent", "predicted with v, r": "%.2f×",
        "efficiency_v": "percent"}.items()
    assert full_table["v(K), bare"].notna().all() and full_table["efficiency_v"].notna().all()  # measured here
    (legend,) = [m.value for m in all_columns.markdown if "efficiency_v" in m.value]
    assert "**v(K), bare**" in legend and "**r, draft rate**" in legend and "Leviathan assumes 1" in legend
    # no claim a measured table can contradict: v(K) < 1 on a flat-cost CPU, r < 1 for a model drafter
    assert "v > 1" not in legend and "never does" not in legend
    assert "above 100 % is timing noise" in legend and "last step of the token budget" in legend
    costs = at.table[0].value  # a static table: its cells wrap, so "c, measured" stays on the page
    assert list(costs["parameters added"]) == ["none", "none"]
    assert list(costs.columns)[-1] == "c, measured"
    assert {s.value for s in at.subheader} >= {"Per drafter and K", "What each drafter costs", "Timeline of a run",
                                             "Per prompt: 2 prompts, 10 runs"}
    (per_prompt,) = [d.value for d in at.dataframe if "category" in d.value.columns]  # not behind an expander
    assert set(per_prompt["category"]) == {"pasted"} and len(per_prompt) == 10
    assert comparison.settings["categories"] == {"0": "pasted", "1": "pasted"}
    assert len(at.get("plotly_chart")) == 4
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download JSON"]
    assert tiny_models == ["smollm2-135m"]

    at.selectbox(key=key("compare.inspect")).select(3).run()  # the timeline of another run
    assert not at.exception
    at.run()  # a rerun keeps the result and does not run again
    assert len(at.dataframe) >= 2 and tiny_models == ["smollm2-135m"]


def test_compare_with_the_qwen_draft_model_reports_its_size(tiny_models):
    at = click(compare_app(target="qwen2.5-coder-1.5b", drafters=["draft-model"], draft="qwen2.5-coder-0.5b",
                           pasted="q3 q4 q5 q3 q4 q5", ks=[2]), "Run comparison")
    assert not at.exception and not at.error, [e.value for e in at.error]
    costs = at.table[0].value
    assert costs["parameters added"].tolist() == [render_compare.format_count(tiny_loaded("x").num_parameters)]
    assert sorted(tiny_models) == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def test_compare_prompts_from_a_spec_bench_category(tiny_models, tmp_path, monkeypatch):
    questions = tmp_path / "question.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "category": category, "turns": [f"t{i + 3} t{i + 4}"]})
                                   for i, category in enumerate(["writing", "rag", "rag", "rag"])))
    monkeypatch.setenv("LAB_SPEC_BENCH", str(questions))
    at = compare_app(source="Spec-Bench category", spec_category="rag", spec_count=2)
    assert at.selectbox(key=key("compare.spec_category")).options == ["writing", "rag"]
    assert any(c.value.startswith("2 prompts × (target alone + ") for c in at.caption)
    at = click(at, "Run comparison")
    assert not at.exception and not at.error
    assert at.session_state["compare:comparison"].prompts == ["t4 t5", "t5 t6"]

    monkeypatch.setenv("LAB_SPEC_BENCH", str(tmp_path / "absent.jsonl"))
    at.run()
    assert any("Spec-Bench prompts are absent" in i.value for i in at.info) and not at.error


@pytest.mark.parametrize(
    "widgets, message",
    [
        (dict(pasted="  \n---\n "), "No prompts"),
        (dict(drafters=[]), "No drafter"),
        (dict(ks=[]), "No K values"),
        # SmolLM2 target, a stale Qwen draft in session state: no draft fits, refused before loading
        (dict(drafters=["draft-model"], draft="qwen2.5-coder-0.5b"), "No draft model shares the tokenizer"),
        (dict(drafters=["prompt-lookup"], min_n=3, max_n=2), "min_n <= max_n"),
    ],
)
def test_compare_errors_are_shown(tiny_models, widgets, message):
    at = click(compare_app(**widgets), "Run comparison")
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]


def test_cancel_keeps_the_runs_that_finished(tiny_models, started_jobs, monkeypatch):
    # The Cancel button's on_click cancels the page's job; here the third decode does it after its first step.
    real_decode = lab.studies.compare.decode
    calls = []

    def decode_then_cancel(*args, **kwargs):
        calls.append(1)
        for number, event in enumerate(real_decode(*args, **kwargs)):
            if len(calls) == 3 and number == 2:  # Prefilled, then the first Step: the run is under way
                started_jobs[-1].cancel("you pressed Cancel")
            yield event

    monkeypatch.setattr(lab.studies.compare, "decode", decode_then_cancel)
    at = click(compare_app(), "Run comparison")
    assert not at.exception and not at.error
    assert any("Cancelled after 2 of 10 runs: you pressed Cancel" in w.value for w in at.warning), \
        [w.value for w in at.warning]
    comparison = at.session_state["compare:comparison"]
    assert [r.cancelled for r in comparison.runs] == [False, False, True]
    assert len(at.dataframe[0].value) == 1  # the one drafter x K that finished
    assert not [b for b in at.button if b.label == "Cancel"]  # drawn only while running


def finished_job(result, cancelled: str | None = None) -> SimpleNamespace:
    """What a page finds of a job that ended while nobody watched (``app.background.Job``'s outcome fields)."""
    done = threading.Event()
    done.set()
    return SimpleNamespace(done=done, result=result, cancelled=cancelled, error=None, partial={}, load=None)


def test_a_job_cancelled_while_nobody_watched_is_shown_cancelled(tiny_models, tiny_comparison):
    # The Cancel click's on_click cancelled the job; it ended in its worker thread while the page drew something else.
    partial = Comparison(tiny_comparison.settings | {"status": "cancelled", "runs_planned": 10}, tiny_comparison.prompts,
                         tiny_comparison.runs[:3])
    at = compare_app()
    at.session_state["compare:job"] = finished_job(partial, cancelled="you pressed Cancel")
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["compare:comparison"] is partial
    assert "compare:job" not in at.session_state
    assert any("Cancelled after 3 of 10 runs: you pressed Cancel" in w.value for w in at.warning), \
        [w.value for w in at.warning]


def test_results_file_loads_back(tiny_models, tiny_comparison):
    at = app_on("compare")
    at.file_uploader[0].set_value(("comparison.json", tiny_comparison.to_json().encode(), "application/json")).run()
    assert not at.exception and not at.error
    assert any("Loaded from **comparison.json**: 10 runs on 2 prompts" in i.value for i in at.info)
    assert len(at.dataframe[0].value) == 4
    assert tiny_models == []

    at.switch_page("app_pages/theory.py").run()  # the Theory page reads the loaded comparison too
    assert not at.exception
    assert any("comparison.json" in m.value for m in at.markdown)


def test_bad_results_file_is_refused(tiny_models):
    at = app_on("compare")
    at.file_uploader[0].set_value(("notes.json", json.dumps({"hello": 1}).encode(), "application/json")).run()
    assert not at.exception
    assert any("not a comparison results file" in e.value for e in at.error)
    assert "compare:comparison" not in at.session_state


def test_results_uploader_takes_one_file_and_refuses_a_csv_in_words(tiny_models):
    # a type filter left a refused .csv's chip beside the next file: the uploader looked like it took several
    at = app_on("compare")
    assert not at.file_uploader[0].proto.multiple_files and not list(at.file_uploader[0].proto.type)
    at.file_uploader[0].set_value(("compare.csv", b"prompt,drafter\n1,a\n", "text/csv")).run()
    assert not at.exception
    assert any("Could not load compare.csv: this loads one JSON file" in e.value for e in at.error)


@pytest.mark.parametrize(
    "text, words",
    [
        (json.dumps({"hello": 1}), "the field 'settings' is missing"),  # not "('settings')"
        (json.dumps({"runs": [], "prompts": []}), "the field 'settings' is missing"),
        ("runs,k\n1,2", "it is not JSON (Expecting value at line 1, column 1)"),
        (json.dumps([1, 2]), "the file must be an object; got a list"),
    ],
)
def test_a_refused_results_file_says_what_is_missing_in_words(text, words):
    with pytest.raises(ValueError, match="not a comparison results file") as refused:
        widgets.parse_comparison(text, "notes.json")
    assert words in str(refused.value) and "('" not in str(refused.value)


def test_theory_page_without_a_comparison_shows_the_curves(tiny_models):
    at = app_on("theory")
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Tokens per target step"] == "2.77"  # (1 - 0.7^5) / 0.3 at the default K = 4, a = 0.7
    assert metrics["Expected speedup"] == "1.98×"  # ... / (4 * 0.1 + 1)
    assert len(at.get("plotly_chart")) == 3  # Leviathan's two, then chain or tree (lab.tree_theory)
    assert any("No comparison yet" in i.value for i in at.info)
    at.slider(key=key("theory.k")).set_value(1).run()
    at.slider(key=key("theory.c")).set_value(0.3).run()
    assert {m.label: m.value for m in at.metric}["Break-even a"] == "0.30"  # K = 1: a = c


def test_theory_best_k_says_none_when_every_k_loses(tiny_models):
    # at a = 0 every K is predicted below 1x: "1 (0.80×)" read as a recommendation to speculate with K = 1
    at = app_on("theory")
    at.slider(key=key("theory.a")).set_value(0.0).run()
    at.slider(key=key("theory.c")).set_value(0.25).run()
    assert not at.exception
    (best,) = [m for m in at.metric if m.label.startswith("Best K")]
    assert best.value == "none"
    assert any("none: speculation is predicted to lose (best K=1 gives 0.80×)" in c.value for c in at.caption)
    at.slider(key=key("theory.a")).set_value(0.7).run()  # a K that wins is still named
    (best,) = [m for m in at.metric if m.label.startswith("Best K")]
    assert best.value != "none" and "×)" in best.value


def test_theory_page_verify_cost_slider_moves_the_prediction(tiny_models):
    at = app_on("theory")
    assert at.slider(key=key("theory.v")).value == 1.0  # Leviathan's model by default
    at.slider(key=key("theory.v")).set_value(2.0).run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Expected speedup"] == f"{expected_speedup(0.7, 4, 0.1, 2.0):.2f}×" == "1.16×"  # 2.77 / (0.4 + 2)
    at.slider(key=key("theory.k")).set_value(1).run()
    at.slider(key=key("theory.c")).set_value(0.3).run()
    at.slider(key=key("theory.v")).set_value(1.2).run()
    assert {m.label: m.value for m in at.metric}["Break-even a"] == "0.50"  # K = 1: a = c + v - 1


def test_theory_page_places_measured_runs(tiny_models):
    at = click(compare_app(), "Run comparison")
    at.switch_page("app_pages/theory.py").run()
    assert not at.exception and not at.error
    points = render_theory.measured_points(at.session_state["compare:comparison"].summary())
    assert points and len(at.dataframe[0].value) == len(points)
    assert any("(accepted / drafted, as vLLM reports it) is a different quantity" in c.value for c in at.caption)
    point = points[-1]
    at.selectbox(key=key("theory.run")).select(point.label).run()  # sliders jump to that run's K, c and a
    assert at.slider(key=key("theory.k")).value == point.k
    assert at.slider(key=key("theory.a")).value == pytest.approx(round(point.acceptance, 2))
    assert at.slider(key=key("theory.c")).value == pytest.approx(round(point.cost_ratio, 2))
    assert at.slider(key=key("theory.v")).value == pytest.approx(round(min(max(point.verify_cost, 1.0), 3.0), 2))
    table = at.dataframe[0].value
    assert table["v(K), bare"].notna().all() and table["efficiency_v"].notna().all()
    assert table["efficiency"].tolist() == pytest.approx([p.efficiency for p in points])
    text = " ".join(m.value for m in at.markdown)
    assert "**efficiency_v** = measured / the prediction with the bare v(K)" in text
    assert "it is not the engine's alone" in text and "The gap is our engine's overhead" not in text
    # the words must hold for any measured table: v(K) below 1 happens on a CPU, above-100 % efficiency is noise,
    # and a model drafter also drafts nothing at the budget's last step (layer skip showed r = 93.6 %)
    assert "v(K) > 1" not in text and "v(K) is measured; Leviathan assumes 1; on a CPU it can be above 1" in text
    assert "values above 100 % are timing noise" in text
    assert "never does" not in text and "the last step of the token budget has no room for a draft" in text


def test_theory_page_loads_an_older_results_file_without_verify_costs(tiny_models, tiny_comparison):
    older = json.loads(tiny_comparison.to_json())
    del older["settings"]["verify_cost"]  # written before the lab timed bare verify passes
    at = app_on("theory")
    at.file_uploader[0].set_value(("old.json", json.dumps(older).encode(), "application/json")).run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert set(table["v(K), bare"]) == {"n/a"} and set(table["efficiency_v"]) == {"n/a"}
    assert table["efficiency"].notna().all()
    assert any("did not measure v(K)" in c.value for c in at.caption)
    label = table["drafter"].iloc[0] + f", K={table['K'].iloc[0]}"
    at.selectbox(key=key("theory.run")).select(label).run()
    assert at.slider(key=key("theory.v")).value == 1.0  # no v(K) measured: Leviathan's

    at.switch_page("app_pages/compare.py").run()  # the Compare page shows it too, n/a in the full table
    assert not at.exception and not at.error
    (all_columns,) = [e for e in at.expander if e.label == "All columns"]
    assert set(all_columns.dataframe[0].value["efficiency_v"]) == {"n/a"}
    assert any(c.value.startswith("n/a: this comparison did not time bare verify passes") for c in all_columns.caption)


def step_app(**widgets) -> AppTest:
    return app_on("step", **({"prompt": "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4", "raw": True, "max_new_tokens": 12} | widgets))


def test_step_through_greedy_cycles(tiny_models):
    at = step_app()
    assert [b.disabled for b in at.button if b.label in ("Next cycle", "Reset")] == [True, True]
    at = click(at, "Start")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Prefilled" in i.value for i in at.info)
    assert not [b for b in at.button if b.label == "Next cycle"][0].disabled
    at = click(click(at, "Next cycle"), "Next cycle")
    assert not at.exception
    session = at.session_state["step:session"]
    assert len(session.steps) == 2
    assert at.subheader[0].value.startswith("Step 2:")
    html = html_of(at)
    assert 'class="sd-card' in html and 'class="tok tok-' in html
    assert at.slider(key=key("step.view")).value == 2
    at.slider(key=key("step.view")).set_value(1).run()  # look back at the first cycle
    assert at.subheader[0].value.startswith("Step 1:")
    changed = "settings above changed since **Start**"
    assert not any(changed in i.value for i in at.info)
    at.slider(key=key("step.k")).set_value(2).run()  # a change mid-run is kept for the next Start, and says so
    assert any(changed in i.value for i in at.info)
    at = click(at, "Next cycle")
    assert at.session_state["step:session"] is session and session.settings["K"] == 4 and len(session.steps) == 3
    at.slider(key=key("step.k")).set_value(4).run()
    assert not any(changed in i.value for i in at.info)

    for _ in range(4):
        at = click(at, "Next 5 cycles")
        if session.finished is not None:
            break
    assert session.finished is not None
    assert any(s.value.startswith("Finished") for s in at.success)
    assert [p.token_id for p in session.pieces if p.kind != "rejected"] == list(session.finished.token_ids)
    assert [b for b in at.button if b.label == "Next cycle"][0].disabled
    at = click(at, "Reset")
    assert "step:session" not in at.session_state


def test_step_through_sampling_explains_the_draw(tiny_models):
    # layer skip is a model drafter: it always drafts, with probabilities
    at = click(step_app(drafter="layer-skip", temperature=0.9, seed=3, max_new_tokens=40, k=3), "Start")
    for _ in range(2):
        at = click(at, "Next cycle")
    assert not at.exception and not at.error
    steps = at.session_state["step:session"].steps
    assert steps[-1].details
    assert all(d.uniform is not None and d.draft_prob is not None for s in steps for d in s.details)
    html = html_of(at)
    assert "uniform draw u =" in html and "Target/draft" in html


def test_step_through_takes_the_n_gram_range(tiny_models):
    # the prompt repeats with period 4: 1-3-grams find a continuation, an 8-gram suffix occurs nowhere earlier
    drafted = {}
    for low, high in ((1, 3), (8, 8)):
        at = click(click(step_app(min_n=low, max_n=high), "Start"), "Next cycle")
        assert not at.exception and not at.error
        session = at.session_state["step:session"]
        assert f"n-grams {low}-{high}" in session.settings["drafter"]
        drafted[low] = len(session.steps[0].drafted)
    assert drafted == {1: 4, 8: 0}


def test_step_through_errors_are_shown(tiny_models):
    at = click(step_app(prompt="   "), "Start")
    assert not at.exception
    assert any("prompt is empty" in e.value for e in at.error)
    assert "step:session" not in at.session_state


# ---------------------------------------------------------------- AppTest with a real model


@pytest.mark.real_model
def test_step_through_with_smollm2_and_prompt_lookup():
    if not lab.models.is_prepared("smollm2-135m"):
        pytest.skip("smollm2-135m is not prepared (run scripts/setup.sh test)")
    st.cache_resource.clear()
    try:
        at = click(app_on("step", max_new_tokens=8), "Start")  # the default prompt through the chat template
        at = click(click(at, "Next cycle"), "Next cycle")
        assert not at.exception and not at.error, [e.value for e in at.error]
        session = at.session_state["step:session"]
        assert len(session.steps) == 2 and at.subheader[0].value.startswith("Step 2:")
        html = html_of(at)
        assert 'class="tok tok-' in html and "the target's own token" in html
        if session.steps[-1].drafted:
            assert 'class="sd-card sd-' in html and "target's top 5" in html
    finally:
        st.cache_resource.clear()


def test_count_puts_the_noun_in_its_number():
    assert render.count(1, "token") == "1 token"
    assert render.count(0, "token") == "0 tokens"
    assert render.count(3, "target pass", "target passes") == "3 target passes"


def test_a_comparison_started_before_a_reload_can_be_followed_from_the_new_session(tiny_models, tiny_comparison):
    from app import background

    release = threading.Event()

    def work(job):  # a comparison another session started, still running when this tab opens
        release.wait(30)
        return tiny_comparison

    job = background.start(work, "cpu", "Compare, session zzzz")
    try:
        at = app_on("compare")
        (offer,) = [i.value for i in at.info if "session zzzz" in i.value]
        assert "is running" in offer and "kept in History" in offer
        threading.Timer(1.0, release.set).start()  # it ends while this session follows it
        at = [b for b in at.button if b.label == "Follow it here"][0].click().run()
        assert job.done.is_set()
        assert not at.exception, at.exception
        assert at.session_state["compare:comparison"] is tiny_comparison  # taken over as if started here
        assert not [i for i in at.info if "session zzzz" in i.value]  # done: no longer offered
    finally:
        release.set()


TREE_PROMPTS = "t3 t4 t5 t3 t4 t6 t3 t4 t7 t8 t3 t4\n---\nt7 t8 t9 t7 t8 t5 t7 t8 t6 t7 t8"  # "t3 t4": three continuations


def test_compare_with_a_tree_budget_counts_runs_its_trees_and_shows_them(tiny_models):
    # the count under the form left out the tree arms (6 decodes; 10 ran), and the summary hid what the tree did
    at = compare_app(drafters=["prompt-lookup"], ks=[2, 4], tree_budget=8, pasted=TREE_PROMPTS)
    assert any("(1 drafter + 1 tree arm) × 2 K) = **10 decodes**" in c.value for c in at.caption), [
        c.value for c in at.caption]
    at = click(at, "Run comparison")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(s.value.startswith("Complete: 10 runs on 2 prompts") for s in at.success)
    summary = at.session_state["compare:comparison"].summary()
    trees = summary[summary["tree_budget"] == 8]
    assert len(trees) == 2 and (trees["mean_tree_size"] > trees["k"]).all()  # branched: more nodes than a chain of K
    assert (summary[summary["tree_budget"] == 0]["mean_tree_size"].isna()).all()
    table = at.dataframe[0].value
    assert list(table.columns)[:4] == ["drafter", "K", "tree budget", "mean tree size"]
    assert set(table[table["drafter"].str.contains("tree")]["tree budget"]) == {"8"}
    assert set(table[~table["drafter"].str.contains("tree")]["mean tree size"]) == {"—"}
    assert any(c.value.startswith("Tree budget: a tree arm drafts") for c in at.caption)
    runs = render_compare.runs_table(at.session_state["compare:comparison"])
    assert "K" in runs.columns and "k" not in runs.columns
    assert set(runs[runs["drafter"] == BASELINE]["K"]) == {"—"}  # the target alone has no K: not "None"
    shown = render_compare.runs_display(runs)
    base = shown[shown["drafter"] == BASELINE]
    assert set(base["speedup"]) == set(base["acceptance rate"]) == set(base["identical to target"]) == {"—"}
    assert not shown.isna().any().any()  # st.dataframe draws a missing cell as "None"
    rates = [float(c.strip().rstrip("%")) for c in sorted(shown["acceptance rate"]) if c != "—"]
    assert rates == sorted(rates)  # text that still sorts by value
