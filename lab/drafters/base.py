"""The drafter protocol: propose up to K new tokens, learn from how many matched.

A drafter proposes only the new tokens, never prompt + draft, and says "no draft"
with an empty proposal. Model drafters return the per-token distributions they
drew from; deterministic drafters (prompt lookup) return none, which verification
treats as one-hot. Inputs travel in one ``DraftContext``: a new drafter's needs
add a field there, not a keyword everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from lab.sampling import SamplingParams, logits_to_probs, sample

if TYPE_CHECKING:
    from lab.grammar import GrammarState


@dataclass(frozen=True)
class DraftContext:
    """What a drafter sees at one step.

    token_ids: [T] int64 on CPU, every committed token (prompt then output).
    num_prompt_tokens: how many of token_ids are the prompt.
    k: how many tokens to propose at most this step (>= 1).
    sampling: the run's sampling parameters (drafts use the same processing).
    generator: random source on the drafter's device, or None.
    grammar: the constrained-output matcher at the committed prefix, or None.
        A drafter may advance it while drafting but must roll it back to where
        it found it before returning.
    engine_mode, compile_backend: how a model drafter runs its passes
        (``lab.runner``: "eager", "static" or "compiled"; the engine resolves "auto").
    max_length: the most tokens a model drafter's cache must hold for this
        sequence (prompt + budget + K + 1), to size a static cache.
    """

    token_ids: torch.Tensor
    num_prompt_tokens: int
    k: int
    sampling: SamplingParams
    generator: torch.Generator | None = None
    grammar: "GrammarState | None" = None
    engine_mode: str = "eager"
    compile_backend: str = "inductor"
    max_length: int = 0


@dataclass(frozen=True)
class Draft:
    """A proposal. tokens: [K'] int64 (K' <= k; K' == 0 means no draft).

    probs: [K', V] float32, the draft distribution each token was drawn from
    (greedy: the draft's softmax at temperature 1, for display only), or None
    for a deterministic drafter.
    cut_by_grammar: the proposed tokens dropped because the grammar forbids the
    first of them (prompt lookup under a constraint); not part of ``tokens``.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    cut_by_grammar: tuple[int, ...] = ()

    @staticmethod
    def empty() -> "Draft":
        return Draft(torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@runtime_checkable
class Drafter(Protocol):
    """A source of draft tokens (see module docstring)."""

    name: str

    def reset(self) -> None:
        """Forget any state from a previous sequence."""

    def propose(self, ctx: DraftContext) -> Draft:
        """Propose up to ctx.k tokens that continue ctx.token_ids."""

    def observe(self, num_accepted: int) -> None:
        """Learn that num_accepted leading tokens of the last draft were kept."""


def draft_token(logits: torch.Tensor, ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One drafted token from a model drafter's next-token logits, as every model drafter picks it.

    logits: [V] on the drafter's device. Masked by ``ctx.grammar`` when there is
    one; the argmax (greedy) or a sample from the processed distribution
    (``lab.sampling``, the run's own temperature / top-k / top-p); the grammar is
    then advanced over the token (the drafter rolls it back after its proposal).

    Returns (token: int64 scalar on the logits' device; dist: [V] float32, the
    distribution it was drawn from, or for greedy the softmax at temperature 1,
    for display; done: the grammar is complete, so nothing may follow).
    """
    if ctx.grammar is not None:
        logits = ctx.grammar.mask_next(logits)
    if ctx.sampling.is_greedy:
        token = logits.argmax(-1)
        dist = torch.softmax(logits.float(), -1)
    else:
        dist = logits_to_probs(logits, ctx.sampling)
        token = sample(dist, ctx.generator)
    done = False
    if ctx.grammar is not None:
        ctx.grammar.accept(int(token))
        done = ctx.grammar.is_terminated
    return token, dist, done
