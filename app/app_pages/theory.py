"""Theory page: Leviathan et al. 2023's expected tokens per step and walltime speedup, with measured runs on them.

Curves come from ``lab.theory`` for the K, c and v on the sliders (v, the cost
of a verify pass over K+1 tokens in plain steps, is 1 in Leviathan's model).
Measured points come from the last comparison in ``st.session_state`` (run on
the Compare page, or a results file loaded there or here), each beside two
predictions: Leviathan's (v = 1, every step drafted) and the one with the
run's measured v(K) and draft rate r (``lab.studies.compare``'s module docstring).
Without a comparison the page shows the curves only.
"""

from __future__ import annotations

import math

import streamlit as st

from app import calibration, moe_section, render_history, render_theory, render_tree_theory, saved, state, widgets
from lab.config import K_MAX
from lab.store import StoreError
from lab.theory import best_k, expected_speedup, expected_tokens_per_step

RESULT_KEY = "compare:comparison"  # written by the Compare page
UPLOAD_KEY = "theory:upload"
LOAD_ERROR_KEY = "theory:load_error"
NO_RUN = "—"
METRIC_WIDTH_PX = 180  # four fit in a row at 1280 px, two at 900 px
V_MIN, V_MAX = 1.0, 3.0  # a pass over K+1 tokens does at least one step's work; a bare v below 1 is timing noise

DEFAULTS = {"theory.k": 4, "theory.c": 0.1, "theory.v": 1.0, "theory.a": 0.7, "theory.run": NO_RUN,
            "theory.own_curves": True, "theory.decay": 0.5, "theory.v_slope": 0.03, "theory.moe": False,
            "theory.moe_c": 0.0}

key = state.widget_key
PERCENT = st.column_config.NumberColumn(format="percent")
POINT_COLUMNS = {
    "a (fitted)": st.column_config.NumberColumn(format="%.2f"),
    "acceptance rate (vLLM)": PERCENT,
    "mean acceptance length": st.column_config.NumberColumn(format="%.2f"),
    "c (measured)": st.column_config.NumberColumn(format="%.3f"),
    "draft rate r": st.column_config.NumberColumn(format="percent", help="Share of steps at which the drafter "
                                                                         "proposed anything (below 100 % when a step "
                                                                         "drafts nothing; see above)."),
    "v(K), bare": st.column_config.NumberColumn(format="%.2f", help="A bare forward pass over K+1 tokens, in plain "
                                                                    "one-token steps (timed at the start of the run)."),
    "measured": st.column_config.NumberColumn(format="%.2f×", help="Measured decode speedup (prefill excluded)."),
    "predicted (Leviathan)": st.column_config.NumberColumn(format="%.2f×", help="For the run's a, K and c, with "
                                                                                "v = 1 and r = 1."),
    "efficiency": st.column_config.NumberColumn(format="percent", help="Measured over Leviathan's prediction."),
    "predicted with v, r": st.column_config.NumberColumn(format="%.2f×", help="For the run's a, K and c with its "
                                                                              "measured v(K) and r."),
    "efficiency_v": st.column_config.NumberColumn(format="percent", help="Measured over the prediction with v(K) "
                                                                        "and r: the engine's own share (above 100 %: "
                                                                        "timing noise)."),
}
V_HELP = ("What one verify pass over K+1 tokens costs, in plain one-token target steps (at least 1: it does a step's work "
          "and more). Leviathan et al. take v = 1: true where a step is bound by reading the weights (a GPU at batch "
          "1). On a CPU, or at a large batch, the pass can be compute bound and v grow with K; on some CPUs it stays "
          "near 1. The Compare page measures it; a measured value below 1 (timing noise) is set here as 1.")


def use_run(points: dict[str, render_theory.MeasuredPoint]) -> None:
    """Select-box callback: put a measured run's K, c, bare v(K) (1 where not measured) and fitted a on the sliders."""
    s = st.session_state
    point = points.get(s[key("theory.run")])
    if point is not None:
        s[key("theory.k")] = point.k
        s[key("theory.c")] = round(min(point.cost_ratio, 1.5), 2)  # the sliders' steps
        v = 1.0 if math.isnan(point.verify_cost) else point.verify_cost
        s[key("theory.v")] = round(min(max(v, V_MIN), V_MAX), 2)
        s[key("theory.a")] = round(point.acceptance, 2)


# ---------------------------------------------------------------- page

state.set_defaults(st.session_state, DEFAULTS)
st.title("Theory: what speculation can gain")
st.markdown(
    "Leviathan et al. (2023) model each drafted token as accepted independently with probability **a**. With **K** "
    "drafted tokens per step, a draft costing **c** target steps per drafted token, and one verify pass over K+1 "
    "tokens costing **v** target steps (their model takes v = 1):"
)
# stacked, not side by side: in half the width the formulas were clipped at 900 px
st.latex(r"\text{tokens per target step} = \frac{1 - a^{K+1}}{1 - a}")
st.latex(r"\text{walltime speedup} = \frac{1 - a^{K+1}}{(1 - a)(Kc + v)}")

comparison = st.session_state.get(RESULT_KEY)
summary = comparison.summary() if comparison is not None else None
points = render_theory.measured_points(summary) if summary is not None else []
by_label = {point.label: point for point in points}

with st.container(border=True):
    k_col, a_col = st.columns(2)  # two rows of two: four in a row cut and misaligned their labels
    c_col, v_col = st.columns(2)
    k = k_col.slider("K (draft tokens per step)", 1, K_MAX, key=key("theory.k"))
    c = c_col.slider("c (draft cost per token)", 0.0, 1.5, step=0.01, key=key("theory.c"),
                     help="In target steps. 0: a free drafter (prompt lookup is close). A draft model a tenth of the target's size "
                          "costs roughly 0.1-0.4 on a memory-bound machine.")
    v = v_col.slider("v (verify cost)", V_MIN, V_MAX, step=0.05, key=key("theory.v"), help=V_HELP)
    a = a_col.slider("a (Leviathan's per-token acceptance)", 0.0, 1.0, step=0.01, key=key("theory.a"),
                     help="Leviathan's a: the chance each drafted token is accepted, independently. Not the lab's "
                          "acceptance rate (accepted / drafted, on Live and Compare). A measured run converts through "
                          "its mean acceptance length L = 1 + accepted / drafts: a is the value with "
                          "(1 − a^(K+1)) / (1 − a) = L. For the readouts below; the curves span every a.")
    if points:
        if st.session_state[key("theory.run")] not in [NO_RUN, *by_label]:
            st.session_state[key("theory.run")] = NO_RUN
        st.selectbox("Set K, c, v and a from a measured run", [NO_RUN, *by_label], key=key("theory.run"),
                     on_change=use_run, args=(by_label,),
                     help="v becomes the run's bare v(K) where the comparison measured it, else 1.")
        if (chosen := by_label.get(st.session_state[key("theory.run")])) is not None:
            st.caption(f"{chosen.label}: acceptance rate {chosen.acceptance_rate:.0%} (accepted / drafted), mean "
                       f"acceptance length {chosen.mean_acceptance_length:.2f} (1 + accepted / drafts), so "
                       f"Leviathan's a = {chosen.acceptance:.2f}: the a with (1 − a^(K+1)) / (1 − a) = "
                       f"{chosen.mean_acceptance_length:.2f} at K = {chosen.k}.")

even = render_theory.break_even_acceptance(k, c, v)
# After "Put this K, c, v(K) and a on the sliders": each K with its own measured v(K), as the calibration chose,
# while the v slider still shows the calibration's v at the slider's K (moving it returns to one v for every K).
measured_v = st.session_state.get(calibration.MEASURED_V_KEY)
if measured_v and not (k in measured_v and math.isclose(v, min(max(round(measured_v[k], 2), V_MIN), V_MAX))):
    measured_v = None
best, best_speedup = best_k(a, c, K_MAX, verify_cost=v, verify_costs=measured_v)
at_v = "" if v == 1 else f", v={v:.2f}"
with st.container(horizontal=True, gap="small"):  # fixed-width cards wrap instead of truncating
    cards = [st.container(width=METRIC_WIDTH_PX) for _ in range(4)]
cards[0].metric("Tokens per target step", f"{expected_tokens_per_step(a, k):.2f}", help="At the a, K of the sliders.")
cards[1].metric("Expected speedup", f"{expected_speedup(a, k, c, v):.2f}×", help="At the a, K, c and v of the sliders.")
cards[2].metric("Break-even a", "never" if even is None else f"{even:.2f}",
                help="Below this acceptance rate speculation is slower than the target alone (for K = 1 it is "
                     "a = c + v − 1, so a = c at v = 1).")
best_help = (f"For a={a:.2f}, c={c:.2f}{at_v}: the K in 1..{K_MAX} with the highest expected speedup, taking the same "
             "v for every K (a measured v can grow with K, so this flatters large K when v > 1).")
if measured_v:
    best_help = (f"For a={a:.2f}, c={c:.2f}: among the K this machine's calibration measured "
                 f"({', '.join(map(str, sorted(measured_v)))}), each with its own measured v(K), the one with the "
                 "highest expected speedup: the calibration's own choice.")
if best_speedup < 1:  # even the best K loses: a K here would read as a recommendation
    cards[3].metric("Best K", "none", help=best_help)
    cards[3].caption(f"none: speculation is predicted to lose (best K={best} gives {best_speedup:.2f}×)")
else:
    cards[3].metric("Best K", f"{best} ({best_speedup:.2f}×)", help=best_help)

left, right = st.columns(2)
left.plotly_chart(render_theory.tokens_per_step_figure(k, a), width="stretch")
own_curves = bool(st.session_state[key("theory.own_curves")]) and bool(points)
right.plotly_chart(render_theory.speedup_theory_figure(k, c, points, a, own_curves=own_curves, verify_cost=v),
                   width="stretch")
st.caption(
    "The shaded band is where speculation is slower than the target alone: a draft that costs c per token must be "
    "accepted often enough to repay K·c, and a verify pass that costs v steps must be repaid too. For K = 1 the line "
    "is exactly a = c + v − 1 (a = c in Leviathan's v = 1); for larger K the break-even a is higher, because every "
    "drafted token costs c but later ones are accepted less often. Tokens per step (left) do not depend on c or v."
)

st.subheader("Measured runs on the curve")
if comparison is None:
    st.info("No comparison yet: run one on the Compare page (or load a results file below) to place measured runs "
            "on these curves.", icon=":material/info:")
    kept = saved.store()
    latest = kept.list_runs("compare", limit=1, top_level=True) if kept is not None else []
    if latest and st.button(f"Place the latest kept comparison (#{latest[0].id}, {render_history.when(latest[0].created_at)}, "
                            f"{render_history.models(latest[0])})", icon=":material/history:"):
        try:
            saved.reopen(kept.get_run(latest[0].id), kept)  # into the session key this page reads
        except (ValueError, StoreError) as error:
            st.error(f"That comparison cannot be placed: {error}", icon=":material/error:")
        else:
            st.rerun()
elif not points:
    st.info("The last comparison has no drafter run with drafted tokens and a measured cost: nothing to place.")
else:
    source = comparison.settings.get("loaded_from") or "the last comparison"
    has_v = any(not math.isnan(p.predicted_v) for p in points)
    st.markdown(
        f"From {source} (target `{comparison.settings.get('target')}`): a **filled** marker is the measured decode "
        "speedup, the **hollow** one is what Leviathan's formula predicts for that run's own K and c"
        + (", and the **dash** what it predicts with the run's measured v(K) and draft rate r." if has_v else ".")
    )
    st.markdown(
        "**efficiency** = measured / Leviathan's prediction. His model takes a verify pass over K+1 tokens to cost "
        "one plain step (v = 1) and the drafter to propose at every step (r = 1). v(K) is measured; Leviathan "
        "assumes 1; on a CPU it can be above 1, and near 1 a single short run is within timing noise. r is below 1 whenever a step drafts nothing, for any drafter: prompt lookup finds no match, the last "
        "step of the token budget has no room for a draft, or a grammar ends one. So this gap mixes the hardware's "
        "verify cost, the steps without a draft and our engine's overhead; it is not the engine's alone.\n\n"
        "**efficiency_v** = measured / the prediction with the bare v(K), timed at the start of the comparison "
        "(a forward pass over K+1 tokens alone, no bookkeeping), and the measured r. What is left is the engine's own "
        "overhead (sampling, acceptance, cache bookkeeping, Python) and timing noise: 100 % is a perfect engine, "
        "and values above 100 % are timing noise."
    )
    if not has_v:
        st.caption("This comparison did not measure v(K) (a results file written before the lab timed bare verify "
                   "passes): v(K), the prediction with v and r, and efficiency_v read n/a. Run it again on the "
                   "Compare page to get them.")
    st.toggle("Draw each run's own Leviathan curve (dotted)", key=key("theory.own_curves"))
    st.caption(
        "Each run's a is fitted from its measured mean acceptance length (the a for which (1 − a^(K+1))/(1 − a) "
        "equals it). The acceptance rate shown elsewhere in the lab (accepted / drafted, as vLLM reports it) is a "
        "different quantity from Leviathan's per-token α: it also counts drafted tokens after the first rejection, "
        "which were never checked. c is the measured draft time per drafted token over the target alone's time per "
        "step. The speedups here are decode speedups (prefill excluded), as the formula models them; the Compare "
        "table's speedup is end to end, so it reads a little lower."
    )
    st.dataframe(render_theory.points_table(points), hide_index=True, width="stretch", column_config=POINT_COLUMNS)
    slower = [p.label for p in points if p.acceptance < p.cost_ratio]
    if slower:
        st.warning("a < c for " + ", ".join(slower) + ": even a perfect engine, with a verify pass as cheap as one "
                   "step (v = 1), would be slower than the target alone.")
    if comparison.settings.get("status") not in (None, "complete"):
        st.caption(f"This comparison is partial ({comparison.settings.get('status')}).")

st.subheader("Chain or tree?")
st.markdown(
    "A **token tree** spends the verify pass's width on several guesses per position instead of one long bet "
    "(`--tree-budget N`). Model (Sequoia's positional acceptance): the draft's i-th choice at a node is accepted "
    "with probability a·s^(i−1) once the elder ones were refused; the best tree of N nodes is grown one most "
    "probable node at a time (`lab.tree_theory`). It always expects more tokens per step than a chain of N; whether "
    "that pays depends on v(N): flat on a GPU at batch 1, rising on a CPU once the pass is compute bound.")
decay_col, slope_col = st.columns(2)
decay_col.slider("Sibling decay s (how good second guesses are)", 0.0, 1.0, step=0.05, key=key("theory.decay"))
slope_col.slider("v(N) slope: extra steps per verified token", 0.0, 0.2, step=0.005, key=key("theory.v_slope"),
                 format="%.3f", help="v(N) = 1 + slope·N. About 0 on a GPU at batch 1; this lab's CPU measurement "
                 "(docs/, token trees) is near 0.01 per token at first, steeper past 16 tokens.")
st.plotly_chart(render_tree_theory.chain_tree_figure(a, c, float(st.session_state[key("theory.decay")]),
                                                     render_tree_theory.linear_verify_cost(
                                                         float(st.session_state[key("theory.v_slope")]))),
                width="stretch")
st.caption("At the a and c of the sliders above; the draft pays c once per depth of the tree (one pass per "
           "level). `python -m lab calibrate` times v(N) out to N = 64 and names the budget the model picks.")

calibration.section()
moe_section.section()

widgets.results_file_section("A JSON file saved on the Compare page", UPLOAD_KEY, LOAD_ERROR_KEY, RESULT_KEY,
                             widgets.parse_comparison, title="Load a Compare results file (JSON)")
st.caption("Leviathan, Kalman, Matias, \"Fast Inference from Transformers via Speculative Decoding\", ICML 2023 "
           "(Eq. 1 and Theorem 3.8); the verify cost v is the lab's addition (`lab.theory.expected_speedup`).")
