"""Frozen trace events: the one record of a decode that everything else reads.

The decode loop yields batch events (``BatchPrefilled``, ``BatchStep``,
``BatchFinished``), each carrying per-request ``Prefilled`` / ``Step`` /
``Finished`` events; at B = 1 ``lab.decode.decode`` yields those directly.

The engine yields them; the app renders them, metrics count them, the CLI prints
them and tests assert on them. Token classes, as coloured in the app:

- accepted: a drafted token the target kept;
- rejected: the first drafted token the target refused (later drafted tokens
  are discarded unseen);
- corrected: the target's own token in place of a rejected one;
- bonus: the target's extra token after a fully accepted draft;
- target: the target's token at a step with no draft (target alone, or a
  drafter that proposed nothing);
- cut: a proposed token the grammar forbids, dropped before verification
  (constrained mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lab.tree import DraftTree

FinalKind = Literal["corrected", "bonus", "target"]
StopReason = Literal["eos", "stop_string", "max_new_tokens", "context_window"]


@dataclass(frozen=True)
class Prefilled:
    """The target (and cache) have read the prompt."""

    num_prompt_tokens: int
    prefill_ms: float


@dataclass(frozen=True)
class PositionDetail:
    """Teaching detail for one checked draft position (step-through mode).

    draft_token / draft_prob: the drafted token and the draft's probability of it
        (None for a deterministic drafter).
    target_prob: the target's (processed) probability of the drafted token.
    target_top: the target's top few (token_id, probability) pairs.
    acceptance_prob: min(1, target_prob / draft_prob) for sampling; 1.0/0.0 for greedy.
    uniform: the uniform draw compared against acceptance_prob (sampling), else None.
    accepted: the decision.
    """

    draft_token: int
    draft_prob: float | None
    target_prob: float
    target_top: tuple[tuple[int, float], ...]
    acceptance_prob: float
    uniform: float | None
    accepted: bool


@dataclass(frozen=True)
class Step:
    """One draft-verify cycle.

    drafted: the K' tokens the drafter proposed (empty: no draft).
    num_accepted: how many leading drafted tokens the target kept (0..K').
    emitted: the tokens committed this step: the accepted ones then the target's
        own (corrected, bonus or target) token, cut at EOS, a stop string or the
        token budget (so it can be shorter than num_accepted + 1).
    final_kind: the class of the target's own token.
    draft_ms, verify_ms: wall time of drafting and of the verify forward pass
        plus acceptance, in milliseconds.
    target_cache_len, draft_cache_len: cache lengths after rollback (draft: None
        when the drafter keeps no cache).
    details: per checked position, when the run records details.
    cut_by_grammar: proposed tokens the grammar dropped before verification.
    tree: the step's token tree (``lab.tree.DraftTree``) when the drafter drafted one: then
        drafted is its N nodes' tokens (node order), num_accepted the accepted depth and
        tree_path the accepted nodes, root's child first; None for a chain.
    """

    index: int
    drafted: tuple[int, ...]
    num_accepted: int
    emitted: tuple[int, ...]
    final_kind: FinalKind
    draft_ms: float
    verify_ms: float
    target_cache_len: int
    draft_cache_len: int | None = None
    details: tuple[PositionDetail, ...] = field(default=())
    cut_by_grammar: tuple[int, ...] = ()
    tree: "DraftTree | None" = None
    tree_path: tuple[int, ...] = ()

    @property
    def tree_size(self) -> int:
        """Nodes of the step's tree (0 for a chain)."""
        return 0 if self.tree is None else len(self.tree)

    @property
    def accepted_tokens(self) -> tuple[int, ...]:
        """The drafted tokens the target kept, in order (a tree's accepted path)."""
        if self.tree is not None:
            return tuple(self.drafted[i] for i in self.tree_path)
        return self.drafted[: self.num_accepted]

    @property
    def rejected(self) -> tuple[int, ...]:
        """The drafted token the target refused (at most one is shown; the rest were never checked; none for a tree)."""
        if self.tree is not None:
            return ()
        return self.drafted[self.num_accepted : self.num_accepted + 1]

    @property
    def final_token(self) -> int | None:
        """The target's own token, if it survived truncation."""
        return self.emitted[-1] if len(self.emitted) == self.num_accepted + 1 else None


@dataclass(frozen=True)
class Finished:
    """The decode ended.

    token_ids: the generated tokens (EOS included if it ended the run).
    text: their decoded text, special tokens skipped, cut before a stop string.
    wall_s: seconds from start of prefill to the end.
    """

    reason: StopReason
    token_ids: tuple[int, ...]
    text: str
    wall_s: float


TraceEvent = Prefilled | Step | Finished


@dataclass(frozen=True)
class BatchPrefilled:
    """The target has read every prompt in one padded pass.

    prefilled: per request, in request order, the single-row ``Prefilled``
        (each carries the whole batch's prefill time: every row waited for it).
    """

    prefilled: tuple[Prefilled, ...]
    prefill_ms: float

    def row_events(self) -> Iterator[tuple[int, Prefilled]]:
        """(request, event) pairs for per-request consumers (``SpecDecodingStats``)."""
        return iter(enumerate(self.prefilled))


@dataclass(frozen=True)
class RowFinished:
    """One request is done (it leaves the batch).

    finished: its single-row ``Finished``; ``wall_s`` is its latency, from the
        batch's submission to its last token.
    first_token_s: from submission to its first emitted token.
    """

    request: int
    finished: Finished
    first_token_s: float


@dataclass(frozen=True)
class BatchStep:
    """One draft-verify cycle of the whole batch.

    requests: the request index of each row in the batch at this step (batch order).
    steps: per row, the single-row ``Step`` (the B = 1 event, as ``lab.decode.decode`` yields it:
        ``index`` counts that request's steps, ``target_cache_len`` its own tokens
        in the cache, holes excluded; draft_ms/verify_ms are the batch's, which
        each row waited for).
    finished: the requests that finished at this step.
    width: tokens per row in the verify pass (1 + the longest draft).
    target_cache_slots: slots of the target's cache after rollback, holes included.
    time_s: seconds from submission to the end of this step.
    """

    index: int
    requests: tuple[int, ...]
    steps: tuple[Step, ...]
    finished: tuple[RowFinished, ...]
    draft_ms: float
    verify_ms: float
    width: int
    target_cache_slots: int
    time_s: float

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    def row_events(self) -> Iterator[tuple[int, Step | Finished]]:
        """(request, event) pairs: each row's Step, then the Finished of rows that ended."""
        yield from zip(self.requests, self.steps)
        for row in self.finished:
            yield row.request, row.finished


@dataclass(frozen=True)
class BatchFinished:
    """Every request is done. rows: per request, in request order. wall_s: submission to the last token of all."""

    rows: tuple[RowFinished, ...]
    wall_s: float


BatchEvent = BatchPrefilled | BatchStep | BatchFinished
