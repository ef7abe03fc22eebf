"""Bad inputs and faults, table by table: each ends in a message saying what to do, never a traceback.

docs/bad-inputs.md lists every case with where it was tried and which test covers it. Here: results files
(``lab.results_files``), server URLs and servers that are not engines (``lab.serving.client``), timeouts
honoured end to end, constraints no output can satisfy (``lab.grammar``), and the command line's bad arguments
and faults (``lab.cli.main`` in-process, on tiny model folders).
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lab.cli import main
from lab.grammar import Constraint, ConstraintSpec, UnsatisfiableConstraint, schema_contradiction
from lab.prompts import Prompt
from lab.results_files import ResultsFileError, parse_results
from lab.serving.client import Endpoint, RequestSettings, ServeError, stream_request
from lab.serving.urls import URLError, check_url
from lab.studies.compare import Comparison
from lab.studies.serve_bench import run_serve_bench

PROMPT = "t5 t6 t7 t5 t6 t7 t5"


# ---------------------------------------------------------------- results files


def valid_comparison() -> dict:
    """A comparison as Download JSON writes it: one prompt, the target alone and one drafter run."""
    metrics = {"num_drafts": 2, "num_draft_tokens": 6, "num_accepted_tokens": 4, "accepted_per_position": [2, 1, 1],
               "per_position_acceptance_rate": [1.0, 0.5, 0.5], "acceptance_rate": 0.67, "mean_acceptance_length": 3.0,
               "target_forward_passes": 3, "num_output_tokens": 8, "prefill_s": 0.01, "draft_s": 0.02,
               "verify_s": 0.05, "wall_s": 0.08, "tokens_per_s": 100.0}
    base = metrics | {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_position": [],
                      "per_position_acceptance_rate": [], "acceptance_rate": None, "mean_acceptance_length": None,
                      "target_forward_passes": 8}
    run = {"prompt_index": 0, "drafter": "prompt-lookup (n 1-3)", "k": 3, "token_ids": [5, 6, 7], "text": "t5 t6 t7",
           "metrics": metrics, "draft_ms": [1.0, 2.0], "verify_ms": [3.0, 4.0], "speedup": 1.2, "decode_speedup": 1.3,
           "cost_ratio": 0.1, "identical_to_target": True, "cancelled": False}
    baseline = run | {"drafter": "target alone", "k": 0, "metrics": base, "speedup": None, "identical_to_target": None}
    return {"settings": {"target": "tiny", "temperature": 0.0, "verify_cost": {"3": 1.1}, "ks": [3]},
            "prompts": ["t5 t6 t7"], "runs": [baseline, run]}


def mutated(path: list, value) -> str:
    data = valid_comparison()
    where = data
    for part in path[:-1]:
        where = where[part]
    where[path[-1]] = value
    return json.dumps(data)


def test_a_valid_comparison_loads_and_summarises():
    comparison = Comparison.from_json(json.dumps(valid_comparison()))
    assert len(comparison.runs) == 2 and comparison.summary()["k"].tolist() == [3]


@pytest.mark.parametrize(
    "text, words",
    [
        # the trial's case: metrics a string broke Compare and Theory for the rest of the session
        (mutated(["runs", 1, "metrics"], "fast"), "runs[1].metrics must be an object; got a string"),
        (mutated(["runs", 0, "metrics", "wall_s"], "1 s"), "runs[0].metrics.wall_s must be a number; got a string"),
        (mutated(["runs", 1, "metrics", "accepted_per_position"], 3), "runs[1].metrics.accepted_per_position must be a list"),
        (mutated(["runs", 1, "k"], -1), "runs[1].k is wrong"),
        (mutated(["runs", 1, "token_ids"], ["a"]), "runs[1].token_ids[0] must be an integer; got a string"),
        (mutated(["runs", 1, "surprise"], 1), "runs[1] holds fields the lab does not write"),
        (mutated(["settings"], []), "settings must be an object; got a list"),
        (mutated(["settings", "verify_cost"], "1.1"), "settings.verify_cost must be an object; got a string"),
        (mutated(["prompts"], "t5"), "prompts must be a list; got a string"),
        (mutated(["runs"], {}), "runs must be a list; got an object"),
        (json.dumps({"hello": 1}), "the field 'settings' is missing"),
        (json.dumps([1, 2]), "the file must be an object; got a list"),
        ("runs,k\n1,2", "it is not JSON (Expecting value at line 1, column 1)"),
        ("", "it is not JSON"),
        ("null", "the file must be an object; got null"),
    ],
)
def test_a_bad_comparison_file_is_refused_naming_the_field(text, words):
    with pytest.raises(ResultsFileError, match="not a comparison results file") as refused:
        Comparison.from_json(text)
    assert words in str(refused.value)


def test_a_hand_edited_comparison_with_inconsistent_counters_summarises_to_nan():
    # more accepted tokens than K per draft: a mean acceptance length above K+1 raised in Leviathan's fit
    data = valid_comparison()
    data["runs"][1]["metrics"] |= {"num_accepted_tokens": 40}
    data["settings"]["verify_cost"] = {"3": 0.0}
    data["runs"][1]["metrics"] |= {"draft_s": 0.0}
    row = Comparison.from_json(json.dumps(data)).summary().iloc[0]
    assert row["fitted_acceptance"] != row["fitted_acceptance"]  # NaN
    assert row["predicted_speedup"] != row["predicted_speedup"]


@pytest.mark.parametrize(
    "kind, data, words",
    [
        ("sweep", {"results": []}, "results is wrong"),
        ("sweep", {"results": [{"batch_size": 0, "off": {}, "on": {}}]}, "results[0].batch_size is wrong"),
        ("sweep", {"results": [{"batch_size": 1, "off": "x", "on": {}}]}, "results[0].off must be an object"),
        ("sweep", {"results": [{"batch_size": 1, "off": {}, "on": {"latency_p50_s": "1"}}]},
         "results[0].on.latency_p50_s must be a number or null"),
        ("serve_bench", {"settings": {"endpoints": []}, "levels": []}, "settings.endpoints is wrong"),
        ("serve_bench", {"settings": {"endpoints": [{"label": "on"}]}, "levels": [{"label": "on", "max_concurrency": "2"}]},
         "levels[0].max_concurrency must be an integer; got a string"),
        ("serve_bench", {"settings": {"endpoints": [{"label": "on"}]}, "levels": [], "comparison": [{"max_concurrency": 1}]},
         "comparison[0].latency_speedup is missing"),
    ],
)
def test_bad_sweep_and_serve_files_are_refused_naming_the_field(kind, data, words):
    with pytest.raises(ResultsFileError) as refused:
        parse_results(json.dumps(data), kind)
    assert words in str(refused.value)


# ---------------------------------------------------------------- server URLs


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://[::1", "an IPv6 address must be closed with ']'"),  # was httpx.InvalidURL
        ("http://127.0.0.1:99999", "the port must be in 1..65535; got 99999"),  # was ExceptionGroup/OverflowError
        ("http://127.0.0.1:0", "the port must be in 1..65535; got 0"),
        ("http://127.0.0.1:http", "the port must be a number in 1..65535; got 'http'"),
        ("http://127.0.0.1:", "the port must be a number"),
        ("http://::1:8080", "an IPv6 address goes in brackets"),
        ("http://[zz]:8080", "'zz' in brackets is not an IPv6 address"),
        ("http://[::1]8080", "after an IPv6 address's ']' comes ':PORT'"),
        ("127.0.0.1:8080", "a URL requires http:// or https:// in front"),
        ("ftp://127.0.0.1", "requires http:// or https://; got ftp://"),
        ("http://", "a URL requires a host"),
        ("http://:8080", "a URL requires a host"),
        ("http://8080", "did you mean http://127.0.0.1:8080?"),
        ("http://999.1.1.1:80", "'999.1.1.1' is not an IPv4 address"),
        ("http://local host:80", "no spaces"),
        ("http://user:pw@127.0.0.1", "user or password"),
        ("http://127.0.0.1/v1?x=1", "no ?query or #fragment"),
        ("http://bad_-.host..name", "is not a host name"),
        ("http://ex\u00e4mple.com", "must be ASCII"),
        ("", "a server URL is required"),
        ("   ", "a server URL is required"),
    ],
)
def test_a_bad_url_is_refused_in_words(url, words):
    with pytest.raises(URLError) as refused:
        check_url(url)
    assert words in str(refused.value)
    with pytest.raises(ValueError):  # Endpoint checks through the same function
        Endpoint(url)


@pytest.mark.parametrize(
    "url, normalised",
    [
        (" HTTP://LocalHost:8080/v1/ ", "http://localhost:8080/v1"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("https://[2001:DB8::1]/", "https://[2001:db8::1]"),
        ("http://127.0.0.1", "http://127.0.0.1"),
        ("http://my-server.internal:65535", "http://my-server.internal:65535"),
    ],
)
def test_a_good_url_is_normalised(url, normalised):
    assert check_url(url) == normalised
    assert Endpoint(url).url == normalised
    httpx.URL(Endpoint(url).base + "/v1/models")  # and the client takes it


@pytest.mark.parametrize("argv, words", [
    (["--on", "http://[::1"], "--on: an IPv6 address must be closed"),
    (["--on", "http://127.0.0.1:99999"], "--on: the port must be in 1..65535; got 99999"),
    (["--on", "http://127.0.0.1:8080", "--off", "localhost:8081"], "--off: a URL requires http:// or https://"),
    (["--on", "http://127.0.0.1:8080", "--n", "0"], "--n requires a number of prompts >= 1"),
])
def test_cli_serve_bench_refuses_a_bad_url_in_one_line(argv, words, capsys):
    assert main(["serve-bench", *argv, "--prompts", "summarization:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


# ---------------------------------------------------------------- servers that are not engines, and timeouts


class FakeServer(http.server.BaseHTTPRequestHandler):
    """A loopback server playing one ``mode``: "html" (answers every path with a page, as the Streamlit app
    does), "no-completions" (models listed, POST 404), "text-completions" (POST 200 in plain text),
    "no-models" (an empty list), "hang" (never answers) or "trickle" (a stream of keep-alives, never done)."""

    mode = "html"
    release = threading.Event()

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.mode == "hang":
            self.release.wait(10)
            return
        if self.mode == "html":
            return self._send(200, b"<!doctype html><html><head><title>Streamlit</title></head></html>", "text/html")
        if self.path != "/v1/models":
            return self._send(404, b"{}", "application/json")
        data = [] if self.mode == "no-models" else [{"id": "m", "object": "model"}]
        self._send(200, json.dumps({"object": "list", "data": data}).encode(), "application/json")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode in ("html", "no-completions"):
            return self._send(404 if self.mode == "no-completions" else 405, b"Not Found", "text/plain")
        if self.mode == "text-completions":
            return self._send(200, b"hello there", "text/plain")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(50):  # trickle: a comment line every 0.2 s, never a token, never done
            if self.release.wait(0.2):
                return
            self.wfile.write(b": keep-alive\n\n")
            self.wfile.flush()


@pytest.fixture
def fake_server():
    FakeServer.release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    FakeServer.release.set()
    server.shutdown()
    server.server_close()


PROMPTS = [Prompt("a/1", "qa", "Say hi.")]


@pytest.mark.parametrize(
    "mode, words",
    [
        ("html", "is not an OpenAI-compatible engine: GET /v1/models answered text/html '<!doctype html>"),
        ("no-completions", "is not an OpenAI-compatible engine: POST /v1/completions answered HTTP 404"),
        ("text-completions", "is not an OpenAI-compatible engine: POST /v1/completions answered text/plain 'hello there'"),
        ("no-models", "serves no model: GET /v1/models answered an empty list"),
    ],
)
def test_a_server_that_is_not_an_engine_is_refused_naming_what_came_back(fake_server, mode, words):
    FakeServer.mode = mode
    url = f"http://127.0.0.1:{fake_server.server_port}"
    with pytest.raises(ServeError) as refused:
        run_serve_bench([Endpoint(url)], PROMPTS, [1], RequestSettings(max_tokens=2, timeout_s=5))
    assert words in str(refused.value)


def test_the_timeout_bounds_the_endpoint_check(fake_server):
    # the trial: a 3 s timeout waited 11.5 s (the check had its own 10 s)
    FakeServer.mode = "hang"
    url = f"http://127.0.0.1:{fake_server.server_port}"
    started = time.monotonic()
    with pytest.raises(ServeError, match="no answer within 0.5 s"):
        run_serve_bench([Endpoint(url)], PROMPTS, [1], RequestSettings(max_tokens=2, timeout_s=0.5))
    assert time.monotonic() - started < 3.0


def test_the_timeout_is_a_deadline_for_a_trickling_stream(fake_server):
    # every read gets bytes within httpx's read timeout, so only an overall deadline ends the request
    FakeServer.mode = "trickle"
    url = f"http://127.0.0.1:{fake_server.server_port}"

    async def one():
        async with httpx.AsyncClient() as client:
            return await stream_request(client, Endpoint(url), "m", "p", "hi", RequestSettings(max_tokens=2, timeout_s=1.0))

    import asyncio

    started = time.monotonic()
    record = asyncio.run(one())
    assert time.monotonic() - started < 3.5
    assert not record.ok and "no answer within 1 s (timeout)" in record.error


# ---------------------------------------------------------------- constraints no output can satisfy


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "must be string and integer at once"),
        ({"type": "object", "allOf": [{"type": "array"}]}, "must be object and array at once"),
        (False, "is `false`"),
        ({"not": {}}, "`not: {}`"),
        ({"enum": []}, "an empty `enum`"),
        ({"type": "integer", "const": "a"}, "a `const` of none of its allowed types"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum 5 above maximum 1"),
        ({"type": "string", "minLength": 9, "maxLength": 2}, "minLength 9 above maxLength 2"),
        ({"anyOf": [{"enum": []}, False]}, "every `anyOf` branch"),
        ({"type": "object", "properties": {"a": {"allOf": [{"type": "null"}, {"type": "boolean"}]}}, "required": ["a"]},
         "the required property 'a' must be null and boolean at once"),
        ({"type": "array", "minItems": 1, "items": False}, "the items of the schema is `false`"),
    ],
)
def test_a_contradictory_schema_is_seen_statically(schema, words):
    why = schema_contradiction(schema)
    assert why is not None and words in why


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        {"allOf": [{"type": "number"}, {"type": "integer"}]},  # every integer is a number
        {"anyOf": [{"enum": []}, {"type": "string"}]},  # one branch is possible
        {"type": "object", "properties": {"a": False}},  # "a" is optional: {} matches
        {"type": ["string", "null"], "const": None},
        {"$ref": "#/definitions/x", "definitions": {"x": {"type": "string"}}},
    ],
)
def test_a_satisfiable_schema_is_not_refused(schema):
    assert schema_contradiction(schema) is None


@pytest.fixture(scope="module")
def word_model():
    return tiny_llama(seed=0, layers=1), tiny_tokenizer()


@pytest.mark.parametrize(
    "spec, words",
    [
        (ConstraintSpec("json_schema", json.dumps({"allOf": [{"type": "string"}, {"type": "integer"}]})),
         "must be string and integer at once"),
        # the tiny vocabulary is the words t0..t47: no token can start "a"
        (ConstraintSpec("regex", "abc"), "no first token of this model's vocabulary can start an output"),
    ],
)
def test_an_unsatisfiable_constraint_is_refused_before_decoding(word_model, spec, words):
    model, tokenizer = word_model
    with pytest.raises(UnsatisfiableConstraint, match="No output can satisfy this constraint") as refused:
        Constraint(spec, tokenizer, model.config.vocab_size, (1,))
    assert words in str(refused.value)


def test_a_satisfiable_regex_over_the_tiny_vocabulary_compiles(word_model):
    model, tokenizer = word_model
    Constraint(ConstraintSpec("regex", "t5( t6)*"), tokenizer, model.config.vocab_size, (1,))


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny model folder, a folder that is not a model, and one whose weights are corrupt."""
    root = tmp_path_factory.mktemp("tiny_bad")
    target = root / "target"
    tiny_llama(seed=0, layers=1).save_pretrained(target)
    tiny_tokenizer().save_pretrained(target)
    empty = root / "empty"
    empty.mkdir()
    corrupt = root / "corrupt"
    tiny_llama(seed=0, layers=1).save_pretrained(corrupt)
    tiny_tokenizer().save_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00not safetensors at all" * 4)
    schema = root / "impossible.json"
    schema.write_text(json.dumps({"allOf": [{"type": "string"}, {"type": "integer"}]}))
    bad_schema = root / "bad.json"
    bad_schema.write_text('{"type": ')
    return {"target": str(target), "empty": str(empty), "corrupt": str(corrupt), "missing": str(root / "nope"),
            "schema": str(schema), "bad_schema": str(bad_schema)}


def gen(dirs, *extra: str, target: str = "target") -> list[str]:
    return ["generate", "--target", dirs.get(target, target), "--dtype", "fp32", "--device", "cpu",
            "--max-new-tokens", "4", "--drafter", "prompt-lookup", *extra]


@pytest.mark.parametrize(
    "extra, target, words",
    [
        (["--prompt", PROMPT, "--k", "abc"], "target", "argument --k: requires an integer 1..16 or 'auto'; got 'abc'"),
        (["--prompt", PROMPT, "--max-new-tokens", "lots"], "target", "--max-new-tokens: invalid int value"),
        (["--prompt", PROMPT, "--temperature", "warm"], "target", "--temperature: invalid float value"),
        (["--prompt", PROMPT, "--max-new-tokens", "-5"], "target", "max_new_tokens requires"),
        (["--prompt", PROMPT, "--k", "-1"], "target", "requires an integer in 1..16; got -1"),
        (["--prompt", PROMPT], "missing", "or a local Hugging Face model folder (a folder holding config.json)"),
        (["--prompt", PROMPT], "empty", "empty"),
        (["--prompt", PROMPT], "corrupt", "corrupt"),
        (["--prompt", PROMPT], "gpt-9", "Unknown model 'gpt-9'"),
        (["--prompt", ""], "target", "the prompt is empty"),
        (["--prompt", " ".join(["t5"] * 600)], "target", "context window"),
        (["--prompt", PROMPT, "--regex", "abc"], "target", "No output can satisfy this constraint"),
        (["--prompt", PROMPT, "--regex", "[a-"], "target", "The regular expression does not compile"),
        (["--prompt", PROMPT, "--json-schema", "SCHEMA"], "target", "No output can satisfy this constraint: the schema must be string and integer at once"),
        (["--prompt", PROMPT, "--json-schema", "BAD_SCHEMA"], "target", "The JSON schema is not valid JSON"),
        (["--prompt", PROMPT, "--engine", "turbo"], "target", "invalid choice: 'turbo'"),
    ],
)
def test_generate_bad_input_exits_2_with_one_line(tiny_dirs, capsys, extra, target, words):
    extra = [tiny_dirs["schema"] if a == "SCHEMA" else tiny_dirs["bad_schema"] if a == "BAD_SCHEMA" else a for a in extra]
    assert main(gen(tiny_dirs, *extra, target=target)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and words in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--target", "TARGET", "--drafter", "prompt-lookup", "--batch-sizes", "0"], "--batch-sizes requires integers >= 1"),
        (["bench", "--target", "TARGET", "--drafter", "prompt-lookup", "--batch-sizes", "-2,4"], "--batch-sizes: expected one argument"),
        (["bench", "--target", "TARGET", "--drafter", "prompt-lookup", "--batch-sizes=-2,4"], "--batch-sizes requires integers >= 1"),
        (["bench", "--target", "TARGET", "--drafter", "prompt-lookup", "--batch-sizes", "two"], "--batch-sizes requires comma-separated integers"),
        (["bench", "--target", "TARGET", "--drafter", "prompt-lookup", "--prompts", "no_such_set"], "prompt set requires"),
        (["bench", "--target", "TARGET", "--drafter", "prompt-lookup", "--prompts", "summarization:zero"], "prompt set"),
        (["compare", "--target", "TARGET", "--drafters", "prompt-lookup", "--ks", "0"], "1..16; got 0"),
        (["compare", "--target", "TARGET", "--drafters", "medusa"], "invalid choice: 'medusa'"),
        (["compare", "--target", "TARGET", "--drafters", "prompt-lookup", "--ks", "x"], "--ks: invalid int value"),
        (["serve-bench", "--on", "http://127.0.0.1:8080", "--concurrency", "0"], "--concurrency requires integers >= 1"),
        (["serve-bench", "--on", "http://127.0.0.1:8080", "--timeout-s", "soon"], "--timeout-s: invalid float value"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_other_commands_refuse_bad_arguments_in_one_line(tiny_dirs, capsys, argv, words):
    assert main([tiny_dirs["target"] if a == "TARGET" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err, err
    assert "Traceback" not in err


def test_out_of_memory_is_one_line_not_a_traceback(tiny_dirs, capsys, monkeypatch):
    import lab.decode

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lab.decode, "decode", out_of_memory)
    monkeypatch.setattr(lab.decode, "run", out_of_memory)
    assert main(gen(tiny_dirs, "--prompt", PROMPT)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (OutOfMemoryError)") and err.count("\n") == 1


def test_the_comparison_schema_names_every_field_a_run_record_writes():
    """A field added to RunRecord must be added to the schema, or files the lab writes itself are refused."""
    from dataclasses import fields

    from lab.results_files import COMPARISON
    from lab.studies.compare import RunRecord

    properties = COMPARISON["properties"]["runs"]["items"]["properties"]
    assert set(properties) == {f.name for f in fields(RunRecord)}
