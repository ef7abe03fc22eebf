"""Map your workload before you ship: an iteration-level simulator that decides speculation.

Join what the lab measures in separate places (acceptance per category, step
costs by batch size and width, a serving engine's timings) into one question:
"we serve these requests at this rate on this hardware: do we turn speculation
on, with which K, and what happens to p99?"

- ``traffic``: Poisson, closed-loop or trace arrivals, lengths, categories;
- ``acceptance``: per-position acceptance per category, from a Compare,
  serve-bench or Batch sweep result, or by hand;
- ``costs``: the step-cost model T(batch, width, context);
- ``policies``: off, static K, K by batch size, goodput (SmartSpec), Cascade;
- ``engine``: the discrete-event simulation (:func:`simulate`);
- ``study``: every policy at every load, the break-even, the recommendation,
  the engines' configuration and the sensitivity sweep (:func:`map_workload`).
"""

from lab.simulate.acceptance import (
    AcceptanceProfile,
    CategoryAcceptance,
    acceptance_by_prompt,
    acceptance_from_comparison,
    acceptance_from_data,
    acceptance_from_dict,
    acceptance_from_runs,
    acceptance_from_serve_bench,
    acceptance_from_sweep,
    read_acceptance,
)
from lab.simulate.costs import (
    StepCosts,
    costs_from_calibration,
    costs_from_cost_model,
    costs_from_dict,
    costs_from_serve_bench,
    read_costs,
)
from lab.simulate.engine import SimResult, Summary, percentile, simulate
from lab.simulate.policies import Cascade, Context, Goodput, KByBatch, Off, StaticK, default_policies
from lab.simulate.study import LoadLevel, PolicyRun, WorkloadMap, engine_configs, map_workload, sensitivity
from lab.simulate.traffic import Request, Traffic, read_trace, trace_traffic

__all__ = [
    "AcceptanceProfile", "CategoryAcceptance", "Cascade", "Context", "Goodput", "KByBatch", "LoadLevel", "Off",
    "PolicyRun", "Request", "SimResult", "StaticK", "StepCosts", "Summary", "Traffic", "WorkloadMap",
    "acceptance_by_prompt", "acceptance_from_comparison", "acceptance_from_data", "acceptance_from_dict",
    "acceptance_from_runs", "acceptance_from_serve_bench",
    "acceptance_from_sweep", "costs_from_calibration", "costs_from_cost_model", "costs_from_dict",
    "costs_from_serve_bench", "default_policies", "engine_configs", "map_workload", "percentile", "read_acceptance",
    "read_costs", "read_trace", "sensitivity", "simulate", "trace_traffic",
]
