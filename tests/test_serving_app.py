"""The Serve page: pure figure builders on a hand-made bench, and AppTest runs of its error paths and loading.

A run against a real engine (llama-server) is in tests/test_serving_llama_server.py;
here the only server is test_serving's fake one, which only fails.
"""

from __future__ import annotations

import json
import threading
import http.server

import pytest

from app import render_serve
from app_util import app_on, click, key
from lab.studies.serve_bench import LevelRun, ServeBench
from lab.serving.client import RequestRecord
from test_serving import FailingHandler, closed_port

RESULT_KEY = "serve:bench"


def run(label: str, concurrency: int, e2el_ms: float, tokens: int, per_position=(0.9, 0.7)) -> LevelRun:
    records = [RequestRecord(f"p{i}", ok=True, ttft_ms=50, e2el_ms=e2el_ms, itl_ms=[10, 12], input_tokens=9,
                             output_tokens=tokens) for i in range(2)]
    from lab.serving.counters import SpecCounters

    counters = None if label == "off" else SpecCounters("llama.cpp", num_drafts=10, num_draft_tokens=30,
                                                        num_accepted_tokens=16,
                                                        accepted_per_position=tuple(10 * p for p in per_position))
    return LevelRun(label, concurrency, records, duration_s=1.0, counters=counters)


def hand_bench() -> dict:
    """Speculation wins at 1 and 2 and loses latency from 4 on (throughput still up at 4)."""
    bench = ServeBench(settings={"endpoints": [{"label": "on"}, {"label": "off"}], "prompts": ["a", "b"],
                                 "max_tokens": 16, "load_average_1m_before": 0.5},
                       engines={"on": {"engine": "llama.cpp", "model": "m", "metrics": True},
                                "off": {"engine": "llama.cpp", "model": "m", "metrics": True}})
    for level, (on_ms, off_ms, on_tokens, off_tokens) in {1: (400, 800, 16, 16), 2: (600, 900, 16, 16),
                                                          4: (1200, 1000, 30, 20)}.items():
        bench.runs += [run("on", level, on_ms, on_tokens), run("off", level, off_ms, off_tokens)]
    return bench.as_dict()


def test_figures_mark_the_crossover_and_read_acceptance():
    bench = hand_bench()
    assert bench["crossover_concurrency"] == 4 and bench["throughput_crossover_concurrency"] is None
    speedup = render_serve.speedup_figure(bench)
    assert list(speedup.data[0].y) == pytest.approx([2.0, 1.5, 1000 / 1200])
    assert any("crossover" in (a.text or "") and "4" in a.text for a in speedup.layout.annotations)
    acceptance = render_serve.acceptance_figure(bench)
    assert [t.name for t in acceptance.data] == ["on, concurrency 1", "on, concurrency 2", "on, concurrency 4"]
    assert list(acceptance.data[0].y) == pytest.approx([0.9, 0.7])
    assert "From concurrency 4 on it made the median request slower (0.83×)" in render_serve.headline(bench)
    table = render_serve.summary_table(bench)
    assert table["concurrency"].tolist() == [1, 2, 4, 1, 2, 4]
    assert table["acceptance rate (%)"].tolist()[:3] == pytest.approx([16 / 30 * 100] * 3)
    assert "unavailable" in table["note"].tolist()[-1]  # off has no counters
    assert render_serve.summary_csv(bench).splitlines()[0].startswith("label,max_concurrency,completed")


def test_load_bench_refuses_other_files():
    with pytest.raises(ValueError, match="not a serve bench"):
        render_serve.load_bench(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="not JSON"):
        render_serve.load_bench("{")


def serve_app(**widgets):
    return app_on("serve", **widgets)


def test_serve_page_defaults_draw():
    at = serve_app()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Speculation on a serving engine"
    assert at.text_input(key=key("serve.on_url")).value == "http://127.0.0.1:8080"
    assert at.multiselect(key=key("serve.levels")).value == [1, 2, 4, 8]
    assert any("No sweep yet" in c.value for c in at.caption)


def test_a_refused_endpoint_is_an_error_in_words():
    port = closed_port()
    at = click(serve_app(on_url=f"http://127.0.0.1:{port}", off_url=""), "Run sweep")
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert error == f"http://127.0.0.1:{port}: cannot connect (connection refused); is the server running at this address?"
    assert RESULT_KEY not in at.session_state


@pytest.fixture
def failing_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_model_the_server_does_not_serve_is_refused(failing_url):
    at = click(serve_app(on_url=failing_url, off_url=failing_url, model="nope"), "Run sweep")
    (error,) = [e.value for e in at.error]
    assert error == f"{failing_url} does not serve the model 'nope': it serves served-model"


def test_a_server_that_fails_every_request_stops_the_sweep_cleanly(failing_url):
    at = click(serve_app(on_url=failing_url, off_url=failing_url, levels=[1, 2]), "Run sweep")
    assert not at.exception and not at.error
    (warning,) = [w.value for w in at.warning]
    assert warning.startswith("Nothing finished: every request to on at concurrency 1 failed: ")
    assert "HTTP 500 (server error): CUDA out of memory" in warning


def test_a_loaded_bench_draws_everything():
    at = serve_app()
    at = at.file_uploader[0].set_value(("bench.json", json.dumps(hand_bench()).encode(), "application/json")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(i.value.startswith("Loaded from **bench.json**") for i in at.info)
    assert {m.label: m.value for m in at.metric}["Crossover (latency)"] == "concurrency 4"
    assert len(at.get("plotly_chart")) == 4
    assert at.dataframe[-1].value["concurrency"].tolist() == [1, 2, 4, 1, 2, 4]
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download JSON"]


def test_lab_table_sits_beside_the_engine_at_its_lowest_level():
    bench = hand_bench()
    assert render_serve.lab_table(bench) is None
    bench["lab"] = {"precision": "bf16", "k": 4, "tokens_per_s_off": 1.0, "tokens_per_s_on": 1.5, "speedup": 1.5,
                    "acceptance_rate": 0.5, "mean_acceptance_length": 2.6, "per_position_acceptance": [0.8, 0.4]}
    table = render_serve.lab_table(bench)
    assert table["engine"].tolist() == ["the server, concurrency 1", "the lab (bf16, K=4)"]
    assert table["speedup"].tolist() == [1.0, 1.5]  # the hand-made server: 16 tokens in 1 s either way at 1
    assert table["acceptance rate (%)"].tolist() == pytest.approx([16 / 30 * 100, 50.0])
    assert table["per-position acceptance"].tolist() == ["0.90 0.70", "0.80 0.40"]


def test_a_malformed_jsonl_file_of_prompts_is_refused_in_words():
    at = serve_app()
    at = at.file_uploader[1].set_value(("traffic.jsonl", b'{"id": 1, "text": "no prompt field"}\n', "text/plain")).run()
    (error,) = [e.value for e in at.error]
    assert "traffic.jsonl:1: a prompt line requires a JSON object with 'prompt'" in error
