"""The serving client's pure parts (metrics, chunks, summaries) and its error paths against a tiny in-process server.

The fake server here only ever fails (refuses, errors, stalls, serves another
model): what a working engine sends is checked against a real llama-server in
tests/test_serving_llama_server.py.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import socket
import threading
import time

import httpx
import pytest

from app_util import tiny_models  # noqa: F401 (a fixture)
from lab.prompts import Prompt
from lab.metrics import percentile
from lab.studies.serve_bench import LevelRun, ServeBench, run_serve_bench, summarize
from lab.serving.counters import SpecCounters, counters_between, parse_metrics
from lab.serving.client import (
    Endpoint,
    RequestRecord,
    RequestSettings,
    ServeError,
    accepted_per_position_from_histogram,
    chunk_text,
    http_error_message,
    read_spec_fields,
    request_body,
    stream_request,
)

VLLM_METRICS = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 10.0
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 60.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="m"} 20.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="m"} 10.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 16.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 12.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 12.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""

LLAMACPP_METRICS = """\
# HELP llamacpp:spec_decode_num_draft_tokens_total Speculative: Total draft tokens generated
# TYPE llamacpp:spec_decode_num_draft_tokens_total counter
llamacpp:spec_decode_num_draft_tokens_total 12
# HELP llamacpp:spec_decode_num_accepted_tokens_total Speculative: Total draft tokens accepted by the target model
# TYPE llamacpp:spec_decode_num_accepted_tokens_total counter
llamacpp:spec_decode_num_accepted_tokens_total 3
# HELP llamacpp:spec_decode_num_drafts_total Speculative: Total speculative decoding verification steps
# TYPE llamacpp:spec_decode_num_drafts_total counter
llamacpp:spec_decode_num_drafts_total 4
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""

SGLANG_METRICS = """\
# TYPE sglang:spec_accept_length gauge
sglang:spec_accept_length{model_name="m",tp_rank="0"} 2.5
# TYPE sglang:spec_accept_rate gauge
sglang:spec_accept_rate{model_name="m",tp_rank="0"} 0.5
"""


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "text, engine, drafts, drafted, accepted, per_position",
    [
        # two engines behind one vLLM server add up; positions come from engine 0 only
        (VLLM_METRICS, "vllm", 20, 80, 40, (16, 12, 12)),
        # llama.cpp without the per-position family (no draft yet has reached it)
        (LLAMACPP_METRICS, "llama.cpp", 4, 12, 3, ()),
    ],
)
def test_parse_metrics_sums_counters_over_labels(text, engine, drafts, drafted, accepted, per_position):
    snapshot = parse_metrics(text)
    assert snapshot.engine == engine
    counters = snapshot.counters
    assert (counters.num_drafts, counters.num_draft_tokens, counters.num_accepted_tokens) == (drafts, drafted, accepted)
    assert counters.accepted_per_position == per_position


def test_parse_metrics_reads_sglang_gauges_and_no_counters():
    snapshot = parse_metrics(SGLANG_METRICS)
    assert snapshot.engine == "sglang"
    assert snapshot.counters is None
    assert snapshot.gauges == {"spec_accept_length": 2.5, "spec_accept_rate": 0.5}


def test_parse_metrics_of_an_unknown_engine_is_empty():
    snapshot = parse_metrics("# TYPE http_requests_total counter\nhttp_requests_total 7\n")
    assert (snapshot.engine, snapshot.counters, dict(snapshot.gauges)) == ("", None, {})


def test_counters_diff_follows_vllm_conventions():
    before = parse_metrics(LLAMACPP_METRICS)
    after = parse_metrics(VLLM_METRICS.replace("vllm:", "llamacpp:"))
    diff = counters_between(before, after)
    # 20-4 drafts, 80-12 drafted, 40-3 accepted; positions padded from nothing
    assert (diff.num_drafts, diff.num_draft_tokens, diff.num_accepted_tokens) == (16, 68, 37)
    assert diff.acceptance_rate == pytest.approx(37 / 68)
    assert diff.mean_acceptance_length == pytest.approx(1 + 37 / 16)
    assert diff.per_position_acceptance == pytest.approx([1.0, 0.75, 0.75])
    assert counters_between(before, parse_metrics(SGLANG_METRICS)) is None


def test_nothing_drafted_gives_nan_not_zero():
    empty = SpecCounters("vllm")
    assert math.isnan(empty.acceptance_rate) and math.isnan(empty.mean_acceptance_length)
    assert empty.per_position_acceptance == []


@pytest.mark.parametrize(
    "histogram, expected",
    [
        ([39, 1, 0, 3], [4, 3, 3]),  # vLLM's own example: 1 step accepted 1, 3 steps accepted all 3
        ([5, 0, 0], [0, 0]),  # nothing accepted
        ([0, 0, 7], [7, 7]),  # every step accepted both
    ],
)
def test_histogram_to_per_position(histogram, expected):
    assert accepted_per_position_from_histogram(histogram) == expected


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize(
    "chunk, text",
    [
        ({"choices": [{"text": "ab", "index": 0}]}, "ab"),  # /v1/completions
        ({"choices": [{"delta": {"content": "cd"}}]}, "cd"),  # /v1/chat/completions
        ({"choices": [{"delta": {"role": "assistant"}}]}, ""),  # role-only first chat chunk
        ({"choices": [], "usage": {"completion_tokens": 3}}, ""),  # usage-only last chunk
    ],
)
def test_chunk_text(chunk, text):
    assert chunk_text(chunk) == text


def test_read_spec_fields_from_each_engine():
    llama = RequestRecord("p")
    read_spec_fields({"usage": {"prompt_tokens": 7, "completion_tokens": 16},
                      "timings": {"draft_n": 20, "draft_n_accepted": 15, "prompt_ms": 3.5, "predicted_ms": 90.0,
                                  "cache_n": 12}}, llama)
    assert (llama.input_tokens, llama.output_tokens, llama.draft_tokens, llama.accepted_tokens) == (7, 16, 20, 15)
    assert (llama.server_prompt_ms, llama.server_predicted_ms, llama.server_cached_tokens) == (3.5, 90.0, 12)

    vllm = RequestRecord("p")
    read_spec_fields({"metrics": {"speculative_decoding": {"num_spec_steps": 43, "num_draft_tokens": 129,
                                                           "num_accepted_draft_tokens": 10,
                                                           "acceptance_histogram": [39, 1, 0, 3]}}}, vllm)
    assert (vllm.spec_steps, vllm.draft_tokens, vllm.accepted_tokens) == (43, 129, 10)
    assert vllm.accepted_per_position == [4, 3, 3]

    sglang = RequestRecord("p")
    read_spec_fields({"meta_info": {"spec_verify_ct": 9}}, sglang)
    assert sglang.spec_steps == 9


def test_request_body_for_each_api():
    settings = RequestSettings(max_tokens=8)
    plain = request_body(Endpoint("http://127.0.0.1:1"), "m", "hi", settings)
    assert plain["prompt"] == "hi" and plain["model"] == "m" and plain["stream"] is True
    assert plain["stream_options"] == {"include_usage": True} and plain["ignore_eos"] is True
    chat = request_body(Endpoint("http://127.0.0.1:1/v1/", api="chat"), None, "hi", RequestSettings(ignore_eos=False))
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "model" not in chat and "ignore_eos" not in chat


@pytest.mark.parametrize(
    "url, base",
    [("http://127.0.0.1:8080", "http://127.0.0.1:8080"), ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080")],
)
def test_endpoint_base(url, base):
    assert Endpoint(url).base == base


@pytest.mark.parametrize("url", ["", "127.0.0.1:8080", "ftp://127.0.0.1/"])
def test_endpoint_refuses_a_bad_url(url):
    with pytest.raises(ValueError, match="http"):
        Endpoint(url)


def test_http_error_message_keeps_the_servers_words():
    body = json.dumps({"error": {"code": 404, "message": "The model `x` does not exist.", "type": "NotFoundError"}})
    assert http_error_message("u", 404, body) == "u: HTTP 404 (client error): The model `x` does not exist."
    assert http_error_message("u", 503, "Loading model") == "u: HTTP 503 (server error): Loading model"


# ---------------------------------------------------------------- summaries


def record(ttft: float, e2el: float, out: int, gaps: list[float], ok: bool = True, **spec) -> RequestRecord:
    return RequestRecord("p", ok=ok, ttft_ms=ttft, e2el_ms=e2el, itl_ms=gaps, input_tokens=5, output_tokens=out,
                         error="" if ok else "boom", **spec)


def test_summarize_names_and_values():
    records = [record(100, 500, 5, [100, 100, 100, 100]), record(200, 1000, 9, [100] * 8),
               record(0, 0, 0, [], ok=False)]
    s = summarize(records, duration_s=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["boom"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (10, 14)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 7.0 and s["total_token_throughput"] == 12.0
    assert s["mean_ttft_ms"] == 150 and s["median_e2el_ms"] == 750 and s["p50_itl_ms"] == 100
    assert s["mean_tpot_ms"] == 100  # (500-100)/4 and (1000-200)/8
    assert s["spec_decode_source"] is None and "unavailable" in s["spec_decode_note"]


def test_summarize_prefers_counters_and_keeps_request_sums():
    records = [record(1, 2, 2, [1], draft_tokens=10, accepted_tokens=5)]
    counters = SpecCounters("llama.cpp", num_drafts=4, num_draft_tokens=12, num_accepted_tokens=6,
                            accepted_per_position=(3, 2, 1))
    s = summarize(records, 1.0, counters)
    assert s["spec_decode_source"] == "metrics"
    assert s["spec_decode_acceptance_rate"] == 50.0  # percent, as vllm bench serve
    assert s["spec_decode_acceptance_length"] == 2.5
    assert s["spec_decode_per_position_acceptance_rates"] == [0.75, 0.5, 0.25]
    assert (s["request_draft_tokens"], s["request_accepted_tokens"]) == (10, 5)


def test_summarize_falls_back_to_per_request_counts():
    records = [record(1, 2, 2, [1], draft_tokens=10, accepted_tokens=5, spec_steps=4, accepted_per_position=[3, 2]),
               record(1, 2, 2, [1], draft_tokens=6, accepted_tokens=1, spec_steps=2, accepted_per_position=[1, 0])]
    s = summarize(records, 1.0, None)
    assert s["spec_decode_source"] == "per-request"
    assert s["spec_decode_acceptance_rate"] == pytest.approx(6 / 16 * 100)
    assert s["spec_decode_acceptance_length"] == pytest.approx(2.0)
    assert s["spec_decode_per_position_acceptance_rates"] == pytest.approx([4 / 6, 2 / 6])


@pytest.mark.parametrize("values, q, expected", [([1, 2, 3, 4], 50, 2.5), ([1, 2, 3, 4], 95, 3.85), ([7], 99, 7)])
def test_percentile_matches_numpy(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def summary_run(label: str, concurrency: int, e2el: float, out: int) -> LevelRun:
    return LevelRun(label, concurrency, [record(10, e2el, out, [1])], duration_s=1.0)


def test_crossover_and_json_shape():
    bench = ServeBench(settings={"endpoints": [{"label": "on"}, {"label": "off"}]})
    # speculation wins at 1 and 2, loses latency from 4 on and throughput from 8 on
    for level, (on_ms, off_ms, on_tok, off_tok) in {1: (50, 100, 40, 20), 2: (80, 100, 40, 30),
                                                    4: (120, 100, 40, 35), 8: (200, 100, 30, 40)}.items():
        bench.runs += [summary_run("on", level, on_ms, on_tok), summary_run("off", level, off_ms, off_tok)]
    assert bench.levels() == [1, 2, 4, 8]
    assert bench.crossover_concurrency == 4 and bench.throughput_crossover_concurrency == 8
    data = json.loads(bench.to_json())
    assert set(data) == {"settings", "engines", "levels", "comparison", "crossover_concurrency",
                         "throughput_crossover_concurrency", "stopped", "lab"}
    assert data["comparison"][0]["latency_speedup"] == 2.0
    assert data["levels"][0]["requests"][0]["tpot_ms"] is not None
    assert "mean_e2el_ms" in bench.to_csv().splitlines()[0]


# ---------------------------------------------------------------- errors, against a fake server that only fails


class FailingHandler(http.server.BaseHTTPRequestHandler):
    """/v1/models serves "served-model"; completions fail as ``mode`` says; no /metrics (404)."""

    mode = "500"

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "served-model", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "slow":
            time.sleep(1.5)
            return self._send(500, {"error": {"message": "too late"}})
        if self.mode == "400":
            return self._send(400, {"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError"}})
        if self.mode == "empty":  # a 200 stream that never carries text
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: [DONE]\n\n")
            return None
        return self._send(500, {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}})


@pytest.fixture
def failing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    FailingHandler.mode = "500"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_request(url: str, timeout_s: float = 5.0) -> RequestRecord:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient() as client:
            return await stream_request(client, Endpoint(url), "served-model", "p", "hi",
                                        RequestSettings(max_tokens=4, timeout_s=timeout_s))
    return asyncio.run(go())


@pytest.mark.parametrize(
    "mode, timeout_s, message",
    [
        ("500", 5.0, "HTTP 500 (server error): CUDA out of memory"),
        ("400", 5.0, "HTTP 400 (client error): max_tokens must be at least 1"),
        ("slow", 0.3, "no answer within 0.3 s (timeout)"),
        ("empty", 5.0, "ended without any generated text"),
    ],
)
def test_request_errors_are_records_not_exceptions(failing_server, mode, timeout_s, message):
    FailingHandler.mode = mode
    result = one_request(f"http://127.0.0.1:{failing_server.server_port}", timeout_s)
    assert not result.ok
    assert message in result.error


def test_refused_connection_is_a_record():
    result = one_request(f"http://127.0.0.1:{closed_port()}")
    assert not result.ok and "cannot connect" in result.error and "is the server running" in result.error


PROMPTS = [Prompt("a/1", "qa", "Say hi."), Prompt("a/2", "qa", "Say bye.")]


def test_sweep_refuses_a_server_that_is_not_there():
    with pytest.raises(ServeError, match="cannot connect"):
        run_serve_bench([Endpoint(f"http://127.0.0.1:{closed_port()}")], PROMPTS, [1])


def test_sweep_refuses_a_model_the_server_does_not_serve(failing_server):
    url = f"http://127.0.0.1:{failing_server.server_port}"
    with pytest.raises(ServeError, match="does not serve the model 'other-model': it serves served-model"):
        run_serve_bench([Endpoint(url, model="other-model")], PROMPTS, [1])


def test_sweep_stops_cleanly_when_every_request_fails(failing_server):
    url = f"http://127.0.0.1:{failing_server.server_port}"
    bench = run_serve_bench([Endpoint(url, label="on"), Endpoint(url, label="off")], PROMPTS, [1, 2])
    assert bench.runs == [] and bench.levels() == []
    assert bench.stopped.startswith("every request to on at concurrency 1 failed: ")
    assert "CUDA out of memory" in bench.stopped
    assert bench.engines["on"] == {"engine": "unknown", "models": ["served-model"], "model": "served-model",
                                   "metrics": False}
    assert json.loads(bench.to_json())["stopped"] == bench.stopped


def test_sweep_stop_request_keeps_nothing_unfinished(failing_server):
    url = f"http://127.0.0.1:{failing_server.server_port}"
    bench = run_serve_bench([Endpoint(url)], PROMPTS, [1], should_stop=lambda: True)
    assert bench.runs == [] and bench.stopped.startswith("stopped at concurrency 1")


# ---------------------------------------------------------------- llama-server wrapper and command line


def test_llama_server_command_turns_speculation_on_only_with_a_draft(tmp_path):
    from pathlib import Path

    from lab.serving.llama_server import LlamaServer

    on = LlamaServer(Path("t.gguf"), Path("d.gguf"), draft_max=5, parallel=8, ctx_per_slot=512).command(Path("srv"))
    assert on[:3] == ["srv", "--host", "127.0.0.1"] and "--metrics" in on
    assert on[on.index("-np") + 1] == "8" and on[on.index("-c") + 1] == "4096"
    assert on[on.index("-md") + 1] == "d.gguf" and on[on.index("--spec-type") + 1] == "draft-simple"
    assert on[on.index("--spec-draft-n-max") + 1] == "5" and on[on.index("--spec-draft-p-min") + 1] == "0"
    off = LlamaServer(Path("t.gguf")).command(Path("srv"))
    assert "-md" not in off and "--spec-type" not in off and "--metrics" in off


def test_llama_server_without_its_binary_says_how_to_build_it(monkeypatch, tmp_path):
    from pathlib import Path

    from lab.serving.llama_server import LlamaServer

    monkeypatch.setenv("LAB_LLAMA_SERVER", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="run `bash scripts/build_llama_server.sh`"):
        LlamaServer(Path("t.gguf")).start()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--concurrency", "1"], "requires either --on URL [--off URL] or --llama-target"),
        (["--on", "http://127.0.0.1:1", "--llama-target", "smollm2-135m"], "requires either --on URL"),
        (["--llama-target", "qwen2.5-coder-1.5b"], "--llama-target requires --llama-draft"),
        (["--on", "http://127.0.0.1:1", "--concurrency", "1,x"], "--concurrency requires comma-separated integers"),
        (["--on", "http://127.0.0.1:1", "--concurrency", "0,1"], "--concurrency requires integers >= 1"),
        (["--on", "http://127.0.0.1:1", "--lab-target", "a"], "requires both --lab-target and --lab-draft"),
        (["--on", "localhost:8080", "--prompts", "summarization:1"], "--on: a URL requires http:// or https:// in front"),
    ],
)
def test_cli_serve_bench_refuses_bad_input_in_one_line(argv, message, capsys):
    from lab.cli import main

    assert main(["serve-bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_serve_bench_names_a_server_that_is_not_there(capsys):
    from lab.cli import main

    port = closed_port()
    assert main(["serve-bench", "--on", f"http://127.0.0.1:{port}", "--prompts", "summarization:1"]) == 2
    assert capsys.readouterr().err == (f"error: http://127.0.0.1:{port}: cannot connect (connection refused); "
                                       "is the server running at this address?\n")


def test_lab_reference_runs_the_labs_engine_on_the_same_prompts(tiny_models):
    from lab.studies.serve_bench import engine_reference
    from lab.studies.serve_reference import run_lab_reference

    prompts = [Prompt("q/1", "t", "q3 q4 q5 q6"), Prompt("q/2", "t", "q7 q8 q9")]
    lab = run_lab_reference("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", prompts, k=3, max_new_tokens=8,
                            chat_template=False)
    # the tiny stand-ins of both presets are the same random model: the draft is always right
    assert lab["acceptance_rate"] == 1.0 and lab["per_position_acceptance"][0] == 1.0
    assert lab["outputs_identical"] == 2 and lab["prompts"] == 2 and lab["precision"] == "fp32"
    assert lab["tokens_per_s_on"] > 0 and lab["speedup"] == pytest.approx(lab["tokens_per_s_on"] / lab["tokens_per_s_off"])

    bench = ServeBench(settings={"endpoints": [{"label": "on"}, {"label": "off"}]}, lab=lab)
    bench.runs += [LevelRun("on", 1, [record(10, 100, 9, [10])], 1.0,
                            SpecCounters("llama.cpp", 4, 12, 6, (3, 2, 1))),
                   LevelRun("off", 1, [record(10, 200, 9, [20])], 2.0)]
    engine = engine_reference(bench)
    assert engine["speedup"] == 2.0 and engine["acceptance_rate"] == 0.5
    assert engine["per_position_acceptance"] == [0.75, 0.5, 0.25]
    from lab.studies.serve_bench import format_serve_bench

    table = format_serve_bench(bench)
    assert "engine at concurrency 1" in table and "lab (fp32, K=3)" in table
