"""The serving client against a real engine: llama.cpp's llama-server on 127.0.0.1 with tiny GGUFs made here.

Three servers of one tiny random target (tests/tiny_gguf.py): drafted by an
identical model (every draft token accepted, greedy), by a model of another
seed (almost none accepted), and alone (speculation off). The engine's own
/metrics counters, diffed over a run, must agree with what the server reports
per request (``timings.draft_n`` / ``draft_n_accepted``), and the client's
latencies must contain the server's own timings.

Skipped, with the reason, only when the llama-server binary is absent:
``bash scripts/build_llama_server.sh`` builds it (``make test`` does, once per machine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab.serving.llama_server import BUILD_COMMAND, LlamaServer, find_server_binary, server_binary
from lab.prompts import Prompt
from lab.studies.serve_bench import run_serve_bench
from lab.serving.client import Endpoint, RequestSettings, ServeError
from tiny_gguf import write_tiny_gguf

pytestmark = [
    pytest.mark.llama_server,
    pytest.mark.skipif(find_server_binary() is None,
                       reason=f"llama-server not built (expected at {server_binary()}); run `{BUILD_COMMAND}`"),
]

K = 4
MAX_TOKENS = 24
PROMPTS = [Prompt("tiny/1", "test", "The quick brown fox jumps over the lazy dog."),
           Prompt("tiny/2", "test", "Summarize: the meeting moved to Tuesday."),
           Prompt("tiny/3", "test", "def add(a, b):")]
SETTINGS = RequestSettings(max_tokens=MAX_TOKENS, timeout_s=60)


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(folder / "target.gguf", seed=0), write_tiny_gguf(folder / "other.gguf", seed=1)


@pytest.fixture(scope="module")
def servers(tiny_ggufs):
    """name -> running LlamaServer: "same" (draft == target), "other" (random draft), "off" (no draft)."""
    target, other = tiny_ggufs
    running = {}
    try:
        for name, draft in (("same", target), ("other", other), ("off", None)):
            running[name] = LlamaServer(target, draft, draft_max=K, parallel=2, ctx_per_slot=256, threads=1,
                                        alias="tiny").start(timeout_s=120)
        yield running
    finally:
        for server in running.values():
            server.stop()


def sweep(server: LlamaServer, levels=(1,), label="on", **kwargs):
    return run_serve_bench([Endpoint(server.url, label=label)], PROMPTS, list(levels), SETTINGS, rounds=1, **kwargs)


def only_level(bench) -> dict:
    (row,) = bench.rows()
    return row


def test_identical_draft_is_always_accepted_and_counters_match_per_request(servers):
    bench = sweep(servers["same"])
    assert bench.engines["on"] == {"engine": "llama.cpp", "models": ["tiny"], "model": "tiny", "metrics": True}
    row = only_level(bench)
    assert row["completed"] == len(PROMPTS) and row["failed"] == 0
    assert row["spec_decode_source"] == "metrics"
    assert row["spec_decode_acceptance_rate"] == 100.0
    assert row["spec_decode_accepted_tokens"] == row["spec_decode_draft_tokens"] > 0
    # the counter diff is exactly the sum of what the server reported per request
    assert row["spec_decode_draft_tokens"] == row["request_draft_tokens"]
    assert row["spec_decode_accepted_tokens"] == row["request_accepted_tokens"]
    per_position = row["spec_decode_per_position_acceptance_rates"]
    assert len(per_position) == K and per_position[0] == 1.0
    # per position: counts add up to the accepted tokens; a draft cut short by the token budget lowers the last ones
    run = bench.runs[0]
    assert sum(run.counters.accepted_per_position) == run.counters.num_accepted_tokens
    assert all(a >= b for a, b in zip(per_position, per_position[1:]))
    assert row["spec_decode_acceptance_length"] == pytest.approx(1 + sum(per_position))
    assert row["spec_decode_acceptance_length"] > 1 + 0.8 * K


def test_random_draft_is_almost_never_accepted(servers):
    row = only_level(sweep(servers["other"]))
    assert row["spec_decode_source"] == "metrics" and row["spec_decode_draft_tokens"] > 0
    assert row["spec_decode_acceptance_rate"] < 10.0
    assert row["spec_decode_acceptance_length"] < 1.4
    assert row["spec_decode_draft_tokens"] == row["request_draft_tokens"]
    assert row["spec_decode_accepted_tokens"] == row["request_accepted_tokens"]


def test_speculation_off_says_nothing_was_drafted(servers):
    row = only_level(sweep(servers["off"], label="off"))
    assert row["completed"] == len(PROMPTS)
    assert row["spec_decode_source"] is None and row["spec_decode_draft_tokens"] is None
    assert row["spec_decode_note"] == "no tokens drafted during this run (the engine's counters did not move)"


def test_latency_fields_agree_with_the_servers_own_timings(servers):
    bench = sweep(servers["same"])
    for record in bench.runs[0].records:
        assert record.ok and record.output_tokens == MAX_TOKENS  # ignore_eos: the whole budget, as usage says
        assert record.input_tokens > 5
        server_ms = record.server_prompt_ms + record.server_predicted_ms
        # the client waits for everything the server timed, plus HTTP and scheduling
        assert record.e2el_ms >= server_ms
        assert record.e2el_ms - server_ms < 1000
        assert record.ttft_ms >= record.server_prompt_ms
        assert record.ttft_ms <= record.e2el_ms
        assert len(record.itl_ms) == MAX_TOKENS - 1  # llama-server streams one event per token
        assert sum(record.itl_ms) == pytest.approx(record.e2el_ms - record.ttft_ms, abs=50)
        assert record.tpot_ms == pytest.approx((record.e2el_ms - record.ttft_ms) / (MAX_TOKENS - 1))


def test_on_off_sweep_at_two_levels_gives_the_comparison(servers):
    bench = run_serve_bench([Endpoint(servers["same"].url, api="chat"), Endpoint(servers["off"].url, api="chat")],
                            PROMPTS, [1, 2], SETTINGS, rounds=1)
    assert bench.stopped == "" and bench.levels() == [1, 2]
    assert [(r.label, r.concurrency) for r in bench.runs] == [("on", 1), ("off", 1), ("off", 2), ("on", 2)]
    comparison = bench.comparison()
    assert [row["max_concurrency"] for row in comparison] == [1, 2]
    assert all(row["latency_speedup"] > 0 and row["throughput_speedup"] > 0 for row in comparison)
    on_rows = [row for row in bench.rows() if row["label"] == "on"]
    assert all(row["spec_decode_acceptance_rate"] == 100.0 for row in on_rows)
    data = json.loads(bench.to_json())
    assert data["levels"][0]["requests"][0]["ok"] is True


def test_a_model_the_server_does_not_serve_is_refused_before_sending(servers):
    with pytest.raises(ServeError, match="does not serve the model 'gpt-4': it serves tiny"):
        run_serve_bench([Endpoint(servers["off"].url, model="gpt-4")], PROMPTS, [1], SETTINGS)


def test_a_request_the_server_refuses_is_reported_and_the_level_goes_on(servers):
    too_long = Prompt("long", "test", "lorem ipsum dolor " * 200)  # more tokens than a slot's 256-token context
    bench = run_serve_bench([Endpoint(servers["off"].url)], [too_long, PROMPTS[0]], [1], SETTINGS, rounds=1)
    row = only_level(bench)
    assert (row["completed"], row["failed"]) == (1, 1) and bench.stopped == ""
    (error,) = row["errors"]
    assert error.startswith(f"{servers['off'].url}/v1/completions: HTTP 400 (client error): ")
    assert "context" in error


def test_cli_serve_bench_json(servers):
    out = subprocess.run(
        [sys.executable, "-m", "lab", "serve-bench", "--on", servers["same"].url, "--off", servers["off"].url,
         "--concurrency", "1,2", "--prompts", "summarization:2", "--max-tokens", "8", "--rounds", "1", "--json"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"settings", "engines", "levels", "comparison", "crossover_concurrency"} <= data.keys()
    assert [(row["label"], row["max_concurrency"]) for row in data["levels"]] == [("on", 1), ("off", 1), ("off", 2), ("on", 2)]
    assert "requests" not in data["levels"][0]  # --json prints summaries; --out keeps the records
    assert data["levels"][0]["spec_decode_acceptance_rate"] == 100.0
    assert data["engines"]["on"]["engine"] == "llama.cpp"


def test_serve_page_runs_and_cancel_keeps_the_finished_levels(servers, monkeypatch):
    import streamlit as st

    import lab.studies.serve_bench
    from app_util import app_on, click

    real_run_level = lab.studies.serve_bench.run_level

    async def run_level_then_cancel(client, endpoint, model, prompts, concurrency, *args, **kwargs):
        if concurrency == 2:
            st.session_state["serve:cancel_requested"] = True  # what the Cancel button's callback does
        return await real_run_level(client, endpoint, model, prompts, concurrency, *args, **kwargs)

    monkeypatch.setattr(lab.studies.serve_bench, "run_level", run_level_then_cancel)
    at = app_on("serve", on_url=servers["same"].url, off_url=servers["off"].url, levels=[1, 2, 4], max_tokens=8,
                rounds=1)
    at = click(at, "Run sweep")
    assert not at.exception and not at.error, [e.value for e in at.error]
    bench = at.session_state["serve:bench"]
    assert [(row["label"], row["max_concurrency"]) for row in bench["levels"]] == [("on", 1), ("off", 1)]
    assert bench["stopped"] == "cancelled at concurrency 2 (off); finished levels are kept"
    assert any(w.value.startswith("Ended early: cancelled at concurrency 2") for w in at.warning)
    assert len(at.get("plotly_chart")) == 4
    assert at.dataframe[-1].value["acceptance rate (%)"].tolist()[0] == 100.0
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download JSON"]
    assert "serve:in_flight" not in at.session_state


def test_serve_page_sends_the_prompts_of_an_uploaded_jsonl_file(servers):
    from app_util import app_on, click

    lines = [{"id": "a", "category": "support", "prompt": "Reset my password, please."},
             {"id": "b", "category": "support", "prompt": "Where is my order?"}]
    at = app_on("serve", on_url=servers["same"].url, off_url="", levels=[1], max_tokens=8, rounds=1)
    jsonl = "\n".join(json.dumps(line) for line in lines).encode()
    at = at.file_uploader[1].set_value(("traffic.jsonl", jsonl, "application/json")).run()
    at = click(at, "Run sweep")
    assert not at.exception and not at.error, [e.value for e in at.error]
    bench = at.session_state["serve:bench"]
    assert bench["settings"]["prompts"] == ["traffic/a", "traffic/b"]
    assert [row["completed"] for row in bench["levels"]] == [2]
