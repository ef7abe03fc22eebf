"""The Serve page: the Batch page's lesson measured on a real serving engine (vLLM, SGLang, llama.cpp).

The page reads its widgets and calls ``lab.studies.serve_bench.run_serve_bench`` against
the endpoint URLs given; figures come from ``app.render_serve`` on the result's
JSON dict, so a run and a loaded file draw the same. Cancel works as the
Batch page once did (``app.inflight``): the sweep polls ``ServeWatch.should_stop`` before
each request; the levels that finished are kept, the one under way is dropped.
Server trouble (refused, 4xx/5xx, timeout, a model the server does not serve)
is shown in words: before the run it stops it, during it the level shows its
failures and a level where every request failed ends the sweep.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from app import background, inflight, render, render_serve, saved, state, widgets
from lab import device_queue
from lab.prompts import Prompt, load_prompts
from lab.studies.serve_bench import run_serve_bench
from lab.serving.client import Endpoint, RequestSettings, ServeError
from lab.serving.urls import URLError, is_local_url

RESULT_KEY = "serve:bench"
UPLOAD_KEY = "serve:upload"
LOAD_ERROR_KEY = "serve:load_error"
CANCEL_KEY = "serve:cancel_requested"
IN_FLIGHT_KEY = "serve:in_flight"
NOTICE_KEY = "serve:notice"
LEVEL_CHOICES = (1, 2, 4, 8, 16, 32, 64)
JSONL_KEY = "serve:jsonl"

DEFAULTS = {
    "serve.on_url": "http://127.0.0.1:8080",
    "serve.off_url": "http://127.0.0.1:8081",
    "serve.model": "",
    "serve.api": "chat",
    "serve.levels": [1, 2, 4, 8],
    "serve.max_tokens": 32,
    "serve.rounds": 2,
    "serve.timeout_s": 120,
} | widgets.prompt_defaults("serve", ["summarization", "code_editing"], spec_count=4)

key = state.widget_key
MS = st.column_config.NumberColumn(format="%.0f")
RATE = st.column_config.NumberColumn(format="%.2f")
TABLE_COLUMNS = {name: MS for name in ("TTFT p50 (ms)", "TTFT p95 (ms)", "TPOT p50 (ms)", "latency p50 (ms)",
                                       "latency p95 (ms)")} | {
    "ITL p50 (ms)": st.column_config.NumberColumn(format="%.1f"), "output tokens/s": RATE, "requests/s": RATE,
    "acceptance rate (%)": st.column_config.NumberColumn(format="%.1f"), "mean acceptance length": RATE}
LAB_COLUMNS = {"tokens/s off": RATE, "tokens/s on": RATE, "speedup": st.column_config.NumberColumn(format="%.2f×"),
               "acceptance rate (%)": st.column_config.NumberColumn(format="%.1f"), "mean acceptance length": RATE}

EXPLANATION = """
The **Batch** page showed, on the lab's own decoder, that latency and throughput part ways as concurrency grows:
past some point speculation makes each request slower while the server may still count more tokens per second.
Here the same picture is measured on **your serving engine**: give the URL of a server with speculation **on** and
one of the same model with it **off** (any OpenAI-compatible server: vLLM, SGLang, llama.cpp's `llama-server`).
Each concurrency level sends your prompts through a closed loop of that many concurrent streams to each server in
turn, and reads the engine's own acceptance counters from `/metrics` before and after. docs/serving-engines.md lists the server
flags for speculation on and off.
"""


class ServeWatch(inflight.StopCatcher):
    """The progress bar, and where the sweep answers Cancel (a stop or rerun reads as a cancel too)."""

    def __init__(self, bar, flight: inflight.InFlight) -> None:
        self.bar, self.flight = bar, flight
        self.interruption: ScriptControlException | None = None
        self.cancel_seen = False

    def progress(self, fraction: float, message: str) -> None:
        self.flight.last_progress = message
        self._yield_point(lambda: self.bar.progress(min(max(fraction, 0.0), 1.0), text=message))

    def should_stop(self) -> bool:
        self.cancel_seen = self.cancel_seen or bool(self._yield_point(lambda: st.session_state.get(CANCEL_KEY)))
        return self.interruption is not None or self.cancel_seen

    def on_wait(self, ticket: device_queue.Ticket) -> None:
        """While a local server's sweep waits for the CPU: its place in line; Cancel (or a rerun) leaves the line."""
        self._yield_point(lambda: self.bar.progress(0.0, text=f"Waiting for the CPU: "
                                                              f"{ticket.describe().removeprefix('waiting: ')}"))
        if self.should_stop():
            ticket.cancel("you pressed Cancel" if self.cancel_seen else "the page reran")


def chosen_prompts() -> list[Prompt]:
    """The prompts the widgets select, or those of an uploaded JSONL file. Raises ValueError / FileNotFoundError."""
    upload = st.session_state.get(JSONL_KEY)
    if upload is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / (Path(upload.name).stem + ".jsonl")
            path.write_bytes(upload.getvalue())
            return load_prompts(path)
    return [Prompt(f"prompt/{i + 1}", "page", text) for i, text in enumerate(widgets.chosen_prompts("serve"))]


def endpoints() -> list[Endpoint]:
    s = st.session_state
    model = s[key("serve.model")].strip() or None
    urls = [(s[key("serve.on_url")].strip(), "on"), (s[key("serve.off_url")].strip(), "off")]
    if not urls[0][0]:
        raise ValueError("The endpoint with speculation on needs a URL, e.g. http://127.0.0.1:8080.")
    chosen = []
    for url, label in urls:
        if url:
            try:
                chosen.append(Endpoint(url, model, s[key("serve.api")], label))
            except URLError as error:  # which box, then what is wrong with it
                raise ValueError(f"Endpoint with speculation {label}: {error}.") from None
    return chosen


def run_page_bench(prompts: list[Prompt], slots: dict) -> inflight.InFlight:
    """Run the sweep with a progress bar and a Cancel button; the hand-over's result is the bench's JSON dict."""
    s = st.session_state
    if not prompts:
        raise ValueError("No prompts to send: pick a prompt set, a Spec-Bench category, a JSONL file, or paste prompts.")
    levels = sorted(int(c) for c in s[key("serve.levels")])
    if not levels:
        raise ValueError("No concurrency levels: pick at least one (1 and a few larger ones show the crossover).")
    settings = RequestSettings(max_tokens=int(s[key("serve.max_tokens")]), timeout_s=float(s[key("serve.timeout_s")]))
    chosen = endpoints()
    flight = inflight.start(IN_FLIGHT_KEY)
    s[CANCEL_KEY] = False
    try:
        slots["cancel"].button("Cancel", icon=":material/stop:", on_click=inflight.request_cancel, args=(CANCEL_KEY,),
                               key="serve_cancel", help="Stop before the next request. The levels that finished are "
                                                        "kept; the one under way is dropped.")
        watch = ServeWatch(slots["progress"].progress(0.0, text="Checking the endpoints…"), flight)
        started_s = time.monotonic()
        # a server on this machine shares the lab's cores: wait in the CPU's line (lab.device_queue) first
        local = any(is_local_url(endpoint.url) for endpoint in chosen)
        with device_queue.join("cpu", background.session_holder("Serve"), on_wait=watch.on_wait) if local \
                else contextlib.nullcontext():
            bench = run_serve_bench(chosen, prompts, levels, settings, rounds=int(s[key("serve.rounds")]),
                                    progress=watch.progress, should_stop=watch.should_stop)
        if bench.stopped.startswith("stopped at"):
            bench.stopped = ("cancelled" if watch.cancel_seen else "stopped because the page reran") + \
                bench.stopped.removeprefix("stopped")
        bench.settings["elapsed_s"] = time.monotonic() - started_s
        flight.result = bench.as_dict()
        if flight.result.get("levels"):
            saved.keep_serve(flight.result)
    except device_queue.Cancelled:
        if watch.interruption is not None:
            raise watch.interruption from None
        raise
    finally:
        flight.done.set()
    if watch.interruption is not None:
        raise watch.interruption
    del s[IN_FLIGHT_KEY]
    return flight


def keep_bench(result: dict | None, where: str) -> None:
    """Keep a finished or partial bench; one with no finished level leaves a notice (and the previous bench shown)."""
    if result is None or not result.get("levels"):
        st.session_state[NOTICE_KEY] = (result or {}).get("stopped") or f"stopped during {where or 'its start'}"
        return
    st.session_state[RESULT_KEY] = result
    st.session_state.pop(NOTICE_KEY, None)


def parse_bench(text: str, file_name: str) -> dict:
    bench = render_serve.load_bench(text)
    bench.setdefault("settings", {})["loaded_from"] = file_name
    st.session_state.pop(NOTICE_KEY, None)
    return bench


def show_result(bench: dict) -> None:
    settings = bench["settings"]
    engines = ", ".join(f"**{label}**: {e.get('engine')} serving `{e.get('model')}`" +
                        ("" if e.get("metrics") else " (no /metrics)") for label, e in (bench.get("engines") or {}).items())
    source = f"Loaded from **{settings['loaded_from']}**" if settings.get("loaded_from") else "Measured"
    st.info(f"{source}: {engines} · {len(settings.get('prompts') or [])} prompts · {settings.get('max_tokens')} "
            f"tokens each · load average {settings.get('load_average_1m_before')} before", icon=":material/dns:")
    if bench.get("stopped"):
        st.warning(f"Ended early: {bench['stopped']}. The figures hold the levels that finished.",
                   icon=":material/cancel:")
    failed = [row for row in bench["levels"] if row.get("failed")]
    for row in failed:
        st.error(f"{row['label']} at concurrency {row['max_concurrency']}: {row['failed']} of "
                 f"{row['failed'] + row['completed']} requests failed: {'; '.join(row.get('errors') or [])}",
                 icon=":material/error:")
    comparison = bench.get("comparison") or []
    if comparison:
        columns = st.columns(3)
        columns[0].metric(f"Latency speedup at concurrency {comparison[0]['max_concurrency']}",
                          f"{render_serve.number(comparison[0]['latency_speedup']):.2f}×")
        columns[1].metric(f"Latency speedup at concurrency {comparison[-1]['max_concurrency']}",
                          f"{render_serve.number(comparison[-1]['latency_speedup']):.2f}×")
        crossover = bench.get("crossover_concurrency")
        columns[2].metric("Crossover (latency)", "none" if crossover is None else f"concurrency {crossover}",
                          help="The smallest concurrency at which speculation lengthens the median request.")
        st.markdown(render_serve.headline(bench))
        st.plotly_chart(render_serve.speedup_figure(bench), width="stretch")
    st.plotly_chart(render_serve.latency_throughput_figure(bench), width="stretch")
    st.plotly_chart(render_serve.tradeoff_figure(bench), width="stretch")
    st.plotly_chart(render_serve.acceptance_figure(bench), width="stretch")
    st.caption(render.PER_POSITION_WHY)
    lab = render_serve.lab_table(bench)
    if lab is not None:
        st.subheader("The lab's own engine on the same prompts")
        st.dataframe(lab, hide_index=True, width="stretch", column_config=LAB_COLUMNS)
        st.caption("Written by `python -m lab serve-bench --lab-target ... --lab-draft ...`: the same prompts, greedy, "
                   "one at a time. Equal acceptance means both engines draft and verify alike; the speedups differ "
                   "with what a verify pass costs each engine.")
    st.subheader("Every level")
    st.dataframe(render_serve.summary_table(bench), hide_index=True, width="stretch", column_config=TABLE_COLUMNS)
    st.caption("Inter-token latency (ITL) is the gap between streamed events. An engine that streams the tokens "
               "accepted in one speculative step as separate events at once (llama-server does) shows a median ITL "
               "near 0 ms with speculation on; TPOT, (latency - TTFT) / (tokens - 1), is the per-token figure to "
               "compare.")
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-partial" if bench.get("stopped") else "")
    left, right, _ = st.columns([1, 1, 3])
    left.download_button("Download CSV", render_serve.summary_csv(bench), file_name=f"serve-bench-{stamp}.csv",
                         mime="text/csv", icon=":material/download:", help="One row per endpoint and level.")
    right.download_button("Download JSON", json.dumps(bench, indent=1), file_name=f"serve-bench-{stamp}.json",
                          mime="application/json", icon=":material/download:",
                          help="Everything, per-request records included, as `python -m lab serve-bench --out` "
                               "writes it. Loads back here.")


# ---------------------------------------------------------------- page

state.set_defaults(st.session_state, DEFAULTS)
st.title("Speculation on a serving engine")
st.markdown(EXPLANATION)

widgets.results_file_section("A JSON file saved with Download JSON, or written by `python -m lab serve-bench --out FILE`",
                             UPLOAD_KEY, LOAD_ERROR_KEY, RESULT_KEY, parse_bench)

with st.container(border=True):
    left, right = st.columns(2)
    with left:
        st.text_input("Endpoint with speculation on", key=key("serve.on_url"),
                      help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8080 (a trailing /v1 is fine).")
        st.text_input("Endpoint with speculation off", key=key("serve.off_url"),
                      help="The same model served without speculation. Leave empty to measure one endpoint.")
        st.text_input("Model name", key=key("serve.model"), placeholder="the first model each server lists",
                      help="Sent with every request; checked against the server's /v1/models first.")
        st.radio("API", ("chat", "completions"), key=key("serve.api"), horizontal=True,
                 help="chat: /v1/chat/completions (the server applies its chat template); completions: the raw prompt.")
    with right:
        widgets.prompt_inputs("serve", "Shipped in assets/prompts/.")
        st.file_uploader("…or a JSONL file of prompts (replaces the choice above)", key=JSONL_KEY,
                         help="One object a line: {\"id\", \"category\", \"prompt\"} or Spec-Bench's shape.")
        st.multiselect("Concurrency levels", LEVEL_CHOICES, key=key("serve.levels"))
        a, b, c = st.columns(3)
        a.number_input("Tokens per request", min_value=1, max_value=2048, step=8, key=key("serve.max_tokens"))
        b.number_input("Requests per stream", min_value=1, max_value=20, step=1, key=key("serve.rounds"),
                       help="Each level sends this many requests per concurrent stream (and at least one per prompt).")
        c.number_input("Timeout (s)", min_value=1, max_value=3600, step=10, key=key("serve.timeout_s"))
    try:
        prompts, prompt_error = chosen_prompts(), None
    except (ValueError, FileNotFoundError) as error:
        prompts, prompt_error = [], str(error)
    if prompt_error:
        st.error(prompt_error, icon=":material/error:")
    run_col, cancel_col, _ = st.columns([2, 1.3, 5])
    run_clicked = run_col.button("Run sweep", type="primary", icon=":material/play_arrow:", key="serve_run")
    cancel_slot = cancel_col.empty()

slots = {"cancel": cancel_slot, "progress": st.empty()}
error_slot = st.empty()
if (flight := inflight.take_over(IN_FLIGHT_KEY, "Stopping the sweep that was running (at its next request)…")):
    keep_bench(flight.result, flight.last_progress)

if run_clicked and not prompt_error:
    st.session_state.pop(NOTICE_KEY, None)
    try:
        flight = run_page_bench(prompts, slots)
    except device_queue.Cancelled as cancelled:
        st.session_state.pop(IN_FLIGHT_KEY, None)
        error_slot.warning(f"Cancelled while waiting for the CPU, before any request: {cancelled.reason}.",
                           icon=":material/cancel:")
    except (ValueError, ServeError) as error:
        st.session_state.pop(IN_FLIGHT_KEY, None)
        error_slot.error(str(error), icon=":material/error:")
    else:
        keep_bench(flight.result, flight.last_progress)
    for slot in slots.values():
        slot.empty()

bench = st.session_state.get(RESULT_KEY)
if (notice := st.session_state.get(NOTICE_KEY)) is not None:
    st.warning(f"Nothing finished: {notice}." + (" The sweep shown below is the previous one." if bench else ""),
               icon=":material/cancel:")
if bench is not None:
    show_result(bench)
elif not run_clicked and notice is None:
    st.caption("No sweep yet: start two servers (docs/serving-engines.md says how), give their URLs, "
               "then Run sweep.")
