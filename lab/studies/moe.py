"""The MoE trap: a Mixture-of-Experts target's verify cost v(K) against its dense source, and what it routes to.

Each of the K+1 tokens of a verify pass picks its own top-k experts, so the
pass reads the union of their weights: at batch 1 (memory-bound) v(K) rises
with the experts touched, where a dense target's stays near 1. Speculation's
break-even acceptance rises with it (``lab.theory``). As the batch grows the
union saturates at E and the step itself already reads every expert, so the
extra tokens cost what they cost a dense model (MoESD, arXiv 2505.19645;
Cascade, arXiv 2506.20675).

- :func:`moe_cost`: v(K) of the MoE and its dense source (and optionally a dense
  model of about the MoE's active size), through the lab's one pass timer
  (``lab.studies.passes.time_passes``), the models alternating round by round;
  experts touched per layer by the very passes timed (``lab.routing``).
- :func:`fidelity`: how close the constructed MoE stays to its dense source on
  held-out prompts: top-1 agreement along the dense greedy continuation, and the
  greedy match length (tokens until the MoE's greedy output first differs).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lab.routing import ExpertCounter, moe_shape, uniform_experts_touched, window_touched
from lab.studies.passes import time_passes


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters one token uses: all of them for a dense model; for a MoE, the experts' share scaled by k/E.

    Counts the experts' parameters as those of modules whose forward takes ``top_k_index`` (``lab.routing``).
    """
    from lab.routing import experts_modules

    total = sum(p.numel() for p in model.parameters())
    shape = moe_shape(model.config)
    if shape is None:
        return total
    experts = sum(p.numel() for module in experts_modules(model) for p in module.parameters())
    return int(total - experts + experts * shape.top_k / shape.num_experts)


@dataclass
class ModelCost:
    """One model's measured pass costs: target_step_ms (one token per row), verify_ms[i] and v[i] for ks[i]."""

    name: str
    ks: list[int]
    target_step_ms: float
    verify_ms: list[float]
    active_parameters: int
    total_parameters: int
    experts_touched: list[float] | None = None
    uniform_experts_touched: list[float] | None = None
    num_experts: int | None = None
    top_k: int | None = None

    @property
    def v(self) -> list[float]:
        """v(K) = verify_ms[K] / target_step_ms, in the order of ``ks``."""
        return [ms / self.target_step_ms for ms in self.verify_ms]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "v": self.v}


@dataclass
class MoeCost:
    """v(K) of a MoE and its dense source measured in one run (see :func:`moe_cost`)."""

    moe: ModelCost
    dense: ModelCost
    active_dense: ModelCost | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {"moe": self.moe.as_dict(), "dense": self.dense.as_dict(), "settings": self.settings}
        if self.active_dense is not None:
            out["active_dense"] = self.active_dense.as_dict()
        return out


def moe_cost(
    moe: Any,
    dense: Any,
    ks: Sequence[int],
    active_dense: Any | None = None,
    batch_size: int = 1,
    context_tokens: int = 128,
    repeats: int = 3,
    rounds: int = 2,
    mode: str = "eager",
) -> MoeCost:
    """Measure v(K) of a MoE target, its dense source and optionally a dense model of the MoE's active size.

    Args:
        moe, dense, active_dense: ``LoadedModel``-likes (``.name``, ``.model``).
        ks: the Ks, in the order the lists are reported (K=0 gives v = 1 by definition).
        batch_size: rows per pass (each pass: batch_size x (K+1) tokens).
        context_tokens, repeats, mode: as ``time_passes``; ``rounds`` alternate the models
            (each round times every model), the median of the rounds' medians is kept.

    Returns:
        :class:`MoeCost`; ``moe.experts_touched[i]``: distinct experts per layer, mean over the layers
        and the timed passes of ``batch_size * (ks[i]+1)`` tokens (random tokens, as ``time_passes`` draws).

    Raises:
        ValueError: an empty or negative ``ks``, or rounds < 1.
        ModelError: ``moe`` is dense, or its router cannot be hooked.
    """
    if not ks or min(ks) < 0 or rounds < 1:
        raise ValueError(f"moe_cost requires Ks >= 0 and rounds >= 1; got ks={list(ks)}, rounds={rounds}")
    widths = sorted({1} | {k + 1 for k in ks})
    models = [("moe", moe), ("dense", dense)] + ([("active_dense", active_dense)] if active_dense else [])
    timed: dict[str, list[dict[int, float]]] = {key: [] for key, _ in models}
    counter = ExpertCounter(moe.model)
    for _ in range(rounds):
        for key, loaded in models:
            if key == "moe":
                with counter:
                    timed[key].append(time_passes(loaded.model, widths, context_tokens, repeats, mode, batch_size))
            else:
                timed[key].append(time_passes(loaded.model, widths, context_tokens, repeats, mode, batch_size))
    shape = moe_shape(moe.model.config)
    costs = {}
    for key, loaded in models:
        ms = {w: statistics.median(round_[w] for round_ in timed[key]) for w in widths}
        costs[key] = ModelCost(
            name=loaded.name, ks=list(ks), target_step_ms=ms[1], verify_ms=[ms[k + 1] for k in ks],
            active_parameters=active_parameters(loaded.model),
            total_parameters=sum(p.numel() for p in loaded.model.parameters()),
        )
    costs["moe"].experts_touched = [counter.mean_touched(batch_size * (k + 1)) for k in ks]
    costs["moe"].uniform_experts_touched = [uniform_experts_touched(shape.num_experts, shape.top_k,
                                                                    batch_size * (k + 1)) for k in ks]
    costs["moe"].num_experts, costs["moe"].top_k = shape.num_experts, shape.top_k
    settings = {"batch_size": batch_size, "context_tokens": context_tokens, "repeats": repeats, "rounds": rounds,
                "mode": mode, "experts_implementation": getattr(moe.model.config, "_experts_implementation", None)}
    return MoeCost(costs["moe"], costs["dense"], costs.get("active_dense"), settings)


@dataclass
class Fidelity:
    """The constructed MoE against its dense source on held-out prompts (greedy).

    top1_agreement: fraction of positions of the dense greedy continuations where the MoE's argmax,
        fed the same prefix, equals the dense token.
    match_lengths: per prompt, tokens the MoE's own greedy output keeps equal to the dense one
        (the first disagreement along the dense continuation; capped at new_tokens).
    text_experts_touched: {K: distinct experts per layer of K+1 consecutive real tokens}, mean over
        layers and windows of the dense continuations (what a verify pass over real text routes to).
    """

    top1_agreement: float
    match_lengths: list[int]
    new_tokens: int
    text_experts_touched: dict[int, float]

    @property
    def mean_match_length(self) -> float:
        return sum(self.match_lengths) / len(self.match_lengths)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_match_length": self.mean_match_length}


@torch.inference_mode()
def fidelity(moe: Any, dense: Any, prompts_ids: Sequence[Sequence[int]], new_tokens: int = 32,
             ks: Sequence[int] = (0, 1, 2, 4, 8)) -> Fidelity:
    """Top-1 agreement and greedy match length of ``moe`` against ``dense`` (see :class:`Fidelity`).

    One greedy generation of the dense model per prompt, then one teacher-forced pass of the MoE over
    prompt + continuation. Raises ModelError if ``moe`` is dense.
    """
    agree = total = 0
    lengths: list[int] = []
    windows: dict[int, list[float]] = {k: [] for k in ks}
    device = next(dense.model.parameters()).device
    for ids in prompts_ids:
        prompt = torch.tensor([list(ids)], device=device)
        out = dense.model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                   pad_token_id=dense.tokenizer.eos_token_id)
        continuation = out[0, len(ids):]
        with ExpertCounter(moe.model, keep_indices=True) as counter:
            logits = moe.model(out).logits[0, len(ids) - 1:-1]  # [new, V]: predictions of each continuation token
        same = (logits.argmax(-1) == continuation).tolist()
        agree += sum(same)
        total += len(same)
        lengths.append(same.index(False) if False in same else len(same))
        per_layer = [indices[0][len(ids):] for _, indices in sorted(counter.token_experts.items())]
        for k in ks:
            windows[k].append(window_touched(per_layer, k + 1))
    return Fidelity(agree / total, lengths, new_tokens, {k: statistics.fmean(v) for k, v in windows.items()})
