"""The Theory page's "This machine" section: calibrate a pair here (``lab.studies.calibrate``), show what was measured and why.

The measurement and the choice live in ``lab.studies.calibrate``; this module only picks
the pair, runs it with a progress bar, draws v(K) and the predicted time per
token per precision, and can put the measured c, v(K), K and the prior a on the
Theory sliders.
"""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app import background, saved, state
from lab import device_queue
from lab.studies.calibrate import Calibration, cached_calibration, calibrate
from lab.models import PRESETS, ModelError

key = state.widget_key
SLIDER_V_MAX = 3.0
MEASURED_V_KEY = "theory:measured_v"  # {K: v(K)} of the calibration last put on the sliders


def pairs() -> dict[str, tuple[str, str | None]]:
    """Label -> (target preset, draft preset or None for prompt lookup): each preset with prompt lookup, and
    each preset with every smaller preset of its tokenizer family as its draft model."""
    out: dict[str, tuple[str, str | None]] = {}
    by_size = sorted(PRESETS.values(), key=lambda p: -p.size_bytes)
    for target in by_size:
        for draft in by_size:
            if draft.size_bytes < target.size_bytes and draft.tokenizer_family == target.tokenizer_family:
                out[f"{target.name} with draft {draft.name}"] = (target.name, draft.name)
        out[f"{target.name} with prompt lookup"] = (target.name, None)
    return out


def cost_figure(calibration: Calibration) -> go.Figure:
    """Predicted ms per generated token by K, one line per precision, the target alone as flat dotted lines."""
    figure = go.Figure()
    for t in calibration.timings:
        ks = sorted(t.verify_ms)
        figure.add_scatter(x=ks, y=[t.ms_per_token(k, calibration.acceptance) for k in ks], mode="lines+markers",
                           name=f"{t.precision}, speculation")
        figure.add_scatter(x=[ks[0], ks[-1]], y=[t.target_step_ms] * 2, mode="lines", line={"dash": "dot"},
                           name=f"{t.precision}, target alone")
    figure.add_scatter(x=[calibration.k], y=[calibration.predicted_ms_per_token], mode="markers",
                       marker={"size": 14, "symbol": "star"}, name="choice")
    figure.update_layout(title=f"Predicted time per token at a = {calibration.acceptance:.2f}",
                         xaxis_title="K", yaxis_title="ms per token", height=360, margin={"t": 50, "b": 40})
    return figure


def verify_figure(calibration: Calibration) -> go.Figure:
    """Measured v(K): a verify pass over K+1 tokens in one-token steps, per precision."""
    figure = go.Figure()
    for t in calibration.timings:
        ks = sorted(t.verify_ms)
        figure.add_scatter(x=ks, y=[t.v(k) for k in ks], mode="lines+markers", name=t.precision)
    figure.add_hline(y=1.0, line_dash="dot", annotation_text="v = 1 (Leviathan)")
    figure.update_layout(title="Measured verify cost v(K)", xaxis_title="K", yaxis_title="one-token steps",
                         height=360, margin={"t": 50, "b": 40})
    return figure


def use_on_sliders(calibration: Calibration) -> None:
    """Button callback: the choice's K, its c and v(K), and the assumed a, onto the Theory sliders."""
    s = st.session_state
    t = calibration.by_precision(calibration.precision)
    s[key("theory.k")] = calibration.k
    s[key("theory.c")] = round(min(t.c, 1.5), 2)
    s[key("theory.v")] = round(min(max(t.v(calibration.k), 1.0), SLIDER_V_MAX), 2)
    s[key("theory.a")] = round(calibration.acceptance, 2)
    s[key("theory.run")] = "—"
    # The Best K card then weighs each K with its own measured v(K), as the calibration did.
    s[MEASURED_V_KEY] = {k: t.v(k) for k in t.verify_ms}


def section() -> None:
    """Render the section (see the module docstring)."""
    st.subheader("This machine: which precision and K pay here")
    st.markdown(
        "Whether bf16 beats fp32, and which K pays, depends on the hardware: where a CPU computes bf16 natively a "
        "bf16 pass over K+1 tokens costs about one one-token pass, where bf16 is emulated it costs several. "
        "**Calibrate** times one-token steps and verify passes over K+1 tokens of the pair in each precision "
        "(about 20 s for SmolLM2, a few minutes for the Qwen pair; cached per machine) and picks the precision "
        "and K with the least predicted time per token. The sidebar's **auto** precision and `--k auto` on the "
        "command line follow it."
    )
    options = pairs()
    state.set_defaults(st.session_state, {"theory.pair": next(iter(options)), "theory.prior_a": 0.0})
    pair_col, a_col = st.columns([2, 1])
    label = pair_col.selectbox("Pair", list(options), key=key("theory.pair"))
    acceptance = a_col.number_input("Assumed acceptance a (0: the drafter's prior)", 0.0, 0.99, step=0.05,
                                    key=key("theory.prior_a"),
                                    help="The per-token acceptance rate the choice assumes. 0 takes the prior: 0.8 "
                                         "for a draft model, 0.4 for prompt lookup. A Compare run measures yours.")
    target, draft = options[label]
    device = state.runtime(st.session_state).device
    a = acceptance or None
    calibration = cached_calibration(target, draft, device=device)
    button = "Measure again" if calibration is not None else "Calibrate"
    if st.button(button, key="theory:calibrate", icon=":material/speed:"):
        bar = st.progress(0.0, text="Starting the calibration…")
        try:
            # one timed run per device: in line behind any other run of the lab (calibrate's own hold nests)
            waiting = lambda ticket: bar.progress(0.0, text=f"Waiting for the {ticket.device} device: "  # noqa: E731
                                                            f"{ticket.describe().removeprefix('waiting: ')}")
            with device_queue.hold(device, background.session_holder("Theory calibration"), on_wait=waiting):
                calibration = calibrate(target, draft, device=device, acceptance=a, refresh=True,
                                        progress=lambda fraction, message: bar.progress(min(fraction, 1.0), text=message))
        except (ModelError, ValueError, RuntimeError) as error:
            bar.empty()
            st.error(f"Calibration failed: {error}")
            return
        bar.empty()
        saved.keep_calibration(calibration)
    if calibration is None:
        st.info("Not calibrated on this machine yet: press **Calibrate**.", icon=":material/info:")
        return
    calibration = calibrate(target, draft, device=device, acceptance=a)  # cached: read and re-scored, not re-timed
    st.markdown(calibration.explain())
    st.caption(f"Measured {calibration.measured_at} in {calibration.wall_s:.0f} s, medians of "
               f"{calibration.repeats} passes per width.")
    left, right = st.columns(2)
    left.plotly_chart(verify_figure(calibration), width="stretch")
    right.plotly_chart(cost_figure(calibration), width="stretch")
    st.button("Put this K, c, v(K) and a on the sliders above", key="theory:use_calibration",
              on_click=use_on_sliders, args=(calibration,))


def set_k(widget: str, k: int) -> None:
    st.session_state[key(widget)] = k


def k_hint(page: str, target: str | None, drafter_name: str, draft: str | None) -> None:
    """Under a page's K slider: the K this machine's calibration of the pair predicts fastest, with a button to use it.

    Nothing (no timing) when the pair was not calibrated here; then it points to the Theory page.
    """
    if drafter_name not in ("draft-model", "prompt-lookup") or not target or target not in PRESETS:
        return
    draft = draft if drafter_name == "draft-model" else None
    if drafter_name == "draft-model" and draft not in PRESETS:
        return
    try:
        device = state.runtime(st.session_state).device
    except (ValueError, ModelError):
        return
    calibration = cached_calibration(target, draft, drafter_name, device)
    if calibration is None:
        st.caption("Which K and precision pay on this machine: **Calibrate** the pair on the Theory page.")
        return
    with st.container(horizontal=True, gap="small"):
        st.caption(f"This machine's calibration: **{calibration.precision}, K = {calibration.k}** predicted fastest "
                   f"({calibration.predicted_speedup:.2f}x at acceptance {calibration.acceptance:.0%}; Theory page).")
        if st.session_state.get(key(f"{page}.k")) != calibration.k:
            st.button(f"Use K = {calibration.k}", key=f"{page}:use_calibrated_k", on_click=set_k,
                      args=(f"{page}.k", calibration.k))
