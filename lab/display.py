"""Coloured tokens for notebooks: trace steps -> HTML with inline styles. Pure functions, no streamlit.

Token classes (``lab.trace``): accepted, rejected, corrected, bonus, target. A
rejected draft token is shown struck through where it was proposed, just before
the target's corrected token that replaced it. The styles are inline, so the
HTML shows the same in Jupyter, VS Code and an exported page.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lab.trace import Step

TOKEN_KINDS: tuple[str, ...] = ("accepted", "rejected", "corrected", "bonus", "target")

KIND_COLOURS: dict[str, str] = {  # the app's colours (assets/app.css)
    "accepted": "#2e9d5b",
    "rejected": "#d0473f",
    "corrected": "#e0912f",
    "bonus": "#3a78c9",
    "target": "#8a8f98",
}

KIND_NOTES: dict[str, str] = {
    "accepted": "a drafted token the target kept",
    "rejected": "the drafted token the target refused",
    "corrected": "the target's own token in its place",
    "bonus": "the target's extra token after a fully accepted draft",
    "target": "the target's token at a step without a draft",
}

CONTEXT_TOKENS = 4
"""Committed tokens decoded before a token to get its text: enough for a split UTF-8 character
(up to 4 bytes) and for tokenizers that drop a leading space at the start of a decode."""


@dataclass(frozen=True)
class ShownToken:
    """One token as shown: its text, its class, the step that produced it and its id."""

    text: str
    kind: str
    step: int
    token_id: int


def token_text(tokenizer, context_ids: Sequence[int], token_id: int) -> str:
    """The text ``token_id`` adds after ``context_ids`` (only the last ``CONTEXT_TOKENS`` are read).

    Decoding in context keeps leading spaces and joins multi-byte characters
    split across tokens: the token that completes a character gets it, a token
    holding only part of one shows as U+FFFD. Special tokens keep their text
    (e.g. ``<|im_end|>``). The app and the notebooks both show tokens through this.
    """
    context = [int(i) for i in context_ids[-CONTEXT_TOKENS:]]
    before = tokenizer.decode(context, skip_special_tokens=False) if context else ""
    after = tokenizer.decode(context + [int(token_id)], skip_special_tokens=False)
    if after.startswith(before):
        return after[len(before) :]
    stripped = before.rstrip("\ufffd")  # the context ended inside a character this token completes
    if after.startswith(stripped):
        return after[len(stripped) :]
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


def shown_tokens(steps: Iterable[Step], tokenizer, prompt_ids: Sequence[int] = ()) -> list[ShownToken]:
    """Every token of a run in reading order, rejected draft tokens included (see the module docstring)."""
    committed = [int(i) for i in prompt_ids[-CONTEXT_TOKENS:]]
    shown: list[ShownToken] = []
    for step in steps:
        num_accepted = min(step.num_accepted, len(step.emitted))
        for token in step.emitted[:num_accepted]:
            shown.append(ShownToken(token_text(tokenizer, committed, token), "accepted", step.index, token))
            committed.append(token)
        final = step.final_token
        if final is not None:
            if step.final_kind == "corrected" and step.rejected:
                rejected = step.rejected[0]
                shown.append(ShownToken(token_text(tokenizer, committed, rejected), "rejected", step.index, rejected))
            shown.append(ShownToken(token_text(tokenizer, committed, final), step.final_kind, step.index, final))
            committed.append(final)
        committed = committed[-CONTEXT_TOKENS:]
    return shown


def tokens_html(tokens: Iterable[ShownToken]) -> str:
    """An HTML block of coloured tokens; hovering one shows its class, step and id."""
    spans = []
    for token in tokens:
        colour = KIND_COLOURS[token.kind]
        text = html.escape(token.text).replace("\n", "↵<br>") or "&#8203;"
        style = f"background:{colour}2e;border-bottom:2px solid {colour};border-radius:3px;padding:0 1px"
        if token.kind == "rejected":
            style += f";color:{colour};text-decoration:line-through"
        title = f"{token.kind}, step {token.step}, id {token.token_id}"
        spans.append(f'<span title="{title}" style="{style}">{text}</span>')
    body = "".join(spans)
    return f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.9">{body}</div>'


def legend_html(kinds: Sequence[str] = TOKEN_KINDS) -> str:
    """A one-line key of the token classes."""
    items = [
        f'<span style="background:{KIND_COLOURS[k]}2e;border-bottom:2px solid {KIND_COLOURS[k]};padding:0 4px">{k}</span>'
        f" {html.escape(KIND_NOTES[k])}"
        for k in kinds
    ]
    return '<div style="font-size:90%;margin:4px 0">' + " &nbsp; ".join(items) + "</div>"
