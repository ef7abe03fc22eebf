"""The Theory page's "MoE trap" section: experts touched per verify pass and the verify cost they bring."""

from __future__ import annotations

import streamlit as st

from app import render_moe, state, widgets

RESULT_KEY = "theory:moe_cost"
UPLOAD_KEY = "theory:moe_upload"
LOAD_ERROR_KEY = "theory:moe_load_error"
key = state.widget_key


def section() -> None:
    """Draw the section (behind a toggle): the shipped measurement, or a loaded ``moe-cost --json`` file."""
    st.subheader("The MoE trap")
    if not st.toggle("Show a Mixture-of-Experts target's verify cost", key=key("theory.moe")):
        st.caption("Each of the K+1 tokens of a verify pass picks its own experts, so a MoE target's pass reads the "
                   "union of their weights and v(K) rises with K: speculation that pays on a dense target can lose "
                   "on its MoE twin at batch 1.")
        return
    # the loader sits at the top of the section, so it is not mistaken for the page's Compare loader below it
    widgets.results_file_section("A moe-cost JSON file (`python -m lab moe-cost --json`)", UPLOAD_KEY,
                                 LOAD_ERROR_KEY, RESULT_KEY, render_moe.parse_moe_cost,
                                 title="Load a moe-cost result (JSON)")
    data = st.session_state.get(RESULT_KEY)
    try:
        data = data or render_moe.load_measured()
    except ValueError as error:
        st.error(str(error), icon=":material/error:")
        data = None
    if data is None:
        st.info("No measurement yet: run `python -m lab moe-cost --json > moe.json` and load the file above.")
        return
    moe, dense = data["moe"], data["dense"]
    st.markdown(
        f"`{moe['name']}` ({moe['num_experts']} experts, top {moe['top_k']}, experts backend "
        f"`{data.get('settings', {}).get('experts_implementation')}`) against its dense source `{dense['name']}`. "
        "A one-token step reads k experts per layer; a verify pass over K+1 tokens reads the union of theirs "
        "(first chart: measured by hooks on the router, dashed: uniform routing), so at batch 1, where a step costs "
        "what its weights cost to read, v(K) climbs (second chart) where the dense model's stays flat. The "
        "break-even acceptance climbs with it (third chart)."
    )
    # stacked, not side by side: in half the width the legends squeezed the plots
    st.plotly_chart(render_moe.experts_figure(data), width="stretch")
    st.caption(f"Uniform routing (prediction): {render_moe.UNIFORM_FORMULA} distinct experts per layer, with E "
               "experts, top k, B rows and K+1 tokens per row: each expert is missed by a token with chance 1 − k/E.")
    st.plotly_chart(render_moe.verify_cost_figure(data), width="stretch")
    c = st.slider("c for the break-even (draft cost per token; 0 = prompt lookup)", 0.0, 1.0, step=0.05,
                  key=key("theory.moe_c"))
    st.plotly_chart(render_moe.break_even_figure(data, c), width="stretch")
    st.caption(f"The break-even takes v(K) at least {render_moe.V_MIN:g}, as the sliders above do: a pass over K+1 "
               "tokens does at least one step's work, so a measured v below 1 (the dense model's at some K) is "
               "timing noise, not a pass cheaper than a step. Hover a point for the measured v.")
