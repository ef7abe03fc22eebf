"""Batch page: speedup against batch size, per-request latency and throughput as separate curves.

Reads the widgets, runs ``lab.studies.batch_sweep.run_sweep`` with a progress bar, keeps the
sweep's JSON dict (``SweepResult.as_dict()``) in ``st.session_state`` and draws
it with ``app.render_batch``. The same dict is what Download JSON writes and
what ``python -m lab bench --out F`` writes, so either loads back here.

Running: the page validates and loads the models in the script run (errors show
at once), then hands the sweep to a worker thread (``app.background``) that holds
the device in ``lab.device_queue``, keeps each finished batch size in the results
store and the whole sweep when it ends, whether or not anyone still watches. The
page follows the job with a progress bar and a Cancel button; a rerun or another
page stops only the drawing, and the page takes the finished sweep over when it
is next drawn. Cancel (``Job.cancel``) is polled before each batch of requests
and each batch size's calibration: ``run_sweep`` returns the batch sizes that
finished, marked settings["status"] = "cancelled" with the reason, and the page
shows them as a partial sweep, exportable like a complete one; only a sweep cut
before its first batch size finished leaves nothing but a notice.

Peer: on request, after the sweep, transformers' assisted generation at batch 1
on the same models, prompts and K (``lab.studies.peer.run_peer_comparison``, as
``python -m lab bench`` runs it); its summary goes in the sweep's JSON as
``peer_batch_1``. It has no cancel hook: Cancel stops it at its next progress
report and the sweep is kept without it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import streamlit as st
import torch

from app import background, batch_peer, render, render_batch, resources, saved, state, widgets
from lab.store import RunSaver
from lab.studies import peer
from lab.drafters import make_drafter
from lab.config import K_MAX, MAX_NEW_TOKENS_MAX, DecodeConfig
from lab.models import ModelError, check_same_tokenizer, encode_prompt
from lab.prompts import Prompt
from lab.studies.batch_sweep import DEFAULT_BATCH_SIZES, run_sweep

RESULT_KEY = "batch:sweep"
UPLOAD_KEY = "batch:upload"
LOAD_ERROR_KEY = "batch:load_error"
JOB_KEY = "batch:job"  # an app.background.Job while a sweep runs (or done and not yet shown)
NOTICE_KEY = "batch:notice"  # how the last sweep ended when no batch size of it finished
MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)
DRAFTERS = ("prompt-lookup", "draft-model", "layer-skip", "eagle")
TRIMMABLE = ("draft-model", "eagle")  # drafters with a draft vocabulary to trim

DEFAULTS = {
    "batch.target": "smollm2-135m",
    "batch.drafter": "prompt-lookup",
    "batch.draft": "qwen2.5-coder-0.5b",
    "batch.exit_layer": None,
    "batch.draft_vocab": 0,
    "batch.k": 4,
    "batch.batch_sizes": [1, 2, 4, 8],
    "batch.max_new_tokens": 32,
    "batch.raw": False,
    "batch.peer": False,
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
PEER_LABEL = "Also run transformers' assisted generation (batch 1)"
PEER_HELP = ("After the sweep, decode every prompt one at a time with transformers' `generate`, greedy and assisted "
             "by the same drafter at the same K, beside our engine alone and speculative: our batch-1 tokens/s "
             "against a peer's on the same models and prompts. Slow: four more decodes of every prompt, after a "
             "warm-up.")
PEER_CANCELLED = "cancelled before it finished (the sweep itself finished and is shown)"

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
    if drafter in TRIMMABLE:
        widgets.draft_vocab_select("batch")
    if drafter == "eagle":
        widgets.eagle_note(target)
    k_col, tokens_col = st.columns(2)
    k_col.number_input("K (draft tokens per step)", min_value=1, max_value=K_MAX, step=1, key=key("batch.k"),
                       help="The 'on' mode drafts K tokens; the auto policy may pick any K from 0 (off) to this one.")
    tokens_col.number_input("Max new tokens", min_value=1, max_value=MAX_NEW_TOKENS_MAX, step=16,
                            key=key("batch.max_new_tokens"))
    st.multiselect("Batch sizes (concurrent requests)", list(DEFAULT_BATCH_SIZES), key=key("batch.batch_sizes"),
                   help="Each batch size decodes the prompts, cycled to fill whole batches, with speculation off, "
                        "on, and at the K the policy picks.")
    st.checkbox(PEER_LABEL, key=key("batch.peer"), help=PEER_HELP)
    return draft


def work_caption(num_prompts: int, sizes: list[int]) -> str:
    # as lab.studies.batch_sweep: each batch size decodes the prompts cycled to fill whole batches
    requests = sum(math.ceil(max(num_prompts, b) / b) * b for b in sizes)
    return (f"{render.count(num_prompts, 'prompt')}, batch sizes {', '.join(map(str, sizes))}: "
            f"**{requests} requests per mode** "
            f"(off and on; auto too when it picks another K) of up to "
            f"{st.session_state[key('batch.max_new_tokens')]} tokens, after a calibration that times verify passes at "
            "each batch size. Greedy decoding."
            + (" Then the peer: four decodes of every prompt at batch 1 (ours and transformers', alone and "
               "speculative)." if st.session_state[key("batch.peer")] else ""))


# ---------------------------------------------------------------- running


class PeerCancelled(Exception):
    """The job was cancelled while the peer ran; the sweep before it is kept."""


@dataclass
class SweepPlan:
    """Everything a sweep needs, prepared in the script run; the worker thread runs it (no ``st`` call).

    settings: what the page adds to the sweep's own settings. kept: the run in the results store, made by the
    worker when it starts.
    """

    target: Any
    draft_model: Any
    drafter: Any
    drafter_name: str
    exit_layer: int | None
    trimmed: int | None
    with_peer: bool
    config: DecodeConfig
    sizes: list[int]
    prompts: list[str]
    prompt_ids: list[list[int]]
    chat_template: bool
    device: str
    settings: dict
    kept: RunSaver | None = None


def prepare_sweep(prompts: list[str], draft: str | None, runtime: state.Runtime, progress_slot) -> SweepPlan:
    """Validate the inputs and load the models (progress in ``progress_slot``): what the worker needs.
    ``draft`` is what the draft select returned. Raises ValueError, ``ModelError`` or a memory error."""
    s = st.session_state
    if not prompts:
        raise ValueError("No prompts to run: pick a prompt set, a Spec-Bench category, or paste prompts.")
    sizes = sorted(int(b) for b in s[key("batch.batch_sizes")])
    if not sizes:
        raise ValueError("No batch sizes: pick at least one (1 and a few larger ones show the crossover).")
    config = DecodeConfig(k=int(s[key("batch.k")]), max_new_tokens=int(s[key("batch.max_new_tokens")]),
                          engine_mode=runtime.engine)
    target_name, drafter_name = s[key("batch.target")], s[key("batch.drafter")]
    draft_name = widgets.checked_draft(target_name, draft) if drafter_name == "draft-model" else None
    exit_layer = s[key("batch.exit_layer")] if drafter_name == "layer-skip" else None
    exit_layer = None if exit_layer is None else int(exit_layer)
    trimmed = (s.get(key("batch.draft_vocab")) or None) if drafter_name in TRIMMABLE else None
    if draft_name:  # compare tokenizers before spending seconds on weights
        check_same_tokenizer(resources.load_tokenizer(target_name), resources.load_tokenizer(draft_name))
    target = resources.load_for_role(target_name, "target", runtime, progress_slot)
    draft_model = resources.load_for_role(draft_name, "draft", runtime, progress_slot) if draft_name else None
    drafter = make_drafter(drafter_name, target, draft_model, exit_layer=exit_layer, draft_vocab=trimmed)
    chat_template = not s[key("batch.raw")]
    prompt_ids = [encode_prompt(target, text, chat_template=chat_template) for text in prompts]
    settings = {"target": target_name, "draft": draft_name, "exit_layer": exit_layer, "draft_vocab": trimmed,
                "precision": runtime.precision("target"), "chat_template": chat_template, "prompts": prompts}
    return SweepPlan(target, draft_model, drafter, drafter_name, exit_layer, trimmed, bool(s[key("batch.peer")]),
                     config, sizes, prompts, prompt_ids, chat_template, str(target.device), settings)


def sweep_work(plan: SweepPlan, job: background.Job) -> dict:
    """The sweep (and on request the peer), in the worker thread: progress into ``job`` ("fraction", "where"),
    each finished batch size into the results store, cancelled through ``job`` before each batch of requests.
    Returns the sweep's JSON dict with the page's settings (its finished batch sizes only when cancelled)."""
    plan.kept = saved.saver("batch", plan.settings["target"], plan.settings["draft"], plan.device,
                            on_error=lambda message: job.partial.__setitem__("finish_error", message))

    def progress(fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if not job.should_cancel():  # keep where it stood when the cancel came, not the sweep's "cancelled after …"
            job.partial["where"] = f"{message} ({100 * fraction:.0f} % of the sweep done)"
        job.partial["fraction"], job.progress = fraction, message

    def peer_progress(fraction: float, message: str) -> None:
        job.partial["where"] = f"transformers' assisted generation at batch 1: {message}"
        if job.should_cancel():
            raise PeerCancelled(job.partial["where"])
        job.partial["fraction"], job.progress = min(max(fraction, 0.0), 1.0), job.partial["where"]

    job.progress = "Starting the sweep…"
    started_s = time.monotonic()
    sweep = run_sweep(plan.target, plan.prompt_ids, plan.drafter, plan.config, plan.sizes, progress=progress,
                      should_cancel=job.should_cancel, draft=plan.draft_model, on_part=saved.sweep_part(plan.kept))
    if sweep.settings.get("status") == "cancelled":
        sweep.settings["cancelled_because"] = job.cancelled
        sweep.peer = {"skipped": "the sweep was cut short before the peer's turn"} if plan.with_peer else None
    elif plan.with_peer and plan.trimmed:
        sweep.peer = {"skipped": "transformers' assisted generation has no trimmed draft vocabulary"}
    elif plan.with_peer:
        sweep.peer = run_peer(plan, peer_progress)
    sweep.settings |= plan.settings | {"elapsed_s": time.monotonic() - started_s}
    return json.loads(sweep.to_json())


def keep_finished(plan: SweepPlan, job: background.Job) -> None:
    """In the worker, the moment the sweep has finished: the machine's load into its settings, and the sweep into
    the results store (``app.saved``), whether or not the user is still on the page."""
    if job.load is not None:
        job.result.setdefault("settings", {})["load"] = job.load.as_dict()
    saved.finish_sweep(plan.kept, job.result)


def peer_prompts(texts: list[str]) -> list[Prompt]:
    return [Prompt(f"prompt/{i + 1}", "page", text) for i, text in enumerate(texts)]


def run_peer(plan: SweepPlan, progress) -> dict:
    """transformers' assisted generation at batch 1 on the sweep's models and prompts, as ``python -m lab bench``
    runs it (``lab.cli.measure._bench_peer``): the summary for K with the peer's settings, or {"skipped": why}."""
    if plan.drafter_name not in peer.PEER_DRAFTERS:
        return {"skipped": f"drafter {plan.drafter_name} has no counterpart in transformers"}
    spec = peer.DrafterSpec(plan.drafter_name, draft=plan.draft_model, exit_layer=plan.exit_layer)
    k, max_new_tokens = plan.config.k, plan.config.max_new_tokens
    try:
        report = peer.run_peer_comparison(plan.target, spec, peer_prompts(plan.prompts), k=k,
                                           max_new_tokens=max_new_tokens, chat_template=plan.chat_template,
                                           progress=progress)
    except PeerCancelled:
        return {"skipped": PEER_CANCELLED}
    return report.summary(k) | {"settings": report.settings}


def draw_running(job: background.Job, slots: dict) -> None:
    """The job so far: its progress bar, or its place in the device's line while it waits."""
    place = job.ticket.place
    if place is not None and place > 0:
        slots["progress"].progress(0.0, text=background.waiting_text(job))
    else:
        slots["progress"].progress(job.partial.get("fraction", 0.0), text=job.progress or "Starting the sweep…")


def keep_sweep(result: dict | None, where: str, cancelled: str | None) -> None:
    """Keep what a sweep finished, complete or partial; one cut before its first batch size finished leaves a
    notice instead (and the previous sweep, if any, stays shown). cancelled: why it was cancelled, or None."""
    s = st.session_state
    if result is None or not result.get("results"):
        s[NOTICE_KEY] = {"cancelled": cancelled is not None, "where": where, "why": cancelled}
        return
    settings = result.setdefault("settings", {})
    if cancelled and settings.get("status") not in (None, "complete"):
        settings |= {"status": "cancelled", "cancelled_because": cancelled}
    s[RESULT_KEY] = result
    s.pop(NOTICE_KEY, None)


def take_over(job: background.Job) -> tuple[str, str] | None:
    """A finished job into session state (``keep_sweep``); returns the error to show (message, icon) when it failed."""
    del st.session_state[JOB_KEY]
    if job.error is not None:
        return background.error_message(job.error, "smaller batch sizes, a smaller target or draft, or fewer new tokens")
    where = job.partial.get("where") or ("its wait for the device" if job.result is None else "")
    keep_sweep(job.result, where, job.cancelled)
    if job.partial.get("finish_error"):
        st.warning(f"This sweep is shown but not saved: {job.partial['finish_error']}", icon=":material/database:")
    return None


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
    constraint = render_batch.constraint_text(sweep)
    trimmed = f" (top {settings['draft_vocab']:,} tokens)" if settings.get("draft_vocab") else ""
    return (f"target `{settings.get('target')}`{draft} · {sweep.get('drafter')}{trimmed}, K={sweep.get('k')} · {precision} on "
            f"{settings.get('device')}, {settings.get('engine', 'eager')} engine · up to {settings.get('max_new_tokens')} "
            f"new tokens · {render.count(int(settings.get('num_prompts') or 0), 'prompt')}"
            + (f" · constrained to {constraint}" if constraint else ""))


def show_status(sweep: dict) -> None:
    """Where the sweep comes from, and, for a cancelled one, which batch sizes of which planned it holds."""
    settings = sweep.get("settings") or {}
    sizes = ", ".join(map(str, render_batch.batch_sizes(sweep)))
    partial = render_batch.partial_text(sweep)
    load = settings.get("load") or {}
    if load.get("loaded"):  # beside the speedups below, before any of them is read
        st.warning(f"Measured while the machine was busy: {load['reason']}; rerun for a clean figure.",
                   icon=":material/speed:")
    if settings.get("loaded_from"):
        st.info(f"Loaded from **{settings['loaded_from']}**: batch sizes {sizes} · {describe(sweep)}",
                icon=":material/upload_file:")
    elif partial is None:
        st.success(f"Swept batch sizes {sizes} in {settings.get('elapsed_s', 0):.0f} s · {describe(sweep)}",
                   icon=":material/check_circle:")
    if partial is not None:
        ran = "" if settings.get("loaded_from") else f" · {settings.get('elapsed_s', 0):.0f} s · {describe(sweep)}"
        why = f" It was cancelled because {settings['cancelled_because']}." if settings.get("cancelled_because") else ""
        st.warning(f"{partial}{why} The figures, the table and the downloads below hold the finished batch sizes only "
                   f"(the crossover is looked for among them){ran}", icon=":material/cancel:")


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


def show_constraint(sweep: dict) -> None:
    """Under a constraint: how many outputs of each mode satisfy it."""
    valid = render_batch.outputs_valid(sweep)
    constraint = render_batch.constraint_text(sweep)
    if valid is None and constraint is None:
        return
    counts = ", ".join(f"{mode} **{done}** of {total}" for mode, (done, total) in (valid or {}).items())
    st.caption(f"Every output was constrained to {constraint or 'a grammar'}. "
               + (f"Outputs that satisfy it: {counts}. " if counts else "This file does not count valid outputs. ")
               + "An output cut by the token budget is a valid prefix but does not count as valid; the modes should "
                 "agree, since the grammar masks drafted and verified positions alike.")


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
        st.caption(render.PER_POSITION_WHY)
        spread = render_batch.acceptance_spread(sweep)
        st.caption(
            "Acceptance should **not** change with batch size: greedy outputs do not depend on the batch, so the "
            "curves should lie on top of each other"
            + ("" if spread is None else " (here they agree to within half a point)" if 100 * spread < 0.5
               else f" (here they differ by at most {100 * spread:.0f} points)")
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
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("" if render_batch.partial_text(sweep) is None else "-partial")
    left, right, _ = st.columns([1, 1, 3])
    left.download_button("Download CSV", render_batch.sweep_csv(sweep), file_name=f"batch-sweep-{stamp}.csv",
                         mime="text/csv", icon=":material/download:", help="The table above, one row per batch size.")
    right.download_button("Download JSON", render_batch.sweep_json(sweep), file_name=f"batch-sweep-{stamp}.json",
                          mime="application/json", icon=":material/download:",
                          help="Everything the sweep measured, as `python -m lab bench --out` writes it. Loads back here.")


def show_notice(notice: dict, previous: bool) -> None:
    """How the last sweep ended when no batch size of it finished: cancelled (and why)."""
    what = "Cancelled" if notice["cancelled"] else "Ended"
    why = f" It was cancelled because {notice['why']}." if notice.get("why") else ""
    after = ("The sweep shown below is the previous one." if previous else
             "Run again with fewer batch sizes, prompts or new tokens for a shorter sweep.")
    st.warning(f"{what} during {notice['where'] or 'its start'}, before any batch size finished: nothing to show."
               f"{why} " + after, icon=":material/cancel:")


def show_result(sweep: dict) -> None:
    show_status(sweep)
    show_headline(sweep)
    show_figures(sweep)
    show_exactness(sweep)
    show_constraint(sweep)
    batch_peer.show_peer(sweep)
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
failed = None

if run_clicked:
    try:
        plan = prepare_sweep(prompts, draft_choice, state.runtime(st.session_state), slots["progress"])
    except (ValueError, ModelError, FileNotFoundError, *MEMORY_ERRORS) as error:
        failed = background.error_message(error, "smaller batch sizes, a smaller target or draft, or fewer new tokens")
    else:
        if (running := st.session_state.get(JOB_KEY)) is not None:  # said, not dropped: kept as cancelled
            running.cancel("you started a new sweep")
        st.session_state.pop(NOTICE_KEY, None)
        st.session_state[JOB_KEY] = background.start(
            lambda job, plan=plan: sweep_work(plan, job), plan.device, background.session_holder("Batch"),
            on_finish=lambda job, plan=plan: keep_finished(plan, job))

if st.session_state.get(JOB_KEY) is None and not run_clicked:
    background.offer_elsewhere("Batch", JOB_KEY, "sweep")
if (job := st.session_state.get(JOB_KEY)) is not None:
    if not job.done.is_set():
        background.cancel_button(slots["cancel"], job, "batch_cancel",
                                 "Stop the sweep before its next batch of requests. The batch sizes that finished "
                                 "are kept and shown as a partial sweep; the one under way is dropped.")
        background.follow(job, lambda job: draw_running(job, slots))
    failed = take_over(job) or failed
for slot in slots.values():
    slot.empty()
if failed is not None:
    error_slot.error(failed[0], icon=failed[1])

sweep = st.session_state.get(RESULT_KEY)
if (notice := st.session_state.get(NOTICE_KEY)) is not None:
    show_notice(notice, previous=sweep is not None)
if sweep is not None:
    show_result(sweep)
elif not run_clicked and notice is None:
    st.caption("No sweep yet: choose a target, a drafter and batch sizes, then Run sweep. On a slow machine start "
               "smaller than the defaults (SmolLM2, prompt lookup, batch sizes 1, 2 and 4, 16 new tokens): every batch "
               "size decodes every request two or three times, after a calibration that times verify passes at each "
               "batch size.")
