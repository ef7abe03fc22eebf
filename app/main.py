"""Speculative Decoding Lab: ``streamlit run app/main.py``.

A thin entry point: page config, the shared sidebar (device, dtype, models),
and ``st.navigation`` over the pages in ``app/app_pages/``. Add a page with
one line in ``PAGES``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts only app/ on the path
    sys.path.insert(0, str(ROOT))

import lab  # noqa: E402, F401  (first: it sets OpenMP's wait policy before torch loads)
import streamlit as st  # noqa: E402
import torch  # noqa: E402

from app import resources, state  # noqa: E402
from lab.models import PRESETS, ModelError, is_prepared  # noqa: E402
from app.precision import format_bytes  # noqa: E402

PAGES = [
    st.Page("app_pages/live.py", title="Live", icon=":material/bolt:", default=True),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/leaderboard:"),
    st.Page("app_pages/theory.py", title="Theory", icon=":material/functions:"),
    st.Page("app_pages/step.py", title="Step-through", icon=":material/footprint:"),
    st.Page("app_pages/batch.py", title="Batch", icon=":material/stacked_line_chart:"),
    st.Page("app_pages/serve.py", title="Serve", icon=":material/dns:"),
    st.Page("app_pages/workload.py", title="Workload", icon=":material/query_stats:"),
    st.Page("app_pages/history.py", title="History", icon=":material/history:"),
]

DEVICE_CHOICES = ("auto", "cpu", "cuda") if torch.cuda.is_available() else ("auto", "cpu")
PRECISION_CHOICES = ("auto", "bf16", "fp32", "fp16", "int8", "nf4", "fp4")
PRECISION_HELP = (
    "auto = measured on this machine: a bf16 and an fp32 matrix product of a decode pass's shape are timed once, "
    "and the faster wins (bf16 where the CPU computes it natively, fp32 where it is emulated); the Theory page "
    "calibrates a whole pair. bf16's rounding differs between a pass over K+1 tokens and a pass over one, so a "
    "near-tie can flip a greedy token; fp32 keeps greedy output identical to the target alone. "
    "int8 (bitsandbytes LLM.int8), nf4 and fp4 (4-bit) quantise the weights: less memory, and on the target a "
    "different model, so a different reference output. Layer skip drafts with the target's own layers, in the "
    "target's precision."
)

ENGINE_CHOICES = ("auto", "eager", "static", "compiled")
ENGINE_HELP = (
    "How the model passes run. eager: a KV cache that grows and is cropped on rollback, each pass at its own width "
    "(the CPU default: a CPU step is bound by the weights). static: a fixed-size cache and fixed-width passes (a "
    "short draft is padded); rollback only moves the cache position. compiled: static, with each width captured "
    "once by torch.compile (CUDA graphs on a GPU, the GPU default: there the host, not the weights, sets an eager "
    "step, and a small draft costs as much as the target). The first compiled run compiles (tens of seconds). The "
    "output is the same in every mode. Every page runs the same loop in this mode, the Batch page at every batch size "
    "(static and compiled keep batches in power-of-two buckets, one captured graph per width and bucket)."
)


def auto_precision_reason(device: str) -> str:
    """Why "auto" resolved as it did: the host probe's own timings (``lab.hardware.host_probe``)."""
    from lab.hardware import host_probe

    probe = host_probe(device)
    if not probe["ms"]:
        return f"auto = {probe['precision']} on this GPU."
    ms = {name: by_rows[5] for name, by_rows in probe["ms"].items()}
    return (f"auto = **{probe['precision']}** here: a verify-sized product (5 rows x 1536 x 8960) took "
            f"{ms['bf16']:.1f} ms in bf16 and {ms['fp32']:.1f} ms in fp32 on this machine.")


def sidebar_runtime() -> None:
    """Device, and the precision of the target and of the draft, for every page."""
    with st.sidebar:
        st.subheader("Runtime")
        state.set_defaults(st.session_state, {"device": "auto", "dtype": "auto", "draft_dtype": state.SAME_AS_TARGET,
                                              "engine": "auto"})
        st.selectbox("Device", DEVICE_CHOICES, key=state.widget_key("device"))
        st.selectbox("Target precision", PRECISION_CHOICES, key=state.widget_key("dtype"), help=PRECISION_HELP)
        st.selectbox("Draft precision", (state.SAME_AS_TARGET, *PRECISION_CHOICES), key=state.widget_key("draft_dtype"),
                     help="The draft model's precision (the draft-model drafter only: an EAGLE head runs in fp32 "
                          "with the target's own LM head). A quantised draft costs less memory; its time per token depends "
                          "on the hardware: notebook 06 measured int8 and nf4 drafts costing more on this CPU (c 2.03 "
                          "and 1.52, against 1.26 in bf16). It never changes the output; it may be accepted less often.")
        st.selectbox("Engine", ENGINE_CHOICES, key=state.widget_key("engine"), help=ENGINE_HELP)
        try:
            runtime = state.runtime(st.session_state)
        except (ValueError, ModelError) as error:
            st.error(str(error))
        else:
            draft = "" if runtime.draft_dtype is None else f", draft in **{runtime.draft_precision}**"
            st.caption(f"Running on **{runtime.device}**, target in **{runtime.target_precision}**{draft}, "
                       f"**{runtime.engine}** engine")
            if "auto" in (st.session_state[state.widget_key("dtype")], st.session_state[state.widget_key("draft_dtype")]):
                st.caption(auto_precision_reason(runtime.device))


def sidebar_models(slot, with_button: bool) -> None:
    """What is prepared on disk and loaded in memory.

    Drawn before the page and again after it (with the button, which a run may
    draw only once), so the list includes what the page just loaded.
    """
    with slot.container():
        st.subheader("Models")
        lines = []
        for name in PRESETS:
            disk = "prepared" if is_prepared(name) else "not prepared yet (prepared on first use)"
            lines.append(f"- `{name}`: {disk}")
        st.markdown("\n".join(lines))
        loaded = resources.model_store().loaded()
        if loaded:
            total_bytes = sum(info.weight_bytes for info in loaded)
            st.caption(f"Loaded in memory, {format_bytes(total_bytes)} of weights in all: " + "; ".join(
                f"{info.name} ({info.precision or info.dtype}, {info.device}, {format_bytes(info.weight_bytes)}, "
                f"loaded in {info.load_s:.1f} s)" for info in loaded
            ))
            if with_button and st.button("Free loaded models", help="Drop every model this server holds; they reload on the next run."):
                resources.free_models()
                st.rerun()
        else:
            st.caption("No model loaded yet: the first run loads its models (a few seconds each).")


st.set_page_config(page_title="Speculative Decoding Lab", page_icon=":material/bolt:", layout="wide")
st.html(ROOT / "assets" / "app.css")
state.keep_widget_values(st.session_state)
sidebar_runtime()
models_slot = st.sidebar.empty()
sidebar_models(models_slot, with_button=False)
st.navigation(PAGES).run()
sidebar_models(models_slot, with_button=True)
