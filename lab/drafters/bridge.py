"""A draft model with another vocabulary than the target's, bridged through text or (the trap) through raw ids.

``vocab_bridge`` names how a draft's tokens reach the target:

- "none": they do not; ``make_drafter`` refuses a draft whose tokenizer is not
  the target's (``lab.models.check_same_tokenizer``).
- "text": Universal Assisted Decoding (transformers' ``assistant_tokenizer``;
  Timor et al., ICML 2025, "Accelerating LLM inference with lossless
  speculative decoding algorithms for heterogeneous vocabularies"). Each step:
    1. the committed text (the target's tokens, decoded) is re-encoded with the
       draft's tokenizer, and the draft drafts in its own tokens;
    2. the draft's tokens are decoded to text; a special token of the draft's
       (its EOS, a chat marker) ends the draft there;
    3. the text is re-encoded with the target's tokenizer together with a window
       of committed text, and only the target tokens after the committed prefix
       are proposed. If the window does not re-encode to the committed tokens
       themselves (the draft's text would merge with the last committed token),
       the draft's text is encoded on its own instead, so a proposal never
       re-tokenizes what is committed. A last target token that more draft text
       would change (a word or a character cut mid-way) is dropped: only the
       target tokens that the draft text without its last token also gives are kept;
    4. the target verifies its own tokens, so greedy output stays token for
       token the target's.
  Sampling is refused (``check_bridge_sampling``): the lab checks the bridge's
  exactness for greedy decoding only.
- "ids": the draft's token ids go to the target as they are (ids beyond the
  target's vocabulary end the draft), as a misconfigured system would send
  them. The draft reads the committed text correctly; only its proposals are
  wrong, so the target rejects nearly every one: acceptance collapses and
  speculation runs slower than the target alone, with no error anywhere.

The drafter speaks the batched ``Drafter`` protocol over a draft-vocabulary
``Drafter`` (``DraftModelDrafter`` of the draft model: its passes stay batched),
translating each row's context and proposal. The tokenizer work of a step goes
into its draft time (so into the cost ratio c) and, on its own, into
``bridge_ms``; ``last_bridged`` keeps each row's last translation for display.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from lab.drafters.base import Draft, DraftContext, Drafter

VocabBridge = Literal["none", "ids", "text"]
VOCAB_BRIDGES: tuple[str, ...] = get_args(VocabBridge)
REPLACEMENT = "\ufffd"  # what a tokenizer decodes a cut UTF-8 character to
WINDOW_TOKENS = 8  # committed target tokens re-encoded with the draft text
DRAFT_LENGTH_FACTOR = 4  # a static draft cache holds this many draft tokens per target token (CJK, emoji)


def check_vocab_bridge(vocab_bridge: str) -> None:
    """Raise ValueError unless vocab_bridge is one of VOCAB_BRIDGES."""
    if vocab_bridge not in VOCAB_BRIDGES:
        raise ValueError(f"vocab_bridge requires one of {', '.join(VOCAB_BRIDGES)}; got {vocab_bridge!r}")


def check_bridge_sampling(vocab_bridge: str, temperature: float) -> None:
    """Raise ValueError for a bridge under sampling (temperature > 0): the lab's bridge is checked for greedy only."""
    check_vocab_bridge(vocab_bridge)
    if vocab_bridge == "text" and temperature > 0:
        raise ValueError("the text bridge is exact for greedy decoding only: set temperature 0, "
                         f"or use a same-vocabulary draft; got temperature {temperature:g}")
    if vocab_bridge == "ids" and temperature > 0:
        raise ValueError("the ids trap is shown for greedy decoding only: set temperature 0; "
                         f"got temperature {temperature:g}")


@dataclass(frozen=True)
class BridgedDraft:
    """One row's translation at one step, for display.

    draft_tokens: what the draft drafted, in its own vocabulary (cut after a special token).
    draft_pieces: their texts, one per draft token.
    text: the draft's text (what the target tokens are made from; "ids": unused).
    target_tokens: what was proposed to the target, in the target's vocabulary.
    target_pieces: their texts under the target's tokenizer.
    note: why the proposal ended where it did, in words ("" when it took all it could).
    """

    draft_tokens: tuple[int, ...]
    draft_pieces: tuple[str, ...]
    text: str
    target_tokens: tuple[int, ...]
    target_pieces: tuple[str, ...]
    note: str = ""

    def rows(self, num_accepted: int | None = None) -> list[dict]:
        """One row per token, the draft's then the target's, for a table (the Step-through page, notebook 03).

        num_accepted: how many target tokens the target kept (None: not verified
        yet). Greedy: the first refused one is "rejected", those after it are "not checked".
        """
        rows = [{"vocabulary": "draft", "position": i + 1, "token id": token, "text": piece, "decision": ""}
                for i, (token, piece) in enumerate(zip(self.draft_tokens, self.draft_pieces))]
        for i, (token, piece) in enumerate(zip(self.target_tokens, self.target_pieces)):
            decision = "" if num_accepted is None else (
                "accepted" if i < num_accepted else "rejected" if i == num_accepted else "not checked")
            rows.append({"vocabulary": "target", "position": i + 1, "token id": token, "text": piece,
                         "decision": decision})
        return rows


class VocabBridgeDrafter:
    """A draft-vocabulary ``Drafter`` made to propose target tokens ("text": exactly; "ids": the trap).

    draft: a ``Drafter`` whose contexts and proposals are in the draft's vocabulary
        (``DraftModelDrafter(draft_model)``, or a test oracle through ``PerRowDrafter``).
    draft_tokenizer, target_tokenizer: the two tokenizers.
    mode: "text" or "ids".
    draft_stop_ids: draft ids that end a proposal (default the draft tokenizer's special tokens).
    """

    def __init__(self, draft: Drafter, draft_tokenizer, target_tokenizer, mode: str = "text",
                 draft_stop_ids: Sequence[int] = (), name: str | None = None) -> None:
        check_vocab_bridge(mode)
        if mode == "none":
            raise ValueError("VocabBridgeDrafter requires mode 'text' or 'ids'; got 'none' (use the draft directly)")
        self.draft = draft
        self.draft_tokenizer = draft_tokenizer
        self.target_tokenizer = target_tokenizer
        self.mode = mode
        self.name = name or f"draft-model ({mode} bridge)"
        self.draft_stop_ids = set(draft_stop_ids) | set(draft_tokenizer.all_special_ids)
        self.target_vocab_size = len(target_tokenizer)
        self.bridge_ms: list[float] = []  # per propose call: the tokenizer work of the whole batch
        self.reset(1)

    def reset(self, batch_size: int) -> None:
        self.draft.reset(batch_size)
        self._draft_prompts: list[tuple[int, list[int]] | None] = [None] * batch_size  # (P, the prompt in draft ids)
        self._drafted_chars: list[list[int]] = [[] for _ in range(batch_size)]  # per row: text length after each draft token
        self.last_bridged: list[BridgedDraft | None] = [None] * batch_size
        self.bridge_ms = []

    def propose(self, contexts: Sequence[DraftContext]) -> list[Draft]:
        t0 = time.perf_counter()
        for ctx in contexts:
            if ctx.k > 0 and not ctx.sampling.is_greedy:
                check_bridge_sampling(self.mode, ctx.sampling.temperature)
        # 1. the committed text, re-encoded in the draft's tokens
        inner = [self._draft_context(b, ctx) for b, ctx in enumerate(contexts)]
        t1 = time.perf_counter()
        drafted = self.draft.propose(inner)
        t2 = time.perf_counter()
        # 2.-3. the draft's tokens -> text -> the target's tokens
        proposals = []
        for b, (ctx, draft) in enumerate(zip(contexts, drafted)):
            bridged = self._to_target(b, ctx, draft.tokens.tolist()) if ctx.k > 0 else None
            self.last_bridged[b] = bridged
            tokens = torch.tensor(bridged.target_tokens if bridged else [], dtype=torch.long)
            proposals.append(Draft(tokens))  # no draft distribution over the target's vocabulary: verified as one-hot
        self.bridge_ms.append(((t1 - t0) + (time.perf_counter() - t2)) * 1e3)
        return proposals

    def observe(self, num_accepted: Sequence[int]) -> None:
        """The draft keeps the draft tokens whose text the accepted target tokens cover."""
        kept = []
        for b, n in enumerate(num_accepted):
            bridged = self.last_bridged[b]
            if bridged is None:
                kept.append(0)
            elif self.mode == "ids":
                kept.append(n)
            else:
                chars = len(self.target_tokenizer.decode(list(bridged.target_tokens[:n])).rstrip(REPLACEMENT))
                kept.append(sum(1 for end in self._drafted_chars[b] if end <= chars))
        self.draft.observe(kept)

    def drop(self, keep: Sequence[int]) -> None:
        self.draft.drop(keep)
        self._draft_prompts = [self._draft_prompts[i] for i in keep]
        self._drafted_chars = [self._drafted_chars[i] for i in keep]
        self.last_bridged = [self.last_bridged[i] for i in keep]

    def cache_lengths(self) -> list[int | None]:
        """Tokens each row's draft cache holds, in the draft's vocabulary."""
        lengths = getattr(self.draft, "cache_lengths", None)
        return lengths() if lengths is not None else [None] * len(self.last_bridged)

    # ------------------------------------------------------------ the translation

    def _draft_context(self, b: int, ctx: DraftContext) -> DraftContext:
        """Row b's context in draft tokens: the prompt's text re-encoded once, then the committed output's text
        (a character the target has only begun is left out: the draft writes it whole)."""
        num_prompt = ctx.num_prompt_tokens
        if self._draft_prompts[b] is None or self._draft_prompts[b][0] != num_prompt:
            prompt_text = self.target_tokenizer.decode(ctx.token_ids[:num_prompt].tolist())
            self._draft_prompts[b] = (num_prompt, self._encode_draft(prompt_text))
        prompt_ids = self._draft_prompts[b][1]
        output_text = self.target_tokenizer.decode(ctx.token_ids[num_prompt:].tolist()).rstrip(REPLACEMENT)
        ids = prompt_ids + (self._encode_draft(output_text) if output_text else [])
        k = ctx.k + 1 if self.mode == "text" and ctx.k > 0 else ctx.k  # one more: the last is the cut probe
        return replace(ctx, token_ids=torch.tensor(ids, dtype=torch.long), num_prompt_tokens=len(prompt_ids), k=k,
                       grammar=None, max_length=DRAFT_LENGTH_FACTOR * ctx.max_length + k + 1)

    def _to_target(self, b: int, ctx: DraftContext, draft_ids: list[int]) -> BridgedDraft:
        note = ""
        for i, token in enumerate(draft_ids):  # a special token of the draft's ends its proposal
            if token in self.draft_stop_ids:
                note = f"the draft emitted its special token {self.draft_tokenizer.convert_ids_to_tokens(token)!r}"
                draft_ids = draft_ids[: i + 1]
                break
        ends_special = bool(note)
        text_ids = draft_ids[:-1] if ends_special else draft_ids
        pieces = tuple(self.draft_tokenizer.decode([t]) for t in draft_ids)
        self._drafted_chars[b] = [len(self._decode_draft(text_ids[: i + 1])) for i in range(len(text_ids))]
        text = self._decode_draft(text_ids)
        if self.mode == "ids":
            target = []
            for token in draft_ids:
                if token >= self.target_vocab_size:
                    note = f"draft id {token} is beyond the target's vocabulary ({self.target_vocab_size:,})"
                    break
                target.append(token)
        else:
            target = self._target_tokens(ctx, text)
            if ends_special:
                special = self.draft_tokenizer.convert_ids_to_tokens(draft_ids[-1])
                special_id = self.target_tokenizer.get_added_vocab().get(special)
                if special_id is not None:  # the same marker exists in the target's vocabulary (e.g. <|im_end|>)
                    target.append(special_id)
            elif text_ids:  # keep only target tokens that one draft token less would give too: no cut word
                shorter = self._target_tokens(ctx, self._decode_draft(text_ids[:-1]))
                stable = 0
                while stable < min(len(target), len(shorter)) and target[stable] == shorter[stable]:
                    stable += 1
                if stable < len(target):
                    note = note or "the last target token might be cut mid-word: dropped"
                target = target[:stable]
        target = target[: ctx.k]
        return BridgedDraft(tuple(draft_ids), pieces, text, tuple(target),
                            tuple(self.target_tokenizer.decode([t]) for t in target), note)

    def _target_tokens(self, ctx: DraftContext, text: str) -> list[int]:
        """The target tokens that continue ctx's committed tokens with ``text``, never re-tokenizing them.

        A window of up to WINDOW_TOKENS committed output tokens is decoded and
        re-encoded with ``text``; when it gives back exactly the committed
        tokens, the rest is the proposal. Otherwise ``text`` is encoded alone
        (empty when the committed output ends inside a character: the window
        cannot continue it).
        """
        if not text:
            return []
        committed = ctx.token_ids.tolist()
        start = max(ctx.num_prompt_tokens, len(committed) - WINDOW_TOKENS)
        while start > ctx.num_prompt_tokens and self.target_tokenizer.decode(committed[start:]).startswith(REPLACEMENT):
            start -= 1  # the window must begin at a character's start
        window = committed[start:]
        window_text = self.target_tokenizer.decode(window)
        cut_character = window_text.endswith(REPLACEMENT)
        reencoded = self._encode_target(window_text.rstrip(REPLACEMENT) + text)
        if reencoded[: len(window)] == window:
            return reencoded[len(window):]
        return [] if cut_character else self._encode_target(text)

    def _encode_draft(self, text: str) -> list[int]:
        return self.draft_tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_target(self, text: str) -> list[int]:
        return self.target_tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode_draft(self, ids: list[int]) -> str:
        return self.draft_tokenizer.decode(ids).rstrip(REPLACEMENT) if ids else ""
