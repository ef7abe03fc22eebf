"""A client of real serving engines: OpenAI-compatible requests and the engine's own speculation counters.

The lab measures its own decoder; teams ship vLLM, SGLang or llama.cpp. This
module talks to any OpenAI-compatible server and reads what that engine says
about speculation, so a team's traffic can be measured on its own deployment
(``lab.studies.serve_bench`` drives the load).

Requests (:func:`stream_request`): ``POST {base}/v1/completions`` (or
``/v1/chat/completions``) with ``stream: true`` and
``stream_options: {"include_usage": true}``, greedy by default. From the
server-sent events, timed on the client with ``time.perf_counter``:

- ttft_ms: request sent -> first event carrying generated text;
- itl_ms: gaps between consecutive events carrying text (``vllm bench serve``'s
  ITL; an engine that sends several accepted tokens in one event shows one gap
  for them, one that sends them as separate events shows near-zero gaps);
- e2el_ms: request sent -> end of the stream;
- output_tokens: the final usage chunk's ``completion_tokens`` (else the count
  of text events); tpot_ms = (e2el_ms - ttft_ms) / (output_tokens - 1).

Per-request speculation, where the engine reports it:

- llama.cpp: ``timings.draft_n`` / ``timings.draft_n_accepted`` (and
  ``timings.prompt_ms`` / ``predicted_ms``, the server's own clock);
- vLLM: ``metrics.speculative_decoding`` (``num_spec_steps``,
  ``num_draft_tokens``, ``num_accepted_draft_tokens``, ``acceptance_histogram``)
  when the server runs with ``--per-request-spec-decode-metrics summary``;
- SGLang: ``meta_info.spec_verify_ct`` (verify steps) where the response has it.

Engine-wide counters: ``lab.serving.counters`` reads ``GET {base}/metrics``
(:func:`scrape_metrics` here fetches it). Server URLs are checked first
(``lab.serving.urls.check_url``).

Conventions are vLLM's (``lab.metrics``): acceptance rate = accepted / drafted
tokens; mean acceptance length = 1 + accepted / drafts (counts the target's own
token); per-position acceptance[i] = accepted at position i / drafts; NaN when
nothing was drafted.

Errors (:class:`ServeError`) say what went wrong and where: a refused
connection, a timeout, an HTTP 4xx/5xx with the server's own message, or a
model the server does not serve (:func:`check_endpoint`, from ``/v1/models``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from lab.serving.counters import MetricsSnapshot, parse_metrics
from lab.serving.urls import check_url

API_NAMES = ("completions", "chat")
Api = Literal["completions", "chat"]
OWNED_BY_ENGINES = {"vllm": "vllm", "llamacpp": "llama.cpp", "sglang": "sglang"}


class ServeError(RuntimeError):
    """A serving endpoint cannot be used; the message says which and why (refused, timeout, HTTP status, model)."""


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server.

    url: base URL such as ``http://127.0.0.1:8080`` (a trailing ``/v1`` is accepted).
    model: the model name sent with each request; None asks ``/v1/models`` and
        takes the first one served (:func:`check_endpoint`).
    api: ``"completions"`` (raw prompt text) or ``"chat"`` (one user message;
        the server applies its chat template).
    label: a name for tables and plots ("on", "off", ...).

    Raises URLError (a ValueError) for a URL :func:`check_url` refuses, ValueError for an unknown api.
    """

    url: str
    model: str | None = None
    api: Api = "completions"
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", check_url(self.url))  # normalised (a frozen dataclass sets it this way)
        if self.api not in API_NAMES:
            raise ValueError(f"Endpoint api requires one of {', '.join(API_NAMES)}; got {self.api!r}")

    @property
    def base(self) -> str:
        """The URL without a trailing slash or ``/v1``."""
        return self.url.rstrip("/").removesuffix("/v1").rstrip("/")

    @property
    def request_path(self) -> str:
        return "/v1/completions" if self.api == "completions" else "/v1/chat/completions"


# ---------------------------------------------------------------- engine counters


@dataclass
class RequestRecord:
    """One request's outcome; times are client-side milliseconds unless named ``server_``.

    prompt_id: which prompt was sent. ok: the stream finished with HTTP 200.
    error: why not, for a person ("" when ok). start_s: when it was sent,
    seconds after its run began. ttft_ms, e2el_ms, itl_ms: see the module
    docstring. input_tokens / output_tokens: from the usage chunk (None when
    the server sent none). draft_tokens / accepted_tokens / spec_steps /
    accepted_per_position: the engine's per-request speculation counts, where
    it reports them (None otherwise). server_prompt_ms / server_predicted_ms:
    llama.cpp's ``timings.prompt_ms`` / ``predicted_ms``.
    """

    prompt_id: str
    ok: bool = False
    error: str = ""
    start_s: float = 0.0
    ttft_ms: float | None = None
    e2el_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    text: str = ""
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    spec_steps: int | None = None
    accepted_per_position: list[int] | None = None
    server_prompt_ms: float | None = None
    server_predicted_ms: float | None = None
    server_cached_tokens: int | None = None

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first: (e2el - ttft) / (output_tokens - 1); None below 2 tokens."""
        if not self.ok or self.ttft_ms is None or self.e2el_ms is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2el_ms - self.ttft_ms) / (self.output_tokens - 1)

    def as_dict(self) -> dict:
        return asdict(self) | {"tpot_ms": self.tpot_ms}


@dataclass(frozen=True)
class RequestSettings:
    """What every request asks for.

    max_tokens: output tokens per request (>= 1). temperature: 0 is greedy.
    ignore_eos: ask the engine to generate all max_tokens (vLLM, llama.cpp and
    SGLang accept it; the figures then compare equal work). timeout_s: per
    request, for connect and for each read.

    Raises ValueError for max_tokens < 1, a negative temperature or timeout_s <= 0.
    """

    max_tokens: int = 32
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"RequestSettings requires max_tokens >= 1; got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"RequestSettings requires temperature >= 0; got {self.temperature}")
        if self.timeout_s <= 0:
            raise ValueError(f"RequestSettings requires timeout_s > 0; got {self.timeout_s}")


def request_body(endpoint: Endpoint, model: str | None, prompt: str, settings: RequestSettings) -> dict:
    """The JSON body of one streamed request (OpenAI shape, plus ``ignore_eos`` when set)."""
    body: dict[str, Any] = {
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    if settings.ignore_eos:
        body["ignore_eos"] = True
    if endpoint.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def chunk_text(chunk: Mapping[str, Any]) -> str:
    """The generated text one streamed chunk carries ("" for usage-only or role-only chunks)."""
    pieces = []
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            pieces.append(choice.get("text") or "")
        delta = choice.get("delta") or {}
        pieces.append(delta.get("content") or "")
        pieces.append(delta.get("reasoning_content") or "")
    return "".join(pieces)


def read_spec_fields(chunk: Mapping[str, Any], record: RequestRecord) -> None:
    """Copy the per-request fields an engine puts in a chunk (usage, llama.cpp timings, vLLM metrics, SGLang meta_info)."""
    usage = chunk.get("usage")
    if isinstance(usage, Mapping):
        record.input_tokens = _int_or(usage.get("prompt_tokens"), record.input_tokens)
        record.output_tokens = _int_or(usage.get("completion_tokens"), record.output_tokens)
    timings = chunk.get("timings")
    if isinstance(timings, Mapping):
        record.server_prompt_ms = _float_or(timings.get("prompt_ms"), record.server_prompt_ms)
        record.server_predicted_ms = _float_or(timings.get("predicted_ms"), record.server_predicted_ms)
        record.server_cached_tokens = _int_or(timings.get("cache_n"), record.server_cached_tokens)
        if "draft_n" in timings:
            record.draft_tokens = _int_or(timings.get("draft_n"), record.draft_tokens)
            record.accepted_tokens = _int_or(timings.get("draft_n_accepted"), record.accepted_tokens)
    spec = (chunk.get("metrics") or {}).get("speculative_decoding") if isinstance(chunk.get("metrics"), Mapping) else None
    if isinstance(spec, Mapping):
        record.draft_tokens = _int_or(spec.get("num_draft_tokens"), record.draft_tokens)
        record.accepted_tokens = _int_or(spec.get("num_accepted_draft_tokens"), record.accepted_tokens)
        record.spec_steps = _int_or(spec.get("num_spec_steps"), record.spec_steps)
        histogram = spec.get("acceptance_histogram")
        if isinstance(histogram, list) and histogram:
            record.accepted_per_position = accepted_per_position_from_histogram(histogram)
    meta = chunk.get("meta_info")
    if isinstance(meta, Mapping) and "spec_verify_ct" in meta:
        record.spec_steps = _int_or(meta.get("spec_verify_ct"), record.spec_steps)


def accepted_per_position_from_histogram(histogram: Sequence[int]) -> list[int]:
    """vLLM's ``acceptance_histogram`` (index j: steps that accepted exactly j tokens) -> accepted count per position.

    Position i is accepted in every step that accepted more than i tokens:
    ``[39, 1, 0, 3]`` -> ``[4, 3, 3]``.
    """
    return [sum(histogram[j] for j in range(i + 1, len(histogram))) for i in range(len(histogram) - 1)]


async def stream_request(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    model: str | None,
    prompt_id: str,
    prompt: str,
    settings: RequestSettings,
    started_at: float = 0.0,
) -> RequestRecord:
    """Send one streamed request and time it; never raises for server trouble.

    client: an ``httpx.AsyncClient`` (one per run; its pool bounds nothing here,
    the caller bounds concurrency). started_at: ``time.perf_counter()`` of the
    run's start, for ``start_s``. A refused connection, a timeout, an HTTP error
    status (with the server's message) or a malformed stream gives a record with
    ``ok=False`` and ``error`` saying which.

    ``settings.timeout_s`` bounds the whole request, not only each connect, read,
    write and pool wait (httpx's own timeouts, also set): a server that trickles
    bytes slower than that is cut off at the deadline.
    """
    record = RequestRecord(prompt_id=prompt_id)
    url = endpoint.base + endpoint.request_path
    try:
        await asyncio.wait_for(_stream_into(record, client, endpoint, model, prompt, settings, started_at),
                               settings.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        record.ok = False
        record.error = f"{url}: no answer within {settings.timeout_s:g} s (timeout)"
    return record


async def _stream_into(record: RequestRecord, client: httpx.AsyncClient, endpoint: Endpoint, model: str | None,
                       prompt: str, settings: RequestSettings, started_at: float) -> None:
    """The body of :func:`stream_request`: fills ``record`` (timeouts are the caller's)."""
    sent = time.perf_counter()
    record.start_s = sent - started_at if started_at else 0.0
    last_text_at: float | None = None
    text_events = 0
    pieces: list[str] = []
    url = endpoint.base + endpoint.request_path
    try:
        async with client.stream("POST", url, json=request_body(endpoint, model, prompt, settings),
                                 timeout=httpx.Timeout(settings.timeout_s)) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = http_error_message(url, response.status_code, response.text)
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, Mapping):
                    raise ValueError(f"a data line holds {type(chunk).__name__}, not an object")
                if "error" in chunk:
                    record.error = f"{url}: the server reported an error mid-stream: {_error_text(chunk)}"
                    return
                now = time.perf_counter()
                text = chunk_text(chunk)
                if text:
                    if last_text_at is None:
                        record.ttft_ms = (now - sent) * 1e3
                    else:
                        record.itl_ms.append((now - last_text_at) * 1e3)
                    last_text_at = now
                    text_events += 1
                    pieces.append(text)
                read_spec_fields(chunk, record)
    except httpx.ConnectError as error:
        record.error = f"{endpoint.base}: cannot connect ({_reason(error)}); is the server running at this address?"
        return
    except httpx.TimeoutException:
        raise
    except httpx.HTTPError as error:
        record.error = f"{url}: {type(error).__name__}: {_reason(error)}"
        return
    except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as error:
        record.error = f"{url}: the stream is not OpenAI-style server-sent events ({error})"
        return
    record.e2el_ms = (time.perf_counter() - sent) * 1e3
    record.text = "".join(pieces)
    if record.output_tokens is None:
        record.output_tokens = text_events
    if record.ttft_ms is None:
        record.error = f"{url}: the stream ended without any generated text"
        return
    record.ok = True


def http_error_message(url: str, status: int, body: str) -> str:
    """One line for a person: the URL, the status and the server's own message (OpenAI/llama.cpp/vLLM JSON or text)."""
    try:
        detail = _error_text(json.loads(body))
    except ValueError:
        detail = body.strip()
    detail = " ".join(detail.split())[:300] or "(no message)"
    kind = "client error" if 400 <= status < 500 else "server error" if status >= 500 else "unexpected status"
    return f"{url}: HTTP {status} ({kind}): {detail}"


# ---------------------------------------------------------------- endpoint checks


@dataclass(frozen=True)
class EndpointInfo:
    """What a server says about itself: the engine (from ``owned_by`` or metric prefixes), models, metrics."""

    engine: str
    models: tuple[str, ...]
    model: str | None
    metrics: bool


async def check_endpoint(client: httpx.AsyncClient, endpoint: Endpoint, timeout_s: float = 10.0) -> EndpointInfo:
    """Ask ``/v1/models``, send a one-token completion, and read ``/metrics``, before a run.

    Returns the engine name ("" when unknown), the models served, the model to
    send (``endpoint.model``, else the first one served) and whether
    ``/metrics`` answered. Each request is bounded by ``timeout_s`` overall.

    Raises:
        ServeError: the server refuses the connection or times out, answers
            ``/v1/models`` with an error, is not an OpenAI-compatible engine
            (``/v1/models`` is not ``{"data": [{"id": ...}, ...]}``, or the
            completion path is missing or answers in another shape), serves no
            model, or does not serve ``endpoint.model``.
    """
    url = endpoint.base + "/v1/models"
    response = await _get(client, url, endpoint, timeout_s)
    if response.status_code != 200:
        raise ServeError(http_error_message(url, response.status_code, response.text))
    models = _model_ids(response)
    if models is None:
        raise ServeError(f"{endpoint.base} is not an OpenAI-compatible engine: GET /v1/models answered "
                         f"{_describe_body(response)}, not a list of models ({{\"data\": [{{\"id\": ...}}]}}). "
                         "Give the URL of a vLLM, SGLang or llama.cpp server.")
    if not models:
        raise ServeError(f"{endpoint.base} serves no model: GET /v1/models answered an empty list. Start the server "
                         "with a model loaded.")
    data = response.json()["data"]
    engine = next((OWNED_BY_ENGINES[str(item.get("owned_by", "")).lower()] for item in data
                   if str(item.get("owned_by", "")).lower() in OWNED_BY_ENGINES), "")
    if endpoint.model and endpoint.model not in models:
        raise ServeError(f"{endpoint.base} does not serve the model {endpoint.model!r}: it serves {', '.join(models)}")
    model = endpoint.model or models[0]
    await probe_completion(client, endpoint, model, timeout_s)
    snapshot = await scrape_metrics(client, endpoint, timeout_s)
    if snapshot is not None and snapshot.engine:
        engine = engine or snapshot.engine
    return EndpointInfo(engine=engine, models=models, model=model, metrics=snapshot is not None)


async def probe_completion(client: httpx.AsyncClient, endpoint: Endpoint, model: str | None, timeout_s: float) -> None:
    """Send a one-token streamed completion; raise ServeError if the answer is not an OpenAI-compatible one.

    Refused: the path is missing (HTTP 404, 405, 501), or HTTP 200 whose first
    server-sent ``data:`` line is not a JSON object with ``choices`` (or
    ``error``), or no ``data:`` line at all. Other statuses (an engine's own
    400 or 500) pass: they are the engine speaking, and the sweep reports them
    per request. A timeout or a refused connection is a ServeError too.
    """
    url = endpoint.base + endpoint.request_path
    body = request_body(endpoint, model, "Hi", RequestSettings(max_tokens=1, timeout_s=timeout_s))
    not_engine = f"{endpoint.base} is not an OpenAI-compatible engine: POST {endpoint.request_path} answered"

    async def probe() -> None:
        async with client.stream("POST", url, json=body, timeout=httpx.Timeout(timeout_s)) as response:
            if response.status_code in (404, 405, 501):
                await response.aread()
                raise ServeError(f"{not_engine} HTTP {response.status_code} ({_describe_body(response)}): it has no "
                                 f"{endpoint.request_path}. Check the URL, or try the other API (chat / completions).")
            if response.status_code != 200:
                return
            seen = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data = line[len("data:"):].strip()
                    try:
                        chunk = json.loads(data) if data != "[DONE]" else {"choices": []}
                    except ValueError:
                        chunk = None
                    if not (isinstance(chunk, Mapping) and (isinstance(chunk.get("choices"), list) or "error" in chunk)):
                        raise ServeError(f"{not_engine} a stream whose data is {_snippet(data)}, not an OpenAI "
                                         "completion chunk ({\"choices\": [...]}).")
                    return
                seen.append(line)
                if len(seen) > 50 or sum(map(len, seen)) > 4000:
                    break
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise ServeError(f"{not_engine} {kind} {_snippet(' '.join(seen))}, not server-sent events of an "
                             "OpenAI completion.")

    try:
        await asyncio.wait_for(probe(), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException) as error:
        raise ServeError(f"{url}: no answer to a one-token completion within {timeout_s:g} s (timeout)") from error
    except httpx.ConnectError as error:
        raise ServeError(f"{endpoint.base}: cannot connect ({_reason(error)}); is the server running at this address?") from error
    except httpx.HTTPError as error:
        raise ServeError(f"{url}: {type(error).__name__}: {_reason(error)}") from error


async def scrape_metrics(client: httpx.AsyncClient, endpoint: Endpoint, timeout_s: float = 10.0) -> MetricsSnapshot | None:
    """``GET {base}/metrics`` parsed (:func:`parse_metrics`); None when the server has none, it fails to parse, or
    no answer comes within ``timeout_s``."""
    try:
        response = await asyncio.wait_for(client.get(endpoint.base + "/metrics", timeout=httpx.Timeout(timeout_s)),
                                          timeout_s)
        if response.status_code != 200:
            return None
        return parse_metrics(response.text)
    except (httpx.HTTPError, ValueError, asyncio.TimeoutError):
        return None


async def _get(client: httpx.AsyncClient, url: str, endpoint: Endpoint, timeout_s: float) -> httpx.Response:
    """GET ``url`` within ``timeout_s`` overall; connection trouble and timeouts as ServeError."""
    try:
        return await asyncio.wait_for(client.get(url, timeout=httpx.Timeout(timeout_s)), timeout_s)
    except httpx.ConnectError as error:
        raise ServeError(f"{endpoint.base}: cannot connect ({_reason(error)}); is the server running at this address?") from error
    except (asyncio.TimeoutError, httpx.TimeoutException) as error:
        raise ServeError(f"{url}: no answer within {timeout_s:g} s (timeout)") from error
    except httpx.HTTPError as error:
        raise ServeError(f"{url}: {type(error).__name__}: {_reason(error)}") from error


def _model_ids(response: httpx.Response) -> tuple[str, ...] | None:
    """The ids of an OpenAI ``/v1/models`` answer; None when it is not that shape."""
    try:
        payload = response.json()
    except ValueError:
        return None
    data = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(data, list) or not all(isinstance(item, Mapping) and isinstance(item.get("id"), str)
                                             and item["id"] for item in data):
        return None
    return tuple(item["id"] for item in data)


def _describe_body(response: httpx.Response) -> str:
    """What a response held, for a person: its content type and the start of its text."""
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    return f"{kind} {_snippet(response.text)}"


def _snippet(text: str, width: int = 80) -> str:
    flat = " ".join(str(text).split())
    return repr(flat[:width] + ("…" if len(flat) > width else "")) if flat else "(empty)"


# ---------------------------------------------------------------- helpers


def _error_text(payload: Any) -> str:
    if isinstance(payload, Mapping):
        error = payload.get("error", payload)
        if isinstance(error, Mapping):
            return str(error.get("message") or error.get("detail") or json.dumps(error))
        if "detail" in payload:
            return str(payload["detail"])
        if "message" in payload:
            return str(payload["message"])
        return str(error)
    return str(payload)


def _reason(error: Exception) -> str:
    text = str(error).strip()
    if isinstance(error, httpx.ConnectError) and ("refused" in text.lower() or "all connection attempts failed" in text.lower()):
        return "connection refused"
    return text or type(error).__name__


def _int_or(value: Any, default: int | None) -> int | None:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _float_or(value: Any, default: float | None) -> float | None:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
