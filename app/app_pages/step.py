"""Step-through page: one draft-verify cycle at a time, for teaching.

Start builds a drafter and a ``lab.decode.decode`` generator with
``DecodeConfig(record_details=True)`` and keeps it in ``st.session_state``: the
generator holds its own KV caches, so each "Next cycle" click resumes it for
exactly one ``Step`` event. Each cycle (and the prefill) holds the device in
``lab.device_queue`` while it runs, not the whole decode: a step-through
lasts as long as the user reads (minutes), and holding the device that long
would stall every other session's timed runs; the times a cycle shows are
taken inside its own hold, so no other run of the lab shares the cores then.
Each cycle shows the drafted tokens with the draft's
probabilities, the target's top tokens at each position, the decision and its
reason, the corrected or bonus token, and the caches' lengths after rollback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
import torch

from app import background, render, render_compare, render_step, render_tree, resources, saved, state, widgets
from lab import device_queue
from lab.config import K_MAX, DecodeConfig
from lab.drafters import check_bridge_sampling, make_drafter
from lab.decode import decode
from lab.metrics import SpecDecodingStats
from lab.models import ModelError, check_same_tokenizer, encode_prompt
from lab.trace import Finished, Prefilled, Step

SESSION_KEY = "step:session"
MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)
DRAFTERS = ("prompt-lookup", "layer-skip", "draft-model", "eagle")
DRAFTER_HELP = ("Prompt lookup (n-grams) is deterministic: no probabilities (draft prob 1). Layer skip (the target's "
                "first layers), a draft model and the EAGLE head (trained on the target's hidden states with "
                "`python -m lab train-head`) show the draft's probability of each token.")
RUN_AHEAD_CYCLES = 5

EXAMPLE_PROMPT = (
    "Fix the spelling mistakes in this sentence and return it corrected:\n\n"
    "Speculative decodng lets a smal draft model propose tokens that the large target model checks in one pas."
)

DEFAULTS = {
    "step.target": "smollm2-135m",
    "step.drafter": "prompt-lookup",
    "step.draft": "qwen2.5-coder-0.5b",
    "step.draft_vocab": 0,
    "step.min_n": 1,
    "step.max_n": 3,
    "step.exit_layer": None,
    "step.vocab_bridge": "none",
    "step.k": 4,
    "step.tree_budget": 0,
    "step.max_new_tokens": 48,
    "step.temperature": 0.0,
    "step.top_p": 1.0,
    "step.seed": 0,
    "step.raw": False,
    "step.prompt": EXAMPLE_PROMPT,
    "step.view": 1,
}

key = state.widget_key
# What Start reads: a session keeps these as they were, so a change shows a note until the next Start.
FORM_KEYS = ("step.target", "step.drafter", "step.draft", "step.k", "step.max_new_tokens", "step.temperature",
             "step.top_p", "step.seed", "step.raw", "step.prompt", "step.draft_vocab",
             "step.vocab_bridge", "step.min_n", "step.max_n", "step.exit_layer", "step.tree_budget")


@dataclass
class StepSession:
    """A decode being stepped through: its generator (which holds the caches) and what it yielded so far."""

    events: Iterator
    tokenizer: Any
    prompt_ids: list[int]
    greedy: bool
    settings: dict[str, Any]
    prefill_ms: float = 0.0
    steps: list[Step] = field(default_factory=list)
    pieces: list[render.TokenPiece] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # committed length before each step
    finished: Finished | None = None
    eos_token_ids: tuple[int, ...] = ()
    stats: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    form: dict[str, Any] = field(default_factory=dict)  # the form's values at Start (FORM_KEYS)
    device: str = "cpu"
    holder: str = "Step-through"  # who holds the device, as lab.device_queue shows it to others
    drafter: Any = None  # a vocabulary bridge's drafter, read after each step for its translation
    bridged: list = field(default_factory=list)  # per step: the bridge's BridgedDraft, or None

    def advance(self) -> None:
        """Resume the decode for one event: a Step, or Finished at the end (holding the device meanwhile)."""
        if self.finished is not None:
            return
        with device_queue.hold(self.device, self.holder):
            event = next(self.events)
        self.stats.observe(event)
        if isinstance(event, Prefilled):
            self.prefill_ms = event.prefill_ms
        elif isinstance(event, Step):
            self.starts.append(len(self.committed))
            self.pieces += render.step_pieces(event, self.committed, self.tokenizer)
            self.steps.append(event)
            self.committed += event.emitted
            if self.drafter is not None:  # the bridge's translation of this step's draft (none: it drafted nothing)
                bridged = self.drafter.last_bridged[0]
                same = bridged is not None and tuple(bridged.target_tokens) == tuple(event.drafted)
                self.bridged.append(bridged if same and event.drafted else None)
        elif isinstance(event, Finished):
            self.finished = event

    def next_cycle(self) -> None:
        """One more Step (and the Finished event right behind it when that step ended the decode).

        Holds the session's lock: a click during "Next 5 cycles" starts a new script run at once, in
        another thread, while the old one may still be resuming the generator.
        """
        with self.lock:
            count = len(self.steps)
            while self.finished is None and len(self.steps) == count:
                self.advance()
            if self.finished is None and self._ended():
                self.advance()

    def _ended(self) -> bool:
        """The last step hit EOS or the token budget (the generator's next event is Finished)."""
        if len(self.committed) - len(self.prompt_ids) >= self.settings["max new tokens"]:
            return True
        last = self.steps[-1].emitted if self.steps else ()
        return bool(last) and last[-1] in self.eos_token_ids


def start(runtime: state.Runtime, slot, draft_name: str | None) -> StepSession:
    """Read the widgets, load models, build the drafter, prefill: a session ready for its first cycle.

    draft_name: what the draft select returned (None: no draft model fits the target).
    """
    s = st.session_state
    prompt = s[key("step.prompt")]
    if not prompt.strip():
        raise ValueError("The prompt is empty: type a question or some text for the model to continue.")
    config = DecodeConfig(k=int(s[key("step.k")]), max_new_tokens=int(s[key("step.max_new_tokens")]),
                          temperature=float(s[key("step.temperature")]), top_p=float(s[key("step.top_p")]),
                          seed=int(s[key("step.seed")]), record_details=True, engine_mode=runtime.engine_choice,
                          tree_budget=int(s[key("step.tree_budget")]))
    target_name, drafter_name = s[key("step.target")], s[key("step.drafter")]
    bridge = widgets.vocab_bridge("step") if drafter_name == "draft-model" else "none"
    draft = None
    if drafter_name == "draft-model":
        draft_name = widgets.checked_draft(target_name, draft_name, bridge)
        check_bridge_sampling(bridge, config.temperature)
        if bridge == "none":
            check_same_tokenizer(resources.load_tokenizer(target_name), resources.load_tokenizer(draft_name))
    target = resources.load_for_role(target_name, "target", runtime, slot)
    if drafter_name == "draft-model":
        draft = resources.load_for_role(draft_name, "draft", runtime, slot)
    prompt_ids = encode_prompt(target, prompt, chat_template=not s[key("step.raw")])
    trimmed = (s.get(key("step.draft_vocab")) or None) if drafter_name in ("draft-model", "eagle") else None
    exit_layer = s.get(key("step.exit_layer"))
    drafter = make_drafter(drafter_name, target, draft, min_n=int(s[key("step.min_n")]), max_n=int(s[key("step.max_n")]),
                           exit_layer=None if exit_layer is None else int(exit_layer), draft_vocab=trimmed,
                           vocab_bridge=bridge)
    settings = {"target": target_name, "drafter": widgets.DRAFTER_LABELS[drafter_name] + (f" ({draft.name})" if draft else "")
                + (f", n-grams {s[key('step.min_n')]}-{s[key('step.max_n')]}" if drafter_name == "prompt-lookup" else "")
                + (f", exit layer {exit_layer}" if drafter_name == "layer-skip" and exit_layer is not None else "")
                + (f", top {trimmed:,} tokens" if trimmed else "") + {"text": ", text bridge", "ids": ", ids trap"}.get(bridge, ""),
                "K": config.k, "max new tokens": config.max_new_tokens}
    if config.tree_budget:
        settings["tree budget"] = config.tree_budget
    settings |= {
                "sampling": "greedy" if config.sampling.is_greedy else f"temperature {config.temperature}, top-p {config.top_p}, seed {config.seed}",
                "precision": runtime.precision("target") + (f", draft {runtime.precision('draft')}" if draft else "")}
    session = StepSession(decode(target, prompt_ids, drafter, config), target.tokenizer, prompt_ids,
                          config.sampling.is_greedy, settings, committed=list(prompt_ids),
                          eos_token_ids=tuple(target.eos_token_ids), form={k: s.get(key(k)) for k in FORM_KEYS},
                          device=str(target.device), holder=background.session_holder("Step-through"),
                          drafter=drafter if bridge != "none" else None)
    session.advance()  # the prefill
    return session


def show_session(session: StepSession) -> None:
    s = st.session_state
    st.caption(" · ".join(f"{name} {value}" for name, value in session.settings.items())
               + f" · {len(session.prompt_ids)} prompt tokens, prefill {session.prefill_ms:.0f} ms")
    stats = session.stats
    st.markdown(f"**Output so far**: {render.count(stats.num_output_tokens, 'token')} in "
                f"{render.count(stats.target_forward_passes, 'target pass', 'target passes')} · "
                f"acceptance rate {render.format_rate(stats.acceptance_rate)} · mean acceptance length "
                f"{render.format_number(stats.mean_acceptance_length)}")
    with_cut = any(piece.kind == "cut" for piece in session.pieces)
    st.html(render.legend_html([k for k in render.TOKEN_KINDS if with_cut or k != "cut"]))
    st.html(render.tokens_html(session.pieces, streaming=session.finished is None))
    if session.finished is not None:
        st.success(f"Finished ({session.finished.reason.replace('_', ' ')}): "
                   f"{render.count(len(session.finished.token_ids), 'token')} in "
                   f"{render.count(len(session.steps), 'target pass', 'target passes')}.", icon=":material/flag:")
    if not session.steps:
        st.info("Prefilled: the target has read the prompt. Press **Next cycle** for the first draft-verify cycle.")
        return
    count = len(session.steps)
    if count > 1:
        if not 1 <= int(s[key("step.view")]) <= count:
            s[key("step.view")] = count
        index = st.slider("Cycle shown", 1, count, key=key("step.view")) - 1
    else:
        index = 0
    step = session.steps[index]
    start_len = session.starts[index]
    st.subheader(render_step.step_headline(step, session.eos_token_ids))
    if step.tree is not None:  # a token tree: drawn whole, the accepted path marked
        st.plotly_chart(render_tree.tree_figure(step, session.tokenizer, session.committed[max(0, start_len - 8):start_len]),
                        width="stretch")
        st.caption("Each node is a drafted token; the target read them all in one pass, each seeing only its own "
                   "ancestors. Green: the accepted path (the longest the target agreed with); red: nodes it refused "
                   "or never reached; the last node is the target's own token. Hover for the draft probability.")
        parents = step.tree.parents.tolist()
        if len(set(parents)) == len(parents):  # no node has two children: a chain
            st.info("This tree never branched: the drafter had one candidate at every depth (for prompt lookup, "
                    "the matched n-gram has a single continuation in the text), so it checked what a chain of the "
                    "same length would.", icon=":material/linear_scale:")
    else:
        st.html(render_step.step_cards_html(step, session.tokenizer, session.committed[max(0, start_len - 8):start_len],
                                               session.greedy, session.eos_token_ids))
    if index < len(session.bridged) and session.bridged[index] is not None:
        show_bridged(session.bridged[index], step)
    st.caption(render_step.cache_note(step, start_len + len(step.emitted))
               + f" Drafting took {step.draft_ms:.1f} ms, verifying {step.verify_ms:.1f} ms.")
    with st.expander(f"All cycles ({count}) and where the time went"):
        st.plotly_chart(render_compare.timeline_figure(
            [x.draft_ms for x in session.steps], [x.verify_ms for x in session.steps], title="Time per cycle",
            accepted=[len(x.emitted) for x in session.steps]), width="stretch")
        st.dataframe(render.steps_rows(session.steps, session.tokenizer, session.prompt_ids), hide_index=True,
                     width="stretch")


def show_bridged(bridged, step: Step) -> None:
    """One bridged step: the draft's tokens (its vocabulary), their text, the target's tokens and the decisions."""
    st.markdown(f"**Through the vocabulary bridge.** The draft wrote {render.count(len(bridged.draft_tokens), 'token')} "
                f"in its own vocabulary, which read as the text `{bridged.text!r}`; re-encoded with the target's "
                f"tokenizer that is {render.count(len(bridged.target_tokens), 'target token')}, of which the target "
                f"kept {step.num_accepted}." + (f" ({bridged.note}.)" if bridged.note else ""))
    st.dataframe(bridged.rows(step.num_accepted), hide_index=True, width="stretch")


# ---------------------------------------------------------------- page

state.set_defaults(st.session_state, DEFAULTS)
st.html(f"<style>{render_step.STEP_CSS}</style>")
st.title("Step through speculative decoding")
st.markdown(
    "Advance one **draft-verify cycle** at a time. The drafter proposes up to K tokens; the target reads them all "
    "in one pass and judges each position in order: with greedy decoding it keeps a drafted token if it is the "
    "target's own most likely token; with sampling it keeps it with probability min(1, target prob / draft prob). "
    "At the first refusal the target puts its own token there (corrected); if it keeps all K it adds one more (bonus)."
)

with st.container(border=True):
    left, right = st.columns(2)
    with left:
        target_choice = widgets.target_select("step")
        drafter_name = widgets.drafter_select("step", DRAFTERS, help=DRAFTER_HELP)
        bridge = widgets.vocab_bridge_select("step") if drafter_name == "draft-model" else "none"
        draft_choice = (widgets.draft_select("step", target_choice, vocab_bridge=bridge)
                        if drafter_name == "draft-model" else None)
        if drafter_name in ("draft-model", "eagle"):
            widgets.draft_vocab_select("step")
        if drafter_name == "eagle":
            widgets.eagle_note(target_choice)
        elif drafter_name == "prompt-lookup":
            widgets.ngram_inputs("step", *st.columns(2))
        elif drafter_name == "layer-skip":
            widgets.exit_layer_input("step")
    with right:
        k_col, tokens_col = st.columns(2)
        k_col.slider("K (draft tokens per step)", 1, K_MAX, key=key("step.k"))
        widgets.tree_budget_input("step", k_col)
        tokens_col.number_input("Max new tokens", min_value=1, max_value=512, step=8, key=key("step.max_new_tokens"))
    temp_col, top_p_col, seed_col = st.columns(3)  # full width: in the right half they were unreadable at 900 px
    temp_col.slider("Temperature", 0.0, 2.0, step=0.05, key=key("step.temperature"), help="0 = greedy.")
    greedy = st.session_state[key("step.temperature")] == 0
    top_p_col.slider("Top-p", 0.05, 1.0, step=0.05, key=key("step.top_p"), disabled=greedy)
    seed_col.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=key("step.seed"), disabled=greedy)
    st.text_area("Prompt", key=key("step.prompt"), height=100)
    st.toggle("Raw completion", key=key("step.raw"), help="Off: the prompt goes through the chat template.")
    session: StepSession | None = st.session_state.get(SESSION_KEY)
    active = session is not None and session.finished is None
    # a wrapping row: in fixed columns the labels were cut to "N" at 900 px
    buttons = st.container(horizontal=True, gap="small")
    start_clicked = buttons.button("Start", type="primary" if not active else "secondary", icon=":material/restart_alt:",
                                      help="Load the models, read the prompt (prefill) and wait for the first cycle.")
    next_clicked = buttons.button("Next cycle", type="primary" if active else "secondary", disabled=not active,
                                     icon=":material/skip_next:")
    ahead_clicked = buttons.button(f"Next {RUN_AHEAD_CYCLES} cycles", disabled=not active,
                                      icon=":material/fast_forward:")
    reset_clicked = buttons.button("Reset", disabled=session is None, icon=":material/close:")

if (opened := st.session_state.pop(saved.STEP_REOPEN_KEY, None)) is not None:  # a kept run, from History
    st.session_state[SESSION_KEY] = session = StepSession(
        iter(()), resources.load_tokenizer(opened["settings"]["target"]), **opened)
status_slot, error_slot = st.empty(), st.empty()
try:
    if start_clicked:
        st.session_state[SESSION_KEY] = start(state.runtime(st.session_state), status_slot, draft_choice)
        st.session_state[key("step.view")] = 1
        st.rerun()  # redraw the buttons for the new session
    elif reset_clicked:
        st.session_state.pop(SESSION_KEY, None)
        st.rerun()
    elif (next_clicked or ahead_clicked) and session is not None:
        cycles = RUN_AHEAD_CYCLES if ahead_clicked else 1
        with status_slot.container(), st.spinner(f"Running {render.count(cycles, 'cycle')} (draft, then one verify "
                                                 "pass each; waits its turn if another run holds the device)…"):
            for _ in range(cycles):
                session.next_cycle()
        if session.finished is not None:
            saved.keep_step(session)
        st.session_state[key("step.view")] = max(1, len(session.steps))
        st.rerun()
except (ValueError, ModelError, FileNotFoundError) as error:
    error_slot.error(str(error), icon=":material/error:")
except MEMORY_ERRORS as error:
    error_slot.error(f"Out of memory ({type(error).__name__}). Free loaded models in the sidebar or pick a smaller "
                     "target; then start again.", icon=":material/memory:")

if session is not None:
    if any(st.session_state.get(key(k)) != v for k, v in session.form.items()):
        st.info("The settings above changed since **Start**: this run goes on with the ones it started with (shown "
                "below). Press **Start** to begin again with the new ones.", icon=":material/info:")
    show_session(session)
else:
    st.caption("Press **Start** to begin.")
