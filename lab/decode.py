"""THE speculative decode loop (Leviathan et al. 2023; Chen et al. 2023), for B >= 1 prompts.

Each step, in order:
  1. draft: the drafter proposes up to K tokens per row (none for the target
     alone; ragged: a prompt lookup miss proposes none);
  2. verify forward: the target reads, per row, [last committed token] + draft
     in one batched pass, giving K_b + 1 next-token distributions per row;
  3. accept: ``lab.verify`` decides for the whole batch at once (one host sync),
     keeping a prefix of each draft and adding the target's own token
     (correction or bonus);
  4. commit and roll back: per row, the tokens are cut at EOS / stop string /
     budget and committed; the target's cache keeps each row's committed
     tokens but the last (``lab.kv``: a crop, holes, or moved lengths);
  5. observe: the drafter hears each row's acceptance; a ``BatchStep`` is
     yielded; finished rows leave the batch, so they cost no more work.

The target's cache always holds every committed token of a row but the last,
which is fed again as the first input of the next verify pass. With no drafter
every step is one plain target decode step through the same code, so measured
speedups compare like with like. ``decode`` is the loop at B = 1, yielding the
single-row events. The loop never formats or prints.

Engine modes (``config.engine_mode``, ``lab.kv``): "eager" runs over a growing
ragged cache (the CPU default); "static" over fixed tensors in a batch-size
bucket, the verify pass at its fixed width K+1 (a short draft is padded, never
a new shape); "compiled" replays each (width, bucket) as one captured graph
(the CUDA default).

Exactness. Greedy output (temperature 0) is, per row, token for token the
target's own greedy output for that prompt (fp32; tests check it). In bf16 and
fp16 it usually is, but not always: a batched matrix product may sum in another
order (by batch size, padded width and cache length), so logits differ in the
last bits, and where the target's top two tokens nearly tie the argmax can flip;
from there the two decodes go their own, equally valid, ways. That is rounding,
not misalignment: the batch sweep measures how often it happens. Sampled output
follows the target's distribution; row i draws from its own generator seeded
``config.seed + i``, so a row samples what it samples alone (up to rounding).

Constrained output (``lab.grammar``): each row has its own matcher at its
committed output. It travels to the drafter in the row's ``DraftContext``,
masks the row's verified positions (correction and bonus included), then
accepts exactly the emitted tokens. ``config.grammar_mode`` "naive" shows the
broken way some engines shipped instead, for teaching: drafts unmasked, the
matcher advanced over every drafted token and never rolled back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lab.config import K_MAX, DecodeConfig
from lab.drafters.base import Draft, DraftContext, Drafter, RowDrafter, as_batch_drafter
from lab.grammar import Constraint, GrammarState
from lab.kv import KVCache, new_kv_cache, resolve_engine_mode
from lab.metrics import SpecDecodingStats
from lab.sampling import logits_to_probs
from lab.trace import (
    BatchEvent, BatchFinished, BatchPrefilled, BatchStep, Finished, PositionDetail, Prefilled, RowFinished, Step,
    StopReason, TraceEvent,
)
from lab.tree import accepted_slots, refuse_tree_decode, tree_verify_forward, verify_tree_greedy, verify_tree_sampling
from lab.verify import Verdict, verify_greedy_batch, verify_sampling_batch

DETAIL_TOP = 5


@torch.inference_mode()
def decode_batch(
    target,
    prompts: Sequence[Sequence[int]],
    drafter: Drafter | RowDrafter | None,
    config: DecodeConfig,
    *,
    k_policy: Callable[[int], int] | None = None,
    target_cache: KVCache | None = None,
    constraint: Constraint | None = None,
) -> Iterator[BatchEvent]:
    """Decode B prompts together, yielding ``BatchPrefilled``, one ``BatchStep`` per cycle, then ``BatchFinished``.

    target: a loaded model (``lab.models.LoadedModel``: ``.model``, ``.tokenizer``, ``.eos_token_ids``).
    prompts: B token-id lists (chat template applied), each of length >= 1, any lengths.
    drafter: a ``Drafter``, a single-row ``RowDrafter`` (copied per row), or
        None for the target alone.
    k_policy: K for the next step given the current batch size (0: no draft
        this step); overrides ``config.k``. ``lab.studies`` AutoK is one.
    target_cache: an empty ``lab.kv`` cache of len(prompts) rows to fill (lets a
        test inspect it); by default one for ``config.engine_mode``.
    constraint: constrained output for every row, each with its own matcher.

    Raises ValueError for no prompts, an empty prompt, one that fills the
    context window, a bad k_policy value, or the compiled mode with a drafter
    that reads the target's passes through hooks (EAGLE).
    """
    model = target.model
    device = next(model.parameters()).device
    max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if not prompts:
        raise ValueError("decoding requires at least one prompt; got none")
    requests = [_Request.start(r, p, config, max_positions, device, constraint) for r, p in enumerate(prompts)]
    if target_cache is not None and (target_cache.batch_size != len(requests) or any(target_cache.lengths)):
        raise ValueError(f"target_cache requires an empty cache of {len(requests)} rows; got {target_cache.lengths}")
    sampling = config.sampling
    naive = constraint is not None and config.grammar_mode == "naive"
    eos = set(target.eos_token_ids)
    drafter = as_batch_drafter(drafter)
    mode = loop_engine_mode(config, device, drafter)
    refuse_tree_decode(config.tree_budget, len(requests), mode, drafter, constraint, naive)
    widest = (max(config.k, K_MAX if k_policy else 0) + 1) if drafter is not None else 1
    max_length = max(q.prompt.numel() + q.budget for q in requests) + widest  # what a static cache must hold
    if drafter is not None:
        drafter.reset(len(requests))

    start = time.perf_counter()
    # Prefill: every prompt token but the last, in one pass (the logits are not needed).
    cache = target_cache
    if cache is None:
        cache = new_kv_cache(model, len(requests), mode, max_length, config.compile_backend)
    if any(q.prompt.numel() > 1 for q in requests):
        cache.forward([q.prompt[:-1] for q in requests], last_only=True)
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
            backend = config.compile_backend
            drafts = drafter.propose([q.draft_context(k_step, sampling, naive, mode, backend, max_length,
                                                      config.tree_budget) for q in rows])
        sync_device(device)
        t1 = time.perf_counter()

        # 2. verify forward: per row [last committed] + draft -> K_b+1 distributions (right-padded);
        # a token tree (B = 1, eager): [last committed] + its N nodes under the tree's mask (lab.tree).
        tree = drafts[0].tree
        width = k_step + 1 if drafter is not None else 1  # the static modes' fixed width
        inputs = [torch.cat([q.committed[-1:], d.tokens]) for q, d in zip(rows, drafts)]
        if tree is not None:
            logits = tree_verify_forward(cache, rows[0].committed[-1:], tree)  # [1, N+1, V]
        else:
            logits = cache.forward(inputs, width=width)  # [B, W, V]
        if constraint is not None:
            logits = _grammar_masks(logits, rows, drafts, naive)

        # 3. accept, for the whole batch at once.
        target_probs = None
        if tree is not None and sampling.is_greedy:
            verdicts = [verify_tree_greedy(logits[0], tree)]
        elif sampling.is_greedy:
            verdicts = verify_greedy_batch(logits, [d.tokens for d in drafts])
        elif tree is not None:
            target_probs = logits_to_probs(logits, sampling)  # [1, N+1, V]
            verdicts = [verify_tree_sampling(target_probs[0], tree, rows[0].generator)]
        else:
            target_probs = logits_to_probs(logits, sampling)  # [B, W, V]
            verdicts = verify_sampling_batch(
                target_probs, [d.tokens for d in drafts], [d.probs for d in drafts], [q.generator for q in rows]
            )

        # 4. commit and roll back: each row keeps K/V of all its committed tokens but the new last one.
        if tree is not None:  # the accepted path's K/V gathered into place after the prefix and the root
            cache.keep_slots(accepted_slots(rows[0].committed.numel() - 1, verdicts[0].path))
        else:
            cache.keep([q.committed.numel() + v.num_accepted for q, v in zip(rows, verdicts)])
        commits = [
            q.commit(d, v, eos, target.tokenizer, config.stop_strings, max_positions, naive)
            for q, d, v in zip(rows, drafts, verdicts)
        ]
        sync_device(device)
        t2 = time.perf_counter()

        # 5. observe, report, and let finished rows leave the batch (no more work, no more tokens).
        if drafter is not None:
            drafter.observe([v.num_accepted for v in verdicts])
        draft_lengths = _draft_cache_lengths(drafter, len(rows))
        steps, finished = [], []
        for b, (q, draft, verdict, (emitted, reason)) in enumerate(zip(rows, drafts, verdicts, commits)):
            details = ()
            if config.record_details and len(draft) and draft.tree is None:
                row_probs = None if target_probs is None else target_probs[b, : len(draft) + 1]
                details = position_details(logits[b, : len(draft) + 1], row_probs, draft, verdict, sampling.is_greedy)
            steps.append(
                Step(
                    index=q.num_steps,
                    drafted=tuple(draft.tokens.tolist()),
                    num_accepted=verdict.num_accepted,
                    emitted=tuple(emitted),
                    final_kind=_final_kind(draft, verdict),
                    draft_ms=(t1 - t0) * 1e3,
                    verify_ms=(t2 - t1) * 1e3,
                    target_cache_len=cache.lengths[b],
                    draft_cache_len=draft_lengths[b],
                    details=details,
                    cut_by_grammar=draft.cut_by_grammar,
                    tree=draft.tree,
                    tree_path=getattr(verdict, "path", ()),
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
            width=logits.shape[1],
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

    if target_cache is None and hasattr(cache, "release"):
        cache.release()  # a static cache's storage goes back to the pool for the next decode
    yield BatchFinished(tuple(q.result for q in requests), time.perf_counter() - start)


def decode(
    target,
    prompt_ids: Sequence[int],
    drafter: Drafter | RowDrafter | None,
    config: DecodeConfig,
    *,
    target_cache: KVCache | None = None,
    constraint: Constraint | None = None,
) -> Iterator[TraceEvent]:
    """The loop at B = 1: yields a ``Prefilled``, one ``Step`` per cycle, then ``Finished``.

    prompt_ids: the prompt's token ids (chat template already applied), length >= 1.
    Otherwise as ``decode_batch``. Raises ValueError for an empty prompt or one
    that fills the context window.
    """
    for event in decode_batch(target, [prompt_ids], drafter, config, target_cache=target_cache, constraint=constraint):
        if isinstance(event, BatchPrefilled):
            yield event.prefilled[0]
        elif isinstance(event, BatchStep):
            yield event.steps[0]
        else:
            yield event.rows[0].finished


def loop_engine_mode(config: DecodeConfig, device: torch.device | str, drafter: Drafter | RowDrafter | None) -> str:
    """The engine mode the loop runs in for this config, device and drafter ("eager", "static" or "compiled").

    "auto" is compiled on CUDA and eager elsewhere; the compiled mode with a
    drafter that hooks the target's passes (EAGLE) falls back to static under
    "auto", and raises ValueError when asked for by name. A token tree (a tree
    budget and a drafter that drafts trees) runs eager under "auto": its mask
    and width change every step, which no static or captured pass takes.
    """
    device = torch.device(device)
    if config.engine_mode == "auto" and config.tree_budget and getattr(drafter, "drafts_trees", False):
        return "eager"
    mode = resolve_engine_mode(config.engine_mode, device)
    if mode == "compiled" and getattr(drafter, "reads_target_passes", False):
        # The drafter records the target's passes through forward hooks, which a captured pass does not run.
        if config.engine_mode != "auto":
            raise ValueError(f"the {drafter.name} drafter reads the target's hidden states through forward hooks, "
                             "which a compiled (captured) pass does not run: pick the eager or static engine")
        mode = "static"
    return mode


def _grammar_masks(logits: torch.Tensor, rows: list["_Request"], drafts: list[Draft], naive: bool) -> torch.Tensor:
    """Each row's verified positions masked by its grammar: float32 [B, W, V].

    Exact: every position, correction and bonus included, under the matcher at
    the committed prefix (a token tree's node rows under the matcher after the node's root path,
    ``GrammarState.mask_tree_positions``). Naive (teaching): the drafted positions unmasked, the
    matcher advanced over every drafted token (refusals ignored, nothing rolled
    back), and only the target's own last position masked, from that corrupted state.
    """
    masked = logits.float().clone()
    for b, (q, draft) in enumerate(zip(rows, drafts)):
        n = len(draft) + 1
        if naive:
            for token in draft.tokens.tolist():
                q.grammar.accept(token)
            masked[b, n - 1] = q.grammar.mask_next(logits[b, n - 1])
        elif draft.tree is not None:  # each node's row under the grammar state after its root path
            masked[b, :n] = q.grammar.mask_tree_positions(logits[b, :n], draft.tree.tokens.tolist(),
                                                          draft.tree.parents.tolist())
        else:
            masked[b, :n] = q.grammar.mask_draft_positions(logits[b, :n], draft.tokens)
    return masked


@dataclass
class _Request:
    """One request's own state in the loop: committed tokens, budget, random generator and matcher."""

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
        which = "The prompt" if index == 0 else f"Prompt {index}"
        if prompt.numel() == 0:
            raise ValueError(f"{which} is empty: type or paste a prompt first.")
        if prompt.numel() >= max_positions:
            raise ValueError(
                f"{which} has {prompt.numel()} tokens but the target's context window is {max_positions}: "
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

    def draft_context(
        self, k: int, sampling, naive: bool, mode: str, backend: str, max_length: int, tree_budget: int = 0
    ) -> DraftContext:
        """This row's drafter input; k (a tree's depth) shrinks to what the budget can take (0: draft nothing).
        A naive-mode drafter drafts without the grammar (the broken way being shown)."""
        k = max(0, min(k, self.remaining - 1))
        grammar = None if naive else self.grammar
        return DraftContext(self.committed, self.prompt.numel(), k, sampling, self.generator, grammar,
                            mode, backend, max_length, tree_budget)

    def commit(
        self, draft: Draft, verdict: Verdict, eos: set[int], tokenizer, stop_strings: tuple[str, ...],
        max_positions: int, naive: bool = False,
    ) -> tuple[list[int], StopReason | None]:
        """Append the accepted tokens and the target's own, cut at EOS / stop string / budget / context window.

        Exact: the grammar advances over exactly what was emitted. Naive: it already
        took every drafted token; only the target's own token is added.
        """
        path = list(verdict.path) if draft.tree is not None else range(verdict.num_accepted)
        new_tokens = draft.tokens[list(path)].tolist() + [verdict.next_token]
        emitted, reason = cut_emitted(new_tokens, self.generated, self.remaining, eos, tokenizer, stop_strings)
        if self.grammar is not None:
            for token in emitted[-1:] if naive else emitted:
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


# ---------------------------------------------------------------- helpers of the loop


def cut_emitted(
    new_tokens: list[int],
    generated: list[int],
    remaining: int,
    eos: set[int],
    tokenizer,
    stop_strings: tuple[str, ...],
) -> tuple[list[int], StopReason | None]:
    """Cut a step's new tokens at the first EOS, stop string or the budget."""
    emitted: list[int] = []
    for token in new_tokens[:remaining]:
        emitted.append(token)
        if token in eos:
            return emitted, "eos"
        if stop_strings and any(s in tokenizer.decode(generated + emitted) for s in stop_strings):
            return emitted, "stop_string"
    return emitted, ("max_new_tokens" if len(emitted) == remaining else None)


def output_text(tokenizer, generated: list[int], stop_strings: tuple[str, ...]) -> str:
    """The generated tokens' text, special tokens skipped, cut before the first stop string."""
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else ""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text


def position_details(
    logits: torch.Tensor,
    target_probs: torch.Tensor | None,
    draft: Draft,
    verdict: Verdict,
    greedy: bool,
) -> tuple[PositionDetail, ...]:
    """Per checked position of one row: draft and target probabilities, the draw and the decision.

    logits: [K'+1, V] the row's own; target_probs: [K'+1, V] processed (sampling) or None (greedy).
    """
    probs = torch.softmax(logits.float(), -1) if target_probs is None else target_probs  # [K'+1, V]
    out = []
    for i, acceptance in enumerate(verdict.acceptance_probs):
        token = int(draft.tokens[i])
        top = torch.topk(probs[i], DETAIL_TOP)
        out.append(
            PositionDetail(
                draft_token=token,
                draft_prob=None if draft.probs is None else float(draft.probs[i, token]),
                target_prob=float(probs[i, token]),
                target_top=tuple(zip(top.indices.tolist(), top.values.tolist())),
                acceptance_prob=acceptance,
                uniform=None if greedy else verdict.uniforms[i],
                accepted=i < verdict.num_accepted,
            )
        )
    return tuple(out)


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _final_kind(draft: Draft, verdict: Verdict) -> str:
    """The class of the target's own token: target (no draft), bonus (all accepted) or corrected."""
    if not len(draft):
        return "target"
    return "bonus" if verdict.is_bonus(len(draft)) else "corrected"


def _draft_cache_lengths(drafter: Drafter | None, batch_size: int) -> list[int | None]:
    lengths = getattr(drafter, "cache_lengths", None)
    return lengths() if lengths is not None else [None] * batch_size


# ---------------------------------------------------------------- results gathered from the events


@dataclass
class DecodeResult:
    """A finished decode of one request gathered from its events (see ``run``)."""

    token_ids: list[int]
    text: str
    reason: str
    steps: list[Step] = field(default_factory=list)
    stats: SpecDecodingStats = field(default_factory=SpecDecodingStats)


@dataclass
class BatchResult:
    """A finished batched decode gathered from its events (see ``run_batch``).

    rows: per request, in request order, a ``DecodeResult`` (its stats observe
        that request's own events, so wall_s is the request's latency).
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
    drafter: Drafter | RowDrafter | None,
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
                DecodeResult(list(row.finished.token_ids), row.finished.text, row.finished.reason,
                             steps_of[r], stats[r])
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


def run(
    target,
    prompt_ids: Sequence[int],
    drafter: Drafter | RowDrafter | None,
    config: DecodeConfig,
    constraint: Constraint | None = None,
) -> DecodeResult:
    """Run ``decode`` to the end and gather its events into a ``DecodeResult``."""
    stats = SpecDecodingStats()
    steps: list[Step] = []
    for event in decode(target, prompt_ids, drafter, config, constraint=constraint):
        stats.observe(event)
        if isinstance(event, Step):
            steps.append(event)
        elif isinstance(event, Finished):
            return DecodeResult(list(event.token_ids), event.text, event.reason, steps, stats)
    raise RuntimeError("decode ended without a Finished event")
