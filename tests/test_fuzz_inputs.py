"""Property-based fuzzing of what people type and load: results files, command lines, server URLs.

The properties: loading a results file raises nothing but ``ResultsFileError`` and keeps the previous
result; a loaded comparison summarises; ``lab.cli.main`` returns an exit code (never a traceback); a URL
check returns a URL httpx takes or a ``URLError``. Examples stay few and small (tiny models, no decode of
any length) so the file runs in well under a minute on two shared cores.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_llama, tiny_tokenizer
from lab.cli import main
from lab.results_files import ResultsFileError, parse_results
from lab.serving.client import Endpoint
from lab.serving.urls import URLError, check_url
from lab.studies.compare import Comparison
from test_bad_inputs import valid_comparison

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indexes)."""
    yield prefix
    if isinstance(value, dict):
        for name, child in value.items():
            yield from paths(child, prefix + (name,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, prefix + (index,))


VALID = valid_comparison()
VALID_PATHS = [p for p in paths(VALID) if p]


@st.composite
def mutated_comparisons(draw):
    """The valid comparison with one field replaced by a random JSON value, or deleted."""
    data = json.loads(json.dumps(VALID))
    path = draw(st.sampled_from(VALID_PATHS))
    where = data
    for part in path[:-1]:
        where = where[part]
    if draw(st.booleans()) and isinstance(where, dict):
        del where[path[-1]]
    else:
        where[path[-1]] = draw(json_values)
    return json.dumps(data)


class Page:
    """Stands in for a page's session: a loaded file replaces the result only if it parses."""

    def __init__(self) -> None:
        self.result = Comparison.from_json(json.dumps(VALID))
        self.error: str | None = None

    def load(self, text: str) -> None:
        try:
            self.result = Comparison.from_json(text)
            self.error = None
        except ResultsFileError as error:
            self.error = str(error)


def check_loads_or_refuses(text: str) -> None:
    page = Page()
    before = page.result
    page.load(text)
    if page.error is not None:
        assert page.result is before and page.error.startswith("This is not a comparison results file")
    else:  # what loads must draw: the summary and the per-run table read every field they use
        page.result.summary()
        page.result.runs_frame()


@FUZZ
@given(mutated_comparisons())
def test_a_mutated_comparison_loads_or_is_refused_keeping_the_previous(text):
    check_loads_or_refuses(text)


@FUZZ
@given(json_values)
def test_any_json_loads_or_is_refused(value):
    check_loads_or_refuses(json.dumps(value))


@FUZZ
@given(st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_any_text_loads_or_is_refused(text):
    check_loads_or_refuses(text)


@FUZZ
@given(json_values, st.sampled_from(["sweep", "serve_bench"]))
def test_other_results_files_load_or_are_refused(value, kind):
    try:
        parse_results(json.dumps(value), kind)
    except ResultsFileError as error:
        assert str(error).startswith("This is not a ")


# ---------------------------------------------------------------- server URLs

url_parts = st.sampled_from(["http://", "https://", "ftp://", "", "http:/", "HTTP://", "http://["])
hosts = st.sampled_from(["127.0.0.1", "[::1]", "::1", "[::1", "localhost", "", "999.0.0.1", "a b", "ex.com",
                         "[fe80::1%eth0]", "h_st", "-x-", "xn--bcher-kva.example"])
ports = st.sampled_from(["", ":", ":8080", ":0", ":65535", ":65536", ":99999", ":-1", ":8o80", ":\u0668"])
tails = st.sampled_from(["", "/", "/v1", "/v1/", "?q=1", "#x", "/a b", "/%zz", "/\u00e9"])


@FUZZ
@given(st.one_of(st.text(max_size=30), st.tuples(url_parts, hosts, ports, tails).map("".join)))
def test_a_url_check_returns_a_usable_url_or_says_why(text):
    try:
        url = check_url(text)
    except URLError as error:
        assert str(error)
        return
    parsed = httpx.URL(Endpoint(url).base + "/v1/models")
    assert parsed.scheme in ("http", "https") and parsed.host
    assert parsed.port is None or 1 <= parsed.port <= 65535


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_model") / "target"
    tiny_llama(seed=0, layers=1).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


words = st.sampled_from(["--k", "--max-new-tokens", "--temperature", "--drafter", "--prompt", "--engine", "--dtype",
                         "--min-n", "--max-n", "--exit-layer", "--json", "--regex", "--top-p", "--seed", "--ks",
                         "--batch-sizes", "--drafters", "--concurrency", "--on", "-1", "0", "17", "abc", "nan", "1e9",
                         "", "prompt-lookup", "layer-skip", "none", "t5 t6", "auto", "fp32", "eager", "[", "1,2"])


@FUZZ
@given(st.sampled_from(["generate", "compare", "bench", "serve-bench"]), st.lists(words, max_size=6))
def test_random_arguments_exit_with_a_code_never_a_traceback(tiny_folder, capsys, command, extra):
    # every run is bounded: tiny model, 2 new tokens, 1 prompt; serve-bench never reaches a server (bad URLs or
    # 127.0.0.1:9, the discard port, refused at once)
    fixed = {"generate": ["--target", tiny_folder, "--device", "cpu", "--max-new-tokens", "2", "--prompt", "t5"],
             "compare": ["--target", tiny_folder, "--device", "cpu", "--max-new-tokens", "2", "--prompts",
                         "summarization:1", "--drafters", "prompt-lookup"],
             "bench": ["--target", tiny_folder, "--device", "cpu", "--max-new-tokens", "2", "--prompts",
                       "summarization:1", "--drafter", "prompt-lookup", "--batch-sizes", "1"],
             "serve-bench": ["--on", "http://127.0.0.1:9", "--prompts", "summarization:1", "--timeout-s", "1"]}[command]
    if "--max-new-tokens" in extra:  # never a long decode
        extra = extra[: extra.index("--max-new-tokens")]
    code = main([command, *fixed, *extra])
    captured = capsys.readouterr()
    assert code in (0, 1, 2), code
    if code:
        assert captured.err.startswith("error: ") or captured.err.startswith("usage"), captured.err
        assert "Traceback" not in captured.err
    assert not math.isnan(code)
