"""Batch page: speedup against batch size, per-request latency and throughput as separate curves.

Reads the widgets, runs ``lab.sweep.run_sweep`` with a progress bar, keeps the
sweep's JSON dict (``SweepResult.as_dict()``) in ``st.session_state`` and draws
it with ``app.render_batch``. The same dict is what Download JSON writes and
what ``python -m lab bench --out F`` writes, so either loads back here.

Cancel: ``run_sweep`` takes no cancel hook and returns nothing until it ends,
so a sweep stops at its next progress report (before each batch of requests)
and nothing of it is kept. The Cancel button's callback sets a session flag
that ``SweepWatch.progress`` reads and answers with ``SweepCancelled``. In the
browser the click also reruns the page and stops the running script run, whose
next ``st`` call raises; the next script run learns how it ended through
``app.inflight`` (a sweep that finished first still hands its result over).
"""

from __future__ import annotations

import json
import math
import time

import streamlit as st
import torch

from app import inflight, render, render_batch, resources, state, widgets
from lab.batch import make_batch_drafter
from lab.config import K_MAX, MAX_NEW_TOKENS_MAX, DecodeConfig
from lab.models import ModelError, check_same_tokenizer, encode_prompt
from lab.sweep import DEFAULT_BATCH_SIZES, run_sweep

RESULT_KEY = "batch:sweep"
UPLOAD_KEY = "batch:upload"
LOAD_ERROR_KEY = "batch:load_error"
CANCEL_KEY = "batch:cancel_requested"
IN_FLIGHT_KEY = "batch:in_flight"  # an app.inflight.InFlight while a sweep runs
NOTICE_KEY = "batch:notice"  # how the last sweep ended when it did not finish
MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)
DRAFTERS = ("prompt-lookup", "draft-model", "layer-skip")

DEFAULTS = {
    "batch.target": "smollm2-135m",
    "batch.drafter": "prompt-lookup",
    "batch.draft": "qwen2.5-coder-0.5b",
    "batch.exit_layer": None,
    "batch.k": 4,
    "batch.batch_sizes": [1, 2, 4, 8],
    "batch.max_new_tokens": 32,
    "batch.raw": False,
} | widgets.prompt_defaults("batch", ["summarization", "code_editing"], spec_count=4)

key = state.widget_key
PROMPT_SETS_HELP = ("Shipped in assets/prompts/: summaries and code edits copy from the prompt (high acceptance), "
                    "creative writing and open questions do not.")
SPEEDUP = st.column_config.NumberColumn(format="%.2f×")
SECONDS = st.column_config.NumberColumn(format="%.3f")
RATE = st.column_config.NumberColumn(format="%.1f")
SHARE = st.column_config.NumberColumn(format="percent")
TABLE_COLUMNS = {
    "latency speedup": SPEEDUP, "throughput speedup": SPEEDUP, "TTFT speedup": SPEEDUP,
    "auto predicted speedup": SPEEDUP,
    **{f"latency {p} {m} (s)": SECONDS for p in ("p50", "p95") for m in render_batch.MODES},
    **{f"TTFT p50 {m} (s)": SECONDS for m in ("off", "on")},
    **{f"tokens/s {m}": RATE for m in render_batch.MODES},
    "acceptance rate": SHARE, "auto latency, share of best": SHARE, "auto throughput, share of best": SHARE,
    "mean acceptance length": st.column_config.NumberColumn(format="%.2f"),
}

EXPLANATION = """
**Throughput** is what a server counts: tokens generated per second, summed over every request in the batch.
**Latency** is what a user feels: the time from sending one request to receiving its last token. At batch size 1
they tell the same story. As the batch grows they part.

Speculation is cheap when one decode step is *memory-bound*: reading the weights dominates, so checking K+1 drafted
tokens costs about what one token costs, and every accepted draft token is nearly free. Put B requests in a batch
and the verify pass handles B × (K+1) tokens: the hardware turns *compute-bound*, the pass costs more and more of
K+1 plain steps, and rejected draft tokens become work that the whole batch pays for. Past some batch size (the
**crossover**) speculation makes each request *slower*. A benchmark at batch 1, or one that reports only tokens per
second, does not show where that happens; this page measures both, batch size by batch size.
"""


# ---------------------------------------------------------------- inputs


def drafter_inputs(target: str) -> str | None:
    """The drafter and its options, K, tokens and batch sizes; returns the draft select's choice (None: none fits)."""
    drafter = widgets.drafter_select("batch", DRAFTERS, help="The target alone always runs as the baseline, through "
                                                             "the same batched loop.")
    draft = widgets.draft_select("batch", target) if drafter == "draft-model" else None
    if drafter == "layer-skip":
        widgets.exit_layer_input("batch")
    k_col, tokens_col = st.columns(2)
    k_col.number_input("K (draft tokens per step)", min_value=1, max_value=K_MAX, step=1, key=key("batch.k"),
                       help="The 'on' mode drafts K tokens; the auto policy may pick any K from 0 (off) to this one.")
    tokens_col.number_input("Max new tokens", min_value=1, max_value=MAX_NEW_TOKENS_MAX, step=16,
                            key=key("batch.max_new_tokens"))
    st.multiselect("Batch sizes (concurrent requests)", list(DEFAULT_BATCH_SIZES), key=key("batch.batch_sizes"),
                   help="Each batch size decodes the prompts, cycled to fill whole batches, with speculation off, "
                        "on, and at the K the policy picks.")
    return draft


def work_caption(num_prompts: int, sizes: list[int]) -> str:
    # as lab.sweep: each batch size decodes the prompts cycled to fill whole batches
    requests = sum(math.ceil(max(num_prompts, b) / b) * b for b in sizes)
    return (f"{num_prompts} prompt(s), batch sizes {', '.join(map(str, sizes))}: **{requests} requests per mode** "
            f"(off and on; auto too when it picks another K) of up to "
            f"{st.session_state[key('batch.max_new_tokens')]} tokens, after a calibration that times verify passes at "
            "each batch size. Greedy decoding.")


# ---------------------------------------------------------------- running


class SweepCancelled(Exception):
    """The Cancel button was pressed while the sweep ran; the message says where it stood."""


class SweepWatch:
    """The sweep's progress bar, and where the sweep answers the Cancel button: at each progress report."""

    def __init__(self, bar, flight: inflight.InFlight) -> None:
        self.bar, self.flight = bar, flight

    def progress(self, fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        self.flight.last_progress = f"{message} ({100 * fraction:.0f} % of the sweep done)"  # before any st call
        if st.session_state.get(CANCEL_KEY):
            raise SweepCancelled(self.flight.last_progress)
        self.bar.progress(fraction, text=message)


def request_cancel() -> None:
    st.session_state[CANCEL_KEY] = True


def collect_stopped_sweep() -> None:
    """Learn how a sweep that the previous script run was stopped in ended (waiting for its next progress report)."""
    s = st.session_state
    flight = inflight.take_over(IN_FLIGHT_KEY, "Stopping the sweep that was running (at its next batch)…")
    if flight is None:
        return
    if flight.result is not None:  # it finished before it could stop
        s[RESULT_KEY] = flight.result
        s.pop(NOTICE_KEY, None)
    else:
        s[NOTICE_KEY] = {"cancelled": bool(s.get(CANCEL_KEY)), "where": flight.last_progress}


def run_page_sweep(prompts: list[str], draft: str | None, runtime: state.Runtime, slots: dict) -> dict:
    """Load models, run the sweep with a progress bar and a Cancel button, and return its JSON dict with the page's
    settings. ``draft`` is what the draft select returned.

    Raises SweepCancelled when the Cancel button's flag is seen. A run stopped by a rerun hands over through
    ``app.inflight`` and ends with the stop.
    """
    s = st.session_state
    if not prompts:
        raise ValueError("No prompts to run: pick a prompt set, a Spec-Bench category, or paste prompts.")
    sizes = sorted(int(b) for b in s[key("batch.batch_sizes")])
    if not sizes:
        raise ValueError("No batch sizes: pick at least one (1 and a few larger ones show the crossover).")
    config = DecodeConfig(k=int(s[key("batch.k")]), max_new_tokens=int(s[key("batch.max_new_tokens")]))
    target_name, drafter_name = s[key("batch.target")], s[key("batch.drafter")]
    draft_name = widgets.checked_draft(target_name, draft) if drafter_name == "draft-model" else None
    exit_layer = s[key("batch.exit_layer")] if drafter_name == "layer-skip" else None
    if draft_name:  # compare tokenizers before spending seconds on weights
        check_same_tokenizer(resources.load_tokenizer(target_name), resources.load_tokenizer(draft_name))
    target = resources.load_for_role(target_name, "target", runtime, slots["progress"])
    draft_model = resources.load_for_role(draft_name, "draft", runtime, slots["progress"]) if draft_name else None
    drafter = make_batch_drafter(drafter_name, target, draft_model,
                                 exit_layer=None if exit_layer is None else int(exit_layer))
    chat_template = not s[key("batch.raw")]
    prompt_ids = [encode_prompt(target, text, chat_template=chat_template) for text in prompts]

    flight = inflight.start(IN_FLIGHT_KEY)
    s[CANCEL_KEY] = False
    try:
        slots["cancel"].button("Cancel", icon=":material/stop:", on_click=request_cancel, key="batch_cancel",
                               help="Stop the sweep before its next batch of requests. A sweep cut short keeps "
                                    "nothing: its figures need every batch size.")
        watch = SweepWatch(slots["progress"].progress(0.0, text="Starting the sweep…"), flight)
        started_s = time.monotonic()
        sweep = run_sweep(target, prompt_ids, drafter, config, sizes, progress=watch.progress)
        sweep.settings |= {
            "target": target_name,
            "draft": draft_name,
            "exit_layer": exit_layer,
            "precision": runtime.precision("target"),
            "draft_precision": runtime.precision("draft") if draft_name else None,
            "chat_template": chat_template,
            "prompts": prompts,
            "elapsed_s": time.monotonic() - started_s,
        }
        flight.result = json.loads(sweep.to_json())
    finally:
        flight.done.set()
    del s[IN_FLIGHT_KEY]
    return flight.result


def parse_sweep(text: str, file_name: str) -> dict:
    """A sweep's JSON (Download JSON, or ``python -m lab bench --out``), marked as loaded from ``file_name``."""
    sweep = render_batch.load_sweep(text)
    sweep.setdefault("settings", {})["loaded_from"] = file_name
    st.session_state.pop(NOTICE_KEY, None)  # the loaded sweep replaces whatever the last one did
    return sweep


# ---------------------------------------------------------------- results


def describe(sweep: dict) -> str:
    settings = sweep.get("settings") or {}
    precision = settings.get("precision") or settings.get("dtype") or "?"
    if settings.get("draft_precision"):
        precision += f" (draft {settings['draft_precision']})"
    draft = f" drafting with `{settings['draft']}`" if settings.get("draft") else ""
    return (f"target `{settings.get('target')}`{draft} · {sweep.get('drafter')}, K={sweep.get('k')} · {precision} on "
            f"{settings.get('device')} · up to {settings.get('max_new_tokens')} new tokens · "
            f"{settings.get('num_prompts')} prompt(s)")


def show_status(sweep: dict) -> None:
    settings = sweep.get("settings") or {}
    sizes = ", ".join(map(str, render_batch.batch_sizes(sweep)))
    if settings.get("loaded_from"):
        st.info(f"Loaded from **{settings['loaded_from']}**: batch sizes {sizes} · {describe(sweep)}",
                icon=":material/upload_file:")
    else:
        st.success(f"Swept batch sizes {sizes} in {settings.get('elapsed_s', 0):.0f} s · {describe(sweep)}",
                   icon=":material/check_circle:")


def show_headline(sweep: dict) -> None:
    results = sweep["results"]
    first, last = results[0], results[-1]
    crossover = render_batch.crossover(sweep)
    columns = st.columns(4)
    columns[0].metric(f"Latency speedup at batch {first['batch_size']}",
                      render.format_number(render_batch.number(first.get("latency_speedup")), 2, "×"))
    columns[1].metric(f"Latency speedup at batch {last['batch_size']}",
                      render.format_number(render_batch.number(last.get("latency_speedup")), 2, "×"))
    columns[2].metric(f"Throughput speedup at batch {last['batch_size']}",
                      render.format_number(render_batch.number(last.get("throughput_speedup")), 2, "×"))
    columns[3].metric("Crossover (latency)", "none" if crossover is None else f"batch {crossover}",
                      help="The smallest batch size at which speculation lengthens the median request's latency.")
    st.markdown(render_batch.headline(sweep))


def show_exactness(sweep: dict) -> None:
    differ = render_batch.outputs_differ(sweep)
    settings = sweep.get("settings") or {}
    dtype = str(settings.get("dtype") or "")
    requests = sum(int(r.get("num_requests") or 0) for r in sweep["results"])
    parts = []
    if differ["on_vs_off"] is not None:
        parts.append(f"speculation on vs off at the same batch size: **{differ['on_vs_off']}** of {requests} requests")
    batched = [m for m in render_batch.MODES if differ[f"{m}_vs_batch_1"] is not None]
    if batched:
        parts.append("at batch > 1 vs the target alone at batch 1: "
                     + ", ".join(f"{m} **{differ[f'{m}_vs_batch_1']}**" for m in batched))
    if not parts:
        st.caption("Output identity was not measured (it needs greedy decoding, and batch size 1 for the batch-1 check).")
        return
    text = "Greedy outputs that differ — " + "; ".join(parts) + "."
    note = (" In bf16 (and fp16) a batched matrix product sums in another order than a single row's, so logits "
            "differ in the last bits, and where the target's top two tokens nearly tie a greedy token can flip: "
            "rounding, not a bug. In fp32 batched outputs equal batch 1 token for token; choose fp32 in the sidebar "
            "for the exact reference (about half the speed on CPU).")
    any_differ = any(v for v in differ.values() if v)
    if any_differ and dtype != "float32":
        st.warning(text + note, icon=":material/rounded_corner:")
    elif any_differ:
        st.error(text + " In fp32 they should not differ: this points at a batching bug.", icon=":material/error:")
    else:
        st.caption(text + ("" if dtype == "float32" else note))


def show_figures(sweep: dict) -> None:
    st.plotly_chart(render_batch.speedup_figure(sweep), width="stretch")
    st.caption("Both curves are speculation on over off at the same batch size. Latency: the median request's wait, "
               "from the batch's submission to its last token. Throughput: every request's tokens over the batches' "
               "wall time. They differ because each request finishes at its own step (rows leave the batch when "
               "done), and because the median request is not the batch. One sweep on a shared machine: timings are "
               "noisy; rerun before trusting a crossover that appears at a single batch size.")
    st.plotly_chart(render_batch.absolute_figure(sweep), width="stretch")
    st.caption("Larger batches buy throughput with latency in every mode. Speculation moves the latency curve down "
               "at small batch sizes and, past the crossover, up. Auto runs at the K the policy chose; where that is "
               "0 or the configured K, auto is the off or the on run.")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(render_batch.acceptance_figure(sweep), width="stretch")
        spread = render_batch.acceptance_spread(sweep)
        st.caption(
            "Acceptance should **not** change with batch size: greedy outputs do not depend on the batch, so the "
            "curves should lie on top of each other"
            + ("" if spread is None else f" (here they differ by at most {100 * spread:.0f} points)")
            + ". What moves with batch size is what a verify pass costs, not what it accepts. Small differences come "
              "from the mix of requests (prompts are cycled to fill whole batches) and, below fp32, from rounding; a "
              "large drift would betray misaligned rows in the batch (the ragged-batch trap)."
        )
    with right:
        costs = render_batch.verify_cost_table(sweep)
        st.markdown("**Why: what a verify pass costs**")
        if costs.empty:
            st.caption("No step costs in this result.")
        else:
            st.dataframe(costs, hide_index=True, width="stretch",
                         column_config={c: st.column_config.NumberColumn(format="%.1f") for c in costs.columns[1:]})
            st.caption(f"Milliseconds of one target pass over B rows × 1 token, and × K+1 tokens (calibration and "
                       f"every step of the sweep, medians). A ratio near 1: verifying K+1 tokens is almost free. Near "
                       f"{int(sweep.get('k') or 0) + 1}: it costs what K+1 plain steps cost, and only accepted tokens "
                       "pay it back."
                       + (" A ratio below 1 is timing noise (more tokens never cost less): on a busy machine these "
                          "costs, and the policy's choices built on them, are unreliable; rerun when it is quieter."
                          if (costs[costs.columns[-1]] < 0.9).any() else ""))
    st.plotly_chart(render_batch.policy_figure(sweep), width="stretch")
    st.caption("The policy picks K per batch size before running it, from the measured step costs and the acceptance "
               "seen so far (Leviathan's expected tokens per step over the predicted step time); it switches "
               "speculation off when no K is predicted to pay by 5 %. Diamonds: what it would pick knowing the whole "
               "sweep. Right: auto's latency and throughput as a share of the better fixed choice (on or off) at "
               "that batch size; 100 % means it matched the better one.")


def show_table_and_export(sweep: dict) -> None:
    st.subheader("Every figure")
    st.dataframe(render_batch.sweep_table(sweep), hide_index=True, width="stretch", column_config=TABLE_COLUMNS)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    left, right, _ = st.columns([1, 1, 3])
    left.download_button("Download CSV", render_batch.sweep_csv(sweep), file_name=f"batch-sweep-{stamp}.csv",
                         mime="text/csv", icon=":material/download:", help="The table above, one row per batch size.")
    right.download_button("Download JSON", render_batch.sweep_json(sweep), file_name=f"batch-sweep-{stamp}.json",
                          mime="application/json", icon=":material/download:",
                          help="Everything the sweep measured, as `python -m lab bench --out` writes it. Loads back here.")


def show_notice(notice: dict, previous: bool) -> None:
    """How the last sweep ended when it did not finish: cancelled, or stopped by a rerun."""
    what = "Cancelled" if notice["cancelled"] else "Stopped because the page reran while sweeping (an input changed)"
    after = ("The sweep shown below is the previous one." if previous else
             "Run again with fewer batch sizes, prompts or new tokens for a shorter sweep.")
    st.warning(f"{what}, at {notice['where'] or 'its start'}. A sweep cut short keeps nothing: its figures need every batch size. "
               + after, icon=":material/cancel:")


def show_result(sweep: dict) -> None:
    show_status(sweep)
    show_headline(sweep)
    show_figures(sweep)
    show_exactness(sweep)
    show_table_and_export(sweep)


# ---------------------------------------------------------------- page

state.set_defaults(st.session_state, DEFAULTS)
st.title("Speculation against batch size")
st.markdown(EXPLANATION)

widgets.results_file_section("A JSON file saved with Download JSON, or written by `python -m lab bench --out FILE`",
                             UPLOAD_KEY, LOAD_ERROR_KEY, RESULT_KEY, parse_sweep)

with st.container(border=True):
    left, right = st.columns(2)
    with left:
        target_choice = widgets.target_select("batch")
        widgets.prompt_inputs("batch", PROMPT_SETS_HELP)
        st.toggle("Raw completion", key=key("batch.raw"), help="Off: prompts go through the chat template.")
    with right:
        draft_choice = drafter_inputs(target_choice)
    try:
        prompts = widgets.chosen_prompts("batch")
        prompt_error = None
    except (ValueError, FileNotFoundError) as error:
        prompts, prompt_error = [], str(error)
    if prompt_error:
        st.error(prompt_error, icon=":material/error:")
    elif prompts and st.session_state[key("batch.batch_sizes")]:
        st.caption(work_caption(len(prompts), sorted(st.session_state[key("batch.batch_sizes")])))
    run_col, cancel_col, _ = st.columns([2, 1.3, 5])
    run_clicked = run_col.button("Run sweep", type="primary", icon=":material/play_arrow:")
    cancel_slot = cancel_col.empty()

slots = {"cancel": cancel_slot, "progress": st.empty()}
error_slot = st.empty()
collect_stopped_sweep()

if run_clicked:
    st.session_state.pop(NOTICE_KEY, None)
    try:
        result = run_page_sweep(prompts, draft_choice, state.runtime(st.session_state), slots)
    except SweepCancelled as cancelled:
        st.session_state.pop(IN_FLIGHT_KEY, None)
        st.session_state[NOTICE_KEY] = {"cancelled": True, "where": str(cancelled)}
    except (ValueError, ModelError) as error:
        error_slot.error(str(error), icon=":material/error:")
    except MEMORY_ERRORS as error:
        error_slot.error(f"Out of memory ({type(error).__name__}). Free loaded models in the sidebar, pick smaller "
                         "batch sizes, a smaller target or draft, or fewer new tokens; then run again.",
                         icon=":material/memory:")
    else:
        st.session_state[RESULT_KEY] = result
    for slot in slots.values():
        slot.empty()

sweep = st.session_state.get(RESULT_KEY)
if (notice := st.session_state.get(NOTICE_KEY)) is not None:
    show_notice(notice, previous=sweep is not None)
if sweep is not None:
    show_result(sweep)
elif not run_clicked and notice is None:
    st.caption("No sweep yet: choose a target, a drafter and batch sizes, then Run sweep. Start small (SmolLM2, prompt "
               "lookup, batch sizes 1, 2, 4, 16 tokens): every batch size decodes every request two or three times, "
               "after a calibration that times verify passes at each batch size.")
