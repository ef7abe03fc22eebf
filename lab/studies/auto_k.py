"""Auto-K for a batch: a cost model by batch size and tokens per row, and the policy that picks K from it.

Cost model (``CostModel``): median milliseconds of one target verify pass by
(rows B, tokens per row w), and of drafting per drafted token by B, from a
short timing over the real prompts (``time_batch_passes``, through the lab's one
pass timer ``lab.studies.passes.time_pass_samples``) and from every step a
sweep runs; between measured points it interpolates linearly. Policy
(``AutoK``): Leviathan et al.'s expected tokens per step (1 - a^(K+1)) / (1 - a),
with a fitted from the measured mean acceptance length and scaled by how often
the drafter proposes at all, over the predicted step time
target(B, K+1) + K draft(B); it picks the K in 0..k_max with the most tokens per
millisecond (K = 0: one token per target(B, 1)). In the vocabulary of
``lab.theory``: target(B, K+1) / target(B, 1) is v(K) at batch B, and
draft(B, 1) / target(B, 1) is c.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lab.config import DecodeConfig
from lab.drafters.base import DraftContext, Drafter, RowDrafter, as_batch_drafter
from lab.grammar import Constraint
from lab.kv import new_kv_cache
from lab.metrics import SpecDecodingStats
from lab.studies.passes import time_pass_samples
from lab.theory import acceptance_from_mean_length, expected_tokens_per_step
from lab.trace import BatchStep

CALIBRATION_REPEATS = 3


@dataclass
class CostModel:
    """Measured step costs on this machine, in milliseconds.

    target_ms: (batch size B, tokens per row w) -> samples of one target verify
        pass (prefill excluded), acceptance and bookkeeping included.
    draft_ms_per_token: B -> samples of drafting time per drafted token of a step.
    """

    target_ms: dict[tuple[int, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    draft_ms_per_token: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add_steps(self, steps: Iterable[BatchStep]) -> None:
        """Learn from a decode's steps (their batch size, width, verify and draft times)."""
        for step in steps:
            self.target_ms[(step.batch_size, step.width)].append(step.verify_ms)
            if step.width > 1:
                self.draft_ms_per_token[step.batch_size].append(step.draft_ms / (step.width - 1))

    def target(self, batch_size: int, width: int) -> float:
        """Predicted ms of a verify pass of batch_size rows x width tokens (NaN with no data)."""
        by_batch: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for (b, w), samples in self.target_ms.items():
            by_batch[b].append((w, statistics.median(samples)))
        at = {b: _interpolate(_monotone(sorted(points)), width) for b, points in by_batch.items()}
        return _interpolate(sorted(at.items()), batch_size)

    def draft(self, batch_size: int, k: int) -> float:
        """Predicted ms of drafting k tokens for batch_size rows (0 when k == 0; NaN with no data)."""
        if k == 0:
            return 0.0
        points = sorted((b, statistics.median(s)) for b, s in self.draft_ms_per_token.items() if s)
        return k * _interpolate(points, batch_size)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_ms": {f"{b}x{w}": statistics.median(s) for (b, w), s in sorted(self.target_ms.items()) if s},
            "draft_ms_per_token": {
                str(b): statistics.median(s) for b, s in sorted(self.draft_ms_per_token.items()) if s
            },
        }


def _interpolate(points: Sequence[tuple[int, float]], x: int) -> float:
    """Piecewise-linear through (x, y) points sorted by x, extrapolated linearly beyond the ends (never below 0).

    With one point, y is taken as proportional to x: the pessimistic guess (no
    data about how cost grows must not make more work look free).
    """
    if not points:
        return math.nan
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    i = next((i for i in range(len(points) - 1) if x <= points[i + 1][0]), len(points) - 2)
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _monotone(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Running maximum of y over sorted x: more tokens per row never cost less (noise aside)."""
    out, top = [], 0.0
    for x, y in points:
        top = max(top, y)
        out.append((x, top))
    return out


@torch.inference_mode()
def time_batch_passes(
    target,
    drafter: Drafter | RowDrafter | None,
    prompts: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    k_max: int,
    repeats: int = CALIBRATION_REPEATS,
    cost: CostModel | None = None,
    constraint: Constraint | None = None,
    engine_mode: str = "eager",
    backend: str = "inductor",
) -> CostModel:
    """Time target verify passes of B rows x w tokens (w = 1..k_max+1), and drafting, over the real prompts.

    engine_mode: the resolved engine mode (``lab.kv``) whose passes are timed:
    the decode loop's own cache, at the loop's declared widths.

    For each batch size the prompts (cycled to B rows) are prefilled; a pass of w
    tokens per row is timed and rolled back (its slots become holes and are
    cut), ``repeats`` times per (B, w). The drafter then proposes k_max tokens
    per row from the same prompts, timed after one untimed proposal that fills
    its cache; under a constraint each row drafts under its own fresh matcher.
    Both go through ``lab.studies.passes.time_pass_samples``, the lab's one pass timer.
    Adds to ``cost`` (default a new CostModel) and returns it.
    """
    cost = CostModel() if cost is None else cost
    model = target.model
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    drafter = as_batch_drafter(drafter)
    generator = torch.Generator().manual_seed(0)
    sampling = DecodeConfig().sampling
    widths = range(1, k_max + 2)
    for batch_size in batch_sizes:
        rows = [torch.as_tensor(list(prompts[i % len(prompts)]), dtype=torch.long) for i in range(batch_size)]
        longest = max(row.shape[0] for row in rows) + k_max + 1
        cache = new_kv_cache(model, batch_size, engine_mode, longest, backend)
        cache.forward(rows)
        lengths = list(cache.lengths)
        new_tokens = {w: list(torch.randint(0, vocab, (batch_size, w), generator=generator)) for w in widths}  # B x [w]

        def roll_back(width: int) -> None:
            cache.keep(lengths)
            cache.trim()

        samples = time_pass_samples(lambda width: cache.forward(new_tokens[width], width=width), roll_back, widths, repeats,
                                    device, warmup_rounds=0)
        for width, ms in samples.items():
            cost.target_ms[(batch_size, width)].extend(ms)
        if drafter is not None and k_max > 0:
            drafter.reset(batch_size)
            grammars = [None if constraint is None else constraint.new_state() for _ in rows]
            contexts = [DraftContext(row, row.shape[0], k_max, sampling, grammar=g, engine_mode=engine_mode,
                                     compile_backend=backend, max_length=longest) for row, g in zip(rows, grammars)]
            # The untimed round fills the draft's cache; observing nothing accepted rolls each proposal back.
            samples = time_pass_samples(lambda width: drafter.propose(contexts),
                                        lambda width: drafter.observe([0] * batch_size), [k_max], repeats, device)
            cost.draft_ms_per_token[batch_size].extend(ms / k_max for ms in samples[k_max])
    return cost


# ---------------------------------------------------------------- policy


@dataclass
class AutoK:
    """Picks K per batch size (0 = speculation off) from a cost model and measured acceptance.

    acceptance: Leviathan's a (per drafted token), fitted from a measured mean
        acceptance length; NaN when nothing was drafted yet (then K = 0).
    draft_rate: fraction of steps at which the drafter proposes anything (prompt
        lookup misses; model drafters 1.0).
    k_max: the largest K considered.
    min_gain: speculation is switched on only when predicted to pay by more than
        this fraction, and a K other than k_max is taken only when predicted to
        beat the current choice by as much (timing noise on a shared machine
        must not switch it on or move it between near-equal Ks).

    Callable: ``policy(batch_size) -> K``, usable as ``decode_batch(k_policy=...)``.
    """

    cost: CostModel
    acceptance: float
    draft_rate: float = 1.0
    k_max: int = 4
    min_gain: float = 0.05

    @classmethod
    def from_stats(cls, cost: CostModel, stats: SpecDecodingStats, k: int, k_max: int | None = None) -> "AutoK":
        """Fit a from stats measured at K = k (mean acceptance length), and the draft rate."""
        mean_length = stats.mean_acceptance_length
        acceptance = math.nan if math.isnan(mean_length) else acceptance_from_mean_length(min(mean_length, k + 1), k)
        draft_rate = stats.num_drafts / stats.target_forward_passes if stats.target_forward_passes else 1.0
        return cls(cost, acceptance, draft_rate, k if k_max is None else k_max)

    def expected_tokens_per_step(self, k: int) -> float:
        if k == 0 or math.isnan(self.acceptance):
            return 1.0
        return self.draft_rate * expected_tokens_per_step(self.acceptance, k) + (1.0 - self.draft_rate)

    def step_ms(self, batch_size: int, k: int) -> float:
        return self.cost.target(batch_size, k + 1) + self.cost.draft(batch_size, k)

    def predicted_speedup(self, batch_size: int, k: int) -> float:
        """Predicted tokens per ms at K over tokens per ms with speculation off (NaN without costs, or with a
        step timed at 0 ms: a cost model fed only by the sweep's own steps can hold no pass of a width yet)."""
        off_ms, on_ms = self.step_ms(batch_size, 0), self.step_ms(batch_size, k)
        if not (off_ms > 0 and on_ms > 0):
            return math.nan
        return (self.expected_tokens_per_step(k) / on_ms) * off_ms

    def choose(self, batch_size: int) -> int:
        """The K (0 = off) to run at this batch size, with hysteresis against a noisy cost model.

        Speculation at the configured K (k_max) is switched on when predicted to
        beat off by more than min_gain; any other K in 1..k_max is taken only when
        predicted to beat the current choice by more than min_gain again. A small
        calibration's noise then cannot move the choice between near-equal Ks
        (measured: a noisy calibration once picked K=2 whose latency was 1.36x
        that of K=4). Without data, 0.
        """
        preferred = self.predicted_speedup(batch_size, self.k_max)
        best_k, best = (self.k_max, preferred) if preferred > 1.0 + self.min_gain else (0, 1.0)
        for k in range(1, self.k_max + 1):
            speedup = self.predicted_speedup(batch_size, k)
            if not math.isnan(speedup) and speedup > best * (1.0 + self.min_gain):
                best_k, best = k, speedup
        return best_k

    __call__ = choose
