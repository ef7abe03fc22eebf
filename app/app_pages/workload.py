"""The Workload page: map your traffic before you ship, and get the speculation setting that fits it.

The page reads its widgets, builds the traffic, the acceptance and the step
costs (``lab.simulate``), runs ``map_workload`` with a progress bar and a
sensitivity sweep, and renders through ``app.render_workload``. Nothing here
models anything itself.
"""

from __future__ import annotations

import io
import json

import streamlit as st

from app import render_workload, saved, state
from lab.models import PRESETS
from lab.simulate import (
    AcceptanceProfile,
    CategoryAcceptance,
    StepCosts,
    Traffic,
    acceptance_from_data,
    costs_from_dict,
    costs_from_serve_bench,
    map_workload,
    sensitivity,
    trace_traffic,
)

RESULT_KEY = "workload:result"
key = state.widget_key
TRAFFIC = ("Closed loop (concurrent clients)", "Poisson arrivals (requests/s)", "Request log (CSV or JSONL)")
ACCEPTANCE = ("Sliders", "A Compare, serve-bench or Batch result file")
COSTS = ("This machine (timed once, cached)", "A serve-bench profile or GPU profile / costs file",
         "Illustrative example (a CPU-like 2-core machine)")
DEFAULTS = {"workload.traffic": TRAFFIC[0], "workload.loads": "1,2,4,8,16", "workload.output_tokens": 64,
            "workload.prompt_tokens": 128, "workload.requests": 200, "workload.batching": "continuous",
            "workload.acceptance": ACCEPTANCE[0], "workload.a": 0.6, "workload.draft_rate": 1.0,
            "workload.costs": COSTS[2], "workload.k_max": 8, "workload.target": "smollm2-135m",
            "workload.drafter": "prompt-lookup", "workload.trace_rates": ""}
EXAMPLE_COSTS = StepCosts({(1, 1): 40.0, (1, 5): 48.0, (1, 9): 60.0, (4, 1): 55.0, (4, 5): 110.0, (4, 9): 180.0,
                           (16, 1): 110.0, (16, 5): 380.0, (16, 9): 680.0}, {1: 0.3, 16: 0.8},
                          prefill_ms_per_token=0.4, source="illustrative example")


def traffic_form() -> tuple[Traffic | None, list[float]]:
    st.radio("Traffic", TRAFFIC, key=key("workload.traffic"), horizontal=True)
    kind = st.session_state[key("workload.traffic")]
    columns = st.columns(4)
    if kind == TRAFFIC[2]:
        upload = st.file_uploader("Request log", type=["csv", "jsonl"], key="workload:log",
                                  help="arrival_s, prompt_tokens, output_tokens, category (optional) per request")
        columns[0].text_input("Rates to rescale it to (requests/s, empty: as logged)", key=key("workload.trace_rates"),
                              help="its own field: the closed loop's concurrencies are not rates")
        if upload is None:
            st.info("Upload a request log to simulate it.")
            return None, []
        traffic = trace_traffic(io.StringIO(upload.getvalue().decode()), upload.name)
        text = st.session_state[key("workload.trace_rates")].strip()
        return traffic, _numbers(text) if text else [traffic.load]
    columns[0].text_input("Loads (comma-separated)", key=key("workload.loads"),
                          help="concurrent clients, or requests/s for Poisson arrivals")
    columns[1].number_input("Output tokens", 1, 4096, key=key("workload.output_tokens"))
    columns[2].number_input("Prompt tokens", 1, 32768, key=key("workload.prompt_tokens"))
    columns[3].number_input("Requests per load", 20, 10_000, key=key("workload.requests"))
    loads = _numbers(st.session_state[key("workload.loads")])
    s = st.session_state
    common = {"num_requests": s[key("workload.requests")], "prompt_tokens": s[key("workload.prompt_tokens")],
              "output_tokens": s[key("workload.output_tokens")]}
    if kind == TRAFFIC[0]:
        if any(x != int(x) for x in loads):
            raise ValueError(f"a closed loop's loads are whole numbers of clients, e.g. 1,2,4; got "
                             f"{s[key('workload.loads')]!r} (for a rate in requests/s, choose Poisson arrivals)")
        return Traffic("closed", concurrency=int(loads[0]), **common), [int(x) for x in loads]
    return Traffic("poisson", rate_per_s=loads[0], **common), loads


def acceptance_source() -> AcceptanceProfile | None:
    st.radio("Acceptance", ACCEPTANCE, key=key("workload.acceptance"), horizontal=True)
    if st.session_state[key("workload.acceptance")] == ACCEPTANCE[0]:
        left, right = st.columns(2)
        left.slider("Per-token acceptance a (Leviathan)", 0.0, 0.99, key=key("workload.a"))
        right.slider("Draft rate (steps with a draft)", 0.0, 1.0, key=key("workload.draft_rate"),
                     help="prompt lookup finds no match at some steps; model drafters always draft")
        return AcceptanceProfile.uniform(st.session_state[key("workload.a")], st.session_state[key("workload.draft_rate")])
    upload = st.file_uploader("Result file (JSON)", type=["json"], key="workload:acceptance_file")
    if upload is None:
        st.info("Upload a Compare, serve-bench or Batch sweep result (JSON) to read its per-position acceptance.")
        return None
    profile = acceptance_from_data(_json(upload), upload.name)
    st.caption(f"{profile.source}: " + "; ".join(
        f"{c}: per-position {', '.join(f'{r:.2f}' for r in a.per_position[:6])}, draft rate {a.draft_rate:.2f}"
        for c, a in profile.categories.items()))
    return profile


def cost_source(loads: list[float], closed: bool) -> StepCosts | None:
    st.radio("Step costs", COSTS, key=key("workload.costs"), horizontal=True)
    choice = st.session_state[key("workload.costs")]
    if choice == COSTS[2]:
        return EXAMPLE_COSTS
    if choice == COSTS[1]:
        upload = st.file_uploader("Costs file (JSON)", type=["json"], key="workload:costs_file",
                                  help="a serve-bench result with llama.cpp's timings, scripts/device_costs.py's "
                                  "output (scripts/gpu_check.sh), a Batch sweep, or the simulator's costs JSON")
        if upload is None:
            st.info("Upload a costs file.")
            return None
        data = _json(upload)
        return costs_from_serve_bench(data) if "engines" in data else costs_from_dict(data, upload.name)
    from lab.simulate.measure import cached_costs, machine_costs, timing_warning

    left, right = st.columns(2)
    left.selectbox("Target", list(PRESETS), key=key("workload.target"))
    right.selectbox("Drafter", ("prompt-lookup", "layer-skip"), key=key("workload.drafter"))
    target, drafter = st.session_state[key("workload.target")], st.session_state[key("workload.drafter")]
    costs = cached_costs(target, drafter)
    warning = timing_warning(target, drafter) if costs is not None else None
    retime = False
    offer = st.empty()  # the offer goes once its button is pressed (it stayed above the finished timing)
    if warning:  # costs timed beside other work are slow by it, and stay cached until re-timed
        with offer.container():
            st.warning(f"{warning} These step costs are kept until you time the machine again, when it is quiet.")
            retime = st.button("Time this machine again")
    if costs is None or retime:
        if costs is None:
            with offer.container():
                st.info("No timing of this pair here yet: time it once (a few minutes on a CPU; kept for next time).")
                if not st.button("Time this machine"):
                    return None
        offer.empty()
        top = int(max(loads)) if closed else 16
        bar = st.progress(0.0, "timing")
        costs = machine_costs(target, drafter, batch_sizes=sorted({1, 2, 4, 8, top} & set(range(1, top + 1)) | {top}),
                              k_max=st.session_state[key("workload.k_max")], refresh=retime,
                              progress=lambda f, m: bar.progress(min(1.0, f), m))
        warning = timing_warning(target, drafter)
        if warning:
            st.warning(warning)
    by_context = ""
    if costs.by_context is not None:
        lengths = sorted({n for row in costs.by_context.target_pass_ms.values() for n in row})
        by_context = f"; context charged from passes and prefills timed at {lengths[0]}-{lengths[-1]} tokens a row"
    st.caption(f"Costs: {costs.source}, batch sizes {costs.batch_sizes}{by_context}.")
    return costs


def show(data: dict, flip: str | None) -> None:
    if data.get("loaded_from"):
        st.info(f"Loaded from **{data['loaded_from']}**.")
    st.subheader("Decision")
    st.success(data["decision"])
    for caveat in data.get("caveats", []):
        st.warning(caveat)
    if flip:
        st.markdown(f"**What would flip it:** {flip}")
    # stacked, not side by side: at 900 px half the width left the legends a column that squeezed the plots
    st.plotly_chart(render_workload.latency_figure(data, "p50"), key="workload:p50")
    st.plotly_chart(render_workload.latency_figure(data, "p99"), key="workload:p99")
    st.plotly_chart(render_workload.throughput_figure(data), key="workload:throughput")
    st.dataframe(render_workload.level_rows(data), hide_index=True, column_config={
        name: st.column_config.NumberColumn(**spec) for name, spec in render_workload.table_columns(data).items()}
        | {"best policy": st.column_config.TextColumn(width="large")})  # a trial saw "K by batch 1:4, ..." cut
    st.subheader("Configuration")
    st.caption(data["configs"].get("note") or f"Realises: {data['recommended']}.")
    for engine in ("vllm", "sglang", "llama.cpp"):
        st.markdown(f"**{engine}**")
        st.code(data["configs"][engine], language="bash", wrap_lines=True)  # vLLM's JSON ran off the edge
    st.download_button("Download the map (JSON)", json.dumps(data, indent=1), "workload.json", "application/json")


def page() -> None:
    st.title("Workload: map your traffic before you ship")
    st.markdown("Your traffic, your acceptance and your step costs in, every speculation policy simulated at every "
                "load (off, static K, K by batch size, goodput per step, per-request gating): which to ship, and "
                "what happens to p99.")
    state.set_defaults(st.session_state, DEFAULTS)
    traffic, loads = _shown(traffic_form, (None, []))  # a bad field is named where it is; the rest stays on screen
    acceptance = _shown(acceptance_source, None)
    costs = _shown(lambda: cost_source(loads or [1], traffic is None or traffic.kind == "closed"), None)
    left, right = st.columns(2)
    left.radio("Batching", ("continuous", "static"), key=key("workload.batching"), horizontal=True,
               help="continuous: requests join at step boundaries (vLLM, SGLang, llama.cpp); static: whole batches "
               "(the Batch page)")
    right.number_input("Largest K", 1, 16, key=key("workload.k_max"))
    ready = traffic is not None and acceptance is not None and costs is not None
    if st.button("Simulate", type="primary", disabled=not ready):
        if len(acceptance.categories) == 1 and traffic.kind != "trace":
            traffic = Traffic(traffic.kind, traffic.rate_per_s, traffic.concurrency, traffic.num_requests,
                              traffic.prompt_tokens, traffic.output_tokens, 0.0, {next(iter(acceptance.categories)): 1})
        elif st.session_state[key("workload.acceptance")] == ACCEPTANCE[0] and traffic.kind == "trace":
            acceptance = acceptance.for_every(traffic.categories)  # the sliders: one acceptance for every request
        bar = st.progress(0.0, "simulating")
        s = st.session_state
        try:
            result = map_workload(traffic, loads, acceptance, costs, batching=s[key("workload.batching")],
                                  k_max=s[key("workload.k_max")], drafter=acceptance.drafter or "prompt-lookup",
                                  progress=lambda f, m: bar.progress(min(1.0, 0.8 * f), m))
            bar.progress(0.85, "sensitivity: acceptance and load")
            middle = sorted(loads)[len(loads) // 2]
            flip = sensitivity(traffic, middle, acceptance, costs, s[key("workload.batching")],
                               min(s[key("workload.k_max")], 8))["flip"]
        except ValueError as error:
            bar.empty()
            st.error(str(error))
            return
        bar.progress(1.0, "done")
        st.session_state[RESULT_KEY] = (result.as_dict(), flip)
        form = {name: s[key(name)] for name in DEFAULTS if key(name) in s}
        saved.keep_workload(result.as_dict(), flip, form | {"loads_simulated": loads,
                                                            "costs_source": costs.source})
    if RESULT_KEY in st.session_state:
        if not ready:  # a trial saw the last map under an error, as if it answered the form now shown
            st.caption("The map below is from the last Simulate, not from the form as it stands now.")
        show(*st.session_state[RESULT_KEY])


def _numbers(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"loads require comma-separated numbers, e.g. 1,4,16; got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"loads require values > 0; got {text!r}")
    return values



def _shown(part, fallback):
    """The form part's value, or ``fallback`` after showing its ValueError where the part is."""
    try:
        return part()
    except ValueError as error:
        st.error(str(error))
        return fallback


def _json(upload):
    """An uploaded file's JSON, or ValueError naming the file (json's own message gave neither file nor cure)."""
    try:
        return json.loads(upload.getvalue())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{upload.name} is not readable JSON ({error}): upload the file the lab or serve-bench "
                         "wrote") from None


page()
