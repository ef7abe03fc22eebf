"""The speculative decode loop (Leviathan et al. 2023; Chen et al. 2023).

Each step, in order:
  1. draft: the drafter proposes up to K tokens (none for the target alone);
  2. verify forward: the target reads [last committed token] + draft in one pass,
     giving K'+1 next-token distributions;
  3. accept: ``lab.verify`` keeps a prefix of the draft and adds the target's own
     token (correction or bonus);
  4. commit and roll back: the accepted tokens are committed and the target's KV
     cache is cropped to the committed tokens (the draft model crops its own cache
     on its next proposal);
  5. observe: the drafter hears how many were accepted; a ``Step`` event is yielded.

The target's cache always holds every committed token but the last, which is fed
again as the first input of the next verify pass. With no drafter every step is
one plain target decode step through the same code, so measured speedups compare
like with like. The loop never formats or prints.

Passes run through ``lab.runner`` in ``config.engine_mode``: eagerly over a
growing cache (the CPU default), or over a static cache with the verify pass at
its fixed width K+1 (a short draft is padded, never a new shape) and, compiled,
replayed as one captured graph (the CUDA default). Rollback then only moves the
cache position back. Greedy acceptance reads the target's argmax tokens to the
host once per step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lab.config import DecodeConfig
from lab.drafters.base import Draft, DraftContext, Drafter
from lab.grammar import Constraint
from lab.metrics import SpecDecodingStats
from lab.runner import KVRunner, give_back, resolve_engine_mode, take_runner
from lab.sampling import logits_to_probs
from lab.trace import Finished, PositionDetail, Prefilled, Step, StopReason, TraceEvent
from lab.verify import Verdict, verify_greedy, verify_sampling

DETAIL_TOP = 5


@torch.inference_mode()
def decode(
    target,
    prompt_ids: Sequence[int],
    drafter: Drafter | None,
    config: DecodeConfig,
    runner: KVRunner | None = None,
    constraint: Constraint | None = None,
) -> Iterator[TraceEvent]:
    """Decode speculatively, yielding a ``Prefilled``, one ``Step`` per cycle, then ``Finished``.

    target: a loaded model (``lab.models.LoadedModel``: ``.model``, ``.tokenizer``,
        ``.eos_token_ids``), batch 1.
    prompt_ids: the prompt's token ids (chat template already applied), length >= 1.
    drafter: the draft source, or None for the target alone.
    runner: the target's ``lab.runner.KVRunner`` (lets a caller inspect its cache
        between events); by default one taken for ``config.engine_mode``. It is
        reset for this sequence.
    constraint: constrained output (``lab.grammar``): drafting and every verified
        position, correction and bonus included, are masked by the grammar, and
        the matcher is rolled back over rejected drafts (``config.grammar_mode``
        "naive" shows the broken way instead).

    Greedy output (temperature 0) is token for token the target's own greedy
    output; sampled output follows the target's distribution.

    Raises ValueError for an empty prompt or one that fills the context window.
    """
    model = target.model
    device = next(model.parameters()).device
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)  # [P] on CPU
    max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if prompt.numel() == 0:
        raise ValueError("The prompt is empty: type or paste a prompt first.")
    if prompt.numel() >= max_positions:
        raise ValueError(
            f"The prompt has {prompt.numel()} tokens but the target's context window is {max_positions}: "
            "shorten the prompt."
        )
    sampling = config.sampling
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    eos = set(target.eos_token_ids)
    budget = min(config.max_new_tokens, max_positions - prompt.numel())
    if drafter is not None:
        drafter.reset()
    grammar = constraint.new_state() if constraint is not None else None
    naive = grammar is not None and config.grammar_mode == "naive"

    mode = resolve_engine_mode(config.engine_mode, device)
    if mode == "compiled" and getattr(drafter, "reads_target_passes", False):
        # The drafter records the target's passes through forward hooks, which a captured pass does not run.
        if config.engine_mode != "auto":
            raise ValueError(f"the {drafter.name} drafter reads the target's hidden states through forward hooks, "
                             "which a compiled (captured) pass does not run: pick the eager or static engine")
        mode = "static"
    verify_width = config.k + 1 if drafter is not None else 1  # the fixed width of the static modes
    max_length = prompt.numel() + budget + verify_width  # what a static cache must hold, padding included
    with _taken(runner, model, mode, config.compile_backend) as runner:
        start = time.perf_counter()
        # Prefill: the cache takes every prompt token but the last (eagerly, at the prompt's own width).
        runner.reset(max_length)
        if prompt.numel() > 1:
            runner.forward(prompt[None, :-1], last_only=True)  # the logits are not needed
        sync_device(device)
        yield Prefilled(prompt.numel(), (time.perf_counter() - start) * 1e3)

        committed = prompt.clone()  # [T] CPU, prompt then output
        generated: list[int] = []
        reason: StopReason | None = None
        step_index = 0
        while reason is None:
            remaining = budget - len(generated)
            # 1. draft: never more than the budget can take (accepted + 1 <= remaining).
            t0 = time.perf_counter()
            draft = Draft.empty()
            if drafter is not None and remaining > 1:
                draft = drafter.propose(
                    DraftContext(
                        committed, prompt.numel(), min(config.k, remaining - 1), sampling, generator,
                        None if naive else grammar, runner.mode, config.compile_backend, max_length,
                    )
                )
            sync_device(device)
            t1 = time.perf_counter()

            # 2. verify forward: [last committed] + draft -> K'+1 distributions.
            inputs = torch.cat([committed[-1:], draft.tokens])[None]  # [1, K'+1], padded to K+1 when static
            logits = runner.forward(inputs, width=verify_width)  # [K'+1, V]
            if naive:
                logits = _naive_grammar_masks(grammar, logits, draft.tokens)
            elif grammar is not None:
                logits = grammar.mask_draft_positions(logits, draft.tokens)

            # 3. accept.
            if sampling.is_greedy:
                verdict = verify_greedy(logits, draft.tokens)
                target_probs = None
            else:
                target_probs = logits_to_probs(logits, sampling)  # [K'+1, V]
                verdict = verify_sampling(target_probs, draft.tokens, draft.probs, generator)

            # 4. commit and roll back: keep K/V of all committed tokens but the new last one.
            runner.crop(committed.numel() + verdict.num_accepted)
            new_tokens = draft.tokens[: verdict.num_accepted].tolist() + [verdict.next_token]
            emitted, reason = cut_emitted(new_tokens, generated, remaining, eos, target.tokenizer, config.stop_strings)
            if grammar is not None:
                # Exact: the matcher is at the committed prefix; advance it over what was committed.
                # Naive: it already took every drafted token; only the target's own token is added.
                for token in emitted[-1:] if naive else emitted:
                    grammar.accept(token)
            generated += emitted
            committed = torch.cat([committed, torch.tensor(emitted, dtype=torch.long)])
            sync_device(device)
            t2 = time.perf_counter()

            # 5. observe.
            if drafter is not None:
                drafter.observe(verdict.num_accepted)
            if reason is None and committed.numel() >= max_positions:
                reason = "context_window"
            details = ()
            if config.record_details and len(draft):
                details = position_details(logits, target_probs, draft, verdict, sampling.is_greedy)
            yield Step(
                index=step_index,
                drafted=tuple(draft.tokens.tolist()),
                num_accepted=verdict.num_accepted,
                emitted=tuple(emitted),
                final_kind="target" if not len(draft) else ("bonus" if verdict.is_bonus(len(draft)) else "corrected"),
                draft_ms=(t1 - t0) * 1e3,
                verify_ms=(t2 - t1) * 1e3,
                target_cache_len=runner.length,
                draft_cache_len=_draft_cache_len(drafter),
                details=details,
                cut_by_grammar=draft.cut_by_grammar,
            )
            step_index += 1

        text = output_text(target.tokenizer, generated, config.stop_strings)
        yield Finished(reason, tuple(generated), text, time.perf_counter() - start)


@dataclass
class DecodeResult:
    """A finished decode gathered from its events (see ``run``)."""

    token_ids: list[int]
    text: str
    reason: str
    steps: list[Step] = field(default_factory=list)
    stats: SpecDecodingStats = field(default_factory=SpecDecodingStats)


def run(
    target,
    prompt_ids: Sequence[int],
    drafter: Drafter | None,
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


def _naive_grammar_masks(grammar, logits: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
    """The broken way, for teaching: drafted positions unmasked, the matcher advanced
    over every drafted token (refusals ignored, nothing rolled back), and only the
    target's own last position masked, from that corrupted state."""
    for token in draft_tokens.tolist():
        grammar.accept(token)
    masked = logits.float().clone()
    masked[-1] = grammar.mask_next(logits[-1])
    return masked


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
        if stop_strings and _has_stop(tokenizer.decode(generated + emitted), stop_strings):
            return emitted, "stop_string"
    return emitted, ("max_new_tokens" if len(emitted) == remaining else None)


def _has_stop(text: str, stop_strings: tuple[str, ...]) -> bool:
    return any(s in text for s in stop_strings)


def output_text(tokenizer, generated: list[int], stop_strings: tuple[str, ...]) -> str:
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
    """Per checked position: draft and target probabilities, the draw and the decision."""
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


def _draft_cache_len(drafter: Drafter | None) -> int | None:
    runner = getattr(drafter, "runner", None)
    if runner is not None:
        return runner.length  # a host count: no device sync
    cache = getattr(drafter, "cache", None)
    return None if cache is None else int(cache.get_seq_length())


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _taken(runner: KVRunner | None, model, mode: str, backend: str) -> Iterator[KVRunner]:
    """The caller's runner, or one taken from ``lab.runner``'s pool and given back at the end."""
    if runner is not None:
        yield runner
        return
    runner = take_runner(model, mode, backend)
    try:
        yield runner
    finally:
        give_back(runner)
