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

    overhead(B)      = median over off steps of B rows of  wall - target(B, 1) - context(step)
    spec_overhead(B) = median over speculating steps of B rows of
                       wall - target(B, width) - draft(B, K) - overhead(B) - context(step)

with context(step) = context_ms_per_token x B x the step's cache slots per row
(the costs' own context term, as the simulator charges it; 0 without one)

with target and draft the bare costs, over the steps at each run's own batch size
(its first step's): the few steps a run takes after some rows finish are too few to count.
A speculating step whose rows all found no draft (width 1) counts too: the
simulator charges it the K drafts and width 1, as the loop spent the search.
Negative medians (noise) become 0. The prefill is refitted from the same runs:
ms per prompt token of the padded batch (rows x the longest prompt), as the simulator charges it,
plus a fixed part: the off runs' median first step. The simulator's prefill
yields the first token (as vLLM's and llama.cpp's do); the lab's loop prefills
all prompt tokens but the last and makes the first token in its first step.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence

from lab.simulate.costs import StepCosts

Progress = Callable[[float, str], None]


def step_walls_ms(result) -> list[tuple[int, int, float, int]]:
    """(batch size, width, wall ms, cache slots per row) of every step of a ``lab.decode.BatchResult``, in order.

    wall: this step's ``time_s`` minus the previous step's (the first step: minus the prefill).
    """
    out, previous_s = [], result.prefill_ms / 1e3
    for step in result.steps:
        out.append((step.batch_size, step.width, (step.time_s - previous_s) * 1e3, step.target_cache_slots))
        previous_s = step.time_s
    return out


def context_ms_per_token(model, batch_size: int, short: int = 64, long: int = 512, repeats: int = 3) -> float:
    """ms per cached token over the batch (rows x slots) of a one-token pass: the slope between two contexts.

    Times bare passes of batch_size rows after ``short`` and after ``long`` cached tokens
    (``lab.studies.passes.time_passes``); 0 when the longer one was not slower (noise).
    """
    from lab.studies.passes import time_passes

    fast = time_passes(model, [1], context_tokens=short, repeats=repeats, batch_size=batch_size)[1]
    slow = time_passes(model, [1], context_tokens=long, repeats=repeats, batch_size=batch_size)[1]
    return max(0.0, (slow - fast) / (batch_size * (long - short)))


def loop_overheads(off_runs: Sequence, on_runs: Sequence, costs: StepCosts, k: int) -> tuple[dict[int, float],
                                                                                            dict[int, float]]:
    """(overhead_ms, spec_overhead_ms) by batch size from real loop runs (see the module docstring).

    off_runs: ``BatchResult`` s without a drafter; on_runs: with the drafter at K = k (>= 1).
    costs: the bare pass costs of the same target and drafter on this machine.
    Raises ValueError for k < 1 or no steps in off_runs.
    """
    if k < 1:
        raise ValueError(f"the loop profile requires the runs' K >= 1; got {k}")
    off: dict[int, list[float]] = {}
    for run in off_runs:
        for b, width, wall_ms, slots in step_walls_ms(run):
            if b == run.steps[0].batch_size:
                off.setdefault(b, []).append(wall_ms - costs.target(b, width) - costs.context_ms_per_token * b * slots)
    if not off:
        raise ValueError("the loop profile requires steps of runs with speculation off; got none")
    overhead = {b: max(0.0, statistics.median(ms)) for b, ms in off.items()}
    with_overhead = dataclasses.replace(costs, overhead_ms=overhead, spec_overhead_ms={})
    on: dict[int, list[float]] = {}
    for run in on_runs:
        for b, width, wall_ms, slots in step_walls_ms(run):
            if b == run.steps[0].batch_size:
                on.setdefault(b, []).append(wall_ms - costs.target(b, width) - costs.draft(b, k)
                                            - with_overhead.overhead(b, 0) - costs.context_ms_per_token * b * slots)
    return overhead, {b: max(0.0, statistics.median(ms)) for b, ms in on.items()}


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
