"""The decode loop's own cost per step, by batch size: what the bare passes leave out.

The bare passes (``lab.studies.auto_k.time_batch_passes``) time the target's
forward and the drafter's proposal alone. A real step of ``lab.decode`` does
more, and more of it with every row: the verdicts, each row's commit (the cut,
the stop checks), the cache rollback and trim, the drafter's observe, the trace
events. On this 2-core CPU that work made a Batch sweep at B = 8 21-30 % slower
than the bare passes predicted (docs/2026-12-07-epyc-avx512bf16.md).

``profile_loop`` runs the real loop (``lab.decode.run_batch``) at each batch
size on profiling prompts, speculation off and at K, and ``loop_overheads``
reads its ``BatchStep`` events: a step's wall time is the gap between its
``time_s`` and the previous one's (the first: after the prefill), and

    overhead(B)      = median over off steps of B rows of  wall - step(B, 0, 1, context)
    spec_overhead(B) = median over speculating steps of B rows of
                       wall - step(B, K, width, context) - overhead(B)

with step the bare costs' own step (``StepCosts.step_ms`` without overheads:
target, drafts and the context term, slope or tables, as the simulator charges
it) and context the tokens the step read as the costs count them (their
``context_rule``), over the steps at each run's own batch size (its first
step's): the few steps a run takes after some rows finish are too few to count.
With a draft model's prefill timed apart (``ContextCosts.draft_prefill_ms``), a speculating
run's first step, where the draft prefills, is left out. A speculating step whose rows all
found no draft (width 1) counts too: the
simulator charges it the K drafts and width 1, as the loop spent the search.
Negative medians (noise) become 0. The prefill is refitted from the same runs
(used by costs without context tables): ms per prompt token of the padded batch
(rows x the longest prompt), plus a fixed part: the off runs' median first step.
``time_context`` times the tables: one-token passes and prefills by context at one batch size. The simulator's prefill
yields the first token (as vLLM's and llama.cpp's do); the lab's loop prefills
all prompt tokens but the last and makes the first token in its first step.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence

from lab.simulate.costs import StepCosts

Progress = Callable[[float, str], None]


def step_walls_ms(result) -> list[tuple[int, int, float, int, int]]:
    """(batch size, width, wall ms, cache slots per row, the rows' own tokens summed) of every step of a
    ``lab.decode.BatchResult``, in order.

    wall: this step's ``time_s`` minus the previous step's (the first step: minus the prefill).
    The rows' own tokens: their ``target_cache_len`` (holes excluded), or slots x rows when not recorded.
    """
    out, previous_s = [], result.prefill_ms / 1e3
    for step in result.steps:
        rows = getattr(step, "steps", None)
        own = sum(row.target_cache_len for row in rows) if rows else step.batch_size * step.target_cache_slots
        out.append((step.batch_size, step.width, (step.time_s - previous_s) * 1e3, step.target_cache_slots, own))
        previous_s = step.time_s
    return out


CONTEXTS = (64, 256, 512, 768)  # tokens per row at which ``time_context`` times passes and prefills


def time_context(model, batch_size: int, contexts=CONTEXTS, repeats: int = 5) -> tuple[dict[int, float],
                                                                                   dict[int, float]]:
    """({L: ms of a one-token pass}, {L: ms of the prefill}) of batch_size rows at each context L (tokens per row).

    One cache per L (the decode loop's eager ``lab.kv`` cache) is prefilled with batch_size x L
    random tokens, each prefill timed once (after an untimed prefill of the shortest context: a
    cold first pass is slow); then ``repeats`` rounds each time one one-token pass per L, rolled
    back, and the median per L is kept. The rounds interleave the contexts, so a minute in which
    the machine runs slow (here: 334 ms against 235 for the same pass) moves every context alike
    instead of bending the table. model: a causal LM.
    Raises ValueError for no contexts, L < 1, repeats < 1 or batch_size < 1.
    """
    import time

    import torch

    from lab.decode import sync_device
    from lab.kv import new_kv_cache

    if not contexts or min(contexts) < 1 or repeats < 1 or batch_size < 1:
        raise ValueError(f"time_context requires contexts >= 1, repeats >= 1 and a batch >= 1; got {list(contexts)}, "
                         f"{repeats}, {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    caches, prefills = {}, {}
    with torch.inference_mode():
        for i, length in enumerate([min(contexts), *sorted(set(contexts))]):
            cache = new_kv_cache(model, batch_size, "eager", length + 1)
            rows = list(torch.randint(vocab, (batch_size, length), generator=generator))
            sync_device(device)
            start = time.perf_counter()
            cache.forward(rows, last_only=True)
            sync_device(device)
            if i > 0:  # the first is the untimed warm-up
                prefills[length] = (time.perf_counter() - start) * 1e3
                caches[length] = (cache, list(cache.lengths))
        token = list(torch.randint(vocab, (batch_size, 1), generator=generator))
        samples: dict[int, list[float]] = {length: [] for length in caches}
        for round_ in range(repeats + 1):  # the first round untimed: each cache's first pass
            for length, (cache, lengths) in caches.items():
                sync_device(device)
                start = time.perf_counter()
                cache.forward(token, width=1)
                sync_device(device)
                if round_ > 0:
                    samples[length].append((time.perf_counter() - start) * 1e3)
                cache.keep(lengths)
    return {length: statistics.median(ms) for length, ms in samples.items()}, prefills


def loop_overheads(off_runs: Sequence, on_runs: Sequence, costs: StepCosts, k: int) -> tuple[dict[int, float],
                                                                                            dict[int, float]]:
    """(overhead_ms, spec_overhead_ms) by batch size from real loop runs (see the module docstring).

    off_runs: ``BatchResult`` s without a drafter; on_runs: with the drafter at K = k (>= 1).
    costs: the bare pass costs (and their context term: slope or tables), without loop overheads, of the same target and drafter on this machine.
    Raises ValueError for k < 1 or no steps in off_runs.
    """
    if k < 1:
        raise ValueError(f"the loop profile requires the runs' K >= 1; got {k}")
    off: dict[int, list[float]] = {}
    for run in off_runs:
        for b, width, wall_ms, slots, own in step_walls_ms(run):
            if b == run.steps[0].batch_size:
                off.setdefault(b, []).append(wall_ms - costs.step_ms(b, 0, width, _read(costs, b, slots, own)))
    if not off:
        raise ValueError("the loop profile requires steps of runs with speculation off; got none")
    overhead = {b: max(0.0, statistics.median(ms)) for b, ms in off.items()}
    with_overhead = dataclasses.replace(costs, overhead_ms=overhead, spec_overhead_ms={})
    on: dict[int, list[float]] = {}
    for run in on_runs:
        # the first step is left out when a draft model's prefill is charged apart (``ContextCosts``): it is
        # in that step (the draft prefills at its first proposal), and in a short run it moved the median
        first = 1 if costs.by_context is not None and costs.by_context.draft_prefill_ms and len(run.steps) > 1 else 0
        for b, width, wall_ms, slots, own in step_walls_ms(run)[first:]:
            if b == run.steps[0].batch_size:
                on.setdefault(b, []).append(wall_ms - with_overhead.step_ms(b, k, width, _read(costs, b, slots, own)))
    return overhead, {b: max(0.0, statistics.median(ms)) for b, ms in on.items()}


def _read(costs: StepCosts, batch_size: int, slots: int, own: int) -> int:
    """The tokens a step's attention reads as ``costs`` count them (``StepCosts.context_rule``)."""
    padded = costs.width_rule == "max" and costs.context_rule == "longest"
    return batch_size * slots if padded else own


def prefill_per_token_ms(runs: Sequence, prompt_tokens: Sequence[int]) -> float:
    """Median over runs of prefill ms / the run's prompt tokens (as ``profile_loop`` counts them); 0 for none."""
    per = [r.prefill_ms / n for r, n in zip(runs, prompt_tokens) if n > 0]
    return statistics.median(per) if per else 0.0


def profile_loop(target, drafter, prompt_ids: Sequence[Sequence[int]], batch_sizes: Sequence[int], k: int,
                 max_new_tokens: int = 24, progress: Progress | None = None) -> tuple[list, list, list[int]]:
    """Run the real decode loop once per batch size, off and with the drafter at K.

    Returns (off runs, on runs, prompt tokens of each run padded: rows x the longest), one of each per batch size.

    prompt_ids: the profiling prompts' token ids, cycled to B rows (use other prompts than
    the ones a prediction will be checked against). Greedy, ``max_new_tokens`` a request,
    EOS respected as in a real run. Raises ValueError for no prompts, a batch size < 1 or k < 1.
    """
    from lab.config import DecodeConfig
    from lab.decode import run_batch

    if not prompt_ids or not batch_sizes or min(batch_sizes) < 1 or k < 1:
        raise ValueError(f"the loop profile requires prompts, batch sizes >= 1 and K >= 1; got {len(prompt_ids)} "
                         f"prompts, batch sizes {list(batch_sizes)}, K={k}")
    report = progress or (lambda fraction, message: None)
    config = DecodeConfig(k=k, max_new_tokens=max_new_tokens)
    off_runs, on_runs, prompt_tokens = [], [], []
    for i, b in enumerate(sorted(set(batch_sizes))):
        report(i / len(batch_sizes), f"running the decode loop at batch size {b}")
        rows = [list(prompt_ids[j % len(prompt_ids)]) for j in range(b)]
        off_runs.append(run_batch(target, rows, None, config))
        on_runs.append(run_batch(target, rows, drafter, config))
        prompt_tokens.append(b * max(len(row) for row in rows))  # the loop pads the prefill to the longest
    return off_runs, on_runs, prompt_tokens


def with_loop_profile(costs: StepCosts, off_runs: Sequence, on_runs: Sequence, prompt_tokens: Sequence[int],
                      k: int) -> StepCosts:
    """``costs`` with the loop's overheads and prefill (see the module docstring), as ``profile_loop`` returns them."""
    overhead, spec_overhead = loop_overheads(off_runs, on_runs, costs, k)
    prefill = prefill_per_token_ms([*off_runs, *on_runs], [*prompt_tokens, *prompt_tokens])
    first_steps = [step_walls_ms(run)[0][2] for run in off_runs if run.steps]
    return dataclasses.replace(costs, overhead_ms=overhead, spec_overhead_ms=spec_overhead,
                               prefill_ms_per_token=prefill or costs.prefill_ms_per_token,
                               prefill_fixed_ms=statistics.median(first_steps) if first_steps else 0.0,
                               source=f"{costs.source} + decode-loop profile")
