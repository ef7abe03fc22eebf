"""Bad inputs on the pages: a clear message, the app keeps running, and nothing the user had is lost.

Results files whose fields have the wrong type (Compare, Theory, Batch, Serve), server URLs the client cannot
use and servers that are not engines (Serve), and constraints no output can satisfy (Live). Each test loads or
runs something good first where there is a result to lose, then the bad input, and checks the good one stays.
"""

from __future__ import annotations

import json

import pytest

from app_util import app_on, click, key, tiny_models  # noqa: F401 (a fixture)
from test_bad_inputs import FakeServer, fake_server, valid_comparison  # noqa: F401 (a fixture)

GOOD = json.dumps(valid_comparison()).encode()
METRICS_A_STRING = json.dumps(valid_comparison() | {"runs": [valid_comparison()["runs"][0] | {"metrics": "fast"}]}).encode()


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def upload(at, name: str, body: bytes):
    at.file_uploader[0].set_value((name, body, "application/json"))
    return at.run()


@pytest.mark.parametrize("page", ["compare", "theory"])
def test_a_comparison_with_metrics_a_string_is_refused_and_the_loaded_one_stays(tiny_models, page):
    at = upload(app_on(page), "good.json", GOOD)
    assert not at.exception and not errors(at)
    at = upload(at, "bad.json", METRICS_A_STRING)
    assert not at.exception
    assert any("Could not load bad.json" in e and "runs[0].metrics must be an object; got a string" in e
               for e in errors(at)), errors(at)
    assert at.session_state["compare:comparison"].settings["loaded_from"] == "good.json"
    for other in ("compare", "theory"):  # both pages still draw the good one, for the rest of the session
        at.switch_page(f"app_pages/{other}.py").run()
        assert not at.exception
        assert any("good.json" in m.value for m in list(at.markdown) + list(at.info))


@pytest.mark.parametrize(
    "page, state_key, body, words",
    [
        ("batch", "batch:sweep", {"results": [{"batch_size": "8", "off": {}, "on": {}}]},
         "results[0].batch_size must be an integer; got a string"),
        ("serve", "serve:bench", {"settings": {"endpoints": [{"label": "on"}]}, "levels": [{"label": 3, "max_concurrency": 1}]},
         "levels[0].label must be a string; got an integer"),
    ],
)
def test_a_sweep_or_bench_file_with_a_wrong_field_is_refused_naming_it(tiny_models, page, state_key, body, words):
    at = upload(app_on(page), "bad.json", json.dumps(body).encode())
    assert not at.exception
    assert any(words in e for e in errors(at)), errors(at)


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://[::1", "Endpoint with speculation on: an IPv6 address must be closed with ']'"),
        ("http://127.0.0.1:99999", "Endpoint with speculation on: the port must be in 1..65535; got 99999"),
        ("127.0.0.1:8080", "Endpoint with speculation on: a URL requires http:// or https://"),
    ],
)
def test_a_bad_url_on_the_serve_page_is_an_error_and_the_inputs_stay(tiny_models, url, words):
    at = app_on("serve", on_url=url, off_url="", source="Paste prompts", pasted="Say hi.")
    at = click(at, "Run sweep")
    assert not at.exception
    assert any(words in e for e in errors(at)), errors(at)
    assert at.session_state[key("serve.on_url")] == url


def test_a_server_that_is_not_an_engine_is_refused_on_the_serve_page(tiny_models, fake_server):
    FakeServer.mode = "html"  # what the Streamlit app itself answers
    url = f"http://127.0.0.1:{fake_server.server_port}"
    at = app_on("serve", on_url=url, off_url="", source="Paste prompts", pasted="Say hi.", timeout_s=5)
    at = click(at, "Run sweep")
    assert not at.exception
    assert any("is not an OpenAI-compatible engine: GET /v1/models answered text/html" in e for e in errors(at)), errors(at)
    assert "serve:bench" not in at.session_state  # no "Measured ... serving None"
