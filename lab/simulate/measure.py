"""This machine's step costs for the simulator: the Batch sweep's pass timings by batch size, plus prefill, cached.

``machine_costs`` times, over real prompts, target verify passes of B rows x w
tokens (w = 1..k_max+1) and drafting per token for every B asked
(``lab.studies.auto_k.time_batch_passes``, the lab's one pass timer), and a
prefill of the prompts at batch 1; then runs the real decode loop at each B
on the same prompts, off and at K = min(4, k_max), for the loop's own work per
step beyond the bare passes and the batch's prefill (``lab.simulate.profile``),
and the cost of context: the slope of a one-token pass between 64 and 512
cached tokens at the largest B (``context_ms_per_token``), the part of every
pass timing it explains taken out of it.
The prompts are the lab's own sets, not Spec-Bench's: a check against a run on
Spec-Bench prompts predicts prompts the costs never saw. The result is
cached per machine, target and drafter as the simulator's costs JSON under
``lab.models.cache_dir() / "calibration"`` (beside ``lab.studies.calibrate``'s),
and reused when it covers the batch sizes and K asked for and holds the loop
profile (an older file without it is timed again).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lab.simulate.costs import StepCosts, costs_from_dict

DEFAULT_PROMPTS = ("json_extraction:2", "summarization:2", "open_qa:2", "code_editing:2")
Progress = Callable[[float, str], None]


def costs_path(target: str, drafter: str, draft: str | None, device: str = "auto") -> Path:
    from lab.hardware import machine_info, machine_key, resolve_device
    from lab.models import cache_dir

    name = f"workload__{target}__{draft or drafter}.json".replace("/", "_")
    return cache_dir() / "calibration" / machine_key(machine_info(resolve_device(device))) / name


def cached_costs(target: str, drafter: str, draft: str | None = None, device: str = "auto") -> StepCosts | None:
    """The cached machine costs of this target and drafter, or None (nothing is timed; a file from before the
    decode-loop profile counts as none: its bare passes predicted a batch of 8 21-30 % too fast)."""
    try:
        costs = costs_from_dict(json.loads(costs_path(target, drafter, draft, device).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return costs if costs.overhead_ms else None


def machine_costs(target: str, drafter: str, draft: str | None = None, batch_sizes: Sequence[int] = (1, 2, 4, 8),
                  k_max: int = 8, prompts: Sequence[str] = DEFAULT_PROMPTS, device: str = "auto",
                  refresh: bool = False, repeats: int = 3, progress: Progress | None = None,
                  loop_tokens: int = 24) -> StepCosts:
    """Time (or read the cached timing of) a target and drafter here at each batch size (see the module docstring).

    target, draft: presets or folders; drafter: a name of ``lab.drafters.DRAFTER_NAMES``.
    loop_tokens: output tokens a request in the loop profile (more: steadier, slower).
    Raises ValueError for no batch sizes or K out of 1..16; ``lab.models.ModelError`` when a model cannot load.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"machine costs require batch sizes >= 1; got {list(batch_sizes)}")
    if not 1 <= k_max <= 16:
        raise ValueError(f"machine costs require k_max in 1..16; got {k_max}")
    report = progress or (lambda fraction, message: None)
    cached = None if refresh else cached_costs(target, drafter, draft, device)
    if cached is not None and set(batch_sizes) <= set(cached.batch_sizes) and \
            all((b, k_max + 1) in cached.target_ms for b in batch_sizes) and \
            set(batch_sizes) <= set(cached.overhead_ms):
        report(1.0, f"reusing the cached costs at {costs_path(target, drafter, draft, device)}")
        return cached
    from lab.drafters import make_drafter
    from lab.models import encode_prompt, load_model
    from lab.prompts import load_prompt_sets

    start = time.perf_counter()
    report(0.0, f"loading {target}")
    loaded = load_model(target, device=None if device == "auto" else device)
    draft_model = load_model(draft, device=None if device == "auto" else device) if draft else None
    batch_drafter = make_drafter(drafter, loaded, draft_model)
    prompt_ids = [encode_prompt(loaded, p.text) for p in load_prompt_sets(list(prompts))]
    costs = time_costs(loaded, batch_drafter, prompt_ids, batch_sizes, k_max, str(target), str(draft or drafter),
                       repeats, loop_tokens, report)
    path = costs_path(target, drafter, draft, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs.as_dict() | {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                  "wall_s": time.perf_counter() - start}, indent=1))
    report(1.0, f"timed in {time.perf_counter() - start:.0f} s")
    return costs


def time_costs(loaded, batch_drafter, prompt_ids: Sequence[Sequence[int]], batch_sizes: Sequence[int], k_max: int,
               model: str, drafter: str, repeats: int = 3, loop_tokens: int = 24,
               progress: Progress | None = None) -> StepCosts:
    """Time loaded models here (see the module docstring): bare passes, a prefill, the decode loop; nothing cached.

    loaded: a ``lab.models`` target; batch_drafter: its drafter (``lab.drafters.make_drafter``);
    prompt_ids: the profiling prompts' token ids; model, drafter: names the costs carry.
    """
    from lab.simulate.costs import costs_from_cost_model
    from lab.simulate.profile import context_ms_per_token, profile_loop, with_loop_profile
    from lab.studies.auto_k import time_batch_passes
    from lab.studies.passes import time_passes

    report = progress or (lambda fraction, message: None)
    time_batch_passes(loaded, batch_drafter, prompt_ids, [1], k_max, repeats=1)  # untimed: a cold first pass is slow
    cost = None
    for i, b in enumerate(sorted(set(batch_sizes))):
        report(0.1 + 0.4 * i / len(batch_sizes), f"timing passes at batch size {b}")
        cost = time_batch_passes(loaded, batch_drafter, prompt_ids, [b], k_max, repeats=repeats, cost=cost)
    length = int(statistics.median(len(p) for p in prompt_ids))
    report(0.5, f"timing a prefill of {length} tokens")
    prefill_ms = time_passes(loaded.model, [length], context_tokens=1, repeats=repeats)[length]
    costs = costs_from_cost_model(cost, prefill_ms_per_token=prefill_ms / length, model=model, drafter=drafter)
    # the context term: its slope, timed at the largest batch; the passes above ran at the prompts' own contexts
    # (rows cycled over the prompts, padded to the longest), which the term now charges, so they lose that part
    top = max(batch_sizes)
    report(0.52, f"timing the context's cost at batch size {top}")
    slope = context_ms_per_token(loaded.model, top, repeats=repeats)
    slots = {b: b * max(len(prompt_ids[i % len(prompt_ids)]) for i in range(b)) for b in costs.batch_sizes}
    bare = {(b, w): max(0.0, ms - slope * slots[b]) for (b, w), ms in costs.target_ms.items()}
    costs = dataclasses.replace(costs, context_ms_per_token=slope, target_ms=bare)
    k = min(4, k_max)
    loop = profile_loop(loaded, batch_drafter, prompt_ids, batch_sizes, k, loop_tokens,
                        progress=lambda f, message: report(0.55 + 0.4 * f, message))
    return with_loop_profile(costs, *loop, k)
