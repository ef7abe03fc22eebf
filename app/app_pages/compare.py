"""Compare page: every chosen drafter at every chosen K on the same prompts, against the target alone.

Reads the widgets, calls ``lab.studies.compare.run_comparison`` with a progress bar and
a Cancel button, keeps the ``Comparison`` in ``st.session_state`` (the Theory
page reads it too) and renders it with ``app.render_compare``. Results export
to CSV and JSON; a JSON file loads back.

Running: the page validates and loads the models in the script run (errors show
at once), then hands the comparison to a worker thread (``app.background``) that
holds the device in ``lab.device_queue``, keeps each finished prompt in the
results store and the whole comparison when it ends, whether or not anyone still
watches. The page follows the job with a progress bar and a Cancel button; a
rerun or another page stops only the drawing, and the page takes the finished
comparison over when it is next drawn. Cancel (``Job.cancel``, polled between
decode steps) keeps the runs finished so far, and says why it stopped.
"""

from __future__ import annotations

import math

import time
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import streamlit as st
import torch

from app import background, render, render_compare, resources, saved, state, widgets
from lab.store import RunSaver
from lab.studies import compare
from lab.config import K_MAX, MAX_NEW_TOKENS_MAX, DecodeConfig
from lab.drafters import TREE_DRAFTERS
from lab.models import ModelError, check_same_tokenizer

RESULT_KEY = "compare:comparison"
JOB_KEY = "compare:job"  # an app.background.Job while a comparison runs (or done and not yet shown)
NOTICE_KEY = "compare:notice"  # why the last comparison started ended before any run (cancelled while waiting)
LOAD_ERROR_KEY = "compare:load_error"
UPLOAD_KEY = "compare:upload"
MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)
COMPARED_DRAFTERS = ("prompt-lookup", "layer-skip", "draft-model", "eagle")

DEFAULTS = {
    "compare.target": "smollm2-135m",
    "compare.drafters": ["prompt-lookup", "layer-skip"],
    "compare.draft": "qwen2.5-coder-0.5b",
    "compare.exit_layer": None,
    "compare.draft_vocab": 0,
    "compare.vocab_bridge": "none",
    "compare.bridged_draft": "smollm2-135m",
    "compare.min_n": 1,
    "compare.max_n": 3,
    "compare.ks": [2, 4],
    "compare.tree_budget": 0,
    "compare.max_new_tokens": 32,
    "compare.temperature": 0.0,
    "compare.seed": 0,
    "compare.raw": False,
    "compare.curve_k": None,
    "compare.inspect": 1,  # the first drafter run (0 is the first target-alone baseline)
} | widgets.prompt_defaults("compare", ["code_editing", "creative_writing"], spec_count=2)

key = state.widget_key
PROMPT_SETS_HELP = ("Shipped in assets/prompts/: chosen to show high acceptance (code editing, JSON extraction, "
                    "summarization copy from the prompt) and low (creative writing, open QA).")
SUMMARY_COLUMNS = {
    "acceptance rate": st.column_config.NumberColumn(format="percent", help=render.ACCEPTANCE_RATE_HELP),
    "mean acceptance length": st.column_config.NumberColumn(format="%.2f", help=render.MEAN_LENGTH_HELP),
    "tokens/s": st.column_config.NumberColumn(format="%.1f"),
    "target tokens/s": st.column_config.NumberColumn(format="%.1f", help="The target alone on the same prompts."),
    "speedup": st.column_config.NumberColumn(format="%.2f×", help="Tokens/s over the target alone's on the same prompts, prefill included."),
    "decode speedup": st.column_config.NumberColumn(format="%.2f×", help="The same over the decode phase only: what Leviathan's formula predicts."),
    "c": st.column_config.NumberColumn(format="%.3f", help="Draft cost: draft time per drafted token over the target alone's time per step."),
    "tokens per pass": st.column_config.NumberColumn(format="%.2f", help="Output tokens per target forward pass, steps without a draft included."),
    "draft rate r": st.column_config.NumberColumn(format="percent", help="Share of steps at which the drafter proposed anything."),
    "verify cost in the loop": st.column_config.NumberColumn(format="%.2f", help="One verify step in the decode loop (K+1 tokens, acceptance and rollback included) over the target alone's step."),
    "v(K), bare": st.column_config.NumberColumn(format="%.2f", help="A bare forward pass over K+1 tokens over a one-token pass, timed at the start of the comparison."),
    "predicted (Leviathan)": st.column_config.NumberColumn(format="%.2f×", help="Leviathan's decode speedup for the fitted a, K and c, with v = 1 and r = 1."),
    "efficiency": st.column_config.NumberColumn(format="percent", help="Decode speedup over Leviathan's prediction."),
    "predicted with v, r": st.column_config.NumberColumn(format="%.2f×", help="The same prediction with the bare v(K) and the measured r."),
    "efficiency_v": st.column_config.NumberColumn(format="percent", help="Decode speedup over the prediction with v(K) and r: the engine's own overhead and noise."),
}
VERIFY_COST_LEGEND = """
- **v(K), bare**: what one forward pass over K+1 tokens costs, in plain one-token steps, with nothing else (timed
  at the start of the comparison). v(K) is measured; Leviathan assumes 1; on a CPU it can be above 1, and near 1
  a single short run is within timing noise. *Verify cost in the loop* is the same ratio for a whole
  verify step of the decode loop: above v(K), the difference is our bookkeeping.
- **r, draft rate**: the share of steps at which the drafter proposed anything (Leviathan: r = 1). Any drafter
  can draft nothing at a step: prompt lookup finds no match, the last step of the token budget has no room for a
  draft, a grammar ends one.
- **efficiency** = decode speedup / Leviathan's prediction (v = 1, r = 1). **efficiency_v** = decode speedup / the
  prediction with the bare v(K) and the measured r: what is left is the engine's own overhead and timing noise
  (100 % = a perfect engine; above 100 % is timing noise). The Theory page draws both.
"""
COMPACT_COLUMNS = SUMMARY_COLUMNS | {
    "K": st.column_config.TextColumn(help="Draft tokens per step; ★: the drafter's best K by speedup, where it beats the target alone."),
}


# ---------------------------------------------------------------- inputs


def chosen_specs(draft: str | None) -> list[compare.DrafterSpec]:
    """The chosen drafters with their options; ``draft`` is what the draft select returned."""
    s = st.session_state
    specs = []
    for name in s[key("compare.drafters")]:
        if name == "prompt-lookup":
            specs.append(compare.DrafterSpec(name, min_n=int(s[key("compare.min_n")]), max_n=int(s[key("compare.max_n")])))
        elif name == "layer-skip":
            exit_layer = s[key("compare.exit_layer")]
            specs.append(compare.DrafterSpec(name, exit_layer=None if exit_layer is None else int(exit_layer)))
        elif name == "eagle":
            specs.append(compare.DrafterSpec(name))
        else:
            specs.append(compare.DrafterSpec(name, draft=widgets.checked_draft(s[key("compare.target")], draft)))
    trimmed = s.get(key("compare.draft_vocab"))
    if trimmed:  # the trimmed variants run beside the full-vocabulary ones
        specs += [replace(spec, draft_vocab=int(trimmed)) for spec in specs if spec.name in ("draft-model", "eagle")]
    bridge = widgets.vocab_bridge("compare")
    if "draft-model" in s[key("compare.drafters")] and bridge != "none":  # a draft of another tokenizer races too
        specs.append(compare.DrafterSpec("draft-model", draft=s[key("compare.bridged_draft")], vocab_bridge=bridge))
    budget = int(s.get(key("compare.tree_budget")) or 0)
    if budget:  # each drafter that drafts trees also runs as a tree, beside its chain
        specs += [replace(spec, tree_budget=budget) for spec in specs
                  if spec.name in TREE_DRAFTERS and spec.vocab_bridge == "none" and not spec.draft_vocab]
    return specs


def drafter_inputs(target: str) -> str | None:
    """The drafters, their options and the K values; returns the draft select's choice (None: none fits)."""
    st.multiselect("Drafters", COMPARED_DRAFTERS, key=key("compare.drafters"), format_func=widgets.DRAFTER_LABELS.get,
                   help="Each runs at every K on every prompt; the target alone always runs as the baseline.")
    chosen = st.session_state[key("compare.drafters")]
    draft = widgets.draft_select("compare", target) if "draft-model" in chosen else None
    options = st.columns(3)
    if "prompt-lookup" in chosen:
        widgets.ngram_inputs("compare", options[0], options[1])
    if "layer-skip" in chosen:
        widgets.exit_layer_input("compare", options[2])
    if "draft-model" in chosen or "eagle" in chosen:
        widgets.draft_vocab_select("compare", label="Also with a trimmed vocabulary")
    if "draft-model" in chosen:
        widgets.bridged_draft_inputs("compare", target)
    st.multiselect("K values (draft tokens per step)", list(range(1, K_MAX + 1)), key=key("compare.ks"))
    widgets.tree_budget_input("compare", disabled=not any(n in TREE_DRAFTERS for n in chosen))
    return draft


# ---------------------------------------------------------------- running


@dataclass
class ComparePlan:
    """Everything a comparison needs, prepared in the script run; the worker thread runs it (no ``st`` call).

    settings: what the page adds to the comparison's own settings (precisions, sizes, drafter costs).
    kept: the run in the results store, made by the worker when it starts.
    """

    target: Any
    drafts: dict
    prompts: list[str]
    specs: list[compare.DrafterSpec]
    ks: list[int]
    config: DecodeConfig
    chat_template: bool
    target_name: str
    draft_name: str | None
    device: str
    settings: dict
    kept: RunSaver | None = None

    @property
    def total_runs(self) -> int:
        return len(self.prompts) * (1 + len(self.specs) * len(self.ks))


def prepare_comparison(prompts: list[str], specs: list[compare.DrafterSpec], ks: list[int], config: DecodeConfig,
                       runtime: state.Runtime, progress_slot) -> ComparePlan:
    """Validate the inputs and load the models (progress in ``progress_slot``): what the worker needs.

    Raises ValueError, ``ModelError``, FileNotFoundError or a memory error: shown by the page at once.
    """
    s = st.session_state
    if not prompts:
        raise ValueError("No prompts to compare: pick a prompt set, a Spec-Bench category, or paste prompts.")
    if not specs:
        raise ValueError("No drafter chosen: pick at least one drafter (the target alone always runs as the baseline).")
    if not ks:
        raise ValueError("No K values: pick at least one K.")
    target_name = s[key("compare.target")]
    draft_names = {spec.draft for spec in specs if spec.draft}
    for draft_name in {spec.draft for spec in specs if spec.draft and spec.vocab_bridge == "none"}:
        # compare tokenizers before spending seconds on weights (a bridged draft has another tokenizer on purpose)
        check_same_tokenizer(resources.load_tokenizer(target_name), resources.load_tokenizer(draft_name))
    target = resources.load_for_role(target_name, "target", runtime, progress_slot)
    drafts = {name: resources.load_for_role(name, "draft", runtime, progress_slot) for name in draft_names}
    settings = {
        "precision": runtime.precision("target"),
        "draft_precision": runtime.precision("draft") if drafts else None,
        "target_parameters": target.num_parameters,
        "target_weight_bytes": target.weight_bytes,
        "drafter_costs": {spec.label: render_compare.drafter_cost(
            spec.name, target, drafts.get(spec.draft), spec.exit_layer, spec.draft_vocab,
            head=resources.eagle_head(target.name) if spec.name == "eagle" else None) for spec in specs},
    }
    return ComparePlan(target, drafts, prompts, specs, ks, config, chat_template=not s[key("compare.raw")],
                       target_name=target_name, draft_name=next(iter(draft_names), None),
                       device=str(target.device), settings=settings)


def compare_work(plan: ComparePlan, job: background.Job) -> compare.Comparison:
    """The comparison, in the worker thread: progress into ``job`` ("fraction", "line"), each finished prompt into
    the results store, cancelled through ``job`` (between decode steps: the runs that finished are returned)."""
    total = plan.total_runs
    counts = {"runs_done": 0, "steps": 0}
    plan.kept = saved.saver("compare", plan.target_name, plan.draft_name, plan.device,
                            on_error=lambda message: job.partial.__setitem__("finish_error", message))

    def progress(fraction: float, message: str) -> None:
        counts["runs_done"], counts["steps"] = round(fraction * total), 0
        job.partial["fraction"] = fraction
        job.progress = f"{counts['runs_done']}/{total} runs · done: {message}"

    def should_cancel() -> bool:
        counts["steps"] += 1
        job.partial["line"] = f"Run {counts['runs_done'] + 1} of {total}: step {counts['steps']}…"
        return job.should_cancel()

    job.progress = f"0/{total} runs"
    started_s = time.monotonic()
    comparison = compare.run_comparison(plan.target, plan.prompts, plan.specs, plan.ks, plan.config,
                                        load_draft=plan.drafts.__getitem__, chat_template=plan.chat_template,
                                        progress=progress, should_cancel=should_cancel,
                                        on_part=saved.compare_part(plan.kept))
    finished = sum(1 for r in comparison.runs if not r.cancelled)
    comparison.settings |= plan.settings | {
        "status": "complete" if finished == total else "cancelled",
        "cancelled_because": None if finished == total else job.cancelled,
        "runs_planned": total,
        "elapsed_s": time.monotonic() - started_s,
    }
    return comparison


def keep_finished(plan: ComparePlan, job: background.Job) -> None:
    """In the worker, the moment the comparison has finished: into the results store, watched or not."""
    saved.finish_comparison(plan.kept, job.result)


def draw_running(job: background.Job, slots: dict) -> None:
    """The job so far: its progress bar and the line of the run under way (or its place in the device's line)."""
    slots["progress"].progress(min(max(job.partial.get("fraction", 0.0), 0.0), 1.0), text=job.progress or "Starting…")
    place = job.ticket.place
    slots["line"].caption(background.waiting_text(job) if place is not None and place > 0
                          else job.partial.get("line", ""))


def take_over(job: background.Job) -> tuple[str, str] | None:
    """A finished job into session state: its comparison (complete, or what finished before a cancel), or a notice
    of why it was cancelled before any run. Returns the error to show (message, icon) when it failed."""
    s = st.session_state
    del s[JOB_KEY]
    if job.error is not None:
        return background.error_message(job.error)
    comparison = job.result
    if comparison is None:  # cancelled while it waited for the device
        s[NOTICE_KEY] = f"Cancelled while waiting for the device, before any run: {job.cancelled}."
        return None
    if job.cancelled and comparison.settings.get("status") != "complete":
        comparison.settings |= {"status": "cancelled", "cancelled_because": job.cancelled}
    s[RESULT_KEY] = comparison
    s.pop(NOTICE_KEY, None)
    if job.partial.get("finish_error"):
        st.warning(f"This comparison is shown but not saved: {job.partial['finish_error']}", icon=":material/database:")
    return None


def clear_run_slots(*slots) -> None:
    for slot in slots:
        slot.empty()


# ---------------------------------------------------------------- results


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def show_status(comparison: compare.Comparison) -> None:
    settings = comparison.settings
    finished = sum(1 for r in comparison.runs if not r.cancelled)
    planned = settings.get("runs_planned", len(comparison.runs))
    status = settings.get("status", "complete")
    precision = settings.get("precision") or settings.get("dtype", "").removeprefix("torch.")
    if settings.get("draft_precision"):
        precision += f" (draft {settings['draft_precision']})"
    what = (f"target `{settings.get('target')}` · {precision} on "
            f"{settings.get('device')} · up to {settings.get('max_new_tokens')} new tokens · "
            + ("greedy" if settings.get("temperature") == 0 else f"temperature {settings.get('temperature')}"))
    load = settings.get("load") or {}
    if load.get("loaded"):  # beside the speedups below, before any of them is read
        st.warning(f"Measured while the machine was busy: {load['reason']}; rerun for a clean figure.",
                   icon=":material/speed:")
    if settings.get("loaded_from"):
        st.info(f"Loaded from **{settings['loaded_from']}**: {plural(finished, 'run')} on "
                f"{plural(len(comparison.prompts), 'prompt')} · {what}",
                icon=":material/upload_file:")
    elif status == "complete":
        st.success(f"Complete: {plural(finished, 'run')} on {plural(len(comparison.prompts), 'prompt')} in "
                   f"{settings.get('elapsed_s', 0):.0f} s · {what}", icon=":material/check_circle:")
    elif status == "cancelled":
        why = f": {settings['cancelled_because']}" if settings.get("cancelled_because") else ""
        st.warning(f"Cancelled after {finished} of {planned} runs{why}. The tables and charts below show the runs that "
                   f"finished (a prompt counts once its target-alone baseline ran) · {what}", icon=":material/cancel:")
    else:  # a comparison kept before runs went on in the background: a rerun stopped it
        st.warning(f"Stopped after {finished} of {planned} runs because the page reran while comparing (an input "
                   f"changed). The runs that finished are shown · {what}", icon=":material/pause_circle:")


def show_summary(comparison: compare.Comparison, summary) -> None:
    st.subheader("Per drafter and K")
    if summary.empty:
        st.info("No drafter run finished yet: only target-alone baselines (if any) are in this result.")
        return
    st.dataframe(render_compare.compact_summary_table(summary), hide_index=True, width="stretch",
                 column_config=COMPACT_COLUMNS)
    st.caption(
        "Acceptance rate: accepted / drafted tokens (vLLM's; not Leviathan's per-token a, which the Theory page "
        "fits from the mean acceptance length). Mean acceptance length = 1 + accepted / drafts: tokens per target "
        "pass on drafted steps, the target's own token included; with K drafted every step it is 1 + K × the "
        "acceptance rate. Speedup: tokens/s over the target alone on the same prompts, prefill "
        "included. ★: each drafter's best K by speedup, where it beats the target alone. One run each on a shared machine: timings are noisy."
    )
    if render_compare.column(summary, "tree_budget").fillna(0).gt(0).any():
        st.caption("Tree budget: a tree arm drafts up to that many nodes per verify pass, K deep. Mean tree size: the "
                   "nodes it drafted per verify pass; a tree no larger than K branched nowhere (each n-gram had one "
                   "continuation, say), so it verified what its chain did.")
    with st.expander("All columns"):
        st.dataframe(render_compare.summary_table(summary), hide_index=True, width="stretch",
                     column_config=SUMMARY_COLUMNS)
        st.caption("Target tokens/s: the target alone on the same prompts. Decode speedup: the speedup without the "
                   "prefill, what Leviathan's formula predicts. c: draft time per drafted token over the target "
                   "alone's time per step. Tokens per pass: output tokens per target forward pass.")
        st.markdown(VERIFY_COST_LEGEND)
        if render_compare.column(summary, "bare_verify_cost").isna().all():
            st.caption("n/a: this comparison did not time bare verify passes (a results file written before the lab "
                       "measured v(K)); run it again for v(K), the prediction with v and r, and efficiency_v.")
    identical = summary["identical_to_target"].astype(float)
    if comparison.settings.get("temperature") == 0 and (identical < 1).any():
        st.warning(
            "Some greedy outputs differ from the target alone. The algorithm is exact, but below fp32 a pass over "
            "K+1 tokens rounds differently from a pass over one, so a near-tie between two tokens can flip. Choose "
            "fp32 as the target precision in the sidebar for token-for-token equality."
        )
    st.subheader("What each drafter costs")
    costs = comparison.settings.get("drafter_costs", {})
    # a static table wraps its cells: in a dataframe the long "what it uses" pushed "c, measured" off the right edge
    st.table(pd.DataFrame(render_compare.cost_rows(costs, summary)), hide_index=True)
    target_params = comparison.settings.get("target_parameters")
    if target_params:
        st.caption(f"For scale, the target `{comparison.settings.get('target')}` has "
                   f"{render_compare.format_count(target_params)} parameters "
                   f"({render_compare.format_bytes(comparison.settings.get('target_weight_bytes'))}). "
                   "Speculation pays when the acceptance rate is well above c (see the Theory page).")


def show_charts(summary) -> None:
    if summary.empty:
        return
    ks = sorted(int(k) for k in summary["k"].unique())
    curves, bars, against_k = st.columns(3)
    with curves:
        chart = st.empty()
        curve_k = None
        if len(ks) > 1:
            if st.session_state[key("compare.curve_k")] not in ks:
                st.session_state[key("compare.curve_k")] = ks[-1]
            curve_k = st.select_slider("K of the acceptance curves", ks, key=key("compare.curve_k"))
        chart.plotly_chart(render_compare.per_position_figure(summary, curve_k), width="stretch")
        st.caption(render.PER_POSITION_WHY)
    bars.plotly_chart(render_compare.speedup_figure(summary), width="stretch")
    against_k.plotly_chart(render_compare.acceptance_vs_k_figure(summary), width="stretch")


def show_runs(comparison: compare.Comparison) -> None:
    st.subheader(f"Per prompt: {len(comparison.prompts)} prompts, {len(comparison.runs)} runs")
    st.caption("The evidence behind the table above: one row per run, with its prompt's category and start. Click a "
               "column's header to sort by it (speedup, acceptance, category, ...).")
    st.dataframe(render_compare.runs_display(render_compare.runs_table(comparison)), hide_index=True, width="stretch")
    with st.expander("The prompts in full"):
        for i, prompt in enumerate(comparison.prompts):
            st.markdown(f"**Prompt {i + 1}.** {render_compare.preview(prompt, 300)}")


def show_timeline(comparison: compare.Comparison) -> None:
    st.subheader("Timeline of a run")
    if not comparison.runs:
        st.caption("No run finished.")
        return
    s = st.session_state
    if not 0 <= int(s[key("compare.inspect")] or 0) < len(comparison.runs):
        s[key("compare.inspect")] = 0
    index = st.selectbox("Run", range(len(comparison.runs)), key=key("compare.inspect"),
                         format_func=lambda i: render_compare.run_label(comparison, i))
    record = comparison.runs[index]
    baseline = next((r for r in comparison.runs if r.prompt_index == record.prompt_index and r.drafter == compare.BASELINE
                     and not r.cancelled), None)
    base_split = render_compare.time_split(baseline.draft_ms, baseline.verify_ms) if baseline is not None else None
    split = render_compare.time_split(record.draft_ms, record.verify_ms)
    st.plotly_chart(render_compare.timeline_figure(
        record.draft_ms, record.verify_ms, title=f"Time per step: {render_compare.run_label(comparison, index)}",
        baseline_ms_per_step=None if base_split is None or record is baseline else base_split.verify_ms_per_step,
    ), width="stretch")
    line = (f"{split.steps} steps: drafting {split.draft_ms:.0f} ms ({render.format_rate(split.draft_share)} of the "
            f"decode time), verifying {split.verify_ms:.0f} ms ({render.format_number(split.verify_ms_per_step, 1)} ms "
            f"per step); prefill {1e3 * (record.metrics.get('prefill_s') or 0):.0f} ms.")
    if base_split is not None and record is not baseline:
        ratio = split.verify_ms_per_step / base_split.verify_ms_per_step if base_split.verify_ms_per_step else math.nan
        line += (f" The target alone took {render.format_number(base_split.verify_ms_per_step, 1)} ms per step, so "
                 f"a verify pass over K+1 tokens cost {render.format_number(ratio, 2, '×')} a one-token step here")
        if 0.8 <= ratio <= 1.25:
            line += ": about the same, as when decoding is memory-bound."
        elif ratio < 0.8:
            line += (": less than a one-token step, which only timing noise or a busy machine explains (the two runs "
                     "were not timed side by side); rerun for a clean figure.")
        else:
            line += ": more, as when a pass is compute-bound (a wide verify, a large batch, or fp32 on this CPU)."
    st.caption(line)
    with st.expander("Output text of this run"):
        if record.identical_to_target is not None:
            st.caption("Identical to the target alone." if record.identical_to_target else
                       "Differs from the target alone (see the note on bf16 above).")
        st.text(record.text or "(no output: the run was cancelled)")


def show_export(comparison: compare.Comparison) -> None:
    left, right, _ = st.columns([1, 1, 3])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    left.download_button("Download CSV", comparison.to_csv(), file_name=f"comparison-{stamp}.csv", mime="text/csv",
                         icon=":material/download:", help="One row per run (per prompt, drafter and K).")
    right.download_button("Download JSON", comparison.to_json(), file_name=f"comparison-{stamp}.json",
                          mime="application/json", icon=":material/download:",
                          help="Everything: settings, prompts, every run with its per-step timings. Loads back here.")


def show_result(comparison: compare.Comparison) -> None:
    summary = comparison.summary()
    show_status(comparison)
    show_summary(comparison, summary)
    show_charts(summary)
    show_runs(comparison)
    show_timeline(comparison)
    show_export(comparison)


# ---------------------------------------------------------------- page

state.set_defaults(st.session_state, DEFAULTS)
st.title("Compare drafters")
st.markdown(
    "Run every chosen drafter at every chosen K on the same prompts, with the **target alone** on each prompt as the "
    "baseline. Prompts that copy from their input (code editing, extraction, summaries) accept many drafted tokens; "
    "free writing accepts few. The Theory page places these runs on Leviathan's curves."
)

widgets.results_file_section("A JSON file saved with Download JSON", UPLOAD_KEY, LOAD_ERROR_KEY, RESULT_KEY,
                             widgets.parse_comparison)
widgets.compare_presets("compare")

with st.container(border=True):
    left, right = st.columns(2)
    with left:
        target_choice = widgets.target_select("compare")
        widgets.prompt_inputs("compare", PROMPT_SETS_HELP)
    with right:
        draft_choice = drafter_inputs(target_choice)
    tokens_col, temp_col, seed_col, raw_col = st.columns(4)
    tokens_col.number_input("Max new tokens", min_value=1, max_value=MAX_NEW_TOKENS_MAX, step=16,
                            key=key("compare.max_new_tokens"))
    temp_col.slider("Temperature", 0.0, 2.0, step=0.05, key=key("compare.temperature"),
                    help="0 = greedy: every run must equal the target alone token for token.")
    seed_col.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=key("compare.seed"),
                          disabled=st.session_state[key("compare.temperature")] == 0)
    raw_col.toggle("Raw completion", key=key("compare.raw"), help="Off: prompts go through the chat template.")

    try:
        items = widgets.chosen_prompt_items("compare")
        prompt_error = None
    except FileNotFoundError:  # the Spec-Bench file is absent: widgets.prompt_inputs said so
        items, prompt_error = [], None
    except ValueError as error:
        items, prompt_error = [], str(error)
    prompts = [item.text for item in items]
    chosen = st.session_state[key("compare.drafters")]
    # the trimmed vocabulary runs a second variant of the draft model and the head
    trims = sum(name in ("draft-model", "eagle") for name in chosen) if st.session_state.get(key("compare.draft_vocab")) else 0
    bridged = int("draft-model" in chosen and widgets.vocab_bridge("compare") != "none")  # the bridged draft races too
    # each drafter that drafts trees also runs as a tree beside its chain (chosen_specs: not trimmed, not bridged)
    trees = sum(name in TREE_DRAFTERS for name in chosen) if int(st.session_state.get(key("compare.tree_budget")) or 0) else 0
    n_drafters, n_ks = len(chosen) + trims + bridged + trees, len(st.session_state[key("compare.ks")])
    if prompt_error:
        st.error(prompt_error, icon=":material/error:")
    else:
        arms = render.count(n_drafters - trees, "drafter")
        if trees:  # said apart: a tree arm is a drafter's tree run beside its chain, not another drafter
            arms = f"({arms} + {render.count(trees, 'tree arm')})"
        st.caption(f"{render.count(len(prompts), 'prompt')} × (target alone + {arms} × {n_ks} K) = "
                   f"**{len(prompts) * (1 + n_drafters * n_ks)} decodes** of up to "
                   f"{st.session_state[key('compare.max_new_tokens')]} tokens.")
        if prompts:
            with st.expander("The prompts"):
                for i, prompt in enumerate(prompts):
                    st.markdown(f"**{i + 1}.** {render_compare.preview(prompt, 240)}")
    run_col, cancel_col, _ = st.columns([2, 1.3, 5])
    run_clicked = run_col.button("Run comparison", type="primary", icon=":material/play_arrow:")
    cancel_slot = cancel_col.empty()

slots = {"cancel": cancel_slot, "progress": st.empty(), "line": st.empty()}
error_slot = st.empty()
failed = None

if run_clicked:
    s = st.session_state
    try:
        runtime = state.runtime(s)
        config = DecodeConfig(max_new_tokens=int(s[key("compare.max_new_tokens")]),
                              temperature=float(s[key("compare.temperature")]), seed=int(s[key("compare.seed")]),
                              engine_mode=runtime.engine_choice)
        plan = prepare_comparison(prompts, chosen_specs(draft_choice), sorted(int(k) for k in s[key("compare.ks")]),
                                  config, runtime, slots["progress"])
        plan.settings["categories"] = {str(i): item.category for i, item in enumerate(items)}
    except (ValueError, ModelError, FileNotFoundError, *MEMORY_ERRORS) as error:
        clear_run_slots(*slots.values())
        failed = background.error_message(error)
    else:
        if (running := s.get(JOB_KEY)) is not None:  # said, not dropped: kept as cancelled, with the reason
            running.cancel("you started a new comparison")
        s.pop(NOTICE_KEY, None)
        s[JOB_KEY] = background.start(lambda job, plan=plan: compare_work(plan, job), plan.device,
                                      background.session_holder("Compare"),
                                      on_finish=lambda job, plan=plan: keep_finished(plan, job))

if st.session_state.get(JOB_KEY) is None and not run_clicked:
    background.offer_elsewhere("Compare", JOB_KEY, "comparison")
if (job := st.session_state.get(JOB_KEY)) is not None:
    if not job.done.is_set():
        background.cancel_button(slots["cancel"], job, "compare_cancel",
                                 "Stop after the current step; the runs finished so far are kept.")
        background.follow(job, lambda job: draw_running(job, slots))
    clear_run_slots(*slots.values())
    failed = take_over(job) or failed

if failed is not None:
    error_slot.error(failed[0], icon=failed[1])
elif (notice := st.session_state.get(NOTICE_KEY)) is not None:
    error_slot.warning(notice, icon=":material/cancel:")

if (result := st.session_state.get(RESULT_KEY)) is not None:
    show_result(result)
elif not run_clicked:
    st.caption("No comparison yet: choose prompts, drafters and K values, then Run comparison.")
