"""Headline figures of each kind of result, as the results store (``lab.store``) keeps them beside the payload.

Every function takes the result's JSON dict (what its ``as_dict`` or
``to_json`` gives) and returns a flat dict of numbers and short strings, with
the lab's names: speedup (tokens/s of speculation over the target alone),
acceptance_rate, mean_acceptance_length (the bonus token counted),
tokens_per_s, and for batch and serving sweeps latency_speedup,
throughput_speedup and the crossover. A missing number is None.
"""

from __future__ import annotations

import math
from typing import Any


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
        return value
    return None


def from_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """From ``SpecDecodingStats.as_dict()`` (or a compare run's metrics): acceptance, tokens/s, tokens, passes."""
    return {
        "acceptance_rate": _number(stats.get("acceptance_rate")),
        "mean_acceptance_length": _number(stats.get("mean_acceptance_length")),
        "tokens_per_s": _number(stats.get("tokens_per_s")),
        "num_output_tokens": _number(stats.get("num_output_tokens")),
        "target_forward_passes": _number(stats.get("target_forward_passes")),
    }


def from_batch_size(part: dict[str, Any]) -> dict[str, Any]:
    """From ``BatchSizeResult.as_dict()``: one batch size of a sweep."""
    on, off = part.get("on") or {}, part.get("off") or {}
    return {
        "batch_size": part.get("batch_size"),
        "latency_speedup": _number(part.get("latency_speedup")),
        "throughput_speedup": _number(part.get("throughput_speedup")),
        "acceptance_rate": _number(on.get("acceptance_rate")),
        "mean_acceptance_length": _number(part.get("mean_acceptance_length")),
        "tokens_per_s": _number(on.get("tokens_per_s")),
        "target_tokens_per_s": _number(off.get("tokens_per_s")),
        "auto_k": part.get("auto_k"),
    }


def from_sweep(sweep: dict[str, Any]) -> dict[str, Any]:
    """From ``SweepResult.as_dict()``: batch 1's figures (the smallest batch size's) and the crossovers."""
    results = sweep.get("results") or []
    first = from_batch_size(results[0]) if results else {}
    return first | {
        "batch_sizes": ",".join(str(r.get("batch_size")) for r in results),
        "crossover_batch_size": sweep.get("crossover_batch_size"),
        "throughput_crossover_batch_size": sweep.get("throughput_crossover_batch_size"),
    }


def from_summary_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """From ``Comparison.summary()`` rows (records): the arm with the highest speedup."""
    rows = [r for r in rows if _number(r.get("speedup")) is not None] or rows
    if not rows:
        return {}
    best = max(rows, key=lambda r: _number(r.get("speedup")) or -math.inf)
    return {
        "speedup": _number(best.get("speedup")),
        "best_drafter": best.get("drafter"),
        "best_k": best.get("k"),
        "acceptance_rate": _number(best.get("acceptance_rate")),
        "mean_acceptance_length": _number(best.get("mean_acceptance_length")),
        "tokens_per_s": _number(best.get("tokens_per_s")),
        "target_tokens_per_s": _number(best.get("target_tokens_per_s")),
        "arms": len(rows),
    }


def from_compare_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """From compare runs as dicts (one prompt's): the drafter run with the highest speedup over the target alone."""
    arms = [r for r in runs if r.get("k") and _number(r.get("speedup")) is not None]
    if not arms:
        return {}
    best = max(arms, key=lambda r: r["speedup"])
    return {"speedup": _number(best["speedup"]), "best_drafter": best.get("drafter"), "best_k": best.get("k")} | {
        name: value for name, value in from_stats(best.get("metrics") or {}).items()
        if name in ("acceptance_rate", "mean_acceptance_length", "tokens_per_s")
    }


def from_calibration(calibration: dict[str, Any]) -> dict[str, Any]:
    """From ``Calibration.as_dict()``: the chosen precision and K, and the predicted speedup."""
    return {"precision": calibration.get("precision"), "k": calibration.get("k"),
            "predicted_speedup": _number(calibration.get("predicted_speedup"))}


def from_serve_bench(bench: dict[str, Any]) -> dict[str, Any]:
    """From ``ServeBench.as_dict()``: concurrency 1's speedups (the lowest finished level) and the crossovers."""
    comparison = bench.get("comparison") or []
    first = comparison[0] if comparison else {}
    return {
        "latency_speedup": _number(first.get("latency_speedup")),
        "throughput_speedup": _number(first.get("throughput_speedup")),
        "levels": ",".join(str(row.get("max_concurrency")) for row in comparison),
        "crossover_concurrency": bench.get("crossover_concurrency"),
        "throughput_crossover_concurrency": bench.get("throughput_crossover_concurrency"),
    }


def from_workload(data: dict[str, Any]) -> dict[str, Any]:
    """From ``WorkloadMap.as_dict()``: the recommended policy, the break-even load and the loads simulated."""
    kind = data.get("load_kind", "concurrency")
    return {"recommended": data.get("recommended"), "break_even_load": _number(data.get("break_even_load")),
            "load_kind": kind, "loads": ",".join(f"{level.get(kind):g}" for level in data.get("levels", [])
                                                 if isinstance(level.get(kind), (int, float)))}


def with_speedup(figures: dict[str, Any], tokens_per_s: float | None, baseline_tokens_per_s: float | None) -> dict:
    """``figures`` plus speedup = tokens_per_s / baseline_tokens_per_s (None when either is missing)."""
    a, b = _number(tokens_per_s), _number(baseline_tokens_per_s)
    return figures | {"speedup": a / b if a is not None and b else None,
                      "target_tokens_per_s": b}
