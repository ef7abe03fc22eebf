"""The drafter protocol: propose up to K new tokens, learn from how many matched.

A drafter proposes only the new tokens, never prompt + draft, and says "no draft"
with an empty proposal. The decode loop speaks one protocol, batched
(``Drafter``); a drafter with nothing to batch is written for one row
(``RowDrafter``) and reaches the loop through one adapter (``PerRowDrafter``).
Model drafters return the per-token distributions they drew from; deterministic
drafters (prompt lookup) return none, which verification treats as one-hot. Inputs travel in one ``DraftContext``: a new drafter's needs
add a field there, not a keyword everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from lab.sampling import SamplingParams, logits_to_probs, sample

if TYPE_CHECKING:
    from lab.grammar import GrammarState
    from lab.tree import DraftTree


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
        (``lab.kv``: "eager", "static" or "compiled"; the loop resolves "auto").
    max_length: the most tokens a model drafter's cache must hold for this
        sequence (prompt + budget + K + 1), to size a static cache.
    tree_budget: a drafter that drafts trees (``drafts_trees``) proposes a
        ``lab.tree.DraftTree`` of at most this many nodes and depth k; 0: a chain.
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
    tree_budget: int = 0


@dataclass(frozen=True)
class Draft:
    """A proposal. tokens: [K'] int64 (K' <= k; K' == 0 means no draft).

    probs: [K', V] float32, the draft distribution each token was drawn from
    (greedy: the draft's softmax at temperature 1, for display only), or None
    for a deterministic drafter.
    cut_by_grammar: the proposed tokens dropped because the grammar forbids the
    first of them (prompt lookup under a constraint); not part of ``tokens``.
    tree: a token tree (``lab.tree.DraftTree``) in place of a chain: then tokens
    is tree.tokens (its N nodes) and probs is tree.sampled_from.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    cut_by_grammar: tuple[int, ...] = ()
    tree: "DraftTree | None" = None

    @staticmethod
    def of_tree(tree: "DraftTree") -> "Draft":
        """A tree proposal: its nodes as the tokens."""
        return Draft(tree.tokens, tree.sampled_from, tree=tree)

    @staticmethod
    def empty() -> "Draft":
        return Draft(torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@runtime_checkable
class Drafter(Protocol):
    """A draft source for a batch of rows: the one protocol the decode loop speaks.

    Rows are numbered in batch order; at ``reset`` row i is request i. A context
    with k == 0 asks for nothing from that row (return an empty draft). Model
    drafters (draft model, layer skip, EAGLE head) implement it directly, each
    drafting every row in batched passes; single-row drafters (``RowDrafter``:
    prompt lookup, test oracles) reach it through ``PerRowDrafter``.
    """

    name: str

    def reset(self, batch_size: int) -> None:
        """Forget previous sequences; prepare for batch_size rows."""

    def propose(self, contexts: Sequence[DraftContext]) -> list[Draft]:
        """One draft per row, each of up to contexts[b].k tokens (ragged lengths allowed)."""

    def observe(self, num_accepted: Sequence[int]) -> None:
        """Learn how many leading tokens of each row's last draft were kept."""

    def drop(self, keep: Sequence[int]) -> None:
        """Only the rows ``keep`` (indices in the current batch, in order) go on."""


@runtime_checkable
class RowDrafter(Protocol):
    """A draft source for one sequence, for drafters with nothing to batch (prompt lookup, test oracles)."""

    name: str

    def reset(self) -> None:
        """Forget any state from a previous sequence."""

    def propose(self, ctx: DraftContext) -> Draft:
        """Propose up to ctx.k tokens that continue ctx.token_ids."""

    def observe(self, num_accepted: int) -> None:
        """Learn that num_accepted leading tokens of the last draft were kept."""


class PerRowDrafter:
    """The one adapter from ``RowDrafter`` to ``Drafter``: a copy of the row drafter per row.

    make: builds the drafter of request i (called at ``reset``).
    """

    def __init__(self, make: Callable[[int], RowDrafter], name: str | None = None) -> None:
        self.make = make
        first = make(0)
        self.name = name or getattr(first, "name", "per-row")
        self.drafts_trees = getattr(first, "drafts_trees", False)
        self.drafters: list[RowDrafter] = []

    def reset(self, batch_size: int) -> None:
        self.drafters = [self.make(i) for i in range(batch_size)]
        for drafter in self.drafters:
            drafter.reset()

    def propose(self, contexts: Sequence[DraftContext]) -> list[Draft]:
        return [d.propose(ctx) if ctx.k > 0 else Draft.empty() for d, ctx in zip(self.drafters, contexts)]

    def observe(self, num_accepted: Sequence[int]) -> None:
        for drafter, n in zip(self.drafters, num_accepted):
            drafter.observe(n)

    def drop(self, keep: Sequence[int]) -> None:
        self.drafters = [self.drafters[i] for i in keep]


def as_batch_drafter(drafter: "Drafter | RowDrafter | None") -> "Drafter | None":
    """The drafter the decode loop drives: a ``Drafter`` as it is, a ``RowDrafter`` copied once per row
    (``PerRowDrafter``), None (the target alone) as None."""
    if drafter is None or hasattr(drafter, "drop"):
        return drafter
    return PerRowDrafter(lambda _: copy.deepcopy(drafter), drafter.name)


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two [N] int64 tensors (any devices): where a cache's rollback ends."""
    n = min(a.shape[0], b.shape[0])
    mismatch = (a[:n] != b[:n].to(a.device)).nonzero()
    return int(mismatch[0]) if mismatch.numel() else n


def draft_token(logits: torch.Tensor, ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One drafted token from a model drafter's next-token logits, as every model drafter picks it.

    logits: [V] on the drafter's device. Masked by ``ctx.grammar`` when there is
    one; the argmax (greedy) or a sample from the processed distribution
    (``lab.sampling``, the run's own temperature / top-k / top-p); the grammar is
    then advanced over the token (the drafter rolls it back after its proposal).

    Returns (token: int64 scalar on the logits' device, or None when the grammar
    refuses every token the drafter may propose (a trimmed vocabulary without the
    one token the grammar forces): the draft ends before it; dist: [V] float32,
    the distribution it was drawn from, or for greedy the softmax at temperature
    1, for display; done: nothing may follow, the grammar being complete or refusing).
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
        if not ctx.grammar.accept(int(token)):
            return None, dist, True  # nothing this drafter may propose is allowed here
        done = ctx.grammar.is_terminated
    return token, dist, done
