"""Load a real serving engine at rising concurrency, speculation on and off: the Batch page's picture, measured.

``run_serve_bench`` takes two (or more) OpenAI-compatible endpoints, typically
the same model served with speculation on and off, a prompt list and
concurrency levels such as 1, 2, 4, 8, 16. Per level, each endpoint gets a
closed-loop load (``run_level``): ``concurrency`` workers, each sending its next
request as soon as its last one ends, until ``num_requests(concurrency)``
requests were sent or ``max_level_s`` passed (no request starts after that; each
is bounded by its own timeout). Prompts are cycled in order. Endpoints run one
at a time, alternating which goes first from level to level, so drift on a
shared machine hits both alike; ``/metrics`` is scraped before and after each
run and the speculation counters diffed (``lab.serving.client``).

Per endpoint and level (:func:`summarize`), named as ``vllm bench serve`` names
them: completed, failed, duration (s), total_input_tokens,
total_output_tokens, request_throughput (req/s), output_throughput (tokens/s),
total_token_throughput, and mean / median / std / p95 / p99 of ttft_ms,
tpot_ms, itl_ms, e2el_ms; and where the engine reports them
spec_decode_acceptance_rate (PERCENT, as vLLM prints it),
spec_decode_acceptance_length (mean acceptance length, counting the target's
own token), spec_decode_num_drafts, spec_decode_draft_tokens,
spec_decode_accepted_tokens and spec_decode_per_position_acceptance_rates
(fractions). spec_decode_source says where they came from: "metrics" (counter
diff; the only source of per-position figures on llama.cpp), "per-request"
(summed per-request fields), "gauge" (SGLang's recent average) or None, with a
note saying why acceptance is unavailable.

Per level, comparing the first endpoint (on) with the second (off):
latency_speedup = off median e2el / on median e2el (> 1: a user waits less with
speculation), throughput_speedup = on output_throughput / off output_throughput.
The crossover is the smallest concurrency whose latency speedup is below 1, as
on the Batch page (``lab.studies.batch_sweep``); the throughput crossover likewise.

A level where every request of one endpoint failed stops the sweep
(``stopped`` says why); finished levels are kept. ``should_stop()`` is polled
before each request starts: a stopped level is dropped, finished ones are kept.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from lab.prompts import Prompt
from lab.metrics import percentile  # the Batch page's percentile: the same numbers both ways
from lab.serving.counters import MetricsSnapshot, SpecCounters, counters_between
from lab.serving.client import (
    Endpoint,
    EndpointInfo,
    RequestRecord,
    RequestSettings,
    check_endpoint,
    scrape_metrics,
    stream_request,
)

Progress = Callable[[float, str], None]
DEFAULT_LEVELS = (1, 2, 4, 8, 16)
PERCENTILES = (50, 95, 99)
LATENCY_FIELDS = ("ttft", "tpot", "itl", "e2el")
NO_ACCEPTANCE_NOTE = ("acceptance unavailable: the server exposes no speculation counters on /metrics and no "
                      "per-request draft counts (speculation off, metrics disabled, or an engine the lab does not know)")


# ---------------------------------------------------------------- what one run gives


@dataclass
class LevelRun:
    """One endpoint at one concurrency level.

    label: the endpoint's label. concurrency: workers. records: every request
    sent, in the order they finished. duration_s: first request sent -> last
    one ended. counters: the engine's spec-decode counter diff over the run
    (None when /metrics has none). gauges: SGLang's gauges after the run.
    """

    label: str
    concurrency: int
    records: list[RequestRecord]
    duration_s: float
    counters: SpecCounters | None = None
    gauges: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """:func:`summarize` of this run, with ``label`` and ``max_concurrency``."""
        return {"label": self.label, "max_concurrency": self.concurrency} | summarize(
            self.records, self.duration_s, self.counters, self.gauges)

    def as_dict(self) -> dict:
        return self.summary() | {"requests": [record.as_dict() for record in self.records]}


def summarize(records: Sequence[RequestRecord], duration_s: float, counters: SpecCounters | None = None,
              gauges: dict[str, float] | None = None) -> dict:
    """Per-run figures named as ``vllm bench serve`` names them (see the module docstring).

    records: the run's requests (failed ones count in ``failed`` only).
    duration_s: the run's wall time in seconds (> 0 for throughputs, else NaN).
    ITL pools every gap of every request; TPOT is per request, then summarised.
    NaN (None in JSON) where nothing was measured.
    """
    done = [r for r in records if r.ok]
    input_tokens = sum(r.input_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens or 0 for r in done)
    per = lambda x: x / duration_s if duration_s > 0 else math.nan  # noqa: E731
    result: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if not r.ok})[:5],
        "duration": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per(len(done)),
        "output_throughput": per(output_tokens),
        "total_token_throughput": per(input_tokens + output_tokens),
    }
    samples = {
        "ttft": [r.ttft_ms for r in done if r.ttft_ms is not None],
        "tpot": [r.tpot_ms for r in done if r.tpot_ms is not None],
        "itl": [gap for r in done for gap in r.itl_ms],
        "e2el": [r.e2el_ms for r in done if r.e2el_ms is not None],
    }
    for name in LATENCY_FIELDS:
        values = samples[name]
        result[f"mean_{name}_ms"] = statistics.fmean(values) if values else math.nan
        result[f"median_{name}_ms"] = statistics.median(values) if values else math.nan
        result[f"std_{name}_ms"] = statistics.pstdev(values) if values else math.nan
        for q in PERCENTILES:
            result[f"p{q}_{name}_ms"] = percentile(values, q)
    return result | acceptance(done, counters, gauges or {})


def acceptance(records: Sequence[RequestRecord], counters: SpecCounters | None, gauges: dict[str, float]) -> dict:
    """The spec_decode_* fields from the best source there is: counter diff, per-request sums, SGLang gauge, none."""
    fields: dict[str, Any] = {
        "spec_decode_acceptance_rate": math.nan,
        "spec_decode_acceptance_length": math.nan,
        "spec_decode_num_drafts": None,
        "spec_decode_draft_tokens": None,
        "spec_decode_accepted_tokens": None,
        "spec_decode_per_position_acceptance_rates": [],
        "spec_decode_source": None,
        "spec_decode_note": "",
        "request_draft_tokens": None,
        "request_accepted_tokens": None,
    }
    reported = [r for r in records if r.draft_tokens is not None]
    if reported:  # per-request sums, kept beside the counters so the two can be checked against each other
        fields["request_draft_tokens"] = sum(r.draft_tokens or 0 for r in reported)
        fields["request_accepted_tokens"] = sum(r.accepted_tokens or 0 for r in reported)
    if counters is not None and counters.num_draft_tokens > 0:
        fields |= {
            "spec_decode_acceptance_rate": counters.acceptance_rate * 100,
            "spec_decode_acceptance_length": counters.mean_acceptance_length,
            "spec_decode_num_drafts": int(counters.num_drafts),
            "spec_decode_draft_tokens": int(counters.num_draft_tokens),
            "spec_decode_accepted_tokens": int(counters.num_accepted_tokens),
            "spec_decode_per_position_acceptance_rates": counters.per_position_acceptance,
            "spec_decode_source": "metrics",
        }
        return fields
    drafted = fields["request_draft_tokens"] or 0
    if drafted > 0:
        accepted = fields["request_accepted_tokens"] or 0
        steps = [r.spec_steps for r in reported if r.spec_steps is not None]
        num_drafts = sum(steps) if len(steps) == len(reported) else None
        per_position: list[float] = []
        histograms = [r.accepted_per_position for r in reported if r.accepted_per_position is not None]
        if num_drafts and len(histograms) == len(reported):
            width = max(len(h) for h in histograms)
            per_position = [sum(h[i] for h in histograms if i < len(h)) / num_drafts for i in range(width)]
        fields |= {
            "spec_decode_acceptance_rate": accepted / drafted * 100,
            "spec_decode_acceptance_length": 1 + accepted / num_drafts if num_drafts else math.nan,
            "spec_decode_num_drafts": num_drafts,
            "spec_decode_draft_tokens": drafted,
            "spec_decode_accepted_tokens": accepted,
            "spec_decode_per_position_acceptance_rates": per_position,
            "spec_decode_source": "per-request",
            "spec_decode_note": "" if per_position else "per-position acceptance needs the engine's /metrics counters",
        }
        return fields
    sglang_steps = [r for r in records if r.spec_steps]
    if sglang_steps:  # SGLang meta_info: verify steps per request, no draft counts
        steps = sum(r.spec_steps or 0 for r in sglang_steps)
        tokens = sum(r.output_tokens or 0 for r in sglang_steps)
        fields |= {"spec_decode_acceptance_length": tokens / steps, "spec_decode_num_drafts": steps,
                   "spec_decode_source": "per-request",
                   "spec_decode_note": "acceptance length = output tokens / verify steps (SGLang meta_info)"}
        return fields
    if "spec_accept_length" in gauges:
        fields |= {"spec_decode_acceptance_length": gauges["spec_accept_length"],
                   "spec_decode_acceptance_rate": gauges.get("spec_accept_rate", math.nan) * 100,
                   "spec_decode_source": "gauge",
                   "spec_decode_note": "SGLang's gauge: the server's recent average, not this run alone"}
        return fields
    if counters is not None:
        fields["spec_decode_note"] = "no tokens drafted during this run (the engine's counters did not move)"
    else:
        fields["spec_decode_note"] = NO_ACCEPTANCE_NOTE
    return fields


# ---------------------------------------------------------------- the whole sweep


@dataclass
class ServeBench:
    """A finished (or stopped) sweep. settings: what was asked; engines: label -> what each server said;
    runs: every finished (endpoint, level) run; stopped: why the sweep ended early ("" when it did not);
    lab: the lab's own engine on the same prompts (``lab.studies.serve_reference.run_lab_reference``), when run."""

    settings: dict
    engines: dict[str, dict] = field(default_factory=dict)
    runs: list[LevelRun] = field(default_factory=list)
    stopped: str = ""
    lab: dict | None = None

    def rows(self) -> list[dict]:
        """One summary per run, in the order they ran."""
        return [run.summary() for run in self.runs]

    def levels(self) -> list[int]:
        """Concurrency levels every endpoint finished, ascending."""
        labels = [e["label"] for e in self.settings["endpoints"]]
        done = {(run.label, run.concurrency) for run in self.runs}
        return sorted({c for _, c in done if all((label, c) in done for label in labels)})

    def comparison(self) -> list[dict]:
        """Per finished level, the first endpoint (on) against the second (off): speedups and both medians."""
        labels = [e["label"] for e in self.settings["endpoints"]]
        if len(labels) < 2:
            return []
        on, off = labels[0], labels[1]
        summaries = {(row["label"], row["max_concurrency"]): row for row in self.rows()}
        rows = []
        for level in self.levels():
            a, b = summaries[(on, level)], summaries[(off, level)]
            rows.append({
                "max_concurrency": level,
                "latency_speedup": _ratio(b["median_e2el_ms"], a["median_e2el_ms"]),
                "throughput_speedup": _ratio(a["output_throughput"], b["output_throughput"]),
                f"median_e2el_ms_{on}": a["median_e2el_ms"], f"median_e2el_ms_{off}": b["median_e2el_ms"],
                f"output_throughput_{on}": a["output_throughput"], f"output_throughput_{off}": b["output_throughput"],
            })
        return rows

    @property
    def crossover_concurrency(self) -> int | None:
        """Smallest level whose latency speedup is below 1 (speculation makes each request slower); None if none."""
        return _first_below_one(self.comparison(), "latency_speedup")

    @property
    def throughput_crossover_concurrency(self) -> int | None:
        """Smallest level whose throughput speedup is below 1; None if none."""
        return _first_below_one(self.comparison(), "throughput_speedup")

    def as_dict(self, requests: bool = True) -> dict:
        """Everything, JSON-ready (NaN becomes None); ``requests=False`` leaves out the per-request records."""
        return _clean({
            "settings": self.settings,
            "engines": self.engines,
            "levels": [run.as_dict() if requests else run.summary() for run in self.runs],
            "comparison": self.comparison(),
            "crossover_concurrency": self.crossover_concurrency,
            "throughput_crossover_concurrency": self.throughput_crossover_concurrency,
            "stopped": self.stopped,
            "lab": self.lab,
        })

    def to_json(self, requests: bool = True) -> str:
        return json.dumps(self.as_dict(requests), indent=1)

    def to_csv(self) -> str:
        """One row per (endpoint, level): the summary fields; lists joined with ';'."""
        import csv

        rows = [_clean(row) for row in self.rows()]
        if not rows:
            return ""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ";".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)
                             if isinstance(v, list) else v for k, v in row.items()})
        return out.getvalue()


def num_requests(concurrency: int, prompts: int, rounds: int) -> int:
    """Requests sent at one level: ``rounds`` per worker, and at least one per prompt."""
    return max(concurrency * rounds, prompts)


def run_serve_bench(
    endpoints: Sequence[Endpoint],
    prompts: Sequence[Prompt],
    levels: Sequence[int] = DEFAULT_LEVELS,
    settings: RequestSettings | None = None,
    rounds: int = 2,
    max_level_s: float = 300.0,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ServeBench:
    """Sweep ``levels`` over every endpoint (see the module docstring); blocking (runs its own event loop).

    endpoints: one or more; with two, the first is "on" and the second "off" in
        ``comparison``. Labels default to "on", "off", "endpoint 3", ...
    prompts: the traffic, cycled. levels: concurrency levels (>= 1), run ascending.
    rounds: requests per worker per level (at least one request per prompt).
    max_level_s: no request starts later than this after a run began.
    progress(fraction, message): after each request. should_stop(): polled
        before each request; True drops the level in progress and returns.

    Raises:
        ValueError: no endpoints, no prompts, a level < 1, rounds < 1, max_level_s <= 0.
        lab.serving.client.ServeError: an endpoint cannot be reached, answers /v1/models
            with an error, or does not serve the model asked for (checked first;
            nothing is sent then).
    """
    return asyncio.run(serve_bench_async(endpoints, prompts, levels, settings, rounds, max_level_s,
                                         progress, should_stop))


async def serve_bench_async(
    endpoints: Sequence[Endpoint],
    prompts: Sequence[Prompt],
    levels: Sequence[int] = DEFAULT_LEVELS,
    settings: RequestSettings | None = None,
    rounds: int = 2,
    max_level_s: float = 300.0,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ServeBench:
    """:func:`run_serve_bench` inside a running event loop."""
    settings = settings or RequestSettings()
    endpoints = _labelled(endpoints)
    prompts = [p for p in prompts if p.text.strip()]
    levels = sorted(set(levels))
    if not endpoints:
        raise ValueError("serve bench requires at least one endpoint URL; got none")
    if not prompts:
        raise ValueError("serve bench requires at least one prompt; got none")
    if not levels or min(levels) < 1:
        raise ValueError(f"serve bench requires concurrency levels >= 1; got {list(levels)}")
    if rounds < 1 or max_level_s <= 0:
        raise ValueError(f"serve bench requires rounds >= 1 and max_level_s > 0; got {rounds} and {max_level_s}")
    report = progress or (lambda fraction, message: None)
    stop = should_stop or (lambda: False)
    bench = ServeBench(settings={
        "endpoints": [{"label": e.label, "url": e.base, "model": e.model, "api": e.api} for e in endpoints],
        "levels": levels, "rounds": rounds, "max_level_s": max_level_s,
        "max_tokens": settings.max_tokens, "temperature": settings.temperature, "ignore_eos": settings.ignore_eos,
        "timeout_s": settings.timeout_s, "prompts": [p.id for p in prompts],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_1m_before": _load_average(),
    })
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=settings.timeout_s) as client:
        infos: dict[str, EndpointInfo] = {}
        for endpoint in endpoints:
            infos[endpoint.label] = info = await check_endpoint(client, endpoint, settings.timeout_s)
            bench.engines[endpoint.label] = {"engine": info.engine or "unknown", "models": list(info.models),
                                             "model": info.model, "metrics": info.metrics}
        total = sum(num_requests(level, len(prompts), rounds) for level in levels) * len(endpoints)
        sent = 0
        for index, level in enumerate(levels):
            order = endpoints if index % 2 == 0 else list(reversed(endpoints))
            for endpoint in order:
                count = num_requests(level, len(prompts), rounds)
                done_before = sent

                def tick(finished: int, label=endpoint.label, level=level, count=count, base=done_before) -> None:
                    report((base + finished) / total, f"{label} · concurrency {level}: {finished}/{count} requests")

                run = await run_level(client, endpoint, infos[endpoint.label].model, prompts, level, count,
                                      settings, max_level_s, tick, stop)
                sent += count
                if run is None:
                    bench.stopped = f"stopped at concurrency {level} ({endpoint.label}); finished levels are kept"
                    _drop_level(bench, level)
                    return bench
                bench.runs.append(run)
                if not any(record.ok for record in run.records):
                    first = run.records[0].error if run.records else "no request was sent"
                    bench.stopped = f"every request to {endpoint.label} at concurrency {level} failed: {first}"
                    _drop_level(bench, level)
                    return bench
    bench.settings["load_average_1m_after"] = _load_average()
    report(1.0, "done")
    return bench


async def run_level(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    model: str | None,
    prompts: Sequence[Prompt],
    concurrency: int,
    count: int,
    settings: RequestSettings,
    max_level_s: float,
    on_finished: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> LevelRun | None:
    """Closed-loop load: ``concurrency`` workers send ``count`` requests (prompts cycled) to one endpoint.

    No request starts after ``max_level_s`` seconds; each is bounded by
    ``settings.timeout_s``. ``on_finished(n)`` after each request. Returns None
    when ``should_stop()`` turned True (the requests in flight are awaited, not
    abandoned), else the run with the counter diff from ``/metrics``.
    """
    stop = should_stop or (lambda: False)
    before: MetricsSnapshot | None = await scrape_metrics(client, endpoint, settings.timeout_s)
    records: list[RequestRecord] = []
    next_index = 0
    stopped = False
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index, stopped
        while True:
            if stopped or stop():
                stopped = True
                return
            if next_index >= count or time.perf_counter() - started > max_level_s:
                return
            index = next_index
            next_index += 1
            prompt = prompts[index % len(prompts)]
            record = await stream_request(client, endpoint, model, prompt.id, prompt.text, settings, started)
            records.append(record)
            if on_finished is not None:
                on_finished(len(records))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    duration_s = time.perf_counter() - started
    if stopped:
        return None
    after = await scrape_metrics(client, endpoint, settings.timeout_s)
    return LevelRun(label=endpoint.label, concurrency=concurrency, records=records, duration_s=duration_s,
                    counters=counters_between(before, after), gauges=dict(after.gauges) if after else {})


# ---------------------------------------------------------------- the engine's side of the lab comparison


def engine_reference(bench: ServeBench, level: int = 1) -> dict | None:
    """The engine's side of the lab comparison: at ``level``, on/off output tokens/s, speedup and acceptance."""
    rows = {(row["label"], row["max_concurrency"]): row for row in bench.rows()}
    labels = [e["label"] for e in bench.settings["endpoints"]]
    if len(labels) < 2 or (labels[0], level) not in rows or (labels[1], level) not in rows:
        return None
    on, off = rows[(labels[0], level)], rows[(labels[1], level)]
    rate = on["spec_decode_acceptance_rate"]
    return _clean({
        "max_concurrency": level,
        "tokens_per_s_off": off["output_throughput"], "tokens_per_s_on": on["output_throughput"],
        "speedup": _ratio(on["output_throughput"], off["output_throughput"]),
        "acceptance_rate": rate / 100 if rate == rate else math.nan,
        "mean_acceptance_length": on["spec_decode_acceptance_length"],
        "per_position_acceptance": on["spec_decode_per_position_acceptance_rates"],
    })


# ---------------------------------------------------------------- helpers


def _labelled(endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    defaults = ["on", "off"]
    out = []
    for i, endpoint in enumerate(endpoints):
        label = endpoint.label or (defaults[i] if i < len(defaults) else f"endpoint {i + 1}")
        out.append(Endpoint(endpoint.url, endpoint.model, endpoint.api, label))
    if len({e.label for e in out}) != len(out):
        raise ValueError(f"serve bench requires distinct endpoint labels; got {[e.label for e in out]}")
    return out


def _drop_level(bench: ServeBench, level: int) -> None:
    """Remove a level that not every endpoint finished (it cannot be compared)."""
    labels = {e["label"] for e in bench.settings["endpoints"]}
    if {run.label for run in bench.runs if run.concurrency == level} != labels:
        bench.runs = [run for run in bench.runs if run.concurrency != level]


def _first_below_one(rows: list[dict], key: str) -> int | None:
    return next((row["max_concurrency"] for row in rows if row[key] == row[key] and row[key] < 1), None)


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or a != a or b != b or b == 0:
        return math.nan
    return a / b


def _clean(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _load_average() -> float | None:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def format_serve_bench(bench: ServeBench) -> str:
    """A plain-text table for the terminal: one line per endpoint and level, then the speedups and crossover."""
    lines = [f"{'endpoint':<10} {'conc':>4} {'ok':>4} {'fail':>4} {'tok/s':>8} {'req/s':>6} {'ttft p50':>9} "
             f"{'itl p50':>8} {'e2el p50':>9} {'e2el p95':>9} {'accept':>7} {'len':>5}  per-position"]
    for row in bench.rows():
        per_position = " ".join(f"{x:.2f}" for x in row["spec_decode_per_position_acceptance_rates"])
        lines.append(
            f"{row['label']:<10} {row['max_concurrency']:>4} {row['completed']:>4} {row['failed']:>4} "
            f"{_num(row['output_throughput'], '8.2f')} {_num(row['request_throughput'], '6.2f')} "
            f"{_num(row['median_ttft_ms'], '9.0f')} {_num(row['median_itl_ms'], '8.1f')} "
            f"{_num(row['median_e2el_ms'], '9.0f')} {_num(row['p95_e2el_ms'], '9.0f')} "
            f"{_num(row['spec_decode_acceptance_rate'], '6.1f')}% {_num(row['spec_decode_acceptance_length'], '5.2f')}  "
            f"{per_position or row['spec_decode_note']}")
    comparison = bench.comparison()
    if comparison:
        labels = [e["label"] for e in bench.settings["endpoints"]]
        lines.append("")
        lines.append(f"{labels[0]} vs {labels[1]}: " + ", ".join(
            f"c{row['max_concurrency']}: latency x{_num(row['latency_speedup'], '.2f').strip()}, "
            f"throughput x{_num(row['throughput_speedup'], '.2f').strip()}" for row in comparison))
        crossover = bench.crossover_concurrency
        if crossover is None:
            lines.append("crossover: none (speculation shortened the median latency at every level)")
        elif crossover == comparison[0]["max_concurrency"]:
            lines.append("crossover: none to find: speculation lengthened the median latency from the first level")
        else:
            lines.append(f"crossover: from concurrency {crossover} on, speculation lengthens the median latency")
    for label, engine in bench.engines.items():
        lines.append(f"{label}: engine {engine['engine']}, model {engine['model']}, "
                     f"/metrics {'read' if engine['metrics'] else 'unavailable'}")
    if bench.lab:
        lines.append(_format_lab(bench))
    if bench.stopped:
        lines.append(f"stopped early: {bench.stopped}")
    return "\n".join(lines)


def _format_lab(bench: ServeBench) -> str:
    lab, engine = bench.lab or {}, engine_reference(bench) or {}
    rows = [("engine at concurrency 1", engine), (f"lab ({lab.get('precision')}, K={lab.get('k')})", lab)]
    out = [f"\n{'same prompts, batch 1':<28} {'off tok/s':>9} {'on tok/s':>9} {'speedup':>8} {'accept':>7} {'len':>5}  per-position"]
    for name, figures in rows:
        per_position = " ".join(f"{x:.2f}" for x in figures.get("per_position_acceptance") or [])
        rate = figures.get("acceptance_rate")
        out.append(f"{name:<28} {_num(figures.get('tokens_per_s_off'), '9.2f')} {_num(figures.get('tokens_per_s_on'), '9.2f')} "
                   f"{_num(figures.get('speedup'), '8.2f')} {_num(None if rate is None else rate * 100, '6.1f')}% "
                   f"{_num(figures.get('mean_acceptance_length'), '5.2f')}  {per_position}")
    return "\n".join(out)


def _num(x: float | None, pattern: str) -> str:
    width = int(pattern.split(".")[0] or 0)
    return f"{'-':>{width}}" if x is None or x != x else format(x, pattern)
