"""Precision on the Live page: the target in a reference precision beside it, and what each model costs in memory.

The page calls ``toggle`` (beside "Compare with the target alone") and ``section`` (the reference precision),
``reference_run`` after its runs (the target alone in the reference precision,
streamed), ``run_memory`` (weights, KV cache and load time of the run's models)
and ``show``.

Speculative decoding is exact relative to the target *as loaded*: quantising
the target makes another model with its own output. The page says so whenever
the target is quantised, and can show the reference target's output beside it,
marked where the two part.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import render, resources, state
from lab.config import DecodeConfig
from lab.decode import decode
from lab.hardware import QUANTIZED_PRECISIONS
from lab.models import ModelError
from lab.studies.precision import MemoryUse, part_ways, run_memory as lab_run_memory

REFERENCE_CHOICES = ("bf16", "fp32")
FULL_PRECISION = "fp32"
DEFAULTS = {"live.reference": False, "live.reference_precision": FULL_PRECISION}

key = state.widget_key


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> "1.5 KiB"; MiB below a GiB, else GiB with two decimals."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}" if unit == "GiB" else f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"


def default_reference(target_precision: str) -> str | None:
    """The best reference precision other than the target's: fp32, or None when the target already is fp32."""
    return None if target_precision == FULL_PRECISION else FULL_PRECISION


def toggle() -> None:
    """The toggle that runs the target in a reference precision beside the run."""
    st.toggle("Show the full-precision target beside it", key=key("live.reference"),
              help="Also run the target alone in the reference precision on the same prompt, and mark where its "
                   "output parts from the target's as loaded. Quantising the target changes its output: "
                   "speculative decoding is exact relative to the target you loaded, not to the unquantised model.")


def section() -> None:
    """Below ``toggle``, when it is on: the reference precision, and why nothing would be shown when the reference
    equals the target's precision."""
    if not st.session_state[key("live.reference")]:
        return
    try:
        target_precision = state.runtime(st.session_state).target_precision
    except (ValueError, ModelError):  # the sidebar shows that error
        target_precision = None
    if target_precision is not None and default_reference(target_precision) is None:
        st.caption(f"The target already runs in full precision ({target_precision}): there is no more precise "
                   "target to compare it with. Pick bf16 or a quantised precision in the sidebar to see what "
                   "rounding or quantising changes.")
        return
    st.selectbox("Reference precision", REFERENCE_CHOICES, key=key("live.reference_precision"), width=240,
                 help="fp32 computes with the least rounding. bf16 is the precision the prepared weights are "
                      "stored in: loading them so loses nothing, but it rounds more than fp32.")
    if st.session_state[key("live.reference_precision")] == target_precision:
        st.warning(f"The reference precision is the target's own ({target_precision}): the reference would be "
                   f"the target itself, so nothing is shown beside it. Pick {default_reference(target_precision)}.",
                   icon=":material/info:")


def settings(runtime: state.Runtime, drafter_name: str) -> dict[str, str]:
    """The run's precisions for its settings line (the draft's only when a draft model drafts)."""
    out = {"target precision": runtime.target_precision}
    if drafter_name == "draft-model":
        out["draft precision"] = runtime.draft_precision
    elif drafter_name == "layer-skip":
        out["draft precision"] = f"{runtime.target_precision} (the target's own layers)"
    elif drafter_name == "eagle":
        out["draft precision"] = f"fp32 head, {runtime.target_precision} LM head (the target's)"
    return out


def rounding_note(settings: dict[str, str]) -> str:
    """Why greedy speculative output can part from the target alone's in this precision, in one sentence."""
    precision = settings.get("target precision") or settings.get("dtype") or "this precision"
    if precision == "int8":
        return ("In int8 (LLM.int8) every input column holding an outlier is computed in fp16 for all tokens of a "
                "pass, so a token's numbers depend on the other tokens verified with it, and a near-tie between two "
                "tokens can flip. Choose fp32 in the sidebar for token-for-token equality.")
    return (f"The algorithm is exact, but in {precision} a pass over K+1 tokens rounds differently from a pass over "
            "one, so a near-tie between two tokens can flip. Choose fp32 in the sidebar for token-for-token equality.")


def reference_model(slot, runtime: state.Runtime, target_name: str, target):
    """The target in the reference precision, loaded (progress in ``slot``) when the page asks for a reference run;
    None when not asked for, the same precision, or the target already in fp32 (``section`` said why)."""
    precision = st.session_state[key("live.reference_precision")]
    if (not st.session_state[key("live.reference")] or precision == target.precision
            or default_reference(target.precision) is None):
        return None
    return resources.load_with_progress(target_name, runtime.device, precision, slot, f"{precision} reference target")


def reference_run(reference, target, prompt_ids: list[int], config: DecodeConfig, compared: state.RunRecord,
                  on_step=None, events=lambda events: events) -> state.ReferenceRun | None:
    """The target alone in the reference precision (``reference``, from ``reference_model``; None: no run).
    No ``st`` call: it runs in the Live page's worker.

    compared: the output of the target as loaded that the reference is held
    against (the target alone when it ran, else the speculative run).
    on_step(record) after each step (the page streams it); events wraps the event stream (the worker's cancel check).
    """
    if reference is None:
        return None
    precision = reference.precision
    record = state.collect_run(f"{precision} target alone (reference)",
                               events(decode(reference, prompt_ids, None, config)),
                               reference.tokenizer, prompt_ids, on_step=on_step)
    return state.ReferenceRun(record=record, precision=precision, target_precision=target.precision,
                              compared_label=compared.label,
                              parting=part_ways(target.tokenizer, compared.token_ids, record.token_ids))


def run_memory(target, drafter, draft, speculative: state.RunRecord) -> list[MemoryUse]:
    """Weights, KV cache (at the end of the run) and load time of the run's target and draft."""
    last = speculative.steps[-1] if speculative.steps else None
    return lab_run_memory(target, drafter, draft, last.target_cache_len if last else 0,
                          last.draft_cache_len if last else None)


def memory_rows(memory: list[MemoryUse]) -> list[dict]:
    """The memory table: one row per model, then the total."""
    rows = [
        {
            "model": f"{use.role}: {use.name}",
            "precision": use.precision,
            "weights": format_bytes(use.weight_bytes) if use.weight_bytes else "shared with the target",
            "KV cache": format_bytes(use.kv_cache_bytes),
            "load time": f"{use.load_s:.1f} s" if use.load_s is not None else "—",
        }
        for use in memory
    ]
    rows.append({"model": "total", "precision": "",
                 "weights": format_bytes(sum(use.weight_bytes for use in memory)),
                 "KV cache": format_bytes(sum(use.kv_cache_bytes for use in memory)), "load time": ""})
    return rows


def show(result: state.LiveResult) -> None:
    """What quantising the target means, the reference beside it, and the run's memory."""
    precision = result.settings.get("target precision", "")
    greedy_word = "greedy " if result.greedy else ""
    if precision in QUANTIZED_PRECISIONS:
        see = ("" if result.reference is not None else " Switch on 'Show the full-precision target beside it' to see "
               "where its output parts from the unquantised model's.")
        st.info(f"The target is quantised ({precision}): speculative decoding is exact relative to the {precision} "
                f"target, so {greedy_word}output equals the {precision} target decoding alone. Quantising the "
                f"target changes that reference itself.{see}", icon=":material/compress:")
    if result.reference is not None:
        show_reference(result.reference, result.greedy)
    if result.memory:
        total = sum(use.total_bytes for use in result.memory)
        roles = " and ".join(dict.fromkeys(use.role for use in result.memory))
        extra = (" The full-precision reference beside it is loaded too and is not counted here."
                 if result.reference is not None else "")
        st.caption(f"Memory of this run: **{format_bytes(total)}** (weights and KV caches of the {roles}).{extra}")
        st.dataframe(pd.DataFrame(memory_rows(result.memory)), hide_index=True, width="stretch")


def show_reference(reference: state.ReferenceRun, greedy: bool) -> None:
    parting = reference.parting
    mine, theirs = reference.target_precision, reference.precision
    if parting is None:
        st.success(f"The {mine} target writes what the {theirs} target writes: all "
                   f"{len(reference.record.token_ids)} tokens match.", icon=":material/compare_arrows:")
    else:
        chance = "" if greedy else " (with sampling, random draws differ too)"
        where = ("From the first token" if parting.index == 0
                 else f"After {parting.num_common} shared tokens (“{_tail(parting.common_text)}”)")
        st.warning(
            f"The {mine} target ({reference.compared_label}) parts from the {theirs} target at token "
            f"{parting.index + 1}{chance}. {where}, {mine} writes “{parting.output_next}…”, {theirs} writes "
            f"“{parting.reference_next}…”.", icon=":material/call_split:"
        )
    stats = reference.record.stats
    st.markdown(f"**{reference.record.label}** · {stats.num_output_tokens} tokens · "
                f"{render.format_number(stats.tokens_per_s, 1)} tokens/s")
    st.html(render.tokens_html(reference.record.pieces, mark_at=None if parting is None else parting.index,
                               mark=f"parts from the {mine} target here"))


def _tail(text: str, max_chars: int = 60) -> str:
    """The end of ``text``, at most ``max_chars`` characters, with "…" when cut."""
    return text if len(text) <= max_chars else "…" + text[-max_chars:]
