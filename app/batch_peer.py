"""The Batch page's peer panel: ours against transformers' assisted generation at batch 1, when a sweep holds it."""

from __future__ import annotations

import streamlit as st

from app import render, render_batch

SPEEDUP = st.column_config.NumberColumn(format="%.2f×")
RATE = st.column_config.NumberColumn(format="%.1f")
PEER_COLUMNS = {
    "greedy tokens/s": RATE, "speculative tokens/s": RATE, "speedup over its own greedy": SPEEDUP,
    "tokens per target pass": st.column_config.NumberColumn(format="%.2f"),
}


def show_peer(sweep: dict) -> None:
    """Ours against transformers' assisted generation at batch 1 (``peer_batch_1``), when the sweep holds it."""
    found = render_batch.peer(sweep)
    if found is None:
        return
    st.subheader("Against transformers' assisted generation at batch 1")
    if found.get("skipped"):
        st.info(f"The peer was not run: {found['skipped']}.", icon=":material/info:")
        return
    table = render_batch.peer_table(found)
    ours, theirs = table["speculative tokens/s"].tolist()
    ours_speedup, their_speedup = table["speedup over its own greedy"].tolist()
    cards = st.columns(3)
    cards[0].metric("Ours, speculative", render.format_number(ours, 1, " tokens/s"),
                    help=f"{render.format_number(ours_speedup, 2, '×')} the tokens/s of our engine's greedy decoding "
                         "(the target alone), one request at a time.")
    cards[1].metric("transformers' assisted generation", render.format_number(theirs, 1, " tokens/s"),
                    help=f"{render.format_number(their_speedup, 2, '×')} the tokens/s of its own greedy `generate`, "
                         "one request at a time.")
    cards[2].metric("Ours / theirs", render.format_number(render_batch.number(found.get("ratio_ours_vs_hf_assisted")),
                                                          2, "×"),
                    help="Our speculative tokens/s over transformers' assisted tokens/s, pooled over the prompts. "
                         "Median of the per-prompt ratios: "
                         + render.format_number(render_batch.number(found.get("ratio_ours_vs_hf_assisted_median")), 2,
                                                "×") + ".")
    st.dataframe(table, hide_index=True, width="stretch", column_config=PEER_COLUMNS)
    settings = found.get("settings") or {}
    mismatches = render_batch.peer_mismatch_text(found)
    st.caption(
        f"{render.count(int(found.get('num_prompts') or 0), 'prompt')}, one at a time, K={found.get('k')}, "
        f"{settings.get('drafter') or sweep.get('drafter')}, greedy, prefill included, on the sweep's target, draft "
        f"and prompts ({settings.get('dtype', '?')}, {render.count(settings['torch_threads'], 'torch thread') if 'torch_threads' in settings else '? torch threads'}). Each "
        "speedup is over that decoder's own greedy decoding, so each engine is measured against itself. Greedy "
        f"outputs identical: {render_batch.peer_identical_text(found)}."
        + (f" Differ: {mismatches}. Below fp32 a pass over K+1 tokens rounds differently from a pass over one, so a "
           "near-tie can flip." if mismatches else "")
    )
