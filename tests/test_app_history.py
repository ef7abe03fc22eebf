"""The History page: a Live run another session made is listed; filters; reopen on its page; two runs side by side;
delete with a confirmation; a corrupt store leaves the app running. Tiny models (``app_util.tiny_models``)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
import torch
from streamlit.testing.v1 import AppTest

from app_util import MAIN, TIMEOUT_S, click, html_of, key, live_app, tiny_models  # noqa: F401 (a fixture)
from app import saved
from lab.store import ResultsStore

MACHINE = {"cpu": "test cpu", "device": "cpu"}
TINY_PROMPT = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4"


@pytest.fixture
def store(tmp_path, monkeypatch) -> ResultsStore:
    path = tmp_path / "results.sqlite3"
    monkeypatch.setenv("LAB_RESULTS_DB", str(path))
    return ResultsStore(path)


def history(**widgets) -> AppTest:
    """A fresh session (another tab, or after a server restart) on the History page."""
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT_S)
    at.run()
    at.switch_page("app_pages/history.py").run()
    for name, value in widgets.items():
        at.session_state[key(f"history.{name}")] = value
    return at.run() if widgets else at


def listed(at: AppTest) -> list[int]:
    return list(at.dataframe[0].value["id"])


def test_a_live_run_is_kept_listed_in_another_session_and_reopens_on_its_page(tiny_models, store):
    at = click(live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=10, k=3), "Run")
    assert not at.exception and not at.error
    (run,) = store.list_runs()
    assert (run.kind, run.status, run.models["target"]) == ("live", "complete", "smollm2-135m")
    assert run.figures["speedup"] is not None and run.figures["mean_acceptance_length"] >= 1

    at = history()  # a new session: nothing in its session state, the run comes from the store
    assert not at.exception and not at.error
    assert listed(at) == [run.id]
    row = at.dataframe[0].value.iloc[0]
    assert row["kind"] == "live" and row["models"] == "smollm2-135m" and "K=3" in row["settings"]
    at = click(at, "Open on its page")
    assert not at.exception, at.exception
    result = at.session_state["live:result"]
    assert result.speculative.label.endswith("K=3") and result.baseline is not None
    assert 'class="tok tok-' in html_of(at)  # the Live page drew the kept run
    assert any("Identical to the target alone" in s.value for s in at.success)
    assert tiny_models == ["smollm2-135m"]  # reopening loads no model


def test_filters_by_kind_and_model(store):
    a = store.save_run("calibrate", target="smollm2-135m", figures={"predicted_speedup": 1.2}, machine=MACHINE)
    b = store.save_run("generate", target="qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b", machine=MACHINE)
    c = store.save_run("generate", target="smollm2-135m", machine=MACHINE)
    at = history()
    assert listed(at) == [c, b, a]
    assert listed(history(kinds=["generate"])) == [c, b]
    assert listed(history(model="qwen2.5-coder-0.5b")) == [b]  # a draft counts as the run's model
    assert listed(history(kinds=["calibrate"], model="smollm2-135m")) == [a]


def test_the_when_filter_keeps_only_the_runs_of_its_window(store):
    old = store.save_run("generate", target="smollm2-135m", machine=MACHINE)
    new = store.save_run("generate", target="smollm2-135m", machine=MACHINE)
    three_days_ago = (datetime.now(timezone.utc) - timedelta(days=3)).isoformat(timespec="microseconds")
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE runs SET created_at = ? WHERE id = ?", (three_days_ago, old))
    assert listed(history()) == [new, old]
    assert listed(history(window="last 24 hours")) == [new]
    assert listed(history(window="last 7 days")) == [new, old]


def test_two_runs_side_by_side_mark_what_differs(store):
    a = store.save_run("generate", settings={"k": 2, "temperature": 0.0}, figures={"speedup": 1.1}, target="m",
                       machine=MACHINE)
    b = store.save_run("generate", settings={"k": 4, "temperature": 0.0}, figures={"speedup": 1.4}, target="m",
                       machine=MACHINE)
    at = history()
    frame = at.dataframe[1].value
    rows = dict(zip(frame[""], frame["differs"]))
    assert rows["setting: k"] and rows["figure: speedup"] and not rows["setting: temperature"]
    assert list(frame.columns[1:3]) == [f"#{b}", f"#{a}"]
    assert any("values differ" in c.value for c in at.caption)


def test_delete_asks_first(store):
    keep = store.save_run("generate", target="m", machine=MACHINE)
    gone = store.save_run("bench", target="m", machine=MACHINE)
    store.save_run("batch-size", parent_id=gone, target="m", machine=MACHINE)
    at = history()
    at = click(at, "Delete…")
    assert any(f"Delete run #{gone}" in w.value for w in at.warning)
    at = click(at, "Keep it")
    assert len(store.list_runs()) == 3
    at = click(click(at, "Delete…"), "Yes, delete it")
    assert not at.exception
    assert [r.id for r in store.list_runs()] == [keep]
    assert any(f"Deleted run #{gone} and its 1 parts" in s.value for s in at.success)
    assert listed(at) == [keep]


def test_a_kept_comparison_reopens_on_the_compare_page(tiny_target, store):
    from lab.config import DecodeConfig
    from lab.studies.compare import DrafterSpec, run_comparison

    comparison = run_comparison(tiny_target, ["t5 t6 t5 t6"], [DrafterSpec("prompt-lookup")], [2],
                                DecodeConfig(max_new_tokens=6), chat_template=False, measure_verify=False)
    run_id = store.save_run("compare", target="tiny", machine=MACHINE, payload=json.loads(comparison.to_json()))
    at = click(history(), "Open on its page")
    assert not at.exception, at.exception
    reopened = at.session_state["compare:comparison"]
    assert reopened.settings.pop("loaded_from").startswith(f"History run #{run_id} (")  # said on the page
    assert reopened.to_json() == comparison.to_json()
    assert any(f"Loaded from **History run #{run_id}" in i.value for i in at.info)
    assert store.get_run(run_id).kind == "compare"


def test_theory_places_the_latest_kept_comparison_from_a_new_session(tiny_target, store):
    from lab.config import DecodeConfig
    from lab.studies.compare import DrafterSpec, run_comparison

    comparison = run_comparison(tiny_target, ["t5 t6 t5 t6"], [DrafterSpec("prompt-lookup")], [2],
                                DecodeConfig(max_new_tokens=6), chat_template=False, measure_verify=False)
    run_id = store.save_run("compare", target="tiny", machine=MACHINE, payload=json.loads(comparison.to_json()))
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT_S)
    at.run()
    at.switch_page("app_pages/theory.py").run()
    (button,) = [b for b in at.button if b.label.startswith("Place the latest kept comparison")]
    assert f"#{run_id}" in button.label
    at = button.click().run()
    assert not at.exception, at.exception
    placed = at.session_state["compare:comparison"]
    kept_at = store.get_run(run_id).created_at[:16].replace("T", " ")
    assert placed.settings.pop("loaded_from") == f"History run #{run_id} ({kept_at} UTC; the form above keeps your settings)"
    assert placed.to_json() == comparison.to_json()
    assert not [b for b in at.button if b.label.startswith("Place the latest")]  # placed: the offer is gone


def test_a_corrupt_store_is_explained_and_the_app_keeps_running(tmp_path, monkeypatch):
    path = tmp_path / "broken.sqlite3"
    path.write_bytes(b"definitely not sqlite " * 200)
    monkeypatch.setenv("LAB_RESULTS_DB", str(path))
    at = history()
    assert not at.exception
    assert any("Move it aside" in e.value for e in at.error)


def test_live_results_survive_the_json_tree(tiny_models, store):
    at = click(live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=8, k=2), "Run")
    result = at.session_state["live:result"]
    text = json.dumps(saved.to_tree(result))
    back = saved.from_tree(json.loads(text))
    assert type(back) is type(result) and back.speculative.steps == result.speculative.steps
    assert back.speculative.pieces == result.speculative.pieces and back.speculative.stats == result.speculative.stats
    assert json.dumps(saved.to_tree(back)) == text  # NaN-safe: every field, as written


def test_a_batch_page_sweep_keeps_each_batch_size_and_reopens(tiny_models, store):
    from app_util import app_on

    at = app_on("batch", source="Paste prompts", pasted="t3 t4 t5 t3 t4 t5\nt7 t8 t7 t8", raw=True,
                max_new_tokens=6, k=2, batch_sizes=[1, 2], peer=False)
    at = click(at, "Run sweep")
    assert not at.exception and not at.error, [e.value for e in at.error]
    (sweep,) = store.list_runs(kind="batch")
    assert sweep.status == "complete" and sweep.models["target"] == "smollm2-135m"
    parts = store.list_runs(parent_id=sweep.id)
    assert [p.kind for p in parts] == ["batch-size", "batch-size"]
    assert sorted(p.figures["batch_size"] for p in parts) == [1, 2]
    assert sweep.figures["batch_sizes"] == "1,2" and "latency_speedup" in sweep.figures

    at = click(history(), "Open on its page")
    assert not at.exception, at.exception
    assert at.session_state["batch:sweep"]["batch_sizes"] == [1, 2]


def test_a_finished_step_through_run_is_kept_and_reopens(tiny_models, store):
    from app_util import app_on

    at = app_on("step", prompt="t3 t4 t5 t6 t3 t4 t5 t6", raw=True, max_new_tokens=4, k=2)
    at = click(at, "Start")
    for _ in range(3):
        if store.list_runs(kind="step"):
            break
        at = click(at, "Next 5 cycles")
    (run,) = store.list_runs(kind="step")
    assert run.figures["num_output_tokens"] == 4
    at = click(history(), "Open on its page")
    assert not at.exception, at.exception
    assert any(s.value.startswith("Finished") for s in at.success)  # the page drew the kept session


def _tree_spec(at: AppTest, step: int) -> str:
    """The plotly spec of the tree the Step-through page draws for step index ``step`` (0-based)."""
    at.slider(key=key("step.view")).set_value(step + 1).run()
    (spec,) = [c.proto.spec for c in at.get("plotly_chart") if "a tree of" in c.proto.spec]
    return spec


def test_a_step_through_run_with_a_tree_is_kept_and_reopens_drawing_the_same_trees(tiny_models, store):
    from app_util import app_on

    at = app_on("step", prompt="t3 t4 t5 t6 t3 t4 t5 t7 t3 t4 t5 t6 t3 t4", raw=True, max_new_tokens=10,
                tree_budget=8)
    at = click(at, "Start")
    for _ in range(4):
        if store.list_runs(kind="step"):
            break
        at = click(at, "Next 5 cycles")
    (run,) = store.list_runs(kind="step")
    assert store.get_run(run.id).payload is not None, "the tree steps are kept"
    steps = at.session_state["step:session"].steps
    tree_steps = [i for i, s in enumerate(steps) if s.tree is not None]
    assert tree_steps, "prompt lookup found no n-gram: the prompt repeats on purpose"
    drawn = [_tree_spec(at, i) for i in tree_steps]

    at = click(history(), "Open on its page")  # a fresh session: the run comes from the store
    assert not at.exception and not at.error, at.exception
    assert any(s.value.startswith("Finished") for s in at.success)  # the Step-through page drew the kept run
    at.switch_page("app_pages/step.py")  # later reruns stay on the page it opened on (AppTest reruns its own page)
    back = at.session_state["step:session"].steps
    assert len(back) == len(steps)
    for old, new in zip(steps, back):
        assert (new.tree is None) == (old.tree is None) and new.tree_path == old.tree_path
        if old.tree is not None:
            assert torch.equal(new.tree.tokens, old.tree.tokens) and torch.equal(new.tree.parents, old.tree.parents)
            assert torch.equal(new.tree.draft_probs, old.tree.draft_probs) if old.tree.draft_probs is not None \
                else new.tree.draft_probs is None
    assert [_tree_spec(at, i) for i in tree_steps] == drawn


def test_a_live_run_with_a_token_tree_is_kept_with_its_result_and_reopens(tiny_models, store):
    # a trial found tree runs kept without their result ("no page to draw it again"): the trees did not serialise
    at = click(live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=10, k=3, tree_budget=8), "Run")
    assert not at.exception and not at.error
    (run,) = store.list_runs()
    record = store.get_run(run.id)
    assert record.payload is not None and "tree budget 8" in record.settings["drafter"]
    assert saved.can_reopen(record)
    at = click(history(), "Open on its page")
    assert not at.exception, at.exception
    assert any(c.value.startswith("Token trees:") for c in at.caption)


def test_settings_summary_names_a_dtype_without_its_module():
    from app.render_history import settings_summary

    assert settings_summary({"k": 4, "dtype": "torch.bfloat16"}) == "k 4 · dtype bfloat16"


def test_a_workload_map_is_kept_and_reopens_on_its_page(store):
    """A trial found Workload runs missing from History."""
    from app_util import app_on

    at = click(app_on("workload", loads="1,4", requests=30, output_tokens=12), "Simulate")
    assert not at.exception, at.exception
    decision = at.success[0].value
    (run,) = store.list_runs(payload=True)
    assert run.kind == "workload" and run.figures["recommended"] == run.payload["map"]["recommended"]
    assert run.figures["loads"] == "1,4" and run.settings["workload.loads"] == "1,4"
    at = click(history(), "Open on its page")
    assert not at.exception, at.exception
    assert at.success[0].value == decision  # the map drawn again, with its sentence, and where it came from
    assert any(f"Loaded from **History run #{run.id}" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) == 3
