"""Predict, then run for real: the workload simulator against llama-server under serve-bench, side by side.

    python scripts/check_workload_llama.py [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b] [--k 4]
        [--concurrency 1,2,4,8] [--max-tokens 16] [--prompts spec_bench:mix:8] [--threads 1] [--out check.json]

1. Start two llama-servers on 127.0.0.1 (target drafted by the draft at K: "on";
   the target alone: "off"), as ``python -m lab serve-bench --llama-target`` does.
2. Profile: a serve-bench pass over the lab's own prompt sets (not the prompts
   checked) at every concurrency level, one request per worker: the slots start
   together, so a request's steps do not carry another's prompt processing,
   which the simulator charges apart. Step costs come
   from llama-server's own per-request timings (``timings.predicted_ms`` per
   step at each concurrency, ``prompt_ms`` per prompt token:
   ``lab.simulate.costs_from_serve_bench``), acceptance from its draft counters
   (``lab.simulate.acceptance_from_serve_bench``). Nothing of the checked run
   goes into them. The prefill is each endpoint's own (the "on" server also
   prefills the draft).
3. Check: serve-bench over the checked prompts at the same levels.
4. Predict each level with ``lab.simulate``: a closed loop of C clients,
   continuous batching (llama-server's slots), the same requests (their prompt
   and output token counts) in the order they were sent, each next request
   joining after the step in flight (``late_joins``: the server steps back to
   back while a response and the next request cross HTTP); then print predicted
   against measured p50 / p99 end-to-end latency, p50 TTFT and output
   throughput, with the error in percent. A prompt the endpoint served before
   in the run is predicted as cached (one token of prefill): llama-server's
   prompt cache, which its own ``prompt_ms`` shows.

Acceptance (``--acceptance-from``): by default a probe, before anything else,
sends each checked prompt once to a third server of the same configuration
and reads its draft counters (what measuring your own prompts gives; the
probe's timings are not used, and the checked servers' prompt caches stay
cold); "profile" takes the profiling prompts' counters (a forecast for prompts
never measured); "check" the checked run's own at its first level.
``--replay FILE`` predicts again from a saved ``--out`` file.

The goal: within 15 % on p50 latency and 25 % on p99. llama-server's threads
and the client share this machine's cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lab  # noqa: F401,E402

from lab.prompts import load_prompt_sets  # noqa: E402
from lab.serving.client import Endpoint, RequestSettings  # noqa: E402
from lab.serving.llama_server import LlamaServer, gguf_path  # noqa: E402
from lab.simulate import (  # noqa: E402
    Off, Request, StaticK, Traffic, acceptance_by_prompt, acceptance_from_serve_bench, simulate)
from lab.simulate.costs import costs_from_serve_bench  # noqa: E402
from lab.studies.serve_bench import run_serve_bench  # noqa: E402

# The lab's short prompts and two long Spec-Bench prompts that the checked mix does not hold (ids 481 and 241):
# llama-server pads each slot's KV read to 256 cells, so only prompts past 256 tokens show what context costs.
PROFILE_PROMPTS = ["summarization:1", "code_editing:1", "open_qa:1", "translation:1", "spec_bench:rag:1",
                   "spec_bench:summarization:1"]
KEYS = ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "tokens_per_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompts", nargs="+", default=["spec_bench:mix:8"])
    parser.add_argument("--profile-prompts", nargs="+", default=PROFILE_PROMPTS)
    parser.add_argument("--rounds", type=int, default=2, help="requests per worker per level in the checked run")
    parser.add_argument("--threads", type=int, default=1, help="llama-server threads (1: see serving-engines.md)")
    parser.add_argument("--api", choices=("completions", "chat"), default="chat")
    parser.add_argument("--acceptance-from", choices=("probe", "profile", "check"), default="probe",
                        help="probe: the checked prompts sent once each, beforehand, to a third server of the same "
                        "configuration (what measuring your own prompts gives; its timings are not used); profile: "
                        "the profiling prompts' draft counters (a forecast for prompts never measured); check: the "
                        "checked run's own counters at concurrency 1")
    parser.add_argument("--profile-rounds", type=int, default=2,
                        help="requests per worker per level in the profile (its steps are read from the streamed "
                        "tokens, and steps that processed a prompt are left out)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="times the profile and the checked run are repeated, each on fresh servers; >1 also "
                        "prints each level's median over the repeats and the measured side's own spread")
    parser.add_argument("--replay", type=Path, help="predict again from a saved --out file (no server is started)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.replay:
        saved = json.loads(args.replay.read_text())
        profiles, checks = saved.get("profiles") or [saved["profile"]], saved.get("checks") or [saved["check"]]
        probe_data, k = saved.get("probe"), saved["settings"]["k"]
    else:
        probe_data, profiles, checks = _run(args)
        k = args.k
    # every repeat's profile together: each (endpoint, batch) step cost is the median over all of them
    profile_data = profiles[0] | {"levels": [lv for p in profiles for lv in p["levels"]]}
    check_data = checks[0]
    costs = {mode: costs_from_serve_bench(profile_data, prefill_label=mode) for mode in ("on", "off")}
    if args.acceptance_from == "probe":
        if probe_data is None:
            raise SystemExit("the saved run has no acceptance probe: replay with --acceptance-from profile or check")
        acceptance = acceptance_by_prompt(probe_data)  # each checked prompt its own rate
    elif args.acceptance_from == "profile":
        acceptance = acceptance_from_serve_bench(profile_data)
    else:
        first = min(lv["max_concurrency"] for lv in check_data["levels"])
        acceptance = acceptance_from_serve_bench(check_data | {"levels": [
            lv for lv in check_data["levels"] if lv["max_concurrency"] == first]})
    steps = {key: round(ms, 1) for key, ms in costs["on"].target_ms.items()}
    print(f"profiled step ms {{(concurrency, width): ms}} {steps}, "
          f"prefill ms/token on {costs['on'].prefill_ms_per_token:.2f}, off {costs['off'].prefill_ms_per_token:.2f}, "
          f"per-position acceptance ({args.acceptance_from}) "
          f"{[round(r, 2) for r in acceptance.categories['all'].per_position]}"
          + (f", per prompt {len(acceptance.categories) - 1}" if len(acceptance.categories) > 1 else ""), flush=True)
    repeats = []
    for i, check in enumerate(checks):
        if len(checks) > 1:
            print(f"repeat {i + 1} of {len(checks)}")
        repeats.append(predict(check, costs, acceptance, k))
    rows = repeats[0] if len(repeats) == 1 else _medians(repeats)
    within = sum(abs(r["errors_pct"]["latency_p50_s"]) <= 15 for r in rows)
    tails = sum(abs(r["errors_pct"]["latency_p99_s"]) <= 25 for r in rows)
    print(f"p50 latency within 15 %: {within}/{len(rows)}; p99 within 25 %: {tails}/{len(rows)}; "
          f"{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out), "replay": str(args.replay)},
                                        "rows": rows, "repeats": repeats,
                                        "costs": {mode: c.as_dict() for mode, c in costs.items()},
                                        "acceptance": acceptance.as_dict(), "profiles": profiles,
                                        "checks": checks, "probe": probe_data},
                                       indent=1, default=str))


def _run(args) -> tuple[dict | None, list[dict], list[dict]]:
    """Measure acceptance on a third server (``--acceptance-from probe``); then, ``--repeats`` times, start the two
    servers afresh, profile on the profiling prompts and run the checked load: (probe or None, profiles, checks)."""
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = RequestSettings(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, timeout_s=300.0)
    llama = {"target": args.target, "draft": args.draft, "k": args.k, "parallel": max(levels), "threads": args.threads}
    print(f"llama-server {args.target} drafted by {args.draft}, K={args.k}, {args.max_tokens} tokens, levels {levels}",
          flush=True)
    log = lambda fraction, message: print(f"  {message}", flush=True)  # noqa: E731
    probe = None
    if args.acceptance_from == "probe":  # its own server: the checked servers' prompt caches stay cold
        print("0. acceptance: each checked prompt once, at concurrency 1, on a third server", flush=True)
        with LlamaServer(gguf_path(args.target), gguf_path(args.draft), draft_max=args.k, parallel=1,
                         threads=args.threads, alias=args.target) as server:
            probe = run_serve_bench([Endpoint(server.url, args.target, args.api, "on")],
                                    load_prompt_sets(args.prompts), [1], settings, rounds=1, progress=log)
        probe.settings["llama_server"] = llama
        probe = probe.as_dict()
    profiles, checks = [], []
    for repeat in range(args.repeats):
        with contextlib.ExitStack() as servers:
            urls = []
            for draft in (gguf_path(args.draft), None):
                server = LlamaServer(gguf_path(args.target), draft, draft_max=args.k, parallel=max(levels),
                                     threads=args.threads, alias=args.target)
                servers.enter_context(server)
                urls.append(server.url)
            endpoints = [Endpoint(urls[0], args.target, args.api, "on"),
                         Endpoint(urls[1], args.target, args.api, "off")]
            print(f"1. profiling on the lab's own prompt sets (repeat {repeat + 1} of {args.repeats})", flush=True)
            profile = run_serve_bench(endpoints, load_prompt_sets(args.profile_prompts), levels, settings,
                                      rounds=args.profile_rounds, progress=log)
            print(f"2. the checked run (repeat {repeat + 1} of {args.repeats})", flush=True)
            check = run_serve_bench(endpoints, load_prompt_sets(args.prompts), levels, settings, rounds=args.rounds,
                                    progress=log)
        profile.settings["llama_server"] = check.settings["llama_server"] = llama
        profiles.append(profile.as_dict())
        checks.append(check.as_dict())
    return probe, profiles, checks


def predict(check_data: dict, costs: dict, acceptance, k: int) -> list[dict]:
    """Predicted against measured rows, one per endpoint and level, printed as they come.

    llama-server keeps each slot's last prompt in its KV cache (``cache_prompt``) and
    gives a request the slot holding the most of its prompt: a prompt this endpoint
    served before in the run costs one token of prefill, as its ``timings.prompt_ms``
    shows (tens of ms for 658 tokens where the first sending took 12.9 s); its
    tokens are still in the context every step reads (``Request.cached_tokens``).
    """
    rows, seen = [], {"on": set(), "off": set()}
    print(f"{'C':>3} {'mode':>4} {'p50 s pred/meas':>17} {'err':>6} {'p99 s pred/meas':>17} {'err':>6} "
          f"{'TTFT p50 s':>15} {'err':>6} {'tok/s pred/meas':>15} {'err':>6}  cached")
    for level in check_data["levels"]:
        records = sorted((r for r in level["requests"] if r["ok"]), key=lambda r: r["start_s"])
        if not records:
            continue
        c, mode = level["max_concurrency"], level["label"]
        requests, cached = [], 0
        for r in records:
            prompt = max(1, r["input_tokens"] or 1)
            if r.get("server_cached_tokens") is not None:  # what the server says it reused
                reused = min(prompt - 1, r["server_cached_tokens"])
            else:  # older runs: a prompt served before on this endpoint is cached
                reused = prompt - 1 if r["prompt_id"] in seen[mode] else 0
            cached += reused > 0
            seen[mode].add(r["prompt_id"])
            category = str(r["prompt_id"]) if str(r["prompt_id"]) in acceptance.categories else "all"
            requests.append(Request(0.0, prompt, max(1, r["output_tokens"] or 1), category, cached_tokens=reused))
        traffic = Traffic("closed", concurrency=c, requests=tuple(requests), num_requests=len(requests))
        policy = StaticK(k) if mode == "on" else Off()
        p = simulate(traffic, acceptance, costs[mode], policy, "continuous", seed=0, late_joins=True).summary()
        measured = {"latency_p50_s": level["median_e2el_ms"] / 1e3, "latency_p99_s": level["p99_e2el_ms"] / 1e3,
                    "ttft_p50_s": level["median_ttft_ms"] / 1e3, "tokens_per_s": level["output_throughput"]}
        row = {"concurrency": c, "mode": mode, "requests": len(records), "cached_prompts": cached} | {
            key: [getattr(p, key), measured[key]] for key in KEYS}
        row["errors_pct"] = {key: _error(*row[key]) for key in KEYS}
        rows.append(row)
        e = row["errors_pct"]
        cells = (f"{row[key][0]:>8.3f}/{row[key][1]:<8.3f} {e[key]:>+5.0f}%" for key in KEYS)
        print(f"{c:>3} {mode:>4} " + " ".join(cells) + f"  {cached}/{len(records)}", flush=True)
    return rows


def _medians(repeats: list[list[dict]]) -> list[dict]:
    """Each level's median over the repeats, predicted and measured alike, with the measured p50's spread
    (its max / min - 1 over the repeats: how far the same load moved on its own), printed."""
    print(f"median over {len(repeats)} repeats (spread: the measured p50's own max/min - 1 over the repeats)")
    rows = []
    for first in repeats[0]:
        mine = [r for rep in repeats for r in rep if (r["concurrency"], r["mode"]) == (first["concurrency"],
                                                                                   first["mode"])]
        row = {"concurrency": first["concurrency"], "mode": first["mode"], "repeats": len(mine)} | {
            key: [statistics.median(r[key][i] for r in mine) for i in (0, 1)] for key in KEYS}
        row["errors_pct"] = {key: _error(*row[key]) for key in KEYS}
        measured = [r["latency_p50_s"][1] for r in mine]
        row["measured_p50_spread_pct"] = (max(measured) / min(measured) - 1) * 100
        rows.append(row)
        e = row["errors_pct"]
        cells = (f"{row[key][0]:>8.3f}/{row[key][1]:<8.3f} {e[key]:>+5.0f}%" for key in KEYS)
        print(f"{row['concurrency']:>3} {row['mode']:>4} " + " ".join(cells)
              + f"  spread {row['measured_p50_spread_pct']:.0f}%", flush=True)
    return rows


def _error(predicted: float, measured: float) -> float:
    """Prediction error in percent of the measured value (positive: the prediction is higher)."""
    return (predicted - measured) / measured * 100 if measured else float("nan")


if __name__ == "__main__":
    main()
