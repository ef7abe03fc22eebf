"""The Step-through page's HTML: one draft-verify cycle as cards, per position, with the reason for each decision.

Pure functions, no streamlit. Inputs are ``lab.trace.Step`` events with their
``PositionDetail`` rows (the target's and draft's top tokens at each position).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from app.render import count
from lab.display import token_text
from lab.trace import PositionDetail, Step


STEP_CSS = """
.sd-cycle { display: flex; flex-wrap: wrap; gap: 0.7rem; margin: 0.3rem 0 0.8rem 0; }
.sd-card { width: 12.2rem; border: 1px solid rgba(128,128,128,0.35); border-top: 5px solid #8a8f98;
  border-radius: 0.5rem; padding: 0.5rem 0.65rem; font-size: 0.86rem; line-height: 1.35; }
.sd-card.sd-accepted { border-top-color: #2e9d5b; }
.sd-card.sd-rejected { border-top-color: #d0473f; }
.sd-card.sd-unchecked { border-top-color: #c9ccd1; opacity: 0.55; }
.sd-card.sd-not-emitted { border-top-color: #2e9d5b; opacity: 0.55; }
.sd-card.sd-corrected { border-top-color: #e0912f; }
.sd-card.sd-bonus { border-top-color: #3a78c9; }
.sd-card.sd-target { border-top-color: #8a8f98; }
.sd-head { display: flex; justify-content: space-between; opacity: 0.75; font-size: 0.78rem; }
.sd-token { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 1.05rem;
  margin: 0.25rem 0; white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.sd-token code, .sd-top code { background: rgba(128,128,128,0.13); border-radius: 3px; padding: 0 3px; }
.sd-probs { margin-bottom: 0.3rem; }
/* fixed layout: a long token is cut with an ellipsis, and a bar never leaves its cell (nor the card) */
.sd-top { width: 100%; table-layout: fixed; border-collapse: collapse; margin: 0.2rem 0 0.35rem 0; font-size: 0.8rem; }
.sd-top td { padding: 1px 2px; border: none; white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.sd-top td.sd-p { text-align: right; width: 2.7rem; }
.sd-top td.sd-bar { width: 3rem; padding-left: 4px; }
.sd-top td.sd-bar span { display: inline-block; max-width: 100%; height: 0.55rem; background: #3a78c9; opacity: 0.55;
  border-radius: 2px; }
.sd-top tr.sd-drafted td { font-weight: 700; }
.sd-decision { font-weight: 700; margin-top: 0.15rem; }
.sd-accepted .sd-decision, .sd-not-emitted .sd-decision { color: #2e9d5b; }
.sd-rejected .sd-decision { color: #d0473f; }
.sd-reason { font-size: 0.8rem; opacity: 0.85; }
"""


SPACE_MARK = "␣"


def visible_token(text: str) -> str:
    """Token text with spaces, newlines and tabs made visible (not escaped): "\nThe" -> "↵The"."""
    if text == "":
        return "∅"
    return text.replace(" ", SPACE_MARK).replace("\n", "↵").replace("\t", "⇥")


def shown_token(text: str) -> str:
    """Token text for a card, escaped, with spaces, newlines and tabs made visible."""
    return visible_token(html.escape(text)) if text else visible_token(text)


def cut_words(step: Step, eos_token_ids: Sequence[int] = ()) -> str:
    """What cut a step's output short, in words: "end of text" when it ends with an EOS, else the budget."""
    if not eos_token_ids:
        return "end of text or token budget"
    return "end of text" if step.emitted and step.emitted[-1] in eos_token_ids else "token budget"


def num_emitted_accepted(step: Step) -> int:
    """Accepted drafted tokens that made it into the output: fewer than num_accepted when an EOS or the budget
    cut the step inside its accepted draft (the rest were verified, and count as accepted, but are not emitted)."""
    return min(step.num_accepted, len(step.emitted))


def decision_reason(detail: PositionDetail, greedy: bool, draft_text: str, argmax_text: str) -> str:
    """Why the target kept or refused one drafted token, in words and numbers.

    greedy: accepted iff the drafted token is the target's most likely one.
    sampling: accepted iff the uniform draw u < min(1, target prob / draft prob)
    (a deterministic drafter has draft prob 1).
    """
    draft_text, argmax_text = visible_token(draft_text), visible_token(argmax_text)
    if greedy:
        if detail.accepted:
            return f"The target's most likely token is “{argmax_text}”, the drafted one: accepted."
        return (f"The target's most likely token is “{argmax_text}”, not the drafted “{draft_text}”: rejected; "
                f"the target's “{argmax_text}” replaces it.")
    draft_prob = 1.0 if detail.draft_prob is None else detail.draft_prob
    source = " (a deterministic drafter: draft prob 1)" if detail.draft_prob is None else ""
    ratio = detail.target_prob / draft_prob if draft_prob > 0 else math.inf
    uniform = detail.uniform if detail.uniform is not None else math.nan
    relation = "<" if detail.accepted else "≥"
    verdict = "accepted" if detail.accepted else "rejected"
    return (f"Target/draft = {detail.target_prob:.3f} / {draft_prob:.3f}{source} = {ratio:.2f}, so accept with "
            f"probability {detail.acceptance_prob:.2f}; uniform draw u = {uniform:.3f} {relation} "
            f"{detail.acceptance_prob:.2f}: {verdict}.")


def final_token_note(step: Step, greedy: bool, eos_token_ids: Sequence[int] = ()) -> str:
    """How the target's own token of a step came about."""
    if step.final_token is None:
        return f"The step was cut before the target's own token ({cut_words(step, eos_token_ids)})."
    if step.final_kind == "target":
        return "No draft this step (the drafter had nothing to propose): the target produced this token alone."
    if step.final_kind == "bonus":
        how = "its most likely token" if greedy else "a sample from its distribution"
        return (f"All {len(step.drafted)} drafted tokens were accepted. The same target pass also gave the distribution "
                f"after the last one, so this token is free: {how} there.")
    if greedy:
        return "The target's most likely token at the first rejected position replaces the drafted one."
    return ("Sampled from the residual norm(max(0, target − draft)) at the first rejected position: what the target "
            "wants there beyond what the draft already proposed. This keeps the output distributed as the target's.")


def _top_table(detail: PositionDetail, tokenizer, context: Sequence[int]) -> str:
    rows = []
    for token, prob in detail.target_top:
        marker = ' class="sd-drafted"' if token == detail.draft_token else ""
        width_pct = max(1.0, 100 * prob)  # of the bar's cell, so a probability near 1 still fits the card
        rows.append(f"<tr{marker}><td><code>{shown_token(token_text(tokenizer, context, token))}</code></td>"
                    f'<td class="sd-p">{prob:.3f}</td>'
                    f'<td class="sd-bar"><span style="width:{width_pct:.0f}%"></span></td></tr>')
    return f'<table class="sd-top">{"".join(rows)}</table>'


def step_cards_html(step: Step, tokenizer, context_ids: Sequence[int], greedy: bool,
                    eos_token_ids: Sequence[int] = ()) -> str:
    """One card per drafted position (checked ones with probabilities and the decision), then the target's own token.

    context_ids: the committed tokens before this step (the last few suffice).
    eos_token_ids: the target's EOS tokens, to say what cut a step short.
    Needs ``step.details`` (a run with ``DecodeConfig(record_details=True)``). Accepted tokens after an EOS (or the
    budget) inside the draft are shown as verified, not emitted: ``lab.metrics`` counts them as accepted, like vLLM.
    """
    context = [int(i) for i in context_ids]
    emitted_accepted = num_emitted_accepted(step)
    cards = []
    for i, token in enumerate(step.drafted):
        here = context + list(step.drafted[:i])
        text = token_text(tokenizer, here, token)
        if i < len(step.details):
            detail = step.details[i]
            kind = "accepted" if detail.accepted else "rejected"
            decision = "✓ accepted" if detail.accepted else "✗ rejected"
            reason = decision_reason(detail, greedy, text, token_text(tokenizer, here, detail.target_top[0][0]
                                                                      if detail.target_top else token))
            if detail.accepted and i >= emitted_accepted:
                cut = cut_words(step, eos_token_ids)
                kind, decision = "not-emitted", f"✓ verified, not emitted (after {cut})"
                reason += (f" It comes after the {cut}, so it is not part of the output; the lab still counts it as "
                           "accepted, as vLLM does.")
            draft_prob = "— (deterministic)" if detail.draft_prob is None else f"{detail.draft_prob:.3f}"
            body = (f'<div class="sd-probs">draft prob {draft_prob} · target prob {detail.target_prob:.3f}</div>'
                    f"<div>target's top {len(detail.target_top)}:</div>{_top_table(detail, tokenizer, here)}"
                    f'<div class="sd-decision">{html.escape(decision)}</div>'
                    f'<div class="sd-reason">{html.escape(reason)}</div>')
        else:
            kind = "unchecked"
            body = ('<div class="sd-decision">not checked</div>'
                    '<div class="sd-reason">Discarded: it follows a rejected token, so the target never judged it.</div>')
        label = "not emitted" if kind == "not-emitted" else kind
        cards.append(f'<div class="sd-card sd-{kind}"><div class="sd-head"><span>draft position {i + 1}</span>'
                     f'<span>{label}</span></div><div class="sd-token"><code>{shown_token(text)}</code></div>{body}</div>')
    final = step.final_token
    kind = step.final_kind if final is not None else "unchecked"
    position = step.num_accepted + 1
    final_context = context + list(step.emitted[:-1]) if final is not None else context
    final_text = shown_token(token_text(tokenizer, final_context, final)) if final is not None else "—"
    cards.append(f'<div class="sd-card sd-{kind}"><div class="sd-head"><span>position {position}: the target\'s own token</span>'
                 f'<span>{kind}</span></div><div class="sd-token"><code>{final_text}</code></div>'
                 f'<div class="sd-reason">{html.escape(final_token_note(step, greedy, eos_token_ids))}</div></div>')
    return f'<div class="sd-cycle">{"".join(cards)}</div>'


def step_headline(step: Step, eos_token_ids: Sequence[int] = ()) -> str:
    """One line about a step: drafted, accepted (and how many of those were emitted), and the target's own token."""
    if not step.drafted:
        return f"Step {step.index + 1}: no draft; the target produced {count(len(step.emitted), 'token')} itself."
    accepted = f"accepted {step.num_accepted}"
    emitted_accepted = num_emitted_accepted(step)
    if emitted_accepted < step.num_accepted:
        accepted += (f" ({emitted_accepted} emitted, {step.num_accepted - emitted_accepted} verified after the "
                     f"{cut_words(step, eos_token_ids)})")
    if step.final_token is None:
        final = f"cut at the {cut_words(step, eos_token_ids)}"
    else:
        final = {"bonus": "plus a bonus token", "corrected": "then a corrected token",
                 "target": "then the target's token"}[step.final_kind]
    return (f"Step {step.index + 1}: drafted {len(step.drafted)}, {accepted}, {final}: "
            f"{count(len(step.emitted), 'token')} in one target pass")


def cache_note(step: Step, committed_len: int) -> str:
    """The caches' lengths after rollback, and why they are what they are."""
    draft = ("" if step.draft_cache_len is None else
             f" The draft's cache holds {step.draft_cache_len} tokens; it is cropped to the committed prefix at its next proposal.")
    return (f"After rollback the target's KV cache holds {step.target_cache_len} tokens: all {committed_len} committed "
            f"tokens (prompt and output) but the last, which is the first input of the next verify pass. "
            f"The K/V of rejected draft tokens were cropped away.{draft}")
