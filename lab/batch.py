"""Batched speculative decoding: B prompts of different lengths decode together, each row at its own pace.

The ragged-batch trap: rows of one batch accept different numbers of drafted
tokens per step, so after one step they no longer line up. An engine that keeps
one shared length (one cache crop, one position counter) misaligns every row
but the one it follows: positions drift, rows attend to rejected drafts, the
acceptance rate collapses and outputs loop. Here nothing is shared but the
tensors. Each row keeps

- its own committed tokens, token budget, random generator and drafter state;
- its own positions: the position id of a token is the number of that row's
  tokens before it, whatever slot it sits in;
- its own view of the shared KV cache (``RaggedCache``): one DynamicCache of
  [B, heads, slots, head_dim] plus a [B, slots] mask of which slots hold one of
  the row's tokens. Left padding, rejected drafted tokens and pad tokens of a
  shorter draft are holes (mask 0); a masked slot adds nothing to attention,
  so each row computes what it would compute alone (up to the rounding of
  batched matrix products). DynamicCache cannot crop one row, so rollback
  punches holes instead; slots that are holes in every row are cut off and the
  cache is compacted when holes waste too much of it.

Each step, in order (as in ``lab.engine``):
  1. draft: the batch drafter proposes up to K tokens per row (ragged: a prompt
     lookup miss proposes none);
  2. verify forward: the target reads, per row, [last committed token] + draft,
     left-padded to the longest row, in one pass;
  3. accept: ``lab.verify`` decides per row on that row's slice of logits;
  4. commit and roll back: per row, cut at EOS / stop string / budget; the
     rejected and padded slots become holes; the draft model rolls back likewise;
  5. observe: the drafter hears each row's acceptance; a ``BatchStep`` is
     yielded; finished rows leave the batch (their cache rows are dropped), so
     they cost no more work and never emit again.

With no drafter the target alone runs through the same loop (the baseline).

Exactness. In fp32 each row's greedy output equals that prompt decoded alone
(tests check it token for token). In bf16 and fp16 it usually does, but not
always: a batched matrix product may sum in another order or tile (by batch
size, padded width and cache length), so logits differ in the last bits, and
where the target's top two tokens are nearly tied the argmax can flip; from
there the two decodes go their own (equally valid) ways. That is rounding, not
misalignment: the sweep (``lab.sweep``) measures how often it happens per batch
size, and fp32 stays the exactness reference.

Sampling: row i draws from its own generator seeded with ``config.seed + i``,
in the single-row engine's order, so a row samples what the single-row engine
samples with that seed (up to the same rounding).

Engine modes: this loop always runs eagerly over its ``RaggedCache``; the
static and compiled modes of ``lab.runner`` (fixed cache, fixed-width passes,
captured graphs) are the single-request engine's only. A ragged batch changes
shape as rows finish and its holes are compacted, so capturing it would need a
graph per (batch size bucket, width) and a static ragged cache, which the lab
does not build; ``run_batch`` ignores ``config.engine_mode``.

Constrained output (``lab.grammar``): each row has its own matcher, at that
row's committed output. It travels to the drafter in the row's ``DraftContext``
(the draft model drafts under its mask, prompt lookup cuts its proposal at the
first forbidden token), masks the row's verified positions, correction and bonus
included, and then accepts exactly the row's emitted tokens, as in
``lab.engine``. A row whose output is complete can only emit a stop token, so it
ends with "eos" like the single-row engine. Only the exact grammar mode exists
here (the naive one is a single-request teaching switch).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from lab.cache import keep_last, new_cache
from lab.config import K_MAX, DecodeConfig
from lab.drafters import DraftModelDrafter, make_drafter
from lab.drafters.base import Draft, DraftContext, Drafter
from lab.drafters.eagle import BatchEagleDrafter, EagleDrafter
from lab.engine import DecodeResult, cut_emitted, output_text, position_details, sync_device
from lab.grammar import Constraint, GrammarState
from lab.metrics import SpecDecodingStats
from lab.sampling import logits_to_probs, sample
from lab.trace import Finished, Prefilled, Step, StopReason
from lab.verify import Verdict, verify_greedy, verify_sampling

PAD_TOKEN_ID = 0  # fed in padded slots; any id works, the slot is masked
COMPACT_MIN_WASTED_SLOTS = 8


# ---------------------------------------------------------------- the ragged cache


class RaggedCache:
    """A KV cache shared by B rows, each of which sees only its own valid slots.

    cache: a DynamicCache, per layer keys/values of [B, heads, S, head_dim].
    valid: [B, S] bool on the model's device; True where the slot holds the
        K/V of one of that row's tokens. A row's valid slots, in slot order, are
        its tokens in order, so its next token's position id is ``lengths[b]``.

    max_waste, min_wasted_slots: when ``trim`` compacts (see there).

    Raises ValueError for a model with sliding-window layers (their window
    counts slots, holes included, so it would not be the row's window).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        max_waste: float = 0.25,
        min_wasted_slots: int = COMPACT_MIN_WASTED_SLOTS,
    ) -> None:
        self.model = model
        self.max_waste = max_waste
        self.min_wasted_slots = min_wasted_slots
        self.device = next(model.parameters()).device
        self.cache = new_cache(model)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ValueError("batched decoding requires full-attention layers; got a sliding-window model")
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)  # [B, S]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64 on the device: tokens each row holds (holes excluded)."""
        return self.valid.sum(-1)

    def forward(self, rows: Sequence[torch.Tensor], logits_to_keep: int = 0) -> torch.Tensor:
        """Feed each row its own new tokens in one batched pass, appending their K/V.

        rows: B int64 tensors [n_b] (n_b >= 0, any device); left-padded to W = max n_b.
        logits_to_keep: 0 keeps all W columns, else the last ones (passed as an
            index tensor, ``lab.cache.keep_last``, to avoid PyTorch's slow path).
        Returns logits [B, W or logits_to_keep, V]; row b's own are the last n_b columns.
        """
        if len(rows) != self.batch_size:
            raise ValueError(f"RaggedCache.forward requires {self.batch_size} rows; got {len(rows)}")
        width = max(1, max(int(r.shape[0]) for r in rows))
        input_ids = torch.full((self.batch_size, width), PAD_TOKEN_ID, dtype=torch.long)  # [B, W]
        new_valid = torch.zeros(self.batch_size, width, dtype=torch.bool)  # [B, W]
        for b, tokens in enumerate(rows):
            n = int(tokens.shape[0])
            if n:
                input_ids[b, width - n :] = tokens.cpu()
                new_valid[b, width - n :] = True
        new_valid = new_valid.to(self.device)
        # Position of a row's j-th new token: its tokens so far + j (pads reuse the first position).
        offsets = torch.arange(width, device=self.device) - (width - new_valid.sum(-1, keepdim=True))  # [B, W]
        position_ids = self.lengths[:, None] + offsets.clamp_min(0)  # [B, W]
        attention_mask = torch.cat([self.valid, new_valid], dim=1)  # [B, S+W]
        out = self.model(
            input_ids.to(self.device),
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep_last(logits_to_keep, width, self.device) if logits_to_keep else 0,
        )
        self.valid = attention_mask
        return out.logits

    def keep(self, lengths: Sequence[int] | torch.Tensor) -> None:
        """Roll back: row b keeps its first lengths[b] tokens; its later slots become holes."""
        lengths = torch.as_tensor(lengths, device=self.device).reshape(-1, 1)  # [B, 1]
        self.valid = self.valid & (self.valid.long().cumsum(-1) <= lengths)

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows (in this order); the others stop costing work."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        if self.num_slots:
            self.cache.batch_select_indices(index)
        self.valid = self.valid[index]

    def trim(self) -> None:
        """Cut slots that are holes in every row; compact when holes still waste > max_waste of the slots.

        Compaction copies the cache (about one attention pass over it), so it
        waits until at least min_wasted_slots slots would go.
        It moves each row's valid slots to the right end (order kept), so the
        cache shrinks to the longest row's token count.
        """
        if self.num_slots == 0:
            return
        used = self.valid.any(0).nonzero().flatten()  # slots some row needs
        if used.numel() == 0:
            self._slice(0, 0)
            return
        first, last = int(used[0]), int(used[-1]) + 1
        if first > 0 or last < self.num_slots:
            self._slice(first, last)
        longest = int(self.lengths.max())
        wasted = self.num_slots - longest
        if wasted >= max(1, self.min_wasted_slots) and wasted > self.max_waste * self.num_slots:
            self._compact(longest)

    def _slice(self, first: int, last: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.keys = layer.keys[:, :, first:last]
                layer.values = layer.values[:, :, first:last]
        self.valid = self.valid[:, first:last]

    def _compact(self, length: int) -> None:
        # A stable sort puts holes first and valid slots after, in their order.
        order = torch.sort(self.valid.to(torch.int8), dim=-1, stable=True).indices[:, -length:]  # [B, L]
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = layer.keys.gather(2, index)
                layer.values = layer.values.gather(2, index)
        self.valid = self.valid.gather(1, order)


# ---------------------------------------------------------------- batch drafters


@runtime_checkable
class BatchDrafter(Protocol):
    """A draft source for a batch of rows (the batched ``lab.drafters.base.Drafter``).

    Rows are numbered in batch order; at ``reset`` row i is request i. A context
    with k == 0 asks for nothing from that row (return an empty draft).
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


class PerRowDrafter:
    """A single-row drafter per row (prompt lookup, test oracles): cheap drafters that need no batching.

    make: builds the drafter of request i (called at ``reset``).
    """

    def __init__(self, make: Callable[[int], Drafter], name: str | None = None) -> None:
        self.make = make
        self.name = name or getattr(make(0), "name", "per-row")
        self.drafters: list[Drafter] = []

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


class BatchDraftModelDrafter:
    """A draft model (or the target's early exit) drafting for every row in one pass per token.

    Same bookkeeping as ``lab.drafters.DraftModelDrafter``, per row: before
    drafting, a row rolls its cache back to the common prefix of what it holds
    and its committed tokens and feeds the rest (usually the correction or bonus
    token); then k rounds of one batched forward each. Rows that drafted enough
    feed nothing (a hole) in later rounds. The draft's cache is a
    ``RaggedCache``: rollback punches holes. A row with a grammar drafts under
    its mask, stops once the grammar is complete, and leaves the matcher where
    it found it.

    model: a causal LM sharing the target's vocabulary; only read.
    """

    def __init__(self, model: torch.nn.Module, name: str = "draft-model") -> None:
        self.model = model
        self.name = name
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        self.cache = RaggedCache(self.model, batch_size)
        self.cached_ids = [torch.empty(0, dtype=torch.long) for _ in range(batch_size)]  # [C_b] per row
        self._num_committed: list[int | None] = [None] * batch_size

    def propose(self, contexts: Sequence[DraftContext]) -> list[Draft]:
        rounds = max((ctx.k for ctx in contexts), default=0)
        if rounds == 0:
            self._num_committed = [None] * len(contexts)
            return [Draft.empty() for _ in contexts]
        greedy = contexts[0].sampling.is_greedy
        keep, feeds = [], []
        for b, ctx in enumerate(contexts):
            held = min(_common_prefix_length(self.cached_ids[b], ctx.token_ids), ctx.token_ids.shape[0] - 1)
            keep.append(held)
            feeds.append(ctx.token_ids[held:] if ctx.k > 0 else ctx.token_ids[:0])
            self.cached_ids[b] = self.cached_ids[b][:held]
        self.cache.keep(keep)
        tokens: list[list[torch.Tensor]] = [[] for _ in contexts]
        probs: list[list[torch.Tensor]] = [[] for _ in contexts]
        wanted = [ctx.k for ctx in contexts]  # shrinks when a row's grammar completes
        for i in range(rounds):
            logits = self.cache.forward(feeds, logits_to_keep=1)[:, -1]  # [B, V]
            logits = _mask_by_grammar(logits, [ctx.grammar if i < n else None for ctx, n in zip(contexts, wanted)])
            if greedy:
                argmax = logits.argmax(-1).cpu()  # [B], one transfer a round
                softmax = torch.softmax(logits.float(), -1)  # [B, V], for display only
            for b, ctx in enumerate(contexts):
                self.cached_ids[b] = torch.cat([self.cached_ids[b], feeds[b].cpu()])
                if i < wanted[b]:
                    if greedy:
                        token, dist = argmax[b], softmax[b]
                    else:
                        dist = logits_to_probs(logits[b], ctx.sampling)
                        token = sample(dist, ctx.generator)
                    tokens[b].append(token)
                    probs[b].append(dist)
                    if ctx.grammar is not None:
                        ctx.grammar.accept(int(token))
                        if ctx.grammar.is_terminated:  # the output is complete: nothing can follow
                            wanted[b] = i + 1
            # Feed each row's newest token, unless that row has drafted enough (the last one is never fed).
            feeds = [
                tokens[b][-1].view(1) if i + 1 < wanted[b] else torch.empty(0, dtype=torch.long)
                for b in range(len(contexts))
            ]
            if not any(feed.numel() for feed in feeds):
                break
        for ctx, drafted in zip(contexts, tokens):
            if ctx.grammar is not None:
                ctx.grammar.rollback(len(drafted))
        self._num_committed = [ctx.token_ids.shape[0] if ctx.k > 0 else None for ctx in contexts]
        return [
            Draft(torch.stack(t).cpu(), torch.stack(p)) if t else Draft.empty() for t, p in zip(tokens, probs)
        ]

    def observe(self, num_accepted: Sequence[int]) -> None:
        """Roll each row back now to its committed prefix (committed + accepted drafts)."""
        keep = []
        for b, n in enumerate(num_accepted):
            committed = self._num_committed[b]
            held = self.cached_ids[b].shape[0]
            if committed is not None:
                held = min(committed + n, held)
            self.cached_ids[b] = self.cached_ids[b][:held]
            keep.append(held)
        self.cache.keep(keep)
        self.cache.trim()
        self._num_committed = [None] * len(self._num_committed)  # observed: a repeat is a no-op

    def drop(self, keep: Sequence[int]) -> None:
        self.cache.select(keep)
        self.cached_ids = [self.cached_ids[i] for i in keep]
        self._num_committed = [self._num_committed[i] for i in keep]

    def cache_lengths(self) -> list[int]:
        return self.cache.lengths.tolist()


def as_batch_drafter(drafter: Drafter | BatchDrafter | None) -> BatchDrafter | None:
    """The batched counterpart of a single-row drafter (None stays None: the target alone).

    A draft-model or layer-skip drafter becomes a ``BatchDraftModelDrafter`` over
    the same model (or early-exit view, or trimmed view); an EAGLE drafter a
    ``BatchEagleDrafter`` sharing its head; any other single-row drafter is copied
    once per row (``PerRowDrafter``); a batch drafter is returned as is.
    """
    if drafter is None or isinstance(drafter, (BatchDraftModelDrafter, BatchEagleDrafter, PerRowDrafter)):
        return drafter
    if isinstance(drafter, DraftModelDrafter):
        return BatchDraftModelDrafter(drafter.model, drafter.name)
    if isinstance(drafter, EagleDrafter):
        return BatchEagleDrafter(drafter)
    if isinstance(drafter, BatchDrafter):
        return drafter
    return PerRowDrafter(lambda _: copy.deepcopy(drafter), drafter.name)


def make_batch_drafter(name: str, target, draft=None, **options) -> BatchDrafter | None:
    """``lab.drafters.make_drafter`` for batches: same names and options."""
    return as_batch_drafter(make_drafter(name, target, draft, **options))


def _mask_by_grammar(logits: torch.Tensor, grammars: Sequence[GrammarState | None]) -> torch.Tensor:
    """logits: [B, V]; rows with a grammar get its next-token mask (forbidden at -inf).

    Returns the logits unchanged when no row has a grammar, else float32 [B, V].
    """
    if all(grammar is None for grammar in grammars):
        return logits
    return torch.stack(
        [row.float() if grammar is None else grammar.mask_next(row) for row, grammar in zip(logits, grammars)]
    )


def _common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two [N] int64 tensors."""
    n = min(a.shape[0], b.shape[0])
    mismatch = (a[:n] != b[:n]).nonzero()
    return int(mismatch[0]) if mismatch.numel() else n


# ---------------------------------------------------------------- events


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
    steps: per row, the single-row ``Step`` (same meaning as in ``lab.engine``:
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


# ---------------------------------------------------------------- the loop


@torch.inference_mode()
def decode_batch(
    target,
    prompts: Sequence[Sequence[int]],
    drafter: BatchDrafter | Drafter | None,
    config: DecodeConfig,
    *,
    k_policy: Callable[[int], int] | None = None,
    target_cache: RaggedCache | None = None,
    constraint: Constraint | None = None,
) -> Iterator[BatchEvent]:
    """Decode B prompts together, yielding ``BatchPrefilled``, one ``BatchStep`` per cycle, then ``BatchFinished``.

    target: a loaded model (``.model``, ``.tokenizer``, ``.eos_token_ids``).
    prompts: B token-id lists (chat template applied), each of length >= 1, any lengths.
    drafter: a ``BatchDrafter``, a single-row drafter (wrapped by
        ``as_batch_drafter``), or None for the target alone.
    k_policy: K for the next step given the current batch size (0: no draft
        this step); overrides ``config.k``. ``lab.sweep.AutoK`` is one.
    target_cache: an empty ``RaggedCache`` of len(prompts) rows to fill (lets a
        test inspect it); by default a new one.
    constraint: constrained output for every row (``lab.grammar``), each row
        with its own matcher (see the module docstring); exact grammar mode only.

    Greedy output per row equals that prompt decoded alone (fp32; see the module
    docstring for bf16/fp16), with the same constraint. Raises ValueError for no
    prompts, an empty prompt, one that fills the context window, or a
    constraint with ``config.grammar_mode`` "naive".
    """
    model = target.model
    device = next(model.parameters()).device
    max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if not prompts:
        raise ValueError("batched decoding requires at least one prompt; got none")
    if constraint is not None and config.grammar_mode != "exact":
        raise ValueError(
            f"batched decoding under a constraint requires grammar_mode 'exact' (the naive mode is a "
            f"single-request teaching switch: use lab.engine); got {config.grammar_mode!r}"
        )
    requests = [_Request.start(r, p, config, max_positions, device, constraint) for r, p in enumerate(prompts)]
    if target_cache is not None and (target_cache.batch_size != len(requests) or target_cache.num_slots):
        raise ValueError(
            f"target_cache requires an empty RaggedCache of {len(requests)} rows; got {target_cache.batch_size} rows"
        )
    sampling = config.sampling
    eos = set(target.eos_token_ids)
    drafter = as_batch_drafter(drafter)
    if drafter is not None:
        drafter.reset(len(requests))

    start = time.perf_counter()
    # Prefill: every prompt token but the last, left-padded, in one pass.
    cache = RaggedCache(model, len(requests)) if target_cache is None else target_cache
    if any(q.prompt.numel() > 1 for q in requests):
        cache.forward([q.prompt[:-1] for q in requests], logits_to_keep=1)
    sync_device(device)
    prefill_ms = (time.perf_counter() - start) * 1e3
    yield BatchPrefilled(tuple(Prefilled(q.prompt.numel(), prefill_ms) for q in requests), prefill_ms)

    rows = list(requests)  # the live requests, in batch order
    step_index = 0
    while rows:
        k_step = config.k if k_policy is None else k_policy(len(rows))
        if not isinstance(k_step, int) or not 0 <= k_step <= K_MAX:
            raise ValueError(f"k_policy requires an integer K in 0..{K_MAX}; got {k_step!r}")
        # 1. draft: never more than a row's budget can take (accepted + 1 <= remaining).
        t0 = time.perf_counter()
        drafts = [Draft.empty() for _ in rows]
        if drafter is not None and k_step > 0 and any(q.remaining > 1 for q in rows):
            drafts = drafter.propose([q.draft_context(k_step, sampling) for q in rows])
        sync_device(device)
        t1 = time.perf_counter()

        # 2. verify forward: per row [last committed] + draft -> K'_b+1 distributions, left-padded.
        logits = cache.forward([torch.cat([q.committed[-1:], d.tokens]) for q, d in zip(rows, drafts)])  # [B, W, V]
        width = logits.shape[1]

        # 3. accept, row by row on the row's own logits (masked by the row's grammar at every position).
        row_logits = [logits[b, width - 1 - len(d) :] for b, d in enumerate(drafts)]  # [K'_b+1, V] each
        row_logits = [
            own if q.grammar is None else q.grammar.mask_draft_positions(own, d.tokens)
            for q, d, own in zip(rows, drafts, row_logits)
        ]
        row_probs = [None if sampling.is_greedy else logits_to_probs(own, sampling) for own in row_logits]
        verdicts = [
            verify_greedy(own, d.tokens) if probs is None else verify_sampling(probs, d.tokens, d.probs, q.generator)
            for q, d, own, probs in zip(rows, drafts, row_logits, row_probs)
        ]

        # 4. commit and roll back: each row keeps K/V of all its committed tokens but the new last one.
        cache.keep([q.committed.numel() + v.num_accepted for q, v in zip(rows, verdicts)])
        commits = [
            q.commit(d, v, eos, target.tokenizer, config.stop_strings, max_positions)
            for q, d, v in zip(rows, drafts, verdicts)
        ]
        sync_device(device)
        t2 = time.perf_counter()

        # 5. observe, report, and let finished rows leave the batch (no more work, no more tokens).
        if drafter is not None:
            drafter.observe([v.num_accepted for v in verdicts])
        target_lengths = cache.lengths.tolist()
        draft_lengths = _draft_cache_lengths(drafter, len(rows))
        steps, finished = [], []
        for b, (q, draft, verdict, (emitted, reason)) in enumerate(zip(rows, drafts, verdicts, commits)):
            details = ()
            if config.record_details and len(draft):
                details = position_details(row_logits[b], row_probs[b], draft, verdict, sampling.is_greedy)
            steps.append(
                Step(
                    index=q.num_steps,
                    drafted=tuple(draft.tokens.tolist()),
                    num_accepted=verdict.num_accepted,
                    emitted=tuple(emitted),
                    final_kind=_final_kind(draft, verdict),
                    draft_ms=(t1 - t0) * 1e3,
                    verify_ms=(t2 - t1) * 1e3,
                    target_cache_len=target_lengths[b],
                    draft_cache_len=draft_lengths[b],
                    details=details,
                    cut_by_grammar=draft.cut_by_grammar,
                )
            )
            q.observe_step(t2 - start, emitted)
            if reason is not None:
                finished.append(q.finish(reason, target.tokenizer, config.stop_strings, t2 - start))
        yield BatchStep(
            index=step_index,
            requests=tuple(q.index for q in rows),
            steps=tuple(steps),
            finished=tuple(finished),
            draft_ms=(t1 - t0) * 1e3,
            verify_ms=(t2 - t1) * 1e3,
            width=width,
            target_cache_slots=cache.num_slots,
            time_s=t2 - start,
        )
        step_index += 1
        keep = [b for b, q in enumerate(rows) if q.result is None]
        if len(keep) < len(rows):
            rows = [rows[b] for b in keep]
            if rows:
                cache.select(keep)
                if drafter is not None:
                    drafter.drop(keep)
        cache.trim()

    yield BatchFinished(tuple(q.result for q in requests), time.perf_counter() - start)


@dataclass
class _Request:
    """One request's own state in a batched decode: what the single-row engine keeps in locals."""

    index: int
    prompt: torch.Tensor  # [P] int64 CPU
    budget: int
    generator: torch.Generator
    committed: torch.Tensor  # [T] int64 CPU: prompt then output
    grammar: GrammarState | None = None  # the constraint's matcher at the committed output
    generated: list[int] = field(default_factory=list)
    num_steps: int = 0
    first_token_s: float | None = None
    result: RowFinished | None = None

    @classmethod
    def start(
        cls,
        index: int,
        prompt_ids: Sequence[int],
        config: DecodeConfig,
        max_positions: int,
        device: torch.device,
        constraint: Constraint | None = None,
    ) -> "_Request":
        """Check the prompt; seed the generator config.seed + index (unseeded when seed is None).

        With a constraint the request gets its own matcher.
        """
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
        if prompt.numel() == 0:
            raise ValueError(f"Prompt {index} is empty: every prompt of a batch needs at least one token.")
        if prompt.numel() >= max_positions:
            raise ValueError(
                f"Prompt {index} has {prompt.numel()} tokens but the target's context window is {max_positions}: "
                "shorten the prompt."
            )
        generator = torch.Generator(device=device)
        if config.seed is not None:
            generator.manual_seed(config.seed + index)
        budget = min(config.max_new_tokens, max_positions - prompt.numel())
        grammar = constraint.new_state() if constraint is not None else None
        return cls(index, prompt, budget, generator, prompt.clone(), grammar)

    @property
    def remaining(self) -> int:
        return self.budget - len(self.generated)

    def draft_context(self, k: int, sampling) -> DraftContext:
        """This row's drafter input; k shrinks to what the budget can take (0: draft nothing)."""
        k = max(0, min(k, self.remaining - 1))
        return DraftContext(self.committed, self.prompt.numel(), k, sampling, self.generator, self.grammar)

    def commit(
        self, draft: Draft, verdict: Verdict, eos: set[int], tokenizer, stop_strings: tuple[str, ...], max_positions: int
    ) -> tuple[list[int], StopReason | None]:
        """Append the accepted tokens and the target's own, cut at EOS / stop string / budget / context window;
        the grammar advances over exactly what was emitted."""
        new_tokens = draft.tokens[: verdict.num_accepted].tolist() + [verdict.next_token]
        emitted, reason = cut_emitted(new_tokens, self.generated, self.remaining, eos, tokenizer, stop_strings)
        if self.grammar is not None:
            for token in emitted:
                self.grammar.accept(token)
        self.generated += emitted
        self.committed = torch.cat([self.committed, torch.tensor(emitted, dtype=torch.long)])
        if reason is None and self.committed.numel() >= max_positions:
            reason = "context_window"
        return emitted, reason

    def observe_step(self, now_s: float, emitted: list[int]) -> None:
        self.num_steps += 1
        if self.first_token_s is None and emitted:
            self.first_token_s = now_s

    def finish(self, reason: StopReason, tokenizer, stop_strings, now_s: float) -> RowFinished:
        text = output_text(tokenizer, self.generated, stop_strings)
        first = self.first_token_s if self.first_token_s is not None else now_s
        self.result = RowFinished(self.index, Finished(reason, tuple(self.generated), text, now_s), first)
        return self.result


@dataclass
class BatchResult:
    """A finished batched decode gathered from its events (see ``run_batch``).

    rows: per request, in request order, a ``DecodeResult`` like the single-row
        engine's (its stats observe that request's own events, so wall_s is the
        request's latency).
    steps: every ``BatchStep``.
    first_token_s, latency_s: per request, from submission to its first / last token.
    prefill_ms: the batch's prefill. wall_s: submission to the last token of all.
    """

    rows: list[DecodeResult]
    steps: list[BatchStep] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    prefill_ms: float = 0.0
    wall_s: float = 0.0

    @property
    def token_ids(self) -> list[list[int]]:
        return [row.token_ids for row in self.rows]

    @property
    def num_output_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows)

    @property
    def tokens_per_s(self) -> float:
        """Throughput: every request's tokens over the batch's wall time."""
        return self.num_output_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def batch_sizes(self) -> list[int]:
        """Rows in the batch at each step (shrinks as requests finish)."""
        return [step.batch_size for step in self.steps]

    def pooled_stats(self) -> SpecDecodingStats:
        """Acceptance counters summed over requests (its wall_s sums latencies: use ``tokens_per_s`` for throughput)."""
        pooled = SpecDecodingStats()
        for row in self.rows:
            pooled.merge(row.stats)
        return pooled


def run_batch(
    target,
    prompts: Sequence[Sequence[int]],
    drafter: BatchDrafter | Drafter | None,
    config: DecodeConfig,
    *,
    k_policy: Callable[[int], int] | None = None,
    constraint: Constraint | None = None,
) -> BatchResult:
    """Run ``decode_batch`` to the end and gather its events into a ``BatchResult``."""
    stats = [SpecDecodingStats() for _ in prompts]
    steps_of: list[list[Step]] = [[] for _ in prompts]
    result = BatchResult(rows=[])
    for event in decode_batch(target, prompts, drafter, config, k_policy=k_policy, constraint=constraint):
        if isinstance(event, BatchFinished):
            result.rows = [
                DecodeResult(
                    list(row.finished.token_ids), row.finished.text, row.finished.reason, steps_of[r], stats[r]
                )
                for r, row in enumerate(event.rows)
            ]
            result.first_token_s = [row.first_token_s for row in event.rows]
            result.latency_s = [row.finished.wall_s for row in event.rows]
            result.wall_s = event.wall_s
            return result
        if isinstance(event, BatchPrefilled):
            result.prefill_ms = event.prefill_ms
        else:
            result.steps.append(event)
        for request, row_event in event.row_events():
            stats[request].observe(row_event)
            if isinstance(row_event, Step):
                steps_of[request].append(row_event)
    raise RuntimeError("decode_batch ended without a BatchFinished event")


def _final_kind(draft: Draft, verdict: Verdict) -> str:
    """The class of the target's own token: target (no draft), bonus (all accepted) or corrected."""
    if not len(draft):
        return "target"
    return "bonus" if verdict.is_bonus(len(draft)) else "corrected"


def _draft_cache_lengths(drafter: BatchDrafter | None, batch_size: int) -> list[int | None]:
    lengths = getattr(drafter, "cache_lengths", None)
    return lengths() if lengths is not None else [None] * batch_size
