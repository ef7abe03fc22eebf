"""Per-session state of the app: widget values that survive page switches, and finished runs.

Widget keys start with ``WIDGET_PREFIX``. Streamlit forgets a widget's value
when a run does not draw it (another page is open); ``keep_widget_values``,
called by ``main.py`` on every run, re-assigns those keys so the user's inputs
survive page switches. Defaults go in through ``set_defaults`` (never through a
widget's ``value=``), so a widget never has two sources of truth.

A finished decode is a ``RunRecord``, built by ``collect_run`` from the same
trace events that metrics count. Records hold no model and no cache, only
tokens, text, steps and stats, so they are cheap to keep in ``st.session_state``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.render import TokenPiece, step_pieces
from lab.metrics import SpecDecodingStats
from lab.studies.precision import MemoryUse, Parting
from lab.trace import Finished, Prefilled, Step, TraceEvent

WIDGET_PREFIX = "w:"


def widget_key(name: str) -> str:
    """The session-state key of a widget whose value should outlive page switches."""
    return WIDGET_PREFIX + name


def keep_widget_values(session: MutableMapping[str, Any]) -> None:
    """Re-assign every widget value under ``WIDGET_PREFIX`` so Streamlit keeps it while its page is not shown."""
    for key in list(session.keys()):
        if isinstance(key, str) and key.startswith(WIDGET_PREFIX):
            session[key] = session[key]


def set_defaults(session: MutableMapping[str, Any], defaults: dict[str, Any]) -> None:
    """Give each widget key its default value unless the session already has one."""
    for name, value in defaults.items():
        if widget_key(name) not in session:
            session[widget_key(name)] = value


SAME_AS_TARGET = "same as target"


@dataclass(frozen=True)
class Runtime:
    """Where models run and in what precision, as the sidebar chose them, resolved.

    device: "cpu" or "cuda".
    dtype: the target's precision, one of ``lab.hardware.PRECISIONS`` ("bf16",
        "fp32", "fp16", "int8", "nf4", "fp4"); pages that load every model alike use it.
    draft_dtype: the draft model's precision; None: the same as the target's.
    engine: how passes run (``lab.kv``): "eager", "static" or "compiled" ("auto" resolved for the device).
    engine_choice: the sidebar's choice as made ("auto" kept), for a decode config: the loop resolves
        "auto" per run, e.g. to eager for a token tree, which no captured pass can take.
    """

    device: str
    dtype: str
    draft_dtype: str | None = None
    engine: str = "eager"
    engine_choice: str = "auto"

    @property
    def target_precision(self) -> str:
        return self.dtype

    @property
    def draft_precision(self) -> str:
        return self.draft_dtype or self.dtype

    def precision(self, role: str) -> str:
        """The precision of the "target" or the "draft"."""
        return self.draft_precision if role == "draft" else self.target_precision


def runtime(session: MutableMapping[str, Any]) -> Runtime:
    """The sidebar's device and precisions ("auto" resolved).

    Raises ValueError (CUDA asked for and none present, a dtype the device
    lacks) or ``lab.models.ModelError`` (int8/nf4/fp4 without bitsandbytes).
    """
    from lab.hardware import resolve_device, resolve_precision
    from lab.kv import resolve_engine_mode

    device = resolve_device(session.get(widget_key("device"), "auto"))
    target = resolve_precision(session.get(widget_key("dtype"), "auto"), device)
    draft = session.get(widget_key("draft_dtype"), SAME_AS_TARGET)
    choice = session.get(widget_key("engine"), "auto")
    engine = resolve_engine_mode(choice, device)
    return Runtime(str(device), target, None if draft == SAME_AS_TARGET else resolve_precision(draft, device), engine,
                   choice)


@dataclass
class RunRecord:
    """One finished decode, as the page shows it.

    label: what ran, e.g. "prompt-lookup, K=4" or "target alone".
    pieces: the coloured tokens (``app.render.TokenPiece``), rejected ones included.
    steps: the trace's ``Step`` events; stats: counters fed with every event.
    token_ids, text, reason, wall_s: from the ``Finished`` event.
    """

    label: str
    prompt_ids: list[int]
    pieces: list[TokenPiece] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    stats: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reason: str = ""
    wall_s: float = 0.0
    prefill_ms: float = 0.0


def collect_run(
    label: str,
    events: Iterable[TraceEvent],
    tokenizer,
    prompt_ids: Sequence[int],
    on_step: Callable[[RunRecord], None] | None = None,
) -> RunRecord:
    """Consume a decode's events into a ``RunRecord``, calling ``on_step(record)`` after each ``Step``.

    ``on_step`` sees the record so far (pieces and stats up to that step): the
    page redraws its token stream there, which is what makes it live.

    Raises RuntimeError if the events end without ``Finished``.
    """
    record = RunRecord(label=label, prompt_ids=[int(i) for i in prompt_ids])
    committed = list(record.prompt_ids)
    for event in events:
        record.stats.observe(event)
        if isinstance(event, Prefilled):
            record.prefill_ms = event.prefill_ms
        elif isinstance(event, Step):
            record.pieces += step_pieces(event, committed, tokenizer)
            record.steps.append(event)
            committed += event.emitted
            if on_step is not None:
                on_step(record)
        elif isinstance(event, Finished):
            record.token_ids = list(event.token_ids)
            record.text = event.text
            record.reason = event.reason
            record.wall_s = event.wall_s
            return record
    raise RuntimeError("the decode ended without a Finished event")


@dataclass
class ConstrainedOutcome:
    """What a run under a constraint (``lab.grammar``) adds to the Live page.

    kind: the constraint's kind ("json_schema", "regex", "any_json").
    naive: the speculative run used the naive (broken) grammar handling.
    valid: its output satisfies the constraint (``Constraint.is_valid``).
    first_invalid: index of its first token a fresh matcher refuses (None: every token allowed).
    incomplete: it stopped at the token budget with every token allowed but the grammar unfinished.
    num_cut_tokens: proposed tokens the grammar dropped before verification.
    exact, exact_valid, first_difference: naive mode only: the same drafter under the exact
        handling (the correct run), its validity, and where the naive output first differs from it.
    free, free_valid: on request: the same drafter without the constraint, and whether its output
        happens to satisfy the constraint anyway.
    """

    kind: str
    naive: bool
    valid: bool
    first_invalid: int | None
    incomplete: bool
    num_cut_tokens: int = 0
    exact: RunRecord | None = None
    exact_valid: bool | None = None
    first_difference: int | None = None
    free: RunRecord | None = None
    free_valid: bool | None = None


@dataclass
class ReferenceRun:
    """The target alone in a reference precision (e.g. bf16), run beside a target loaded in another (e.g. nf4).

    record: the reference run. precision: its precision. target_precision: the
    precision of the target as loaded. compared_label: which run of that target
    it is held against ("target alone", or the speculative run's label).
    parting: where the two outputs part (``lab.studies.precision.Parting``), None when identical.
    """

    record: RunRecord
    precision: str
    target_precision: str
    compared_label: str
    parting: Parting | None


@dataclass
class LiveResult:
    """What the Live page shows after a run: the speculative run, optionally the target alone, the settings
    it ran with, the rows of its steps table (``app.render.steps_rows``), under a constraint its outcome, the
    target in a reference precision when asked for, and the memory of the run's models (``lab.studies.precision.MemoryUse``)."""

    speculative: RunRecord
    baseline: RunRecord | None
    greedy: bool
    settings: dict[str, Any]
    step_rows: list[dict] = field(default_factory=list)
    constrained: ConstrainedOutcome | None = None
    reference: ReferenceRun | None = None
    memory: list[MemoryUse] = field(default_factory=list)
    timing: dict | None = None  # the interleaved pairs' tokens/s (app_pages/live.py's paired_timing); None: one pair

    @property
    def speculative_tokens_per_s(self) -> float:
        """The speculative arm's tokens/s: pooled over its interleaved runs when there were two, else its one run."""
        if self.timing is not None:
            return self.timing["speculative_pooled_tokens_per_s"]
        return self.speculative.stats.tokens_per_s

    @property
    def baseline_tokens_per_s(self) -> float | None:
        """The target alone's tokens/s, pooled the same way (None without a baseline)."""
        if self.baseline is None:
            return None
        if self.timing is not None:
            return self.timing["baseline_pooled_tokens_per_s"]
        return self.baseline.stats.tokens_per_s

    @property
    def speedup(self) -> float | None:
        """Speculative tokens/s over the target alone's, each pooled over its interleaved runs (None without a baseline)."""
        base = self.baseline_tokens_per_s
        if base is None:
            return None
        return self.speculative_tokens_per_s / base if base and base == base else None
