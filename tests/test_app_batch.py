"""The Batch page: pure figure builders on hand-made sweeps, then AppTest runs with tiny models.

Figures read a sweep as its JSON dict (``SweepResult.as_dict()``), so hand-made
dicts pin the crossover logic without timing anything. The AppTest runs patch
``lab.models``'s loaders (the app's only way to models) to return tiny random
models (``app_util.tiny_models``); a whole sweep then takes seconds.
"""

from __future__ import annotations

import json
import math
import threading
from types import SimpleNamespace

import pytest
from streamlit.testing.v1 import AppTest

import lab.studies.peer
import lab.studies.batch_sweep
from app import render_batch
from app_util import app_on, click, key, started_jobs, tiny_models  # noqa: F401 (fixtures)
from lab.config import DecodeConfig
from lab.drafters import PromptLookupDrafter
from lab.studies.batch_sweep import run_sweep

RESULT_KEY = "batch:sweep"
JOB_KEY = "batch:job"
TINY_PROMPTS = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4\n---\nt7 t8 t9 t7 t8 t9 t7 t8"


# ---------------------------------------------------------------- hand-made sweeps


def mode(name: str, k: int, latency_s: float, tokens_per_s: float, differ: int | None = 0) -> dict:
    return {"mode": name, "k": k, "latency_p50_s": latency_s, "latency_p95_s": 1.2 * latency_s,
            "ttft_p50_s": 0.1, "ttft_p95_s": 0.2, "tokens_per_s": tokens_per_s, "acceptance_rate": 0.5 if k else None,
            "per_position_acceptance_rate": [0.6, 0.4] if k else [], "outputs_differ_from_batch_1": differ}


def hand_sweep(latency: list[float], throughput: list[float], sizes=(1, 2, 4, 8), auto_k=(2, 2, 1, 0)) -> dict:
    """A sweep dict whose latency and throughput speedups are the given ones (off: 1 s, 10 tokens/s)."""
    results = []
    for b, lat, tput, k in zip(sizes, latency, throughput, auto_k):
        off, on = mode("off", 0, 1.0, 10.0), mode("on", 2, 1.0 / lat, 10.0 * tput)
        results.append({
            "batch_size": b, "num_requests": max(b, 2), "latency_speedup": lat, "throughput_speedup": tput,
            "ttft_speedup": 1.0, "per_position_acceptance_rate": [0.6, 0.4], "mean_acceptance_length": 2.0,
            "outputs_differ_on_vs_off": 0, "auto_k": k, "auto_predicted_speedup": 1.1,
            "auto_latency_vs_best": 1.0, "auto_throughput_vs_best": 1.0,
            "off": off, "on": on, "auto": {**(on if k else off), "mode": "auto", "k": k},
        })
    return {"drafter": "prompt-lookup", "k": 2, "settings": {"dtype": "bfloat16", "device": "cpu"},
            "batch_sizes": list(sizes), "results": results,
            "cost_model": {"target_ms": {"1x1": 10.0, "1x3": 11.0, "8x1": 20.0, "8x3": 50.0}},
            "policy_after_sweep": {"k_by_batch_size": {str(b): k for b, k in zip(sizes, auto_k)}}}


def vertical_lines(figure) -> list[float]:
    return [s.x0 for s in figure.layout.shapes if s.type == "line" and s.x0 == s.x1 and s.xref == "x"]


def annotation_texts(figure) -> list[str]:
    return [a.text for a in figure.layout.annotations]


def test_crossover_is_marked_where_latency_speedup_drops_below_one():
    sweep = hand_sweep(latency=[1.8, 1.3, 0.9, 0.7], throughput=[1.7, 1.4, 1.1, 1.05])
    assert render_batch.crossover(sweep) == 4 and render_batch.crossover(sweep, "throughput") is None
    figure = render_batch.speedup_figure(sweep)
    latency, throughput = figure.data
    assert list(latency.y) == [1.8, 1.3, 0.9, 0.7] and list(throughput.y) == [1.7, 1.4, 1.1, 1.05]
    assert list(latency.x) == [0, 1, 2, 3]  # log2 of the batch sizes, ticks labelled with the sizes
    assert list(figure.layout.xaxis.ticktext) == ["1", "2", "4", "8"]
    assert vertical_lines(figure) == [2.0]  # log2(4): the crossover, and no throughput line
    assert any(render_batch.CROSSOVER_TEXT in t for t in annotation_texts(figure))
    assert any(s.y0 == s.y1 == 1.0 for s in figure.layout.shapes if s.type == "line")  # the line at 1x
    # throughput still gains at the crossover: the headline names the measurement mistake
    assert "invisible" in render_batch.headline(sweep) and "From batch size 4 on" in render_batch.headline(sweep)


def test_no_crossover_when_speculation_pays_at_every_batch_size():
    sweep = hand_sweep(latency=[2.0, 1.8, 1.5, 1.2], throughput=[1.9, 1.7, 1.4, 1.1])
    assert render_batch.crossover(sweep) is None
    figure = render_batch.speedup_figure(sweep)
    assert vertical_lines(figure) == []
    texts = annotation_texts(figure)
    assert not any(render_batch.CROSSOVER_TEXT in t for t in texts)
    assert any("pays for latency at every batch size" in t for t in texts)
    assert "at every batch size measured (up to 8)" in render_batch.headline(sweep)


def test_a_crossover_at_the_first_batch_size_is_said_once():
    sweep = hand_sweep(latency=[0.75, 0.6, 0.5, 0.4], throughput=[0.7, 0.6, 0.5, 0.4])
    headline = render_batch.headline(sweep)
    assert "0.75× as fast" in headline and "did not pay for latency even at batch size 1" in headline
    assert "From batch size 1 on" not in headline and headline.count("0.75") == 1


def test_throughput_crossover_elsewhere_gets_its_own_dotted_line():
    sweep = hand_sweep(latency=[1.5, 0.95, 0.8, 0.7], throughput=[1.4, 1.1, 0.9, 0.8])
    figure = render_batch.speedup_figure(sweep)
    assert sorted(vertical_lines(figure)) == [1.0, 2.0]  # latency at batch 2, throughput at batch 4
    assert "invisible" in render_batch.headline(sweep)  # at batch 2 throughput still gained 1.1x


def test_missing_numbers_do_not_break_the_figures():
    # NaN becomes None in the JSON (nothing drafted, no time measured)
    sweep = hand_sweep(latency=[1.5, 1.2], throughput=[1.4, 1.1], sizes=(1, 2), auto_k=(1, 0))
    sweep["results"][1]["latency_speedup"] = None
    sweep["results"][1]["on"]["per_position_acceptance_rate"] = []
    sweep["results"][1]["auto_latency_vs_best"] = None
    assert render_batch.crossover(sweep) is None
    assert math.isnan(render_batch.speedup_figure(sweep).data[0].y[1])
    for build in (render_batch.absolute_figure, render_batch.acceptance_figure, render_batch.policy_figure):
        build(sweep)
    assert render_batch.acceptance_spread(sweep) is None  # only one curve left
    assert render_batch.sweep_table(sweep)["per-position acceptance"].tolist() == ["0.60 0.40", "—"]


def test_acceptance_spread_and_policy_figure():
    sweep = hand_sweep(latency=[1.5, 1.2, 1.0, 0.9], throughput=[1.4, 1.1, 1.0, 0.9])
    sweep["results"][2]["on"]["per_position_acceptance_rate"] = [0.5, 0.45]
    assert render_batch.acceptance_spread(sweep) == pytest.approx(0.1)
    assert [t.name for t in render_batch.acceptance_figure(sweep).data] == ["batch 1", "batch 2", "batch 4", "batch 8"]
    policy = render_batch.policy_figure(sweep)
    bars = policy.data[0]
    assert list(bars.y) == [2, 2, 1, 0] and list(bars.text) == ["K=2", "K=2", "K=1", "off"]
    assert list(policy.data[1].y) == [2, 2, 1, 0]  # K after the whole sweep


@pytest.mark.parametrize(
    "latency_vs_best, throughput_vs_best, shares",
    [(1.0, 1.0, (1.0, 1.0)), (1.25, 0.8, (0.8, 0.8)), (None, None, (math.nan, math.nan))],
)
def test_auto_share_of_best(latency_vs_best, throughput_vs_best, shares):
    # latency is a time (auto / best >= 1), shown as best / auto so both curves read "100 % = as good"
    result = {"auto_latency_vs_best": latency_vs_best, "auto_throughput_vs_best": throughput_vs_best}
    assert render_batch.auto_share_of_best(result) == pytest.approx(shares, nan_ok=True)


def test_verify_cost_table_reads_the_cost_model():
    table = render_batch.verify_cost_table(hand_sweep([1.5] * 4, [1.4] * 4))
    assert table["batch size"].tolist() == [1, 8]
    assert table["3 tokens over 1"].tolist() == pytest.approx([1.1, 2.5])


@pytest.mark.parametrize(
    "text, message",
    [("{not json", "not JSON"), (json.dumps({"hello": 1}), "not a batch-size sweep"),
     (json.dumps({"results": [{"batch_size": 1}]}), "not a batch-size sweep"),
     (json.dumps([1, 2]), "not a batch-size sweep")],
)
def test_load_sweep_refuses_other_files(text, message):
    with pytest.raises(ValueError, match=message):
        render_batch.load_sweep(text)


# ---------------------------------------------------------------- a real sweep of tiny models


@pytest.fixture(scope="module")
def tiny_sweep(tiny_target):
    prompts = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [7, 8, 9, 7, 8, 9, 7, 8]]
    return run_sweep(tiny_target, prompts, PromptLookupDrafter(), DecodeConfig(k=3, max_new_tokens=8), (1, 2, 4))


def test_a_real_sweep_draws_and_exports(tiny_sweep, tmp_path):
    path = tmp_path / "bench.json"
    tiny_sweep.to_json(path)  # what `python -m lab bench --out` writes
    sweep = render_batch.load_sweep(path.read_text())
    assert render_batch.sweep_json(sweep) == tiny_sweep.to_json()  # export is the lab's own JSON, byte for byte
    assert render_batch.crossover(sweep) == tiny_sweep.crossover_batch_size
    speedup = render_batch.speedup_figure(sweep)
    assert list(speedup.data[0].y) == pytest.approx([r.latency_speedup for r in tiny_sweep.results])
    absolute = render_batch.absolute_figure(sweep)
    assert len(absolute.data) == 8  # off and on: p50, p95, tokens/s; auto: p50 and tokens/s as markers
    assert [t.name for t in absolute.data if t.showlegend] == ["off (target alone)", "on (K=3)", "auto (policy's K)"]
    table = render_batch.sweep_table(sweep)
    assert table["batch size"].tolist() == [1, 2, 4]
    assert table["outputs differ on vs off"].tolist() == [0, 0, 0]  # fp32 greedy: exact
    assert table["outputs differ from batch 1 (on)"].tolist() == [0, 0, 0]
    csv_lines = render_batch.sweep_csv(sweep).splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("batch size,requests,latency speedup")
    assert render_batch.outputs_differ(sweep) == {"on_vs_off": 0, "off_vs_batch_1": 0, "on_vs_batch_1": 0,
                                                  "auto_vs_batch_1": 0}
    assert render_batch.verify_cost_table(sweep)["batch size"].tolist() == [1, 2, 4]


# ---------------------------------------------------------------- AppTest with tiny models


def batch_app(**widgets):
    """The app on the Batch page with tiny settings (and any widget values given), drawn."""
    settings = dict(source="Paste prompts", pasted=TINY_PROMPTS, raw=True, max_new_tokens=8, k=3,
                    batch_sizes=[1, 2, 4]) | widgets
    return app_on("batch", **settings)


def run_clicked(at):
    return click(at, "Run sweep")


def test_batch_page_defaults_draw_without_loading(tiny_models):
    at = app_on("batch")
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Speculation against batch size"
    assert any("**Throughput** is what a server counts" in m.value and "**Latency** is what a user feels" in m.value
               for m in at.markdown)
    assert at.selectbox(key=key("batch.target")).value == "smollm2-135m"
    assert at.selectbox(key=key("batch.drafter")).value == "prompt-lookup"
    assert at.multiselect(key=key("batch.batch_sizes")).value == [1, 2, 4, 8]
    assert at.number_input(key=key("batch.max_new_tokens")).value == 32
    assert any("requests per mode" in c.value for c in at.caption)
    assert tiny_models == []


def test_batch_run_draws_the_figures_and_keeps_the_result(tiny_models):
    at = run_clicked(batch_app())
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(s.value.startswith("Swept batch sizes 1, 2, 4") for s in at.success)
    sweep = at.session_state[RESULT_KEY]
    assert render_batch.batch_sizes(sweep) == [1, 2, 4] and sweep["settings"]["target"] == "smollm2-135m"
    assert len(at.get("plotly_chart")) == 4
    assert {m.label for m in at.metric} >= {"Latency speedup at batch 1", "Crossover (latency)"}
    table = at.dataframe[-1].value
    assert table["batch size"].tolist() == [1, 2, 4]
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download JSON"]
    assert any("Greedy outputs that differ" in c.value for c in at.caption)  # fp32: shown, all zero
    assert tiny_models == ["smollm2-135m"]

    at.run()  # a rerun keeps the result and does not sweep again
    assert at.session_state[RESULT_KEY] is sweep and len(at.get("plotly_chart")) == 4
    assert tiny_models == ["smollm2-135m"]


def test_exported_json_loads_back(tiny_models, tiny_sweep):
    exported = render_batch.sweep_json(json.loads(tiny_sweep.to_json()))
    at = batch_app()
    at.file_uploader[0].set_value(("sweep.json", exported.encode(), "application/json")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Loaded from **sweep.json**: batch sizes 1, 2, 4" in i.value for i in at.info)
    loaded = at.session_state[RESULT_KEY]
    assert loaded["results"] == json.loads(exported)["results"]
    assert len(at.get("plotly_chart")) == 4 and at.dataframe[-1].value["batch size"].tolist() == [1, 2, 4]
    assert tiny_models == []


def test_bad_results_file_is_refused(tiny_models):
    at = batch_app()
    at.file_uploader[0].set_value(("notes.json", json.dumps({"hello": 1}).encode(), "application/json")).run()
    assert not at.exception
    assert any("not a batch-size sweep results file" in e.value for e in at.error)
    assert RESULT_KEY not in at.session_state


@pytest.mark.parametrize(
    "widgets, message",
    [
        (dict(pasted="  \n---\n "), "No prompts"),
        (dict(batch_sizes=[]), "No batch sizes"),
        (dict(drafter="draft-model", draft="qwen2.5-coder-0.5b"), "tokenizer"),  # SmolLM2 target, Qwen draft
    ],
)
def test_batch_errors_are_shown(tiny_models, widgets, message):
    at = run_clicked(batch_app(**widgets))
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert RESULT_KEY not in at.session_state


def upload(at: AppTest, sweep: dict) -> AppTest:
    return at.file_uploader[0].set_value(("sweep.json", json.dumps(sweep).encode(), "application/json")).run()


def test_bf16_outputs_that_differ_are_explained_as_rounding(tiny_models):
    sweep = hand_sweep(latency=[1.5, 1.2, 0.9, 0.8], throughput=[1.4, 1.1, 1.0, 0.9])
    sweep["results"][3]["on"]["outputs_differ_from_batch_1"] = 2  # a near-tie flipped at batch 8
    at = upload(batch_app(), sweep)
    assert not at.exception and not at.error
    (warning,) = [w.value for w in at.warning if "Greedy outputs that differ" in w.value]
    assert "on **2**" in warning and "rounding, not a bug" in warning and "fp32" in warning


def test_verify_costs_below_one_are_called_noise(tiny_models):
    sweep = hand_sweep(latency=[1.5, 1.2, 0.9, 0.8], throughput=[1.4, 1.1, 1.0, 0.9])
    sweep["cost_model"]["target_ms"]["8x3"] = 15.0  # 3 tokens per row cheaper than 1: impossible but for noise
    at = upload(batch_app(), sweep)
    assert not at.exception and not at.error
    assert any("timing noise" in c.value for c in at.caption)


# ---------------------------------------------------------------- cancel


@pytest.fixture
def cancel_during_run_batch(monkeypatch, started_jobs):
    """Cancel the page's job (as the Cancel button's on_click does) while a chosen ``run_batch`` call runs.

    Yields (choose, calls): ``choose(predicate)`` picks the call, ``predicate(calls)`` seeing the number of prompt
    rows of every call so far (the warm-up's two calls first); calls is that list.
    """
    real_run_batch = lab.studies.batch_sweep.run_batch
    calls, chosen = [], [lambda rows: False]

    def run_batch_then_cancel(target, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if chosen[0](calls):
            started_jobs[-1].cancel("you pressed Cancel")  # what the Cancel button's on_click does
        return real_run_batch(target, prompts, *args, **kwargs)

    monkeypatch.setattr(lab.studies.batch_sweep, "run_batch", run_batch_then_cancel)
    yield lambda predicate: chosen.__setitem__(0, predicate), calls


def at_call(n: int):
    return lambda calls: len(calls) == n


def first_batch_of_size(size: int, after: int = 2):
    """The first call with ``size`` rows after the first ``after`` calls (the warm-up's two)."""
    return lambda calls: len(calls) > after and calls[-1] == size and size not in calls[after:-1]


def test_cancel_keeps_the_batch_sizes_that_finished(tiny_models, cancel_during_run_batch):
    cancel_when, calls = cancel_during_run_batch
    cancel_when(first_batch_of_size(2))  # two prompts: batch size 2 is one batch; it finishes, 4 never starts
    at = run_clicked(batch_app())
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert 4 not in calls[2:]  # the sweep stopped before batch size 4's batch
    sweep = at.session_state[RESULT_KEY]
    assert render_batch.batch_sizes(sweep) == [1, 2]
    assert sweep["settings"]["status"] == "cancelled" and sweep["settings"]["batch_sizes_planned"] == [1, 2, 4]
    (warning,) = [w.value for w in at.warning if w.value.startswith("Cancelled")]
    assert warning.startswith("Cancelled: a partial sweep. Batch sizes 1, 2 of 1, 2, 4 finished; 4 did not run.")
    assert "hold the finished batch sizes only" in warning
    assert not at.success  # not "Swept batch sizes …": it is labelled partial
    assert len(at.get("plotly_chart")) == 4 and at.dataframe[-1].value["batch size"].tolist() == [1, 2]
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download JSON"]
    assert JOB_KEY not in at.session_state and not [b for b in at.button if b.label == "Cancel"]

    exported = render_batch.sweep_json(sweep)  # what Download JSON writes: it loads back, still marked partial
    at = upload(at, json.loads(exported))
    assert any("Loaded from **sweep.json**: batch sizes 1, 2" in i.value for i in at.info)
    assert any(w.value.startswith("Cancelled: a partial sweep. Batch sizes 1, 2 of 1, 2, 4") for w in at.warning)


def test_cancel_before_any_batch_size_finished_keeps_nothing(tiny_models, cancel_during_run_batch):
    cancel_when, calls = cancel_during_run_batch
    cancel_when(at_call(3))  # the warm-up decodes twice; the third decode is batch size 1's first batch
    at = run_clicked(batch_app(pasted=TINY_PROMPTS))  # two prompts: two batches at batch size 1
    assert not at.exception and not at.error, [e.value for e in at.error]
    (warning,) = [w.value for w in at.warning if w.value.startswith("Cancelled")]
    assert warning.startswith("Cancelled during batch size 1: batch 1/2")
    assert "before any batch size finished: nothing to show" in warning and "Run again" in warning
    assert len(calls) <= 2 + 3  # the warm-up and one batch in each mode (off, on, maybe auto): no second batch
    assert RESULT_KEY not in at.session_state and JOB_KEY not in at.session_state
    assert not at.success and not at.get("plotly_chart")
    assert not any(c.value.startswith("No sweep yet") for c in at.caption)  # the notice says what to do instead
    assert not [b for b in at.button if b.label == "Cancel"]  # drawn only while sweeping

    at.run()  # the notice stays until the next sweep
    assert any(w.value.startswith("Cancelled") for w in at.warning)
    cancel_when(lambda calls: False)
    at = run_clicked(at)  # the flag is reset at the start of a sweep: this one runs to the end
    assert any(s.value.startswith("Swept batch sizes 1, 2, 4") for s in at.success)
    assert not any(w.value.startswith("Cancelled") for w in at.warning)


def test_a_sweep_cancelled_before_its_first_batch_size_leaves_the_previous_one_shown(tiny_models,
                                                                                    cancel_during_run_batch):
    cancel_when, calls = cancel_during_run_batch
    at = run_clicked(batch_app())
    previous = at.session_state[RESULT_KEY]
    cancel_when(at_call(len(calls) + 3))
    at = run_clicked(at)
    assert not at.exception and not at.error
    (warning,) = [w.value for w in at.warning if w.value.startswith("Cancelled")]
    assert "The sweep shown below is the previous one." in warning
    assert at.session_state[RESULT_KEY] is previous and len(at.get("plotly_chart")) == 4


def hand_over(at: AppTest, result: dict | None, cancelled: str | None,
              where: str = "batch size 2: batch 1/1") -> AppTest:
    """What a sweep that ended while nobody watched leaves: its ``app.background.Job``, done."""
    done = threading.Event()
    done.set()
    at.session_state[JOB_KEY] = SimpleNamespace(done=done, result=result, cancelled=cancelled, error=None,
                                                partial={"where": where}, load=None)
    return at.run()


@pytest.mark.parametrize(
    "status, cancelled, headline",
    [("cancelled", "you pressed Cancel", "Cancelled: a partial sweep"),
     # a sweep kept before sweeps went on in the background, reopened: a rerun had stopped it
     ("stopped", None, "Stopped because the page reran while sweeping (an input changed): a partial sweep")],
)
def test_a_sweep_that_ended_unwatched_is_taken_over_with_its_finished_batch_sizes(tiny_models, tiny_sweep, status,
                                                                                    cancelled, headline):
    partial = json.loads(tiny_sweep.to_json())
    partial["results"] = partial["results"][:2]
    partial["settings"] |= {"status": status}
    at = hand_over(batch_app(), partial, cancelled)
    assert not at.exception and not at.error
    assert at.session_state[RESULT_KEY] is partial and JOB_KEY not in at.session_state
    assert partial["settings"]["status"] == status
    assert any(w.value.startswith(f"{headline}. Batch sizes 1, 2 of 1, 2, 4 finished; 4 did not run.")
               for w in at.warning), [w.value for w in at.warning]
    if cancelled:
        assert any("It was cancelled because you pressed Cancel." in w.value for w in at.warning)
    assert at.dataframe[-1].value["batch size"].tolist() == [1, 2]


def test_a_sweep_cancelled_with_nothing_finished_says_where_and_why(tiny_models):
    at = hand_over(batch_app(), None, "you pressed Cancel", where="batch size 2: batch 1/1 (60 % of the sweep done)")
    assert not at.exception and not at.error
    assert any(w.value.startswith("Cancelled during batch size 2: batch 1/1") and "nothing to show" in w.value
               and "because you pressed Cancel" in w.value for w in at.warning), [w.value for w in at.warning]
    assert JOB_KEY not in at.session_state and RESULT_KEY not in at.session_state


def test_a_sweep_that_finished_before_it_could_stop_is_kept(tiny_models, tiny_sweep):
    result = json.loads(tiny_sweep.to_json())
    at = hand_over(batch_app(), result, cancelled="you pressed Cancel", where="done")
    assert not at.exception and not at.error
    assert at.session_state[RESULT_KEY] is result and not at.warning
    assert any(s.value.startswith("Swept batch sizes 1, 2, 4") for s in at.success)


# ---------------------------------------------------------------- the peer: transformers at batch 1


PEER = {"k": 3, "num_prompts": 4, "ours_baseline_tokens_per_s": 10.0, "ours_speculative_tokens_per_s": 18.0,
        "speedup": 1.8, "hf_greedy_tokens_per_s": 12.0, "hf_assisted_tokens_per_s": 12.0, "hf_speedup": 1.0,
        "ratio_ours_vs_hf_assisted": 1.5, "ratio_ours_vs_hf_assisted_median": 1.4,
        "ours_tokens_per_target_pass": 2.5, "hf_tokens_per_target_pass": 2.4, "speculative_identical_to_baseline": 4,
        "baseline_identical_to_hf_greedy": 3, "hf_assisted_identical_to_hf_greedy": 4,
        "mismatches": [{"prompt": "spec_bench/7", "pair": "baseline_vs_hf_greedy", "first_difference_at": 11}],
        "settings": {"drafter": "prompt-lookup n=1..3", "dtype": "bfloat16", "torch_threads": 2}}


def test_peer_table_and_identical_counts():
    table = render_batch.peer_table(PEER)
    assert table["decoder"].tolist() == ["ours (lab.decode)", "transformers' assisted generation"]
    assert table["speculative tokens/s"].tolist() == [18.0, 12.0]
    assert table["speedup over its own greedy"].tolist() == [1.8, 1.0]
    assert render_batch.peer_identical_text(PEER) == (
        "ours speculative = ours alone: 4/4; ours alone = transformers' greedy: 3/4; "
        "transformers' assisted = its greedy: 4/4")
    assert render_batch.peer({"peer_batch_1": None}) is None and render_batch.peer({}) is None


def metric_values(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_a_loaded_sweep_with_a_peer_shows_ours_against_transformers(tiny_models):
    sweep = hand_sweep(latency=[1.5, 1.2, 0.9, 0.8], throughput=[1.4, 1.1, 1.0, 0.9]) | {"peer_batch_1": PEER}
    at = upload(batch_app(), sweep)
    assert not at.exception and not at.error
    assert "Against transformers' assisted generation at batch 1" in [s.value for s in at.subheader]
    metrics = metric_values(at)
    assert metrics["Ours, speculative"] == "18.0 tokens/s"
    assert metrics["transformers' assisted generation"] == "12.0 tokens/s"
    assert metrics["Ours / theirs"] == "1.50×"
    (caption,) = [c.value for c in at.caption if "prompts, one at a time" in c.value]
    assert "ours alone = transformers' greedy: 3/4" in caption
    assert "Differ: ours alone vs transformers' greedy on spec_bench/7 from token 11." in caption
    peer_table = [d.value for d in at.dataframe if "decoder" in d.value.columns]
    assert len(peer_table) == 1 and peer_table[0]["speedup over its own greedy"].tolist() == [1.8, 1.0]


def test_a_loaded_sweep_says_why_the_peer_was_skipped(tiny_models):
    sweep = hand_sweep(latency=[1.5, 1.2, 0.9, 0.8], throughput=[1.4, 1.1, 1.0, 0.9])
    at = upload(batch_app(), sweep | {"peer_batch_1": {"skipped": "drafter x has no counterpart in transformers"}})
    assert any(i.value == "The peer was not run: drafter x has no counterpart in transformers." for i in at.info)
    assert "Ours / theirs" not in metric_values(at)
    at = upload(at, sweep)  # no peer in the file: no section
    assert "Against transformers' assisted generation at batch 1" not in [s.value for s in at.subheader]


def test_the_page_runs_the_peer_on_request(tiny_models):
    at = batch_app(batch_sizes=[1, 2])
    (checkbox,) = [c for c in at.checkbox if c.label.startswith("Also run transformers' assisted generation")]
    assert checkbox.value is False  # slow: off by default
    checkbox.check()
    at.run()
    assert any("Then the peer: four decodes of every prompt at batch 1" in c.value for c in at.caption)
    at = run_clicked(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    found = at.session_state[RESULT_KEY]["peer_batch_1"]
    assert found["k"] == 3 and found["num_prompts"] == 2 and found["settings"]["target"] == "smollm2-135m"
    # fp32 tiny models with peaked logits: every decoder agrees token for token
    assert found["speculative_identical_to_baseline"] == found["baseline_identical_to_hf_greedy"] == 2
    assert found["hf_assisted_identical_to_hf_greedy"] == 2
    assert "Ours / theirs" in metric_values(at)
    assert any("transformers' assisted = its greedy: 2/2" in c.value for c in at.caption)


def test_cancel_during_the_peer_keeps_the_sweep(tiny_models, started_jobs, monkeypatch):
    real_peer = lab.studies.peer.run_peer_comparison

    def peer_then_cancel(*args, **kwargs):
        started_jobs[-1].cancel("you pressed Cancel")  # clicked once the sweep had finished, while the peer ran
        return real_peer(*args, **kwargs)

    monkeypatch.setattr(lab.studies.peer, "run_peer_comparison", peer_then_cancel)
    at = run_clicked(batch_app(batch_sizes=[1, 2], peer=True))
    assert not at.exception and not at.error
    sweep = at.session_state[RESULT_KEY]
    assert sweep["settings"]["status"] == "complete" and render_batch.batch_sizes(sweep) == [1, 2]
    assert sweep["peer_batch_1"] == {"skipped": "cancelled before it finished (the sweep itself finished and is shown)"}
    assert any(s.value.startswith("Swept batch sizes 1, 2") for s in at.success)
    assert any(i.value.startswith("The peer was not run: cancelled before it finished") for i in at.info)


# ---------------------------------------------------------------- constrained sweeps


def test_constraint_and_valid_outputs_are_shown(tiny_models):
    sweep = hand_sweep(latency=[1.5, 1.2], throughput=[1.4, 1.1], sizes=(1, 2), auto_k=(2, 0))
    sweep["settings"]["constraint"] = {"kind": "regex", "source": "t[0-9]+( t[0-9]+)*", "mode": "exact"}
    for r, valid in zip(sweep["results"], (2, 1)):
        for name in render_batch.MODES:
            r[name] |= {"outputs_valid": valid, "num_requests": 2}
    assert render_batch.outputs_valid(sweep) == {"off": (3, 4), "on": (3, 4), "auto": (3, 4)}
    at = upload(batch_app(), sweep)
    assert not at.exception and not at.error
    assert any("constrained to regex `t[0-9]+( t[0-9]+)*`" in i.value for i in at.info)
    (caption,) = [c.value for c in at.caption if c.value.startswith("Every output was constrained")]
    assert "off **3** of 4, on **3** of 4, auto **3** of 4" in caption
    assert at.dataframe[-1].value["outputs valid (on)"].tolist() == [2, 1]
    assert render_batch.outputs_valid(hand_sweep([1.5], [1.4], sizes=(1,), auto_k=(2,))) is None
