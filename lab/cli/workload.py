"""``python -m lab workload``: map a workload before shipping it (``lab.simulate``).

Costs: ``--costs FILE`` (the simulator's costs JSON, a Batch sweep, a GPU
profile of ``scripts/device_costs.py`` or a serve-bench result with
llama.cpp's timings), else this machine's, timed once and cached
(``lab.simulate.measure``). Acceptance: ``--acceptance FILE`` (a Compare,
serve-bench or Batch sweep result, or the simulator's acceptance JSON), else
the calibration's prior for the drafter (``lab.studies.calibrate.PRIOR_ACCEPTANCE``),
said so in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lab.cli.common import EXIT_OK, ProgressLine, UsageError


def add_workload(commands) -> None:
    """Register ``python -m lab workload``."""
    from lab.drafters import DRAFTER_NAMES

    work = commands.add_parser("workload", help="simulate your traffic under each speculation policy and say which to "
                               "ship (latency p50/p99 and throughput against load)")
    work.add_argument("--target", required=True, help="the target (a preset or folder): whose costs to use")
    work.add_argument("--drafter", choices=[n for n in DRAFTER_NAMES if n != "none"], default="prompt-lookup",
                      help="draft source (default prompt-lookup)")
    work.add_argument("--draft", help="draft model for --drafter draft-model")
    load = work.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="closed loop: comma-separated client counts (default 1,4,16)")
    load.add_argument("--rate", help="Poisson arrivals: comma-separated requests/s")
    work.add_argument("--trace", type=Path, help="a CSV or JSONL request log (arrival_s, prompt_tokens, "
                      "output_tokens, category); with --rate, its arrivals are rescaled to each rate")
    work.add_argument("--output-tokens", type=int, default=64, help="output tokens per request (default 64)")
    work.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per request (default 128)")
    work.add_argument("--length-spread", type=float, default=0.0, help="lengths uniform in mean x [1-s, 1+s] (default 0)")
    work.add_argument("--requests", type=int, default=400, help="requests simulated per load and policy (default 400)")
    work.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                      help="continuous (requests join at step boundaries) or static (whole batches, as the Batch page)")
    work.add_argument("--max-batch", type=int, default=None, help="rows per step at most (default: the concurrency, "
                      "or 256 for arrivals)")
    work.add_argument("--k-max", type=int, default=8, help="the largest K any policy may pick (default 8)")
    work.add_argument("--acceptance", type=Path, help="acceptance: a Compare / serve-bench / Batch sweep result or JSON")
    work.add_argument("--costs", type=Path, help="step costs: a costs JSON, Batch sweep, GPU profile or serve-bench "
                      "result (default: this machine's, timed once per target and drafter, a few minutes on 2 cores, "
                      "then cached under ~/.cache/speculative-decoding-lab/calibration)")
    work.add_argument("--refresh", action="store_true", help="time this machine again even when costs are cached")
    work.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    work.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    work.add_argument("--out", type=Path, help="also write the JSON result to this file")
    work.set_defaults(handler=_cmd_workload)


def _cmd_workload(args: argparse.Namespace) -> int:
    from lab.simulate import AcceptanceProfile, Traffic, map_workload, read_acceptance, read_costs, trace_traffic

    if args.drafter == "draft-model" and not args.draft:
        raise UsageError("--drafter draft-model requires --draft NAME (e.g. --draft qwen2.5-coder-0.5b)")
    if args.trace and args.concurrency:
        raise UsageError("--trace takes --rate (arrivals rescaled) or nothing (as logged); got --concurrency")
    loads_text = args.rate or args.concurrency or ("" if args.trace else "1,4,16")
    loads = _numbers(loads_text, "--rate" if args.rate else "--concurrency", integer=not args.rate)
    if args.trace:
        traffic = trace_traffic(args.trace)
        loads = loads or [traffic.load]
    elif args.rate:
        traffic = Traffic("poisson", rate_per_s=loads[0], num_requests=args.requests, prompt_tokens=args.prompt_tokens,
                          output_tokens=args.output_tokens, length_spread=args.length_spread)
    else:
        traffic = Traffic("closed", concurrency=int(loads[0]), num_requests=args.requests,
                          prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                          length_spread=args.length_spread)
    progress = ProgressLine(sys.stderr, always=True)  # timing takes minutes: say so in a log too
    if args.acceptance:
        acceptance, acceptance_note = read_acceptance(args.acceptance), f"from {args.acceptance}"
    else:
        from lab.studies.calibrate import PRIOR_ACCEPTANCE

        a = PRIOR_ACCEPTANCE.get(args.drafter, 0.5)
        acceptance = AcceptanceProfile.uniform(a, model="", drafter=args.draft or args.drafter, source="prior")
        acceptance_note = (f"a prior (a = {a} per token for {args.drafter}); measure yours with `python -m lab compare "
                           "... --out compare.json` and pass --acceptance compare.json")
    if len(acceptance.categories) == 1 and traffic.kind != "trace":
        only = next(iter(acceptance.categories))
        traffic = Traffic(traffic.kind, traffic.rate_per_s, traffic.concurrency, traffic.num_requests,
                          traffic.prompt_tokens, traffic.output_tokens, traffic.length_spread, {only: 1.0})
    if args.costs:
        costs = read_costs(args.costs)
        costs.check_model(str(args.target))
    else:
        from lab.simulate.measure import machine_costs, timing_warning

        top = int(max(loads)) if traffic.kind == "closed" else (args.max_batch or 16)
        batch_sizes = sorted({1, 2, 4, 8, top} & set(range(1, top + 1)) | {top})
        costs = machine_costs(args.target, args.drafter, args.draft, batch_sizes, args.k_max, refresh=args.refresh,
                              progress=progress)
        warning = timing_warning(args.target, args.drafter, args.draft)
        if warning:
            print(f"warning: {warning} (the costs stay cached: --refresh times them again)", file=sys.stderr)
    result = map_workload(traffic, loads, acceptance, costs, batching=args.batching, k_max=args.k_max, seed=args.seed,
                          max_batch=args.max_batch, drafter=args.drafter, draft=args.draft, progress=progress)
    progress.done()
    data = result.as_dict() | {"target": str(args.target), "drafter": args.draft or args.drafter,
                               "acceptance_source": acceptance_note, "costs_source": costs.source,
                               "requests_per_level": traffic.num_requests}
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1) if args.json else format_workload(data))
    return EXIT_OK


def format_workload(data: dict) -> str:
    """The map as a plain-text table, one line per load: off, the recommended policy and the best one there."""
    kind = data["load_kind"]
    lines = [f"{data['target']} with {data['drafter']}, {data['batching']} batching; acceptance {data['acceptance_source']}; "
             f"costs: {data['costs_source']}", f"recommended: {data['recommended']}",
             f"{kind:>11} {'off p50/p99 s':>15} {'tok/s':>7}   {'recommended':>13} {'tok/s':>7}   "
             f"{'best policy':<28} {'p50/p99 s':>13} {'tok/s':>7}"]
    for level in data["levels"]:
        off, best = level["off"], level["best"]
        mine = next(r for r in level["runs"] if r["policy"] == data["recommended"])
        lines.append(f"{level[kind]:>11g} {off['latency_p50_s']:>7.3f}/{off['latency_p99_s']:<7.3f} "
                     f"{off['tokens_per_s']:>7.1f}   {mine['latency_p50_s']:>6.3f}/{mine['latency_p99_s']:<6.3f} "
                     f"{mine['tokens_per_s']:>7.1f}   {best['policy']:<28} "
                     f"{best['latency_p50_s']:>6.3f}/{best['latency_p99_s']:<6.3f} {best['tokens_per_s']:>7.1f}")
    lines.append(data["decision"])
    lines += [f"caveat: {caveat}" for caveat in data.get("caveats", [])]
    for engine in ("vllm", "sglang", "llama.cpp"):
        lines.append(f"{engine}: {data['configs'][engine]}")
    if data["configs"].get("note"):
        lines.append(f"note: {data['configs']['note']}")
    return "\n".join(lines)


def _numbers(text: str, flag: str, integer: bool) -> list[float]:
    if not text:
        return []
    try:
        values = [int(x) if integer else float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} requires comma-separated {'integers' if integer else 'numbers'}, e.g. 1,4,16; "
                         f"got {text!r}") from None
    if not values or min(values) <= 0:
        raise UsageError(f"{flag} requires values > 0; got {text!r}")
    return values
