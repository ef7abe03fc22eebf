"""Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding").

With each drafted token accepted independently with probability a (their alpha),
K drafted tokens per step and a draft that costs c target steps per token:

- expected tokens per target step (Eq. 1): (1 - a^(K+1)) / (1 - a)
- expected walltime speedup (Theorem 3.8): (1 - a^(K+1)) / ((1 - a) (K c + 1))

Speculation loses (speedup < 1) whenever a is too small for c; for K = 1 that
is exactly a < c. The lab places measured runs on these curves: a is fitted from
the measured mean acceptance length (so the model's tokens per step equals the
measured one), c is the measured draft time per drafted token over the target's
time per plain decode step, and efficiency = measured speedup / predicted
speedup.

Leviathan's model takes one verify pass over K+1 tokens to cost one plain
decode step. Where it costs more (v > 1: a CPU, or a GPU at large batch), the
measured speedup falls short of the model even for a perfect engine; the lab
therefore also measures v and reports the part of the gap that is the engine's
own overhead (``lab.studies.compare``: efficiency_v).
"""

from __future__ import annotations

import math


def expected_tokens_per_step(acceptance: float, k: int) -> float:
    """(1 - a^(K+1)) / (1 - a): mean tokens per target step, the bonus token included.

    acceptance: a in [0, 1]; k: drafted tokens per step, >= 0. Raises ValueError otherwise.
    """
    _check(acceptance, k)
    if acceptance == 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def expected_speedup(acceptance: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """(1 - a^(K+1)) / ((1 - a)(K c + v)): predicted walltime speedup over the target alone.

    cost_ratio: c >= 0, the draft's time per drafted token in target steps.
    verify_cost: v > 0, the time of one verify pass over K+1 tokens in target
        steps. Leviathan et al. take v = 1 (the default): true where a step is
        bound by reading the weights (a GPU at small batch). On a CPU, or at a
        large batch, the pass is compute bound and v grows with K, which lowers
        the speedup; ``lab.studies.compare.measure_verify_cost`` measures it.

    Raises ValueError for a, K, c or v out of range.
    """
    if cost_ratio < 0:
        raise ValueError(f"cost ratio c requires c >= 0; got {cost_ratio}")
    if not verify_cost > 0:
        raise ValueError(f"verify cost v requires v > 0; got {verify_cost}")
    return expected_tokens_per_step(acceptance, k) / (k * cost_ratio + verify_cost)


def acceptance_from_mean_length(mean_acceptance_length: float, k: int) -> float:
    """The a for which expected_tokens_per_step(a, K) equals a measured mean acceptance length.

    mean_acceptance_length: in [1, K+1] (vLLM's convention: counts the bonus token).
    Returns NaN for NaN input. Solved by bisection (the function is increasing in a).
    """
    if math.isnan(mean_acceptance_length):
        return math.nan
    if not 1.0 <= mean_acceptance_length <= k + 1 + 1e-9:
        raise ValueError(f"mean acceptance length requires a value in [1, {k + 1}] for K={k}; got {mean_acceptance_length}")
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_tokens_per_step(mid, k) < mean_acceptance_length:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def best_k(
    acceptance: float,
    cost_ratio: float,
    k_max: int = 16,
    verify_cost: float = 1.0,
    verify_costs: dict[int, float] | None = None,
) -> tuple[int, float]:
    """The K in 1..k_max with the highest expected speedup, and that speedup.

    verify_cost: v, one value for every K (Leviathan: 1). A measured v(K) grows
    with K, so a single v flatters large K; it is a what-if, not a fit.
    verify_costs: {K: v(K)} measured per K (``lab.studies.calibrate``); then only those
    K are considered, each with its own v, and verify_cost is ignored.
    """
    costs = verify_costs or {k: verify_cost for k in range(1, k_max + 1)}
    return max(((k, expected_speedup(acceptance, k, cost_ratio, v)) for k, v in sorted(costs.items())),
               key=lambda kv: kv[1])


def _check(acceptance: float, k: int) -> None:
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance rate a requires 0 <= a <= 1; got {acceptance}")
    if k < 0:
        raise ValueError(f"K requires K >= 0; got {k}")
