"""What speculation costs on this hardware, by batch size: c(B) and v(K, B), and the speedup they predict.

The batch-size trap of the article, as numbers: at batch 1 a GPU step is bound
by reading the weights, so a verify pass over K+1 tokens costs about one plain
step (v ~ 1) and a small draft is cheap; as the batch grows the step becomes
compute bound, v grows towards K+1 and the gain goes. ``measure_costs`` times
the passes (through ``lab.studies.auto_k.time_batch_passes``, the same timings
Auto-K uses) and :meth:`CostTable.predicted_speedup` puts them into Leviathan
et al.'s formula with a given acceptance. c and v are the lab's one cost
vocabulary, ``lab.studies.passes.PassCosts``. The timings do not depend on the weights' values, so
random weights of a model's architecture give its costs where the trained
weights are not at hand (``random_model``); acceptance must then come from a
run with the trained models.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lab.studies.auto_k import CostModel, time_batch_passes
from lab.studies.passes import PassCosts, in_target_steps
from lab.theory import acceptance_from_mean_length


@dataclass
class CostRow:
    """One batch size. Times in ms, medians; c and v in plain target steps of that batch size."""

    batch_size: int
    target_step_ms: float  # one target pass, 1 token per row
    verify_ms: float  # one target pass, K+1 tokens per row
    draft_ms_per_token: float  # drafting, per drafted token (all rows together)

    def costs(self, k: int) -> PassCosts:
        """This row in the lab's one cost vocabulary, its verify pass being the one over K+1 tokens."""
        return PassCosts(self.target_step_ms, {k: self.verify_ms}, self.draft_ms_per_token)

    @property
    def c(self) -> float:
        """The draft's cost per drafted token, in target steps: draft_ms_per_token / target_step_ms."""
        return in_target_steps(self.draft_ms_per_token, self.target_step_ms)

    @property
    def v(self) -> float:
        """The verify pass's cost in target steps: verify_ms / target_step_ms."""
        return in_target_steps(self.verify_ms, self.target_step_ms)


@dataclass
class CostTable:
    """c(B) and v(K, B) measured for one target/draft pair at one K."""

    k: int
    rows: list[CostRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def predicted_speedup(self, mean_acceptance_length: float) -> list[float]:
        """Per row: Leviathan's latency speedup (1-a^(K+1)) / ((1-a)(K c + v)) with this row's c and v.

        mean_acceptance_length: tokens per target pass measured with the trained
            models at this K (bonus included), in [1, K+1]; a is fitted to it.
        Raises ValueError if it is out of range.
        """
        alpha = acceptance_from_mean_length(mean_acceptance_length, self.k)
        return [row.costs(self.k).predicted_speedup(alpha, self.k) for row in self.rows]

    def as_dict(self, mean_acceptance_length: float | None = None) -> dict[str, Any]:
        predicted = None if mean_acceptance_length is None else self.predicted_speedup(mean_acceptance_length)
        return {
            "k": self.k,
            "settings": self.settings,
            "mean_acceptance_length": mean_acceptance_length,
            "rows": [
                {
                    "batch_size": r.batch_size,
                    "target_step_ms": r.target_step_ms,
                    "verify_ms": r.verify_ms,
                    "draft_ms_per_token": r.draft_ms_per_token,
                    "c": r.c,
                    "v": r.v,
                    **({} if predicted is None else {"predicted_speedup": p}),
                }
                for r, p in zip(self.rows, predicted or [None] * len(self.rows))
            ],
        }


def measure_costs(
    target,
    draft_model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    k: int,
    repeats: int = 5,
) -> CostTable:
    """Time target passes of 1 and K+1 tokens per row and the draft's K proposals, at each batch size.

    target: anything with ``.model`` (a causal LM); draft_model: the draft's causal
    LM on the same device. prompts: token-id lists, cycled to fill each batch.
    batch_sizes: >= 1 each; k: >= 1. Each figure is the median of ``repeats``
    timed passes after the cache is filled (see ``lab.studies.auto_k.time_batch_passes``),
    after one untimed round at the first batch size.
    Raises ValueError for an empty prompt list, a batch size < 1 or K < 1.
    """
    from lab.drafters import DraftModelDrafter

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("measure_costs requires at least one non-empty prompt")
    if k < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError(f"measure_costs requires K >= 1 and batch sizes >= 1; got K={k}, {list(batch_sizes)}")
    cost = CostModel()
    with torch.inference_mode():
        # Untimed warm-up: the first passes pay for kernel selection and clock ramp-up.
        time_batch_passes(target, DraftModelDrafter(draft_model), prompts, batch_sizes[:1], k, repeats=1)
        for batch_size in batch_sizes:  # one at a time: a large batch's cache is freed before the next
            time_batch_passes(target, DraftModelDrafter(draft_model), prompts, [batch_size], k, repeats=repeats,
                              cost=cost)
    rows = [
        CostRow(
            batch_size=b,
            target_step_ms=statistics.median(cost.target_ms[(b, 1)]),
            verify_ms=statistics.median(cost.target_ms[(b, k + 1)]),
            draft_ms_per_token=statistics.median(cost.draft_ms_per_token[b]),
        )
        for b in batch_sizes
    ]
    device = next(target.model.parameters()).device
    return CostTable(k, rows, {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(target.model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": [len(p) for p in prompts],
        "repeats": repeats,
    })


def from_calibration(calibration, k: int | None = None, precision: str | None = None) -> CostTable:
    """The batch-1 row of a ``lab.studies.calibrate.Calibration`` as a ``CostTable``: the same measured c and v(K).

    k, precision: default the calibration's choice. The draft's cost per token is
    its one-token step (0 for prompt lookup). Raises KeyError for a K or
    precision the calibration did not measure.
    """
    precision = precision or calibration.precision
    k = calibration.k if k is None else k
    timings = calibration.by_precision(precision)
    row = CostRow(1, timings.target_step_ms, timings.verify_ms[k], timings.draft_step_ms or 0.0)
    return CostTable(k, [row], {"device": calibration.machine["device"], "dtype": precision,
                                "source": "calibration", "measured_at": calibration.measured_at})


def random_model(config_path: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A causal LM of the architecture in ``config_path`` (a config.json or its folder) with random weights.

    For timing only: its outputs mean nothing. Built directly on ``device``.
    Raises OSError if the config cannot be read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)
