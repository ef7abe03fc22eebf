"""Trace events -> coloured token HTML, plotly figures and table rows. Pure functions, no streamlit.

Token classes (``lab.trace``): accepted, rejected, corrected, bonus, target, and
cut (constrained output). Each token becomes ``<span class="tok tok-<class>">``;
the colours live in ``assets/app.css``. A rejected draft token is shown struck
through where it was proposed, just before the target's corrected token that
replaced it; proposed tokens the grammar cut are shown, dashed, just before the
target's own token of their step.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from lab.display import CONTEXT_TOKENS, token_text
from lab.trace import Step

TOKEN_KINDS: tuple[str, ...] = ("accepted", "rejected", "corrected", "bonus", "target", "cut")
UNCOMMITTED_KINDS: frozenset[str] = frozenset({"rejected", "cut"})
"""Classes shown for teaching but never part of the output."""

KIND_LABELS: dict[str, str] = {
    "accepted": "accepted draft token",
    "rejected": "rejected draft token",
    "corrected": "corrected (the target's token after a rejection)",
    "bonus": "bonus (the target's extra token after a fully accepted draft)",
    "target": "target (no draft at that step)",
    "cut": "cut (proposed, but the grammar forbids it: dropped before verification)",
}

LEGEND_NOTES: dict[str, str] = {
    "accepted": "a drafted token the target kept",
    "rejected": "the drafted token the target refused",
    "corrected": "the target's own token in its place",
    "bonus": "the target's extra token after a fully accepted draft",
    "target": "the target's token at a step without a draft",
    "cut": "a proposed token the grammar forbids, dropped unverified (constrained output)",
}

KIND_COLOURS: dict[str, str] = {  # keep in step with assets/app.css
    "accepted": "#2e9d5b",
    "rejected": "#d0473f",
    "corrected": "#e0912f",
    "bonus": "#3a78c9",
    "target": "#8a8f98",
    "cut": "#8e5bb5",
}

# Two "acceptance rates" meet in the lab: say which one each number is, wherever either appears.
ACCEPTANCE_RATE_HELP = ("Accepted draft tokens / drafted tokens (vLLM's acceptance rate; — when nothing was drafted). "
                        "Not Leviathan's per-token a on the Theory page, which is fitted from the mean acceptance "
                        "length. With K tokens drafted every step, mean acceptance length = 1 + K × this rate.")
MEAN_LENGTH_HELP = ("1 + accepted / drafts: tokens committed per target pass on steps with a draft, the target's own "
                    "token included. Leviathan's model predicts (1 − a^(K+1)) / (1 − a) for a per-token a.")
PER_POSITION_WHY = ("Why the bars fall: a drafted token at position i is accepted only if every earlier position was "
                    "kept too (the first refusal ends the step), so position i's rate can never exceed position "
                    "i − 1's.")
NEWLINE_MARK = "↵"
TAB_MARK = "⇥"


@dataclass(frozen=True)
class TokenPiece:
    """One token as shown: its text, its class, the step that produced it and its id."""

    text: str
    kind: str
    step: int
    token_id: int
    special: bool = False

    @property
    def committed(self) -> bool:
        """Part of the output (not a rejected or cut proposal)."""
        return self.kind not in UNCOMMITTED_KINDS


def step_pieces(step: Step, context_ids: Sequence[int], tokenizer) -> list[TokenPiece]:
    """The pieces one ``Step`` adds, in reading order.

    context_ids: the committed tokens before this step (prompt then output; the
    last few suffice). Accepted draft tokens come first; a rejected draft token
    follows, struck through, only when the target's corrected token survived
    (not cut by EOS or the budget); then the proposed tokens the grammar cut
    (``Step.cut_by_grammar``, read after the whole draft), under the same
    condition; then the target's own token.
    """
    special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    context = [int(i) for i in context_ids[-CONTEXT_TOKENS:]]
    pieces: list[TokenPiece] = []

    def add(token_id: int, kind: str, commit: bool) -> None:
        pieces.append(TokenPiece(token_text(tokenizer, context, token_id), kind, step.index, int(token_id), token_id in special_ids))
        if commit:
            context.append(int(token_id))

    num_accepted_emitted = min(step.num_accepted, len(step.emitted))
    for token_id in step.emitted[:num_accepted_emitted]:
        add(token_id, "accepted", commit=True)
    final = step.final_token
    if final is not None:
        if step.final_kind == "corrected" and step.rejected:
            add(step.rejected[0], "rejected", commit=False)
        if step.cut_by_grammar:
            proposal = context + [int(t) for t in step.drafted[step.num_accepted :]]  # context of the cut tokens
            for i, token_id in enumerate(step.cut_by_grammar):
                pieces.append(TokenPiece(token_text(tokenizer, proposal + list(step.cut_by_grammar[:i]), token_id),
                                         "cut", step.index, int(token_id), token_id in special_ids))
        add(final, step.final_kind, commit=True)
    return pieces


def pieces_from_steps(steps: Iterable[Step], tokenizer, prompt_ids: Sequence[int] = ()) -> list[TokenPiece]:
    """All pieces of a run, step after step (see ``step_pieces``)."""
    committed = [int(i) for i in prompt_ids[-CONTEXT_TOKENS:]]
    pieces: list[TokenPiece] = []
    for step in steps:
        pieces += step_pieces(step, committed, tokenizer)
        committed = (committed + [int(i) for i in step.emitted])[-CONTEXT_TOKENS:]
    return pieces


def _visible(text: str) -> str:
    """Escaped token text with newlines and tabs marked (the newline itself is kept: the CSS wraps with pre-wrap)."""
    if text == "":
        return '<span class="ws">∅</span>'
    escaped = html.escape(text)
    escaped = escaped.replace("\n", f'<span class="ws">{NEWLINE_MARK}</span>\n')
    return escaped.replace("\t", f'<span class="ws">{TAB_MARK}</span>\t')


def piece_html(piece: TokenPiece, mark: str = "") -> str:
    """One ``<span class="tok tok-<kind>">`` with a tooltip naming the class, step and token id.

    mark: a note that flags this token (``tok-mark`` class, the note leads the tooltip).
    """
    classes = f"tok tok-{piece.kind}" + (" tok-special" if piece.special else "") + (" tok-mark" if mark else "")
    title = html.escape((f"{mark} · " if mark else "") + f"{KIND_LABELS[piece.kind]} · step {piece.step + 1} · "
                        f"token id {piece.token_id}", quote=True)
    return f'<span class="{classes}" title="{title}">{_visible(piece.text)}</span>'


def tokens_html(
    pieces: Iterable[TokenPiece],
    *,
    streaming: bool = False,
    marks: Mapping[int, str] | None = None,
    mark_at: int | None = None,
    mark: str = "marked",
) -> str:
    """The coloured token stream as one ``<div class="tok-stream">``; a blinking caret while streaming.

    marks: output-token index -> note; those tokens are flagged (``tok-mark``), e.g.
    where an output stops matching its grammar. Indices count committed tokens
    only, as in ``Finished.token_ids``. mark_at / mark: one such flag (shorthand).
    """
    marks = dict(marks or {})
    if mark_at is not None:
        marks.setdefault(mark_at, mark)
    body, position = [], 0
    for piece in pieces:
        body.append(piece_html(piece, marks.get(position, "") if piece.committed else ""))
        position += piece.committed
    body = "".join(body)
    caret = '<span class="tok-caret">▌</span>' if streaming else ""
    if not body and not streaming:
        body = '<span class="tok-empty">no tokens</span>'
    return f'<div class="tok-stream">{body}{caret}</div>'


def legend_html(kinds: Sequence[str] = TOKEN_KINDS) -> str:
    """A legend: one sample span per token class, followed by what it means."""
    items = "".join(
        f'<span class="legend-item"><span class="tok tok-{kind}">{kind}</span> {html.escape(LEGEND_NOTES[kind])}</span>'
        for kind in kinds
    )
    return f'<div class="tok-legend">{items}</div>'


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where two token sequences differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def count(n: int, one: str, many: str | None = None) -> str:
    """"1 token", "3 tokens": n and the noun in its number (``many`` defaults to ``one`` + "s")."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def format_rate(value: float | None) -> str:
    """A fraction as a percentage; "—" for NaN/None (nothing drafted)."""
    return "—" if value is None or math.isnan(value) else f"{100 * value:.0f} %"


def format_number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """A number with fixed digits; "—" for NaN/None."""
    return "—" if value is None or math.isnan(value) else f"{value:,.{digits}f}{suffix}"


def acceptance_figure(per_position_rate: Sequence[float], title: str = "Per-position acceptance") -> go.Figure:
    """Bar chart of the per-position acceptance rate (vLLM convention: accepted at i / drafts).

    x: draft position 1..K; y: rate in [0, 1]. With nothing drafted the chart
    says so instead of showing empty axes.
    """
    positions = list(range(1, len(per_position_rate) + 1))
    figure = go.Figure(
        go.Bar(
            x=positions,
            y=list(per_position_rate),
            marker_color=KIND_COLOURS["accepted"],
            text=[format_rate(rate) for rate in per_position_rate],
            textposition="outside",
            hovertemplate="position %{x}: %{y:.0%} of drafts accepted here<extra></extra>",
        )
    )
    figure.update_layout(
        title=title,
        xaxis=dict(title="draft position", tickmode="linear", dtick=1),
        yaxis=dict(title="acceptance rate", range=[0, 1.1], tickformat=".0%"),
        height=300,
        margin=dict(l=10, r=10, t=40, b=10),
        showlegend=False,
    )
    if not positions:
        figure.add_annotation(text="nothing was drafted", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return figure


def steps_rows(steps: Iterable[Step], tokenizer, prompt_ids: Sequence[int] = ()) -> list[dict]:
    """One row per step for a table: drafted text, accepted count, emitted text, the final token's class, timings;
    plus the tokens the grammar cut, when any step had some (constrained output)."""
    steps = list(steps)
    with_cut = any(step.cut_by_grammar for step in steps)  # the column only appears in constrained runs
    rows = []
    committed = [int(i) for i in prompt_ids[-CONTEXT_TOKENS:]]
    for step in steps:
        drafted = "".join(token_text(tokenizer, committed + list(step.drafted[:i]), t) for i, t in enumerate(step.drafted))
        pieces = step_pieces(step, committed, tokenizer)
        emitted = "".join(piece.text for piece in pieces if piece.committed)
        row = {
            "step": step.index + 1,
            "drafted": drafted,
            "accepted": f"{step.num_accepted}/{len(step.drafted)}" if step.drafted else "—",
            "emitted": emitted,
            "final token": step.final_kind if step.final_token is not None else "cut",
            "draft ms": round(step.draft_ms, 1),
            "verify ms": round(step.verify_ms, 1),
        }
        if with_cut:
            row["cut by grammar"] = "".join(piece.text for piece in pieces if piece.kind == "cut")
        rows.append(row)
        committed = (committed + [int(i) for i in step.emitted])[-CONTEXT_TOKENS:]
    return rows


# ---------------------------------------------------------------- figures shared by the pages


DRAFTER_PALETTE = ("#3a78c9", "#e0912f", "#2e9d5b", "#9b59b6", "#d0473f", "#17a2b8", "#8c564b", "#e377c2")


FIGURE_MARGIN = dict(l=10, r=10, t=50, b=10)


def drafter_colours(drafters: Sequence[str]) -> dict[str, str]:
    """One colour per drafter label, stable in the order given."""
    return {name: DRAFTER_PALETTE[i % len(DRAFTER_PALETTE)] for i, name in enumerate(dict.fromkeys(drafters))}


def figure_note(figure: go.Figure, text: str) -> None:
    """Write ``text`` in the middle of an empty figure (nothing to plot yet)."""
    figure.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
