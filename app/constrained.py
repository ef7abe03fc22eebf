"""Constrained output on the Live page: its widgets, the compiled constraint, the extra runs and their display.

The page calls ``section`` (widgets), ``build`` (the compiled ``lab.grammar.Constraint``
or None, before any decode, so a schema that does not compile stops the run with
its plain message), ``configured`` (the grammar mode), ``extra_runs`` (the exact
run beside a naive one, the run without the constraint) and ``show``.

Naive mode is the broken way some engines shipped (drafts and verification not
masked, the matcher never rolled back): it is for teaching, never the default,
and always shown beside the exact run so the damage is visible.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import streamlit as st

from app import render, state
from lab.config import DecodeConfig
from lab.studies.constrained import ExtractionItem, load_extraction_items
from lab.decode import decode
from lab.grammar import Constraint, ConstraintSpec, first_invalid_token

KINDS = ("off", "json_schema", "regex", "any_json")
KIND_LABELS = {"off": "off", "json_schema": "JSON schema", "regex": "regex", "any_json": "any JSON"}
WHAT = {"json_schema": "schema", "regex": "regex", "any_json": "JSON"}
INCOMPLETE = "the output is a valid prefix but incomplete: raise max new tokens"
NAIVE_HELP = (
    "The WRONG way, for teaching: draft tokens are proposed and verified without the grammar's mask, and the "
    "grammar matcher is advanced over every drafted token and never rolled back. Output can break the schema or "
    "differ from the correct run; the exact run is shown beside it."
)

key = state.widget_key


@functools.cache
def examples() -> tuple[ExtractionItem, ...]:
    """The extraction prompts with their schemas (``assets/extraction.jsonl``), read once."""
    return tuple(load_extraction_items())


def example(item_id: str) -> ExtractionItem:
    return next(item for item in examples() if item.id == item_id)


def example_label(item_id: str) -> str:
    first_line = example(item_id).prompt.splitlines()[0]
    return f"{item_id}: {first_line[:60]}{'…' if len(first_line) > 60 else ''}"


DEFAULTS = {
    "live.constraint": "off",
    "live.schema": json.dumps(examples()[0].schema, indent=2),
    "live.regex": r"\d{4}-\d{2}-\d{2}",
    "live.example": examples()[0].id,
    "live.naive": False,
    "live.unconstrained": False,
}


def load_example() -> None:
    """Button callback: the chosen example's prompt and schema into their widgets (before they are drawn)."""
    s = st.session_state
    item = example(s[key("live.example")])
    s[key("live.prompt")] = item.prompt
    s[key("live.schema")] = json.dumps(item.schema, indent=2)
    s[key("live.constraint")] = "json_schema"


def section() -> None:
    """The "Constrained output" widgets."""
    kind = st.session_state[key("live.constraint")]
    with st.expander("Constrained output", expanded=kind != "off"):
        kind = st.radio("The output must match", KINDS, key=key("live.constraint"), format_func=KIND_LABELS.get,
                        horizontal=True, help="The grammar masks every drafted and verified position, so speculation "
                                              "stays exact: the output is what the target alone writes under it.")
        pick, load = st.columns([4, 1], vertical_alignment="bottom")
        pick.selectbox("Example: an extraction prompt with its schema", [item.id for item in examples()],
                       key=key("live.example"), format_func=example_label)
        load.button("Load example", on_click=load_example,
                    help="Puts its prompt and schema in the boxes and switches the constraint to JSON schema.")
        if kind == "json_schema":
            st.text_area("JSON schema", key=key("live.schema"), height=180)
        elif kind == "regex":
            st.text_input("Regular expression (the whole output must match it)", key=key("live.regex"))
        elif kind == "any_json":
            st.caption("Any well-formed JSON value.")
        on = kind != "off"
        naive_col, free_col = st.columns(2)
        naive_col.checkbox("Naive (broken) speculation — for teaching: the wrong way", key=key("live.naive"),
                           disabled=not on, help=NAIVE_HELP)
        free_col.checkbox("Also run without the constraint", key=key("live.unconstrained"), disabled=not on,
                          help="Runs the same drafter once more with no grammar, to compare acceptance.")


def spec_from_widgets() -> ConstraintSpec | None:
    """The constraint the widgets ask for, None when off. Raises ValueError on an empty schema or regex."""
    s = st.session_state
    kind = s[key("live.constraint")]
    if kind == "off":
        return None
    source = {"json_schema": s[key("live.schema")], "regex": s[key("live.regex")], "any_json": ""}[kind]
    return ConstraintSpec(kind, source)


@st.cache_resource(show_spinner=False, max_entries=32)
def _compiled(kind: str, source: str, model_name: str, vocab_size: int, tokenizer_size: int, _target) -> Constraint:
    """One compiled constraint per (spec, model): compiling takes up to a second; each decode gets a fresh matcher."""
    return Constraint(ConstraintSpec(kind, source), _target.tokenizer, vocab_size, _target.eos_token_ids)


def build(target) -> Constraint | None:
    """The widgets' constraint compiled for ``target``, or None.

    Raises ``GrammarError`` (a ValueError) with a plain message when it does not compile.
    """
    spec = spec_from_widgets()
    if spec is None:
        return None
    return _compiled(spec.kind, spec.source, target.name, target.vocab_size, len(target.tokenizer), target)


def is_naive(constraint: Constraint | None, drafter) -> bool:
    """Naive mode matters only with a constraint and a drafter (the target alone has nothing to mis-handle)."""
    return constraint is not None and drafter is not None and bool(st.session_state[key("live.naive")])


def configured(config: DecodeConfig, constraint: Constraint | None, drafter) -> DecodeConfig:
    return replace(config, grammar_mode="naive" if is_naive(constraint, drafter) else "exact")


def describe(constraint: Constraint | None, drafter) -> str:
    """A label suffix such as ", JSON schema" or ", regex, naive (broken)"; "" without a constraint."""
    if constraint is None:
        return ""
    return f", {KIND_LABELS[constraint.spec.kind]}" + (", naive (broken)" if is_naive(constraint, drafter) else "")


def settings(constraint: Constraint | None, drafter) -> dict[str, str]:
    """The "Last run" caption's entry for the constraint (none without one)."""
    return {} if constraint is None else {"constraint": describe(constraint, drafter).removeprefix(", ")}


def extra_runs(target, prompt_ids, drafter, config: DecodeConfig, constraint: Constraint | None,
               speculative: state.RunRecord, label: str, unconstrained: bool,
               on_step=None, events=lambda events: events) -> state.ConstrainedOutcome | None:
    """After the main run: validity, and the runs that explain it. No ``st`` call: it runs in the Live page's worker.

    label: what drafts, e.g. "draft model, K=4" (without the constraint's suffix).
    Naive mode: the same drafter under the exact grammar handling (the correct run).
    unconstrained (the page's "live.unconstrained" toggle): also the same drafter without the constraint.
    on_step(record): called after each step of those runs (the page streams them); events: wraps each run's
    event stream (the worker's cancel check).
    """
    if constraint is None:
        return None
    naive = config.grammar_mode == "naive"
    exact_config = replace(config, grammar_mode="exact")

    def collect(run_label: str, run_constraint: Constraint | None) -> state.RunRecord:
        run_events = events(decode(target, prompt_ids, drafter, exact_config, constraint=run_constraint))
        return state.collect_run(run_label, run_events, target.tokenizer, prompt_ids, on_step=on_step)

    exact = collect(f"{label}, {KIND_LABELS[constraint.spec.kind]}, exact", constraint) if naive else None
    free = collect(f"{label}, no constraint", None) if unconstrained else None
    first_invalid = first_invalid_token(constraint, speculative.token_ids)
    return state.ConstrainedOutcome(
        kind=constraint.spec.kind,
        naive=naive,
        valid=constraint.is_valid(speculative.text),
        first_invalid=first_invalid,
        incomplete=first_invalid is None and speculative.reason in ("max_new_tokens", "context_window"),
        num_cut_tokens=sum(len(step.cut_by_grammar) for step in speculative.steps),
        exact=exact,
        exact_valid=None if exact is None else constraint.is_valid(exact.text),
        first_difference=None if exact is None else render.first_difference(speculative.token_ids, exact.token_ids),
        free=free,
        free_valid=None if free is None else constraint.is_valid(free.text),
    )


def _validity(what: str, valid: bool | None, incomplete: bool = False, first_invalid: int | None = None) -> str:
    if valid:
        return f"Valid for its {what}: yes."
    if incomplete:
        return f"Valid for its {what}: no — {INCOMPLETE}."
    where = f" (the grammar forbids token {first_invalid + 1})" if first_invalid is not None else ""
    return f"Valid for its {what}: no{where}."


def show(outcome: state.ConstrainedOutcome | None, speculative: state.RunRecord) -> None:
    """Validity, the naive-vs-exact comparison, and acceptance with and without the constraint."""
    if outcome is None:
        return
    what = WHAT[outcome.kind]
    message = _validity(what, outcome.valid, outcome.incomplete, outcome.first_invalid)
    (st.success if outcome.valid else st.warning)(message, icon=":material/rule:")
    if outcome.num_cut_tokens:
        st.caption(f"The grammar cut {outcome.num_cut_tokens} proposed tokens before verification "
                   "(shown dashed); they cost no target work.")
    # The token view interleaves struck-through and dashed tokens with the output: the committed text alone reads
    # as what the user receives.
    committed_text(speculative, outcome.kind, "The committed text alone (what the user receives)")
    if outcome.exact is not None:
        _show_naive_vs_exact(outcome, speculative, what)
    if outcome.free is not None:
        _show_acceptance(outcome, speculative, what)


def committed_text(record: state.RunRecord, kind: str, label: str) -> None:
    """A run's committed text, without the rejected or cut tokens the token view shows (JSON highlighted)."""
    st.markdown(f"**{label}**")
    st.code(record.text or " ", language="json" if kind in ("json_schema", "any_json") else None, wrap_lines=True)


def _show_naive_vs_exact(outcome: state.ConstrainedOutcome, naive: state.RunRecord, what: str) -> None:
    st.markdown("**Naive (broken) vs exact speculation under the grammar**")
    notes = []
    if outcome.first_invalid is not None:
        notes.append(f"the naive output becomes invalid at token {outcome.first_invalid + 1}: the grammar forbids it")
    if outcome.first_difference is not None:
        notes.append(f"it first differs from the correct (exact) run at token {outcome.first_difference + 1}")
    if notes:
        st.error("Naive speculation broke the output: " + "; ".join(notes) + ". The matcher was advanced over "
                 "drafted tokens the target then rejected and never rolled back, and drafted positions were "
                 "verified without the mask.", icon=":material/heart_broken:")
    else:
        st.info("This time the naive output happens to equal the correct run: it is still the wrong method. "
                "Try a draft model, a larger K or another prompt.")
    naive_marks: dict[int, str] = {}
    if outcome.first_difference is not None:
        naive_marks[outcome.first_difference] = "first difference from the exact run"
    if outcome.first_invalid is not None:
        note = "the grammar forbids this token"
        naive_marks[outcome.first_invalid] = " · ".join(filter(None, (naive_marks.get(outcome.first_invalid), note)))
    exact_marks = {} if outcome.first_difference is None else {outcome.first_difference: "the naive output differs here"}
    left, right = st.columns(2)
    with left:
        st.markdown(f"**{naive.label}** · {_validity(what, outcome.valid, outcome.incomplete, outcome.first_invalid)}")
        st.html(render.tokens_html(naive.pieces, marks=naive_marks))
        committed_text(naive, outcome.kind, "Its committed text")
    with right:
        st.markdown(f"**{outcome.exact.label}** · {_validity(what, outcome.exact_valid)}")
        st.html(render.tokens_html(outcome.exact.pieces, marks=exact_marks))
        committed_text(outcome.exact, outcome.kind, "Its committed text")


def _show_acceptance(outcome: state.ConstrainedOutcome, speculative: state.RunRecord, what: str) -> None:
    st.markdown("**What the constraint does to acceptance**")
    with_it, without = speculative.stats, outcome.free.stats
    cards = st.columns(4)
    cards[0].metric("Acceptance rate with the constraint", render.format_rate(with_it.acceptance_rate))
    cards[1].metric("Acceptance rate without it", render.format_rate(without.acceptance_rate))
    cards[2].metric("Mean acceptance length with", render.format_number(with_it.mean_acceptance_length))
    cards[3].metric("Mean acceptance length without", render.format_number(without.mean_acceptance_length))
    with st.expander(f"Output without the constraint · {_validity(what, outcome.free_valid)}"):
        st.html(render.tokens_html(outcome.free.pieces))
