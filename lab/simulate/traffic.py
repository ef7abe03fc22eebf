"""Traffic for the workload simulator: who arrives when, with how many prompt and output tokens, of which category.

Three shapes (``Traffic.kind``):

- "poisson": open loop, exponential gaps at ``rate_per_s`` requests per second;
- "closed": ``concurrency`` clients, each sending its next request the moment
  its last one ends (serve-bench's and the Batch page's load);
- "trace": the requests of a file (:func:`read_trace`), arrival times as given.

Lengths come from the trace, or from ``prompt_tokens`` / ``output_tokens``
(means, in tokens) spread uniformly by ``length_spread`` (0: every request the
same). Categories come from the trace, or are drawn from ``mix``
({category: weight}).
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

TrafficKind = Literal["poisson", "closed", "trace"]
TRACE_FIELDS = ("arrival_s", "prompt_tokens", "output_tokens", "category")


@dataclass(frozen=True, slots=True)
class Request:
    """One request. arrival_s: seconds from the start (ignored by a closed loop, which sets it);
    prompt_tokens, output_tokens: tokens (output >= 1); category: its acceptance profile's key;
    cached_tokens: the prompt's tokens already in the engine's KV cache (a prefix or prompt cache:
    llama-server keeps each slot's last prompt), which the prefill skips and attention still reads
    (at most prompt_tokens - 1: the last one is always fed)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    category: str = "all"
    cached_tokens: int = 0


@dataclass(frozen=True)
class Traffic:
    """A load to simulate (see the module docstring).

    kind: "poisson", "closed" or "trace". rate_per_s: arrivals per second
        (poisson). concurrency: clients (closed). num_requests: requests in all
        (poisson, closed; a trace has its own). prompt_tokens, output_tokens:
        mean lengths in tokens. length_spread: each length is drawn uniformly
        in mean x [1 - s, 1 + s] (0 <= s < 1). mix: {category: weight} the
        categories are drawn from. requests: a trace's requests, by arrival; or,
        for a closed loop, the exact requests its clients send, in order (their
        arrival_s ignored; num_requests, lengths and mix are then unused).

    Raises ValueError on a negative or zero rate, concurrency < 1, no requests,
    lengths < 1, a spread outside [0, 1) or an empty mix.
    """

    kind: TrafficKind = "closed"
    rate_per_s: float = 0.0
    concurrency: int = 1
    num_requests: int = 200
    prompt_tokens: int = 128
    output_tokens: int = 64
    length_spread: float = 0.0
    mix: dict[str, float] = field(default_factory=lambda: {"all": 1.0})
    requests: tuple[Request, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "closed", "trace"):
            raise ValueError(f"traffic kind requires 'poisson', 'closed' or 'trace'; got {self.kind!r}")
        if self.kind == "poisson" and not self.rate_per_s > 0:
            raise ValueError(f"Poisson traffic requires a rate > 0 requests/s; got {self.rate_per_s}")
        if self.kind == "closed" and self.concurrency < 1:
            raise ValueError(f"closed-loop traffic requires concurrency >= 1; got {self.concurrency}")
        if self.kind == "trace" and not self.requests:
            raise ValueError("trace traffic requires at least one request; got an empty trace")
        if self.kind != "trace" and self.num_requests < 1:
            raise ValueError(f"traffic requires num_requests >= 1; got {self.num_requests}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"traffic requires prompt and output tokens >= 1; got {self.prompt_tokens}, "
                             f"{self.output_tokens}")
        if not 0.0 <= self.length_spread < 1.0:
            raise ValueError(f"length_spread requires 0 <= s < 1; got {self.length_spread}")
        if not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix requires at least one category with a positive weight; got {self.mix}")

    @property
    def load(self) -> float:
        """The load's one number: requests/s (poisson), clients (closed), mean arrival rate (trace)."""
        if self.kind == "poisson":
            return self.rate_per_s
        if self.kind == "closed":
            return float(self.concurrency)
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s
        return len(self.requests) / span if span > 0 else float("inf")

    @property
    def categories(self) -> set[str]:
        return {r.category for r in self.requests} if self.requests else set(self.mix)

    def at_load(self, load: float) -> "Traffic":
        """The same traffic at another load: a rate (poisson), a concurrency (closed), or the trace's arrival
        times scaled so that its mean rate is ``load`` requests/s (trace)."""
        if self.kind == "poisson":
            return replace(self, rate_per_s=float(load))
        if self.kind == "closed":
            return replace(self, concurrency=int(load))
        scale = self.load / load
        start = self.requests[0].arrival_s
        return replace(self, requests=tuple(replace(r, arrival_s=start + (r.arrival_s - start) * scale)
                                            for r in self.requests))

    def draw(self, rng: random.Random) -> list[Request]:
        """The requests, in arrival order (a closed loop's arrival_s are all 0: the engine sets them)."""
        if self.requests:
            return list(self.requests)
        names = list(self.mix)
        weights = [self.mix[n] for n in names]
        out, t = [], 0.0
        for _ in range(self.num_requests):
            if self.kind == "poisson":
                t += rng.expovariate(self.rate_per_s)
            category = names[0] if len(names) == 1 else rng.choices(names, weights)[0]
            out.append(Request(t, self._length(self.prompt_tokens, rng), self._length(self.output_tokens, rng),
                               category))
        return out

    def _length(self, mean: int, rng: random.Random) -> int:
        if self.length_spread == 0:
            return mean
        return max(1, round(mean * rng.uniform(1 - self.length_spread, 1 + self.length_spread)))


def read_trace(source: str | Path | io.TextIOBase, name: str = "") -> tuple[Request, ...]:
    """Requests from a CSV (header with the fields below) or JSONL file (one object per line), sorted by arrival.

    Fields: arrival_s (seconds, >= 0), prompt_tokens (>= 1), output_tokens
    (>= 1), category (optional, default "all"). source: a path, or an open
    text stream (then ``name`` says CSV or JSONL by its suffix, default: sniffed).

    Raises ValueError on an empty file, a missing field, or a value out of range,
    naming the line.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ValueError(f"a trace requires an existing CSV or JSONL file; got {str(path)!r}, which does not exist")
        text, name = path.read_text(), path.name
    else:
        text = source.read()
    if not text.strip():
        raise ValueError(f"a trace requires at least one request; got an empty file {name!r}".replace(" ''", ""))
    jsonl = name.endswith((".jsonl", ".json")) or (not name.endswith(".csv") and text.lstrip().startswith("{"))
    rows: list[tuple[int, dict]] = []
    if jsonl:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"trace line {number}: expected a JSON object; got {line[:60]!r} ({error.msg})") from None
    else:
        reader = csv.DictReader(io.StringIO(text))
        missing = [f for f in TRACE_FIELDS[:3] if f not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"a CSV trace requires the columns {', '.join(TRACE_FIELDS)} (category optional); "
                             f"got {reader.fieldnames}")
        rows = [(number, row) for number, row in enumerate(reader, 2)]
    requests = [_request(number, row) for number, row in rows]
    if not requests:
        raise ValueError("a trace requires at least one request; got a header and no rows")
    return tuple(sorted(requests, key=lambda r: r.arrival_s))


def _request(number: int, row: dict) -> Request:
    if not isinstance(row, dict):
        raise ValueError(f"trace line {number}: expected an object with {', '.join(TRACE_FIELDS)}; got {row!r}")
    try:
        request = Request(float(row["arrival_s"]), int(row["prompt_tokens"]), int(row["output_tokens"]),
                          str(row.get("category") or "all"))
    except KeyError as error:
        raise ValueError(f"trace line {number}: expected the field {error.args[0]!r}; got {sorted(row)}") from None
    except (TypeError, ValueError):
        raise ValueError(f"trace line {number}: expected numbers for arrival_s, prompt_tokens, output_tokens; "
                         f"got {row!r}") from None
    if request.arrival_s < 0 or request.prompt_tokens < 1 or request.output_tokens < 1:
        raise ValueError(f"trace line {number}: expected arrival_s >= 0 and token counts >= 1; got {row!r}")
    return request


def trace_traffic(source: str | Path | io.TextIOBase, name: str = "") -> Traffic:
    """A "trace" Traffic of a file (:func:`read_trace`); its mean lengths fill prompt_tokens and output_tokens."""
    requests = read_trace(source, name)
    return Traffic("trace", requests=requests, num_requests=len(requests),
                   prompt_tokens=max(1, round(sum(r.prompt_tokens for r in requests) / len(requests))),
                   output_tokens=max(1, round(sum(r.output_tokens for r in requests) / len(requests))),
                   mix={c: 1.0 for c in sorted({r.category for r in requests})})
