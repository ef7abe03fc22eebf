"""Predict, then run for real: the workload simulator against the lab's Batch sweep, side by side.

    python scripts/check_workload.py [--target smollm2-135m] [--drafter prompt-lookup] [--k 4]
        [--prompts spec_bench:mix:8] [--max-new-tokens 32] [--batch-sizes 1,2,4,8] [--rounds 1] [--out check.json]

1. The traffic's inputs: one batch-1 run of every checked prompt with the
   target alone and with the drafter at K: their output lengths and their
   acceptance per category (Spec-Bench's: a summary copies its source, a
   translation does not), not their timings.
2. Per batch size B, ascending, interleaved so that the machine's drifting load
   hits costs and check alike: time this machine's step costs at B with the one
   cost model the CLI and the page use (``lab.simulate.measure.time_costs``:
   bare passes, one-token passes and prefills by context, and the real decode
   loop's own work per step, profiled on the lab's own prompt sets, never the
   prompts checked here); predict the level
   with ``lab.simulate`` (static batches, a closed loop of B clients as the
   Batch page loads it, the same requests in the same order, speculation off and
   at static K); then run it (``lab.studies.batch_sweep.run_sweep`` at B) and
   print predicted against measured p50 / p95 latency and throughput, with the
   error in percent, the loop overhead charged, a probe of the machine's speed
   (a bare one-token pass) before and after, and the load average. With
   ``--rounds N`` each level is timed, predicted and run N times, and each
   level's median over its rounds is printed with the measured side's own
   spread (how far the same run moved between rounds: the noise floor).

The goal: within 15 % on p50 latency and 25 % on p99 (with 8 requests a level,
the sweep's p95 is its nearest figure). The probe columns tell a level the
machine's speed moved under (another job, a slow minute) from a model miss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lab  # noqa: F401,E402  (first: OpenMP's wait policy)

from lab.config import DecodeConfig  # noqa: E402
from lab.decode import run_batch  # noqa: E402
from lab.drafters import make_drafter  # noqa: E402
from lab.models import encode_prompt, load_model  # noqa: E402
from lab.prompts import load_prompt_sets  # noqa: E402
from lab.simulate import (  # noqa: E402
    AcceptanceProfile,
    Off,
    Request,
    StaticK,
    Traffic,
    acceptance_from_runs,
    simulate,
)
from lab.simulate.measure import DEFAULT_PROMPTS, time_costs  # noqa: E402
from lab.studies.passes import time_passes  # noqa: E402
from lab.studies.batch_sweep import _requests, run_sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default="prompt-lookup")
    parser.add_argument("--draft", default=None)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", nargs="+", default=None,
                        help="default: spec_bench:mix:8 when the Spec-Bench file is there, else our own sets")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each level is timed, predicted and run; >1 also prints each level's median")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    started = time.perf_counter()
    prompts = _prompts(args.prompts)
    target = load_model(args.target)
    draft = load_model(args.draft) if args.draft else None
    drafter = make_drafter(args.drafter, target, draft)
    prompt_ids = [encode_prompt(target, p.text) for p in prompts]
    config = DecodeConfig(k=args.k, max_new_tokens=args.max_new_tokens)
    print(f"{args.target} with {args.drafter}, K={args.k}, {len(prompts)} prompts, {args.max_new_tokens} tokens; "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)

    # 1. the traffic's inputs: every checked prompt alone at batch 1, off and on (lengths, acceptance)
    alone = [run_batch(target, [p], None, config) for p in prompt_ids]
    spec = [run_batch(target, [p], drafter, config) for p in prompt_ids]
    categories = [p.category or "all" for p in prompts]
    # per category, as a Compare on your own prompts measures it, without the steps the budget capped
    by_category = {category: acceptance_from_runs([r for r, c in zip(spec, categories) if c == category], args.k,
                                                  args.max_new_tokens) for category in dict.fromkeys(categories)}
    acceptance = AcceptanceProfile(by_category, model=args.target)
    lengths = [len(r.rows[0].token_ids) for r in alone]
    print("traffic: per-position acceptance by category "
          + "; ".join(f"{c} {[round(r, 2) for r in a.per_position]} (drafts {a.draft_rate:.2f})"
                      for c, a in by_category.items()) + f"; output lengths {lengths}", flush=True)
    profile_ids = [encode_prompt(target, p.text) for p in load_prompt_sets(list(DEFAULT_PROMPTS))]

    rows, costs = [], None
    print(f"{'B':>3} {'mode':>4} {'p50 s pred/meas':>17} {'err':>6} {'p95 s pred/meas':>17} {'err':>6} "
          f"{'tok/s pred/meas':>17} {'err':>6}  {'loop ms':>7} {'probe ms before/after':>21} {'load':>4}")
    for b in batch_sizes:
        for round_ in range(args.rounds):
            # 2. this level's costs, timed just before it (the machine's speed drifts): the CLI's one cost model
            probe_before = _probe(target)
            level_costs = time_costs(target, drafter, profile_ids, [b], args.k, args.target, args.drafter,
                                     loop_tokens=args.max_new_tokens,
                                     draft_model=None if draft is None else draft.model)
            costs = level_costs if costs is None else costs.merged(level_costs)
            # 3. predict: static batches, a closed loop of B clients (the Batch page's load), the same requests
            requests = tuple(Request(0.0, len(prompt_ids[i]), lengths[i], categories[i])
                             for i in _requests(len(prompt_ids), b))
            traffic = Traffic("closed", concurrency=b, requests=requests, num_requests=len(requests))
            predicted = {name: simulate(traffic, acceptance, costs, policy, "static", seed=0).summary()
                         for name, policy in (("off", Off()), ("on", StaticK(args.k)))}
            # 4. run for real
            result = run_sweep(target, prompt_ids, drafter, config, [b], calibration=False).results[0]
            probe_after, load = _probe(target), os.getloadavg()[0]
            for name, run in (("off", result.off), ("on", result.on)):
                p = predicted[name]
                row = {"batch_size": b, "mode": name, "round": round_,
                       "latency_p50_s": [p.latency_p50_s, run.latency_p50_s],
                       "latency_p95_s": [p.latency_p95_s, run.latency_p95_s],
                       "tokens_per_s": [p.tokens_per_s, run.tokens_per_s],
                       "loop_overhead_ms": costs.overhead(b, args.k if name == "on" else 0),
                       "probe_ms": [probe_before, probe_after], "load_average": load}
                rows.append(_with_errors(row))
                _print_row(row, f"{probe_before:>10.1f}/{probe_after:<10.1f} {load:>4.1f}")
    summary = rows
    if args.rounds > 1:  # each level's median over its rounds, predicted and measured alike
        summary = []
        print(f"median over {args.rounds} rounds (spread: the measured side's own max/min - 1 across its rounds)")
        for b in batch_sizes:
            for name in ("off", "on"):
                mine = [r for r in rows if r["batch_size"] == b and r["mode"] == name]
                row = {"batch_size": b, "mode": name, "rounds": len(mine),
                       "loop_overhead_ms": statistics.median(r["loop_overhead_ms"] for r in mine)}
                for key in KEYS:
                    row[key] = [statistics.median(r[key][i] for r in mine) for i in (0, 1)]
                spread = max(r["latency_p50_s"][1] for r in mine) / min(r["latency_p50_s"][1] for r in mine) - 1
                row["measured_p50_spread_pct"] = spread * 100
                summary.append(_with_errors(row))
                _print_row(row, f"spread {spread * 100:>4.0f}%")
    within = sum(abs(r["errors_pct"]["latency_p50_s"]) <= 15 for r in summary)
    tails = sum(abs(r["errors_pct"]["latency_p95_s"]) <= 25 for r in summary)
    print(f"p50 latency within 15 %: {within}/{len(summary)}; p95 within 25 %: {tails}/{len(summary)}; "
          f"{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows,
                                        "summary": summary,
                                        "costs": costs.as_dict(), "profile_prompts": list(DEFAULT_PROMPTS),
                                        "acceptance": acceptance.as_dict(),
                                        "load_average_end": os.getloadavg()[0]}, indent=1))


KEYS = ("latency_p50_s", "latency_p95_s", "tokens_per_s")


def _with_errors(row: dict) -> dict:
    row["errors_pct"] = {key: _error(*row[key]) for key in KEYS}
    return row


def _print_row(row: dict, tail: str) -> None:
    cells = " ".join(f"{row[key][0]:>8.3f}/{row[key][1]:<8.3f} {row['errors_pct'][key]:>+5.0f}%" for key in KEYS)
    print(f"{row['batch_size']:>3} {row['mode']:>4} {cells}  {row['loop_overhead_ms']:>7.1f} {tail}", flush=True)


def _probe(target) -> float:
    """Median ms of a bare one-token pass after 100 cached tokens: how fast the machine is right now."""
    return time_passes(target.model, [1], context_tokens=100, repeats=5)[1]


def _prompts(sources):
    if sources:
        return load_prompt_sets(sources)
    try:
        return load_prompt_sets(["spec_bench:mix:8"])
    except (FileNotFoundError, ValueError):
        return load_prompt_sets(["summarization:2", "open_qa:2", "code_editing:2", "json_extraction:2"])


def _error(predicted: float, measured: float) -> float:
    """Prediction error in percent of the measured value (positive: the prediction is higher)."""
    return (predicted - measured) / measured * 100 if measured else float("nan")


if __name__ == "__main__":
    main()
