"""The batch-size sweep: where speculation stops paying, and an auto-K policy that knows it.

At batch 1 a decode step is memory-bound: verifying K+1 tokens costs about what
one token costs, so every accepted draft token is nearly free. As the batch
grows, a verify pass of B rows x (K+1) tokens turns compute-bound and costs more
and more of (K+1) plain steps, while the expected tokens per step stay what
acceptance makes them. Past some batch size speculation costs more than it
saves: the crossover.

``run_sweep`` measures it. For each batch size B, every request of the prompt
list (cycled to fill at least one batch) is decoded in batches of B submitted
at once, through ``lab.decode.run_batch``, in three modes:

- off: the target alone through the same batched loop (the baseline);
- on: the drafter at the configured K;
- auto: the K (0 = off) that ``AutoK`` picks for B before B is run, from the
  cost model and the acceptance measured so far. When that K is 0 or the
  configured K, the matching run is the auto run (the same decode twice would
  only add noise); otherwise it is run as well.

Modes alternate batch by batch in rotated order, so noise from a shared machine
hits them alike. Per mode and batch size it reports:

- latency_p50_s / latency_p95_s: per request, from the batch's submission to
  the request's last token;
- ttft_p50_s / ttft_p95_s: per request, submission to its first token;
- tokens_per_s: throughput, every request's tokens over the batches' wall time;
- acceptance: per-position acceptance, acceptance rate and mean acceptance
  length, pooled over requests (vLLM's conventions, ``lab.metrics``). Greedy
  outputs do not depend on the batch, so neither should acceptance: a drift
  with B would betray the ragged-batch trap;
- outputs that differ (greedy): speculative vs the target alone at this B, and
  each mode vs the target alone at batch 1 on the same prompt. Zero in fp32; in
  bf16/fp16 batched matrix products round differently and near-ties can flip
  (see ``lab.decode``), which these counts measure.

Per batch size: latency_speedup = off latency p50 / on latency p50 (> 1: a user
waits less), throughput_speedup = on tokens/s / off tokens/s; the two differ
because finished rows leave the batch at different times. The crossover batch
size is the smallest B whose latency speedup is below 1 (None: speculation paid
at every measured B).

The cost model and the auto-K policy live in ``lab.studies.auto_k``: before a
batch size is run, its passes are timed over the real prompts
(``time_batch_passes``), and every step the sweep runs adds to the same
``CostModel``.

Under a constraint (``lab.grammar``) every decode runs with it, each request
with its own matcher (``lab.decode``); the settings record it, and each mode
counts its outputs that satisfy it (``outputs_valid``). The settings also record
what was measured: each model's weight precision ("bf16", "int8", ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lab.drafters import Drafter, as_batch_drafter, make_drafter
from lab.decode import BatchResult, loop_engine_mode, run_batch
from lab.config import K_MAX, DecodeConfig
from lab.grammar import Constraint, ConstraintSpec
from lab.hardware import dtype_precision, model_precision
from lab.metrics import SpecDecodingStats, percentile
from lab.studies.auto_k import AutoK, CostModel, time_batch_passes

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
OFF, ON, AUTO = "off", "on", "auto"
WARMUP_NEW_TOKENS = 8

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------- results


@dataclass
class ModeRun:
    """One mode at one batch size, pooled over its batches.

    k: the K used (0 = the target alone). latency/ttft per request in seconds.
    outputs: per request, the generated tokens (not in ``as_dict``).
    outputs_valid: under a constraint, the outputs that satisfy it (one cut by
        the token budget is a valid prefix but not valid); None without one.
    """

    mode: str
    k: int
    latency_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    wall_s: float = 0.0
    stats: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    outputs: list[list[int]] = field(default_factory=list)
    outputs_differ_from_batch_1: int | None = None
    outputs_valid: int | None = None

    def add(self, result: BatchResult, constraint: Constraint | None = None) -> None:
        if constraint is not None:
            self.outputs_valid = (self.outputs_valid or 0) + sum(constraint.is_valid(row.text) for row in result.rows)
        self.latency_s += result.latency_s
        self.first_token_s += result.first_token_s
        self.num_output_tokens += result.num_output_tokens
        self.wall_s += result.wall_s
        self.stats.merge(result.pooled_stats())
        self.outputs += result.token_ids

    @property
    def latency_p50_s(self) -> float:
        return percentile(self.latency_s, 50)

    @property
    def latency_p95_s(self) -> float:
        return percentile(self.latency_s, 95)

    @property
    def ttft_p50_s(self) -> float:
        return percentile(self.first_token_s, 50)

    @property
    def ttft_p95_s(self) -> float:
        return percentile(self.first_token_s, 95)

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s if self.wall_s > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "mode": self.mode,
                "k": self.k,
                "num_requests": len(self.latency_s),
                "latency_p50_s": self.latency_p50_s,
                "latency_p95_s": self.latency_p95_s,
                "ttft_p50_s": self.ttft_p50_s,
                "ttft_p95_s": self.ttft_p95_s,
                "tokens_per_s": self.tokens_per_s,
                "num_output_tokens": self.num_output_tokens,
                "wall_s": self.wall_s,
                "acceptance_rate": self.stats.acceptance_rate,
                "mean_acceptance_length": self.stats.mean_acceptance_length,
                "per_position_acceptance_rate": self.stats.per_position_acceptance_rate,
                "outputs_differ_from_batch_1": self.outputs_differ_from_batch_1,
                "outputs_valid": self.outputs_valid,
                "stats": self.stats.as_dict(),
            }
        )


@dataclass
class BatchSizeResult:
    """Every figure of one batch size (see the module docstring).

    auto_k: the policy's choice for this batch size, made before running it.
    auto_predicted_speedup: what the cost model expected of it (latency and
        throughput alike; NaN without costs).
    outputs_differ_on_vs_off: greedy requests whose speculative output is not
        the target alone's at this batch size (None when sampling).
    """

    batch_size: int
    off: ModeRun
    on: ModeRun
    auto: ModeRun
    auto_k: int
    auto_predicted_speedup: float
    outputs_differ_on_vs_off: int | None

    @property
    def num_requests(self) -> int:
        return len(self.off.latency_s)

    @property
    def latency_speedup(self) -> float:
        """Off latency p50 over on latency p50 (> 1: speculation shortens the wait)."""
        return _ratio(self.off.latency_p50_s, self.on.latency_p50_s)

    @property
    def throughput_speedup(self) -> float:
        """On tokens/s over off tokens/s."""
        return _ratio(self.on.tokens_per_s, self.off.tokens_per_s)

    @property
    def ttft_speedup(self) -> float:
        return _ratio(self.off.ttft_p50_s, self.on.ttft_p50_s)

    @property
    def auto_latency_vs_best(self) -> float:
        """Auto's latency p50 over the better of on and off (1.0: the best; above: that much slower)."""
        return _ratio(self.auto.latency_p50_s, min(self.on.latency_p50_s, self.off.latency_p50_s))

    @property
    def auto_throughput_vs_best(self) -> float:
        """Auto's tokens/s over the better of on and off (1.0: the best; below: that fraction of it)."""
        return _ratio(self.auto.tokens_per_s, max(self.on.tokens_per_s, self.off.tokens_per_s))

    def as_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "batch_size": self.batch_size,
                "num_requests": self.num_requests,
                "latency_speedup": self.latency_speedup,
                "throughput_speedup": self.throughput_speedup,
                "ttft_speedup": self.ttft_speedup,
                "per_position_acceptance_rate": self.on.stats.per_position_acceptance_rate,
                "mean_acceptance_length": self.on.stats.mean_acceptance_length,
                "outputs_differ_on_vs_off": self.outputs_differ_on_vs_off,
                "auto_k": self.auto_k,
                "auto_predicted_speedup": self.auto_predicted_speedup,
                "auto_latency_vs_best": self.auto_latency_vs_best,
                "auto_throughput_vs_best": self.auto_throughput_vs_best,
                "off": self.off.as_dict(),
                "on": self.on.as_dict(),
                "auto": self.auto.as_dict(),
            }
        )


@dataclass
class SweepResult:
    """A batch-size sweep: one ``BatchSizeResult`` per batch size, ascending."""

    drafter: str
    k: int
    settings: dict[str, Any]
    results: list[BatchSizeResult]
    cost: CostModel
    peer: dict[str, Any] | None = None  # transformers' assisted generation at batch 1 (``lab.studies.peer``), if run

    @property
    def batch_sizes(self) -> list[int]:
        return [r.batch_size for r in self.results]

    @property
    def crossover_batch_size(self) -> int | None:
        """The smallest batch size at which speculation lengthens the p50 latency (speedup < 1); None if none."""
        return next((r.batch_size for r in self.results if r.latency_speedup < 1.0), None)

    @property
    def throughput_crossover_batch_size(self) -> int | None:
        """The same for throughput."""
        return next((r.batch_size for r in self.results if r.throughput_speedup < 1.0), None)

    def policy(self, k_max: int | None = None) -> AutoK:
        """The auto-K policy fitted on everything the sweep measured: ``run_batch(..., k_policy=sweep.policy())``."""
        seen = SpecDecodingStats()
        for r in self.results:
            seen.merge(r.on.stats)
        return AutoK.from_stats(self.cost, seen, self.k, self.settings.get("k_max") if k_max is None else k_max)

    def as_dict(self) -> dict[str, Any]:
        policy = self.policy()
        return _clean(
            {
                "drafter": self.drafter,
                "k": self.k,
                "settings": self.settings,
                "batch_sizes": self.batch_sizes,
                "crossover_batch_size": self.crossover_batch_size,
                "throughput_crossover_batch_size": self.throughput_crossover_batch_size,
                "results": [r.as_dict() for r in self.results],
                "cost_model": self.cost.as_dict(),
                "policy_after_sweep": {
                    "acceptance": policy.acceptance,
                    "draft_rate": policy.draft_rate,
                    "k_by_batch_size": {str(b): policy(b) for b in self.batch_sizes},
                },
                "peer_batch_1": self.peer,
            }
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text of ``as_dict``; also written to path when given."""
        text = json.dumps(self.as_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text


def format_sweep(sweep: SweepResult) -> str:
    """A plain-text table of the sweep, one line per batch size (latencies in seconds)."""
    settings = sweep.settings
    precision = settings.get("precision") or settings.get("dtype")
    if settings.get("draft_precision"):
        precision += f", draft {settings['draft_precision']}"
    constraint = f", constrained to {settings['constraint']['kind']}" if settings.get("constraint") else ""
    lines = [
        f"{sweep.drafter}, K={sweep.k}: batch-size sweep ({precision}, {settings.get('device')}, "
        f"{settings.get('engine', 'eager')} engine{constraint})",
        f"{'B':>3} {'latency p50 off/on':>19} {'p95 off/on':>15} {'TTFT p50 off/on':>17} {'tokens/s off/on':>17} "
        f"{'latency x':>9} {'tput x':>6}  {'acceptance per position':<24} {'auto K':>6} {'auto/best':>9}",
    ]
    for r in sweep.results:
        per_position = " ".join(f"{a:.2f}" for a in r.on.stats.per_position_acceptance_rate[:6]) or "-"
        lines.append(
            f"{r.batch_size:>3} {r.off.latency_p50_s:>9.3f}/{r.on.latency_p50_s:<9.3f} "
            f"{r.off.latency_p95_s:>7.3f}/{r.on.latency_p95_s:<7.3f} {r.off.ttft_p50_s:>8.3f}/{r.on.ttft_p50_s:<8.3f} "
            f"{r.off.tokens_per_s:>8.1f}/{r.on.tokens_per_s:<8.1f} "
            f"{r.latency_speedup:>9.2f} {r.throughput_speedup:>6.2f}  "
            f"{per_position:<24} {r.auto_k:>6} {r.auto_latency_vs_best:>9.2f}"
        )
    crossover = sweep.crossover_batch_size
    lines.append(
        "speculation shortens the p50 latency at every measured batch size"
        if crossover is None
        else f"crossover: from batch size {crossover} on, speculation lengthens the p50 latency"
    )
    if settings.get("status") == "cancelled":
        planned = settings.get("batch_sizes_planned") or []
        lines.append(f"cancelled: {len(sweep.results)} of {len(planned)} batch sizes finished")
    peer = sweep.peer
    if peer and peer.get("skipped"):
        lines.append(f"peer at batch 1: not run ({peer['skipped']})")
    elif peer:
        fmt = lambda x, pattern: "n/a" if x is None else pattern.format(x)  # noqa: E731
        lines.append(
            f"peer at batch 1, {peer['num_prompts']} prompts, K={peer['k']}: ours {fmt(peer['ours_speculative_tokens_per_s'], '{:.2f}')} tok/s "
            f"({fmt(peer['speedup'], '{:.2f}')}x our target alone), transformers' assisted generation "
            f"{fmt(peer['hf_assisted_tokens_per_s'], '{:.2f}')} tok/s ({fmt(peer['hf_speedup'], '{:.2f}')}x its greedy): "
            f"ours/theirs {fmt(peer['ratio_ours_vs_hf_assisted'], '{:.2f}')}x"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the sweep


def run_sweep(
    target,
    prompts: Sequence[Sequence[int]],
    drafter: Drafter | Drafter,
    config: DecodeConfig,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    k_max: int | None = None,
    calibration: bool = True,
    warmup: bool = True,
    progress: Progress | None = None,
    draft=None,
    constraint: Constraint | ConstraintSpec | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Decode the prompts at each batch size with speculation off, on (config.k) and auto; see the module docstring.

    target: a loaded model; prompts: token-id lists (chat template applied);
    drafter: the speculative side (a batch drafter or a single-row one, wrapped).
    config: K, budget, sampling, and the engine mode (``config.engine_mode``:
        "auto" is compiled on CUDA, eager on a CPU) that every run and the
        calibration use; the settings record the resolved one.
    batch_sizes: ascending; each batch size decodes max(len(prompts), B)
        requests rounded up to whole batches, prompts cycled.
    k_max: largest K the policy may pick (default config.k).
    calibration: time verify passes first (``lab.studies.auto_k.time_batch_passes``); without it the
        policy starts from the sweep's own steps only (and picks 0 at the first
        batch size, having no costs for K > 0 yet).
    warmup: run one small untimed batch first (kernels, allocator), whose
        acceptance seeds the policy.
    progress: ``progress(fraction, message)``.
    draft: the loaded draft model behind a draft-model drafter, for the
        settings (its precision); a layer-skip drafter's is the target's.
    constraint: constrain every output (``lab.grammar``); a ``ConstraintSpec``
        is compiled for the target's tokenizer.
    should_cancel: polled before each batch of requests and each batch size's
        calibration; once it returns True the sweep stops and returns the batch
        sizes finished so far, with settings["status"] = "cancelled" (else
        "complete") and settings["batch_sizes_planned"].
    on_part: called with each finished batch size's ``BatchSizeResult.as_dict()``
        the moment it finishes (a results store keeps it there, so a sweep cut
        short, or killed, keeps its finished parts).

    Raises ValueError for no prompts, no drafter, a non-positive batch size,
    k_max out of 1..16, or a constraint with ``config.grammar_mode`` "naive";
    ``lab.grammar.GrammarError`` for a constraint that does not compile.
    """
    if not prompts:
        raise ValueError("a batch-size sweep requires at least one prompt; got none")
    batch_sizes = sorted(set(batch_sizes))
    if batch_sizes[0] < 1:
        raise ValueError(f"batch sizes require integers >= 1; got {batch_sizes}")
    k_max = config.k if k_max is None else k_max
    if not 1 <= k_max <= K_MAX:
        raise ValueError(f"k_max requires an integer in 1..{K_MAX}; got {k_max}")
    drafter = as_batch_drafter(drafter)
    if drafter is None:
        raise ValueError("a batch-size sweep requires a drafter (the target alone always runs as the baseline); got none")
    if config.tree_budget and batch_sizes != [1]:
        raise ValueError(f"a sweep with token trees (tree budget {config.tree_budget}) requires batch size 1 only; "
                         f"got {batch_sizes}: trees run at batch size 1 (pass --batch-sizes 1)")
    if constraint is not None and config.grammar_mode != "exact":
        raise ValueError(
            f"a batch-size sweep under a constraint requires grammar_mode 'exact'; got {config.grammar_mode!r}"
        )
    if isinstance(constraint, ConstraintSpec):
        constraint = Constraint.for_model(constraint, target)
    report = progress or (lambda fraction, message: None)
    model = target.model
    param = next(model.parameters())
    engine = loop_engine_mode(config, param.device, drafter)
    settings = {
        "engine": engine,
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "num_prompts": len(prompts),
        "k_max": k_max,
        "target": getattr(target, "name", None),
        "precision": model_precision(target),
        "draft_precision": _draft_precision(drafter, target, draft),
        "constraint": None
        if constraint is None
        else {"kind": constraint.spec.kind, "source": constraint.spec.source, "mode": config.grammar_mode},
        "batch_sizes_planned": list(batch_sizes),
        "status": "complete",
    }
    cancel = should_cancel or (lambda: False)
    results: list[BatchSizeResult] = []
    cost = CostModel()

    def stopped() -> SweepResult:
        settings["status"] = "cancelled"
        report(1.0, f"cancelled after {len(results)} of {len(batch_sizes)} batch sizes")
        return SweepResult(getattr(drafter, "name", "drafter"), config.k, settings, results, cost)

    seen = SpecDecodingStats()  # acceptance measured so far (on runs), seeds the policy

    if warmup:
        report(0.0, "warm-up")
        warm = replace(config, max_new_tokens=min(WARMUP_NEW_TOKENS, config.max_new_tokens))
        few = prompts[: 1 if config.tree_budget else 2]  # token trees run at batch size 1 only
        run_batch(target, few, None, warm, constraint=constraint)
        seen.merge(run_batch(target, few, drafter, warm, constraint=constraint).pooled_stats())
    if calibration:
        for batch_size in batch_sizes:
            if cancel():
                return stopped()
            report(0.02, f"calibrating step costs at batch size {batch_size}")
            time_batch_passes(target, drafter, prompts, [batch_size], k_max, cost=cost, constraint=constraint,
                              engine_mode=engine, backend=config.compile_backend)

    greedy = config.sampling.is_greedy
    batch_1_outputs: dict[int, list[int]] = {}
    total_requests = sum(_num_requests(len(prompts), b) for b in batch_sizes)
    done_requests = 0
    for batch_size in batch_sizes:
        policy = AutoK.from_stats(cost, seen, config.k, k_max)
        auto_k = policy.choose(batch_size)
        predicted = policy.predicted_speedup(batch_size, auto_k)
        modes = {OFF: ModeRun(OFF, 0), ON: ModeRun(ON, config.k)}
        if auto_k not in (0, config.k):
            modes[AUTO] = ModeRun(AUTO, auto_k)
        order = list(modes)
        request_prompts = _requests(len(prompts), batch_size)
        groups = [request_prompts[i : i + batch_size] for i in range(0, len(request_prompts), batch_size)]
        for g, group in enumerate(groups):
            if cancel():
                return stopped()  # this batch size is unfinished: it is dropped
            fraction = 0.05 + 0.95 * done_requests / total_requests
            report(fraction, f"batch size {batch_size}: batch {g + 1}/{len(groups)}")
            for mode in order[g % len(order) :] + order[: g % len(order)]:
                run = modes[mode]
                k = run.k
                result = run_batch(
                    target,
                    [prompts[i] for i in group],
                    drafter if k > 0 else None,
                    replace(config, k=k) if k > 0 else config,
                    constraint=constraint,
                )
                run.add(result, constraint)
                cost.add_steps(result.steps)
            done_requests += len(group)
        seen.merge(modes[ON].stats)

        if greedy:
            for run in modes.values():
                if batch_size == batch_sizes[0] == 1 and run.mode == OFF:
                    batch_1_outputs = dict(zip(request_prompts, run.outputs))
                if batch_1_outputs:
                    run.outputs_differ_from_batch_1 = sum(
                        out != batch_1_outputs[p] for p, out in zip(request_prompts, run.outputs)
                    )
        auto = modes.get(AUTO) or (modes[OFF] if auto_k == 0 else modes[ON])
        auto = replace(auto, mode=AUTO)
        differ = sum(a != b for a, b in zip(modes[ON].outputs, modes[OFF].outputs)) if greedy else None
        results.append(BatchSizeResult(batch_size, modes[OFF], modes[ON], auto, auto_k, predicted, differ))
        if on_part is not None:
            on_part(results[-1].as_dict())
    report(1.0, "done")
    return SweepResult(getattr(drafter, "name", "drafter"), config.k, settings, results, cost)


def _draft_precision(drafter: Drafter, target, draft) -> str | None:
    """The draft side's weight precision: the draft model's, the target's for an early exit, None without a model."""
    if draft is not None:
        return model_precision(draft)
    model = getattr(drafter, "model", None)
    if model is None:
        return None  # no draft model (prompt lookup)
    first = next(model.parameters())
    if any(first is p for p in target.model.parameters()):
        return model_precision(target)  # layer skip: the target's own weights
    return dtype_precision(first.dtype)


def _num_requests(num_prompts: int, batch_size: int) -> int:
    return math.ceil(max(num_prompts, batch_size) / batch_size) * batch_size


def _requests(num_prompts: int, batch_size: int) -> list[int]:
    """Prompt index of each request: the prompts cycled to fill whole batches."""
    return [i % num_prompts for i in range(_num_requests(num_prompts, batch_size))]


# ---------------------------------------------------------------- helpers


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def _clean(value: Any) -> Any:
    """NaN and infinities become None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value




def run_sweep_by_name(
    target: str,
    drafter: str,
    prompts: Sequence[str] = ("spec_bench:mix:16",),
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    draft: str | None = None,
    k: int = 4,
    max_new_tokens: int = 64,
    dtype: str | None = None,
    device: str | None = None,
    chat_template: bool = True,
    exit_layer: int | None = None,
    constraint: ConstraintSpec | Constraint | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    engine: str = "auto",
) -> SweepResult:
    """Load models and prompt sets by name, then ``run_sweep`` (what ``python -m lab bench`` runs).

    target, draft: presets or folders (``lab.models.load_model``); drafter: a
    name of ``lab.drafters.DRAFTER_NAMES`` other than "none"; prompts: sources of
    ``lab.prompts.load_prompt_sets``; constraint: constrain every output (a spec
    is compiled for the target's tokenizer); engine: the engine mode (``lab.kv``;
    "auto": compiled on CUDA, eager on a CPU). Greedy decoding. Writes the JSON
    to out when given.
    """
    from lab.models import encode_prompt, load_model
    from lab.prompts import load_prompt_sets

    config = DecodeConfig(k=k, max_new_tokens=max_new_tokens, engine_mode=engine)
    texts = [p.text for p in load_prompt_sets(list(prompts))]
    if not texts:
        raise ValueError(f"the prompt sets {list(prompts)} hold no prompts: choose others")
    loaded = load_model(target, device=device, dtype=dtype)
    draft_model = load_model(draft, device=device, dtype=dtype) if draft else None
    batch_drafter = make_drafter(drafter, loaded, draft_model, exit_layer=exit_layer)
    if batch_drafter is None:
        raise ValueError("a sweep requires a drafter (the target alone always runs as the baseline); got 'none'")
    prompt_ids = [encode_prompt(loaded, text, chat_template=chat_template) for text in texts]
    sweep = run_sweep(loaded, prompt_ids, batch_drafter, config, batch_sizes, progress=progress,
                      draft=draft_model, constraint=constraint)
    sweep.settings.update({"draft": draft, "prompts": list(prompts)})
    if out is not None:
        sweep.to_json(out)
    return sweep
