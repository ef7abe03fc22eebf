"""Live page: one prompt, one drafter, tokens coloured as the target commits them.

Reads the widgets, builds a ``DecodeConfig``, loads the models (``prepare_live``,
in the script run: its errors show at once), then hands the decodes to a worker
thread (``app.background``) that holds the device in ``lab.device_queue`` and
collects the trace events into the session's job; the page draws the job while
it runs. A slider moved or a page opened mid-run stops only the drawing: the run
finishes, and the page shows it when it is next drawn. With the target alone to
compare against, the arms run interleaved (speculative, target alone, target
alone, speculative) and the speedup pools each arm's pair, so a drift of the
machine's speed hits both. The last run lives in ``st.session_state`` and is
drawn again on every rerun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st
import torch
from streamlit.delta_generator import DeltaGenerator

from app import background, calibration, constrained, precision, render, resources, saved, state, widgets
from lab.config import K_MAX, MAX_NEW_TOKENS_MAX, DecodeConfig
from lab.drafters import DRAFTER_NAMES, check_bridge_sampling, make_drafter
from lab.decode import decode
from lab.models import ModelError, check_same_tokenizer, encode_prompt

RESULT_KEY = "live:result"
JOB_KEY = "live:job"  # an app.background.Job while a run is under way (or done and not yet shown)
NOTICE_KEY = "live:notice"  # why the last run started did not finish (cancelled), shown until the next run
METRIC_WIDTH_PX = 170  # five in one row at 1400 px with the sidebar open; the longest label, "Speedup vs target alone", with its help icon
MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)

EXAMPLE_PROMPT = """Fix the spelling mistakes in this text and return the corrected text only:

Speculative decodng speeds up text generaton without changing its output. A small draft model proposes several tokens, and the large target model checks all of them in a single forward pas."""

DEFAULTS = {
    "live.target": "smollm2-135m",
    "live.target_folder": "",
    "live.drafter": "prompt-lookup",
    "live.draft": "qwen2.5-coder-0.5b",
    "live.draft_folder": "",
    "live.min_n": 1,
    "live.max_n": 3,
    "live.exit_layer": None,
    "live.draft_vocab": 0,
    "live.vocab_bridge": "none",
    "live.k": 4,
    "live.tree_budget": 0,
    "live.max_new_tokens": 64,
    "live.temperature": 0.0,
    "live.top_p": 1.0,
    "live.seed": 0,
    "live.raw": False,
    "live.compare": True,
    "live.prompt": EXAMPLE_PROMPT,
}

key = state.widget_key


@dataclass
class LiveView:
    """Placeholders of the results area, filled while streaming and again from session state on reruns."""

    status: DeltaGenerator
    metrics: DeltaGenerator
    check: DeltaGenerator
    speculative: DeltaGenerator
    baseline: DeltaGenerator
    details: DeltaGenerator

    @classmethod
    def create(cls, side_by_side: bool) -> "LiveView":
        status, metrics, check = st.empty(), st.empty(), st.empty()
        left, right = st.columns(2) if side_by_side else (st.container(), st.container())
        with left:
            speculative = st.empty()
        with right:
            baseline = st.empty()
        return cls(status, metrics, check, speculative, baseline, st.empty())


def show_tokens(slot, record: state.RunRecord, streaming: bool = False) -> None:
    with slot.container():
        stats = record.stats
        st.markdown(f"**{record.label}** · {stats.num_output_tokens} tokens in {stats.target_forward_passes} target passes"
                    + (f" · {render.format_number(stats.tokens_per_s, 1)} tokens/s" if not streaming else " · streaming…"))
        st.html(render.tokens_html(record.pieces, streaming=streaming))


def show_metrics(slot, result: state.LiveResult) -> None:
    stats = result.speculative.stats
    # a wrapping row of fixed-width cards, not st.columns(5): at 900 px with the sidebar open five columns cut
    # values ("2.…") and labels ("Accept…"); here the cards move to a second line instead
    with slot.container():
        with st.container(horizontal=True, gap="small"):
            cards = [st.container(width=METRIC_WIDTH_PX) for _ in range(5)]
            cards[0].metric("Acceptance rate", render.format_rate(stats.acceptance_rate),
                            help=render.ACCEPTANCE_RATE_HELP)
            cards[1].metric("Mean acceptance length", render.format_number(stats.mean_acceptance_length),
                            help=render.MEAN_LENGTH_HELP)
            if result.baseline is not None:  # the speedup's own figure: a trial saw 11.9 beside 1.02x of 12.7
                cards[2].metric("Tokens/s", render.format_number(result.speculative_tokens_per_s, 1),
                                help="Output tokens / wall time, prefill included, pooled over the speculative "
                                     "arm's two interleaved runs (the figure the speedup divides).")
            else:
                cards[2].metric("Tokens/s", render.format_number(stats.tokens_per_s, 1),
                                help="Output tokens / wall time, prefill included.")
            cards[3].metric("Target forward passes", f"{stats.target_forward_passes}",
                            help=f"Verify passes after the prefill, for {stats.num_output_tokens} output tokens.")
            if result.baseline is not None:
                cards[4].metric("Speedup vs target alone", render.format_number(result.speedup, 2, "×"),
                                help=f"Against the target alone on the same prompt: "
                                     f"{render.format_number(result.baseline_tokens_per_s, 1)} tokens/s. Both arms ran "
                                     "twice, interleaved (speculative, target alone, target alone, speculative), "
                                     "each pooled over its two runs; still one prompt: noisy.")
            elif result.settings["drafter"] == widgets.DRAFTER_LABELS["none"]:
                cards[4].metric("Speedup vs target alone", "—", help="No drafter: this run is the target alone.")
            else:
                cards[4].metric("Speedup vs target alone", "—", help="Switch on 'Compare with the target alone'.")
        if stats.num_tree_drafts:
            st.caption(f"Token trees: {render.format_number(stats.mean_tree_size, 1)} nodes per verify pass on "
                       f"average; mean accepted depth {render.format_number(stats.mean_acceptance_length - 1)} "
                       "(the acceptance rate counts every node, so it is low by construction).")
        load = result.settings.get("load") or {}
        if result.baseline is not None and load.get("loaded"):
            st.warning(f"Measured while the machine was busy: {load['reason']}; rerun for a clean figure.",
                       icon=":material/speed:")
        hint = loss_hint(result)
        if hint:
            st.info(hint, icon=":material/trending_down:")
        if result.baseline is not None:
            machine = "CPU" if result.settings.get("device") == "cpu" else "machine"
            sampled = "" if result.greedy else (
                " With sampling the two runs wrote different texts, and an easier text (a repetitive one drafts "
                "well) can flatter the speedup; compare at temperature 0 for like with like.")
            st.caption(f"Speedup: one short run on a shared {machine} is noisy (run it again and it can move by a "
                       f"third either way); use Compare over several prompts to decide.{sampled}")


LOSS_HINTS = {
    "layer-skip": "Layer skip drafts with the target's own first layers, untrained: each draft token costs a "
                  "sizeable share of a target pass, and the early exit rarely agrees with the full model, so the "
                  "verify passes keep too few tokens to pay for the drafting. It needs a target with many layers, "
                  "or an exit trained for it (LayerSkip); try prompt lookup on text that repeats its prompt, or a "
                  "draft model.",
    "prompt-lookup": "Prompt lookup only proposes when the output repeats an n-gram of the prompt (code edits, "
                     "summaries, retrieval); here it proposed little that the target kept. The Theory page shows "
                     "the acceptance this drafter would need to break even.",
    "draft-model": "The draft model costs too much per token for the acceptance it got on this prompt: below the "
                   "break-even acceptance (Theory page) every rejected token is a wasted draft pass. Try a smaller "
                   "draft, a smaller K, or a trimmed draft vocabulary.",
    "eagle": "The trained head's acceptance on this prompt was below break-even (Theory page); heads trained on "
             "little data accept well only near their training text. Try a smaller K.",
}


def loss_hint(result: state.LiveResult) -> str | None:
    """Why speculation lost on this run, in the drafter's terms; None when it did not lose (or no baseline ran)."""
    if result.baseline is None or result.speedup is None or result.speedup >= 1.0:
        return None
    drafter = str(result.settings.get("drafter", ""))  # the run's label: "layer-skip (early exit), K=4, ..."
    name = next((n for n, label in widgets.DRAFTER_LABELS.items() if drafter.startswith(label)), None)
    hint = LOSS_HINTS.get(name)
    return None if hint is None else f"Speculation lost here ({render.format_number(result.speedup, 2, '×')}). {hint}"


def show_check(slot, result: state.LiveResult) -> None:
    if result.baseline is None:
        slot.empty()
        return
    spec, base = result.speculative.token_ids, result.baseline.token_ids
    if not result.greedy:
        slot.info("Sampling: speculative decoding keeps the target's distribution, so the two outputs are equal "
                  "in distribution, not token for token (their random draws differ).")
        return
    at = render.first_difference(spec, base)
    if at is None:
        slot.success(f"Identical to the target alone: all {len(spec)} tokens match, token for token.")
    elif result.constrained is not None and result.constrained.naive:
        slot.warning(f"Differs from the target alone from token {at + 1} on: naive speculation under a grammar "
                     "is not exact (see the comparison below).")
    else:
        # not an error of the method: an info, not a warning (in fp32 the two are identical)
        slot.info(f"Differs from the target alone from token {at + 1} on: a rounding near-tie, not a flaw of "
                  f"speculation. {precision.rounding_note(result.settings)}", icon=":material/info:")


def show_result(view: LiveView, result: state.LiveResult) -> None:
    view.status.caption("Last run: " + " · ".join(f"{k} {v}" for k, v in result.settings.items() if k != "load"))
    show_metrics(view.metrics, result)
    show_check(view.check, result)
    show_tokens(view.speculative, result.speculative)
    if result.baseline is not None:
        show_tokens(view.baseline, result.baseline)
    else:
        view.baseline.empty()
    spec = result.speculative
    with view.details.container():
        constrained.show(result.constrained, spec)
        precision.show(result)
        if spec.stats.num_drafts:
            st.plotly_chart(render.acceptance_figure(spec.stats.per_position_acceptance_rate), width="stretch")
            st.caption(render.PER_POSITION_WHY)
        with st.expander(f"Steps ({len(spec.steps)})"):
            st.dataframe(result.step_rows, hide_index=True, width="stretch")
        with st.expander("Output text"):
            st.text(spec.text)


def require_model(name: str, what: str) -> str:
    if not name:
        raise ValueError(f"Type the {what} model's folder path, or pick a preset.")
    return name


def load(name: str, what: str, runtime: state.Runtime, slot):
    """A shared model; preparation and loading progress shown in ``slot`` the first time."""
    return resources.load_for_role(require_model(name, what), what, runtime, slot)


@dataclass
class LivePlan:
    """Everything a Live run needs, prepared in the script run; the worker thread decodes from it (no ``st`` call).

    label: the drafter's name for the page ("prompt lookup, K=4"); run_label: the same with the constraint's.
    compare: also run the target alone; unconstrained: also the drafter without the constraint;
    reference: the target in a reference precision (``precision.reference_model``), or None.
    """

    target: Any
    draft: Any
    drafter: Any
    config: DecodeConfig
    constraint: Any
    prompt_ids: list[int]
    label: str
    run_label: str
    settings: dict
    compare: bool
    unconstrained: bool
    reference: Any
    device: str


def prepare_live(view: LiveView, runtime: state.Runtime, target_name: str, draft_name: str | None) -> LivePlan:
    """Read the widgets, validate, load the models (progress in ``view.status``): what the run needs.

    draft_name: what the draft select returned (a preset, a folder path, "" or None).
    Raises ValueError, ``ModelError``, FileNotFoundError or a memory error: shown by the page.
    """
    s = st.session_state
    drafter_name = s[key("live.drafter")]
    config = DecodeConfig(k=int(s[key("live.k")]), max_new_tokens=int(s[key("live.max_new_tokens")]),
                          temperature=float(s[key("live.temperature")]), top_p=float(s[key("live.top_p")]),
                          seed=int(s[key("live.seed")]), engine_mode=runtime.engine_choice,
                          tree_budget=int(s[key("live.tree_budget")]) if drafter_name != "none" else 0)
    prompt = s[key("live.prompt")]
    if not prompt.strip():
        raise ValueError("The prompt is empty: type a question or some text for the model to continue.")
    bridge = widgets.vocab_bridge("live") if drafter_name == "draft-model" else "none"
    if drafter_name == "draft-model":  # before any loading: a draft that cannot fit stops here
        draft_name = widgets.checked_draft(target_name, draft_name, bridge)
        check_bridge_sampling(bridge, config.temperature)
    target = load(target_name, "target", runtime, view.status)
    prompt_ids = encode_prompt(target, prompt, chat_template=not s[key("live.raw")])
    constraint = constrained.build(target)  # before any decode: a schema that does not compile stops here

    draft = None
    if drafter_name == "draft-model":
        # compare tokenizers before spending seconds on the draft's weights (a bridge is for other tokenizers)
        if bridge == "none":
            check_same_tokenizer(target.tokenizer, resources.load_tokenizer(require_model(draft_name, "draft")))
        draft = load(draft_name, "draft", runtime, view.status)
    exit_layer = s[key("live.exit_layer")]
    trimmed = (s.get(key("live.draft_vocab")) or None) if drafter_name in ("draft-model", "eagle") else None
    drafter = make_drafter(drafter_name, target, draft, min_n=int(s[key("live.min_n")]), max_n=int(s[key("live.max_n")]),
                           exit_layer=None if exit_layer is None else int(exit_layer),
                           draft_vocab=trimmed, vocab_bridge=bridge)
    config = constrained.configured(config, constraint, drafter)

    # a trimmed draft vocabulary is part of what drafts: said in the run's name
    label = (widgets.DRAFTER_LABELS[drafter_name] + (f", top {trimmed:,} tokens" if trimmed else "")
             + {"text": ", text bridge", "ids": ", ids trap"}.get(bridge, "")
             + (f", K={config.k}" if drafter is not None else "")
             + (f", tree budget {config.tree_budget}" if config.tree_budget and drafter is not None else ""))
    settings = {"target": target_name, "drafter": label, "temperature": config.temperature,
                "max new tokens": config.max_new_tokens, "device": runtime.device, "engine": runtime.engine}
    settings |= precision.settings(runtime, drafter_name)
    settings |= constrained.settings(constraint, drafter)
    reference = precision.reference_model(view.details, runtime, target_name, target)
    return LivePlan(target, draft, drafter, config, constraint, prompt_ids, label,
                    label + constrained.describe(constraint, drafter), settings,
                    compare=bool(s[key("live.compare")]) and drafter is not None,
                    unconstrained=bool(s.get(key("live.unconstrained"))), reference=reference, device=runtime.device)


def live_work(plan: LivePlan, job: background.Job) -> state.LiveResult:
    """The run, in the worker thread: the speculative decode, the target alone interleaved with it, the extra runs.

    Streams each record into ``job.partial`` ("speculative", "baseline", "extra") for the page to draw.
    Raises ``background.JobCancelled`` when cancelled between steps.
    """
    target, prompt_ids, config, constraint = plan.target, plan.prompt_ids, plan.config, plan.constraint

    def collect(label: str, drafter, slot: str | None, run_constraint=constraint, run_config=config) -> state.RunRecord:
        events = job.cancellable(decode(target, prompt_ids, drafter, run_config, constraint=run_constraint))
        on_step = None if slot is None else (lambda record: job.partial.__setitem__(slot, record))
        return state.collect_run(label, events, target.tokenizer, prompt_ids, on_step=on_step)

    job.progress = "Decoding…"
    speculative = collect(plan.run_label, plan.drafter, "speculative")
    baseline, timing = None, None
    if plan.compare:
        job.progress = "Running the target alone on the same prompt, for comparison…"
        baseline = collect("target alone", None, "baseline")
        job.progress = ("Timing a second pair in reverse order (target alone, then speculative), so that a drift of "
                        "the machine's speed hits both arms…")
        baseline_again = collect("target alone", None, None)
        speculative_again = collect(plan.run_label, plan.drafter, None)
        timing = paired_timing([speculative, speculative_again], [baseline, baseline_again])
    job.progress = "Finishing…"
    stream_extra = lambda record: job.partial.__setitem__("extra", record)  # noqa: E731
    outcome = constrained.extra_runs(target, prompt_ids, plan.drafter, config, constraint, speculative, plan.label,
                                     plan.unconstrained, on_step=stream_extra, events=job.cancellable)
    reference = precision.reference_run(plan.reference, target, prompt_ids, config, compared=baseline or speculative,
                                        on_step=stream_extra, events=job.cancellable)
    return state.LiveResult(speculative, baseline, greedy=config.sampling.is_greedy, settings=dict(plan.settings),
                            step_rows=render.steps_rows(speculative.steps, target.tokenizer, prompt_ids),
                            constrained=outcome, reference=reference,
                            memory=precision.run_memory(target, plan.drafter, plan.draft, speculative), timing=timing)


def paired_timing(speculative: list[state.RunRecord], baseline: list[state.RunRecord]) -> dict:
    """Each arm's tokens/s per run and pooled over its runs (total tokens / total wall time), with the order run."""
    def pooled(records):
        wall_s = sum(r.wall_s for r in records)
        return sum(r.stats.num_output_tokens for r in records) / wall_s if wall_s > 0 else float("nan")

    return {
        "order": ["speculative", "target alone", "target alone", "speculative"],
        "speculative_tokens_per_s": [r.stats.tokens_per_s for r in speculative],
        "baseline_tokens_per_s": [r.stats.tokens_per_s for r in baseline],
        "speculative_pooled_tokens_per_s": pooled(speculative),
        "baseline_pooled_tokens_per_s": pooled(baseline),
    }


def draw_running(view: LiveView, job: background.Job, cancel_slot, drawn: dict) -> None:
    """The job so far: where it stands, and its token streams (redrawn only when they grew)."""
    view.status.caption(background.waiting_text(job))
    for name, slot in (("speculative", view.speculative), ("baseline", view.baseline), ("extra", view.details)):
        record = job.partial.get(name)
        if record is not None and drawn.get(name) != len(record.pieces):
            drawn[name] = len(record.pieces)
            show_tokens(slot, record, streaming=True)
    if job.done.is_set():
        cancel_slot.empty()


def keep_finished(job: background.Job) -> None:
    """In the worker, the moment the run has finished: its load report into its settings, and the run into the
    results store (``app.saved``), whether or not the user is still on the page."""
    if job.load is not None:
        job.result.settings["load"] = job.load.as_dict()
    saved.keep_live(job.result, str(job.ticket.device),
                    on_error=lambda message: job.partial.__setitem__("finish_error", message))


def take_over(job: background.Job) -> tuple[str, str] | None:
    """A finished job into session state: its result as the last run, or a notice of why it was cancelled.
    Returns the error to show (message, icon) when it failed; re-raises what the page does not expect."""
    s = st.session_state
    del s[JOB_KEY]
    if job.result is not None:
        if job.load is not None:
            job.result.settings["load"] = job.load.as_dict()
        s[RESULT_KEY] = job.result
        s.pop(NOTICE_KEY, None)
        if job.partial.get("finish_error"):
            st.warning(f"This run is shown but not saved: {job.partial['finish_error']}", icon=":material/database:")
        return None
    if job.cancelled is not None:
        partial = job.partial.get("speculative")
        done = f" after {partial.stats.num_output_tokens} tokens" if partial is not None else " before it started"
        s[NOTICE_KEY] = f"The run you started was cancelled{done}: {job.cancelled}."
        return None
    return background.error_message(job.error)


# ---------------------------------------------------------------- page

state.set_defaults(st.session_state, DEFAULTS)
state.set_defaults(st.session_state, constrained.DEFAULTS)
state.set_defaults(st.session_state, precision.DEFAULTS)
st.title("Speculative Decoding Lab")
st.markdown(
    "A **drafter** proposes up to K tokens; the **target** checks them all in one forward pass, keeps the longest "
    "prefix it agrees with and adds one token of its own. With temperature 0 (greedy) the output is the target "
    "alone's output, token for token in fp32 (in bf16 a near-tie can round the other way: the check below says "
    "when); with sampling it follows the same distribution. Colours:"
)
# "cut" exists only under a grammar: listed once constrained output is on.
constraint_on = st.session_state.get(state.widget_key("live.constraint"), "off") != "off"
st.html(render.legend_html(render.TOKEN_KINDS if constraint_on else [k for k in render.TOKEN_KINDS if k != "cut"]))

with st.container(border=True):
    models_col, drafter_col = st.columns(2)
    with models_col:
        target_choice = widgets.target_select("live", local_folder=True)
    with drafter_col:
        drafter_name = widgets.drafter_select("live", DRAFTER_NAMES)
        draft_choice = None
        if drafter_name == "draft-model":
            bridge = widgets.vocab_bridge_select("live")
            draft_choice = widgets.draft_select("live", target_choice, local_folder=True, vocab_bridge=bridge)
            widgets.draft_vocab_select("live")
        elif drafter_name == "prompt-lookup":
            widgets.ngram_inputs("live", *st.columns(2))
        elif drafter_name == "layer-skip":
            widgets.exit_layer_input("live")
        elif drafter_name == "eagle":
            widgets.draft_vocab_select("live")
            widgets.eagle_note(target_choice)
    # the toggles span the form and wrap: in half of it their labels were cut ("Compare with the ta…") at 900 px
    with st.container(horizontal=True, gap="small"):
        st.toggle("Raw completion", key=key("live.raw"),
                  help="Off (default): the prompt goes through the model's chat template as a user message. "
                       "On: the model continues the text as is.")
        st.toggle("Compare with the target alone", key=key("live.compare"),
                  help="Also run the target without a drafter on the same prompt: speedup and exactness check.")
        precision.toggle()
    precision.section()
    # two rows, not five columns: at 900 px with the sidebar open five sliders were too narrow to read
    k_col, tokens_col = st.columns(2)
    temp_col, top_p_col, seed_col = st.columns(3)
    k_col.slider("K (draft tokens per step)", 1, K_MAX, key=key("live.k"), disabled=drafter_name == "none")
    with k_col:
        calibration.k_hint("live", target_choice, drafter_name, draft_choice)
    widgets.tree_budget_input("live", tokens_col, disabled=drafter_name == "none")
    tokens_col.number_input("Max new tokens", min_value=1, max_value=MAX_NEW_TOKENS_MAX, step=16,
                            key=key("live.max_new_tokens"))
    temp_col.slider("Temperature", 0.0, 2.0, step=0.05, key=key("live.temperature"), help="0 = greedy.")
    greedy = st.session_state[key("live.temperature")] == 0
    top_p_col.slider("Top-p", 0.05, 1.0, step=0.05, key=key("live.top_p"), disabled=greedy)
    seed_col.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=key("live.seed"), disabled=greedy)
    st.text_area("Prompt", key=key("live.prompt"), height=140)
    constrained.section()
    buttons = st.container(horizontal=True, gap="small")  # fixed columns cut "Run" to its icon at 900 px
    run_clicked = buttons.button("Run", type="primary", icon=":material/play_arrow:")
    cancel_slot = buttons.empty()

error_slot = st.empty()
notice_slot = st.empty()
last = st.session_state.get(RESULT_KEY)
running = st.session_state.get(JOB_KEY)
side_by_side = (run_clicked and st.session_state[key("live.compare")] and drafter_name != "none") or (
    not run_clicked and running is not None and running.partial.get("compare")) or (
    not run_clicked and running is None and last is not None and last.baseline is not None)
view = LiveView.create(side_by_side)

failed = None
if run_clicked:
    try:
        runtime = state.runtime(st.session_state)
        plan = prepare_live(view, runtime, target_choice, draft_choice)
    except (ValueError, ModelError, FileNotFoundError, *MEMORY_ERRORS) as error:
        failed = background.error_message(error)
    else:
        if running is not None:  # said, not dropped: its notice names the reason
            running.cancel("you started a new run")
        st.session_state.pop(NOTICE_KEY, None)
        job = background.start(lambda job, plan=plan: live_work(plan, job), plan.device, background.session_holder("Live"),
                               on_finish=keep_finished)
        job.partial["compare"] = plan.compare
        st.session_state[JOB_KEY] = job

if (job := st.session_state.get(JOB_KEY)) is not None:
    if not job.done.is_set():
        background.cancel_button(cancel_slot, job, "live_cancel",
                                 "Stop this run after its current step (or take it out of the line while it waits).")
        drawn: dict = {}
        background.follow(job, lambda job: draw_running(view, job, cancel_slot, drawn))
    for slot in (view.status, view.speculative, view.baseline, view.details):
        slot.empty()
    failed = take_over(job) or failed

if failed is not None:
    with error_slot.container():
        st.error(failed[0], icon=failed[1])
        if st.session_state.get(RESULT_KEY) is not None:  # kept, not lost; but it must not read as this run's
            st.caption("Below: the previous run, kept as it was. The run you just started did not happen.")
elif (notice := st.session_state.get(NOTICE_KEY)) is not None:
    notice_slot.warning(notice + (" Below: the previous run." if st.session_state.get(RESULT_KEY) is not None else ""),
                        icon=":material/cancel:")

if (result := st.session_state.get(RESULT_KEY)) is not None:
    show_result(view, result)
