"""Time the workload simulator: 10,000 requests per case (the issue's bound: under 2 s on this CPU).

    python scripts/bench_simulate.py

Prints, per case, the simulated events and steps (fixed by the seed; tests/test_simulate.py asserts the
count) and the wall time of the best of three runs; the last case charges context from tables (``ContextCosts``),
as the lab's own machine costs do. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.simulate import AcceptanceProfile, Cascade, Goodput, Off, StaticK, StepCosts, Traffic, simulate  # noqa: E402
from lab.simulate.costs import ContextCosts  # noqa: E402

COSTS = StepCosts({(b, w): 20.0 * (1 + 0.3 * (w - 1) / 4) * (1 + 0.05 * (b - 1)) for b in (1, 16) for w in range(1, 10)},
                  {1: 0.5, 16: 1.0}, prefill_ms_per_token=0.05)
TABLES = ContextCosts({b: {64: 20.0 * (1 + 0.05 * b), 768: 20.0 * (1 + 0.2 * b)} for b in (1, 16)},
                      {b: {64: 64 * b * 0.05, 768: 768 * b * 0.06} for b in (1, 16)}, {1: 100, 16: 100})
WITH_TABLES = dataclasses.replace(COSTS, by_context=TABLES, context_rule="sum")  # as the lab's machine costs
CASES = [
    ("closed 16, static K=3", Traffic("closed", concurrency=16, num_requests=10_000, output_tokens=64), StaticK(3)),
    ("closed 16, off", Traffic("closed", concurrency=16, num_requests=10_000, output_tokens=64), Off()),
    ("poisson 20/s, goodput", Traffic("poisson", rate_per_s=20, num_requests=10_000, output_tokens=64,
                                      length_spread=0.5), Goodput(8)),
    ("closed 8, cascade", Traffic("closed", concurrency=8, num_requests=10_000, output_tokens=64), Cascade(8)),
    ("closed 16, K=3, tables", Traffic("closed", concurrency=16, num_requests=10_000, output_tokens=64), StaticK(3)),
]


def main() -> None:
    acceptance = AcceptanceProfile.uniform(0.6)
    for name, traffic, policy in CASES:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            result = simulate(traffic, acceptance, WITH_TABLES if "tables" in name else COSTS, policy, seed=0)
            times.append(time.perf_counter() - start)
        print(f"{name:<24} {traffic.num_requests} requests, {result.events} events, {result.steps} steps: "
              f"{min(times):.2f} s (best of 3)")


if __name__ == "__main__":
    main()
