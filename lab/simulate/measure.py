"""This machine's step costs for the simulator: the Batch sweep's pass timings by batch size, plus prefill, cached.

``machine_costs`` times, over real prompts, target verify passes of B rows x w
tokens (w = 1..k_max+1) and drafting per token for every B asked
(``lab.studies.auto_k.time_batch_passes``, the lab's one pass timer); then, at
each B, one-token passes and prefills at 64, 256, 512 and 768 tokens per row,
the target's and a separate draft model's (``lab.simulate.profile.time_context``:
the costs' ``by_context`` tables); then runs the real decode loop at each B on
the same prompts, off and at K = min(4, k_max), for the loop's own work per
step beyond the bare passes (``lab.simulate.profile``).
The prompts are the lab's own sets, not Spec-Bench's: a check against a run on
Spec-Bench prompts predicts prompts the costs never saw. The result is
cached per machine, target and drafter as the simulator's costs JSON under
``lab.models.cache_dir() / "calibration"`` (beside ``lab.studies.calibrate``'s),
and reused when it covers the batch sizes and K asked for and holds the loop
profile and the context tables (an older file without them is timed again).
"""

from __future__ import annotations

import dataclasses
import json
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
    decode-loop profile or the context tables counts as none: the first predicted a batch of 8 21-30 % too
    fast, the second charged context by one slope)."""
    try:
        costs = costs_from_dict(json.loads(costs_path(target, drafter, draft, device).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return costs if costs.overhead_ms and costs.by_context is not None else None


def timing_warning(target: str, drafter: str, draft: str | None = None, device: str = "auto") -> str | None:
    """The line to show beside cached machine costs timed while other work kept the cores busy (else None):
    such costs are slow by whatever ran beside them, and stay cached until re-timed (``refresh``)."""
    try:
        return json.loads(costs_path(target, drafter, draft, device).read_text()).get("load_warning")
    except (OSError, ValueError, AttributeError):
        return None


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
            set(batch_sizes) <= set(cached.overhead_ms) and set(batch_sizes) <= set(cached.by_context.target_pass_ms):
        report(1.0, f"reusing the cached costs at {costs_path(target, drafter, draft, device)}")
        return cached
    from lab import device_queue
    from lab.drafters import make_drafter
    from lab.hardware import resolve_device
    from lab.load import measure_load
    from lab.models import encode_prompt, load_model
    from lab.prompts import load_prompt_sets

    start = time.perf_counter()
    report(0.0, f"loading {target}")
    loaded = load_model(target, device=None if device == "auto" else device)
    draft_model = load_model(draft, device=None if device == "auto" else device) if draft else None
    batch_drafter = make_drafter(drafter, loaded, draft_model)
    prompt_ids = [encode_prompt(loaded, p.text) for p in load_prompt_sets(list(prompts))]
    # held like the lab's other timed runs (another page's decode waits), and watched for outside load
    with device_queue.hold(resolve_device(device), "workload costs"), measure_load() as meter:
        costs = time_costs(loaded, batch_drafter, prompt_ids, batch_sizes, k_max, str(target), str(draft or drafter),
                           repeats, loop_tokens, report, None if draft_model is None else draft_model.model)
    path = costs_path(target, drafter, draft, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    load = meter.report
    path.write_text(json.dumps(costs.as_dict() | {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                  "wall_s": time.perf_counter() - start,
                                                  "load": None if load is None else load.as_dict(),
                                                  "load_warning": None if load is None else load.warning()},
                               indent=1))
    report(1.0, f"timed in {time.perf_counter() - start:.0f} s")
    return costs


def time_costs(loaded, batch_drafter, prompt_ids: Sequence[Sequence[int]], batch_sizes: Sequence[int], k_max: int,
               model: str, drafter: str, repeats: int = 3, loop_tokens: int = 24,
               progress: Progress | None = None, draft_model=None) -> StepCosts:
    """Time loaded models here (see the module docstring): bare passes, a prefill, the decode loop; nothing cached.

    loaded: a ``lab.models`` target; batch_drafter: its drafter (``lab.drafters.make_drafter``);
    prompt_ids: the profiling prompts' token ids; model, drafter: names the costs carry.
    draft_model: the drafter's separate draft model (a ``lab.models`` model), if it has one: its
    passes and prefill by context are timed too.
    """
    from lab.simulate.costs import ContextCosts, costs_from_cost_model
    from lab.simulate.profile import profile_loop, time_context, with_loop_profile
    from lab.studies.auto_k import time_batch_passes

    report = progress or (lambda fraction, message: None)
    # untimed: a process's first seconds of passes run slow here (one-token passes at B = 1 timed 63-86 ms in
    # the first round, 52-69 ms after), and every new shape's first pass too
    report(0.02, "warming up")
    time_batch_passes(loaded, batch_drafter, prompt_ids, [1], k_max, repeats=1)
    time_context(loaded.model, 1, repeats=1)
    if draft_model is not None:
        time_context(draft_model, 1, repeats=1)
    cost = None
    for i, b in enumerate(sorted(set(batch_sizes))):
        report(0.05 + 0.2 * i / len(batch_sizes), f"timing passes at batch size {b}")
        cost = time_batch_passes(loaded, batch_drafter, prompt_ids, [b], k_max, repeats=repeats, cost=cost)
    costs = costs_from_cost_model(cost, model=model, drafter=drafter)
    # the context term: one-token passes and prefills by context at each batch size (the target's, and a
    # separate draft model's); the bare passes above ran at the prompts' own contexts (rows cycled over the
    # prompts), which under the "sum" rule read their mean length
    reference = {b: round(sum(len(prompt_ids[i % len(prompt_ids)]) for i in range(b)) / b) for b in costs.batch_sizes}
    tables: dict[str, dict] = {"pass": {}, "prefill": {}, "draft_pass": {}, "draft_prefill": {}}
    done, total = 0, sum(set(batch_sizes))  # the tables' cost grows with B (the prefills): the bar follows it
    for b in sorted(set(batch_sizes)):
        report(0.25 + 0.45 * done / total, f"timing passes and prefills by context at batch size {b}")
        done += b
        tables["pass"][b], tables["prefill"][b] = time_context(loaded.model, b, repeats=max(7, repeats))
        if draft_model is not None:
            tables["draft_pass"][b], tables["draft_prefill"][b] = time_context(draft_model, b, repeats=max(7, repeats))
    costs = dataclasses.replace(costs, by_context=ContextCosts(tables["pass"], tables["prefill"], reference,
                                                               tables["draft_pass"], tables["draft_prefill"]),
                                context_rule="sum")  # the eager cache's padded slots cost nothing measurable
    k = min(4, k_max)
    loop = profile_loop(loaded, batch_drafter, prompt_ids, batch_sizes, k, loop_tokens,
                        progress=lambda f, message: report(0.7 + 0.28 * f, message))
    return with_loop_profile(costs, *loop, k)
