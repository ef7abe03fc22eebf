"""Step costs for the workload simulator: T(batch, width, context) in milliseconds, and where they come from.

One decode step of a batch of B rows, K drafted tokens per row, costs

    T = target(B, w) + K x draft(B) + loop(B) [+ spec_loop(B) when K > 0]
        + context_ms_per_token x (tokens cached over the batch)

with the tokens cached over the batch counted as attention reads them: B x the
longest row's context in a padded engine, the sum of the rows' in a flattened
one; and w the verify width: K+1 for every row in a padded engine (the lab's:
``width_rule`` "max", the widest row sets the pass) or the mean width over rows
in a token-flattening engine (vLLM, llama.cpp's batch of all slots' tokens:
"mean"). A row that
drafted nothing counts as width 1. target(B, w) and draft(B) interpolate
linearly between measured points (more rows or more tokens per row never cost
less: a running maximum evens out timing noise) and extrapolate linearly beyond them (with
one measured batch size, proportionally to B: the pessimistic guess, as
``lab.studies.auto_k`` makes it). loop(B) and spec_loop(B) are the real decode
loop's own work per step beyond the bare passes (per row: the n-gram search's
bookkeeping, rollback, the cut, the stop checks, Python), measured by batch size
by :mod:`lab.simulate.profile` and interpolated the same way (0 when unmeasured).
Prefill of n prompt tokens costs prefill_fixed_ms + prefill_ms_per_token x n
(n: the joiners' prompts, padded to the longest in a padded engine), and yields
the first token.

Sources: the Batch sweep's ``CostModel`` (``lab.studies.auto_k``, measured
over real prompts by batch size), a batch-1 calibration
(``lab.studies.calibrate``), a GPU profile of ``scripts/device_costs.py``
(``lab.studies.costs.CostTable.as_dict``), a serve-bench result with
llama.cpp's own timings, or the simulator's costs JSON (:meth:`StepCosts.as_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class StepCosts:
    """Measured step costs, in milliseconds (see the module docstring).

    target_ms: {(batch size, width in tokens per row): ms of one verify pass}.
    draft_ms_per_token: {batch size: ms of drafting one token for every row}.
    prefill_ms_per_token: ms per prompt token (all rows' tokens summed);
    prefill_fixed_ms: ms per prefill pass. context_ms_per_token: ms per cached
    token over the batch, per step (0: the calibration's context only).
    overhead_ms: {batch size: ms of the loop's own work per step} (every step);
    spec_overhead_ms: {batch size: ms} more on a step that drafts (K > 0).
    width_rule: "max" (padded) or "mean" (flattened). model: the target's name
    ("" unknown); drafter: the drafter's label; source: for a person.

    Raises ValueError on no target timings, a missing one-token width, or a negative time.
    """

    target_ms: dict[tuple[int, int], float]
    draft_ms_per_token: dict[int, float] = field(default_factory=dict)
    prefill_ms_per_token: float = 0.0
    prefill_fixed_ms: float = 0.0
    context_ms_per_token: float = 0.0
    width_rule: Literal["max", "mean"] = "max"
    model: str = ""
    drafter: str = ""
    source: str = "by hand"
    overhead_ms: dict[int, float] = field(default_factory=dict)
    spec_overhead_ms: dict[int, float] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.target_ms:
            raise ValueError("step costs require target timings {(batch, width): ms}; got none")
        if not any(w == 1 for _, w in self.target_ms):
            raise ValueError(f"step costs require the one-token step (width 1) at some batch size; got the widths "
                             f"{sorted({w for _, w in self.target_ms})}")
        values = [*self.target_ms.values(), *self.draft_ms_per_token.values(), self.prefill_ms_per_token,
                  self.prefill_fixed_ms, self.context_ms_per_token, *self.overhead_ms.values(),
                  *self.spec_overhead_ms.values()]
        if any(b < 1 for b in [*self.draft_ms_per_token, *self.overhead_ms, *self.spec_overhead_ms]) or \
                any(b < 1 or w < 1 for b, w in self.target_ms):
            raise ValueError("step costs require batch sizes and widths >= 1; got "
                             f"{sorted(self.target_ms)} {sorted(self.overhead_ms)} {sorted(self.spec_overhead_ms)}")
        if any(not (v >= 0) for v in values):
            raise ValueError(f"step costs require times >= 0 ms; got {values}")
        if self.width_rule not in ("max", "mean"):
            raise ValueError(f"width_rule requires 'max' or 'mean'; got {self.width_rule!r}")

    def target(self, batch_size: int, width: float) -> float:
        """ms of one verify pass of batch_size rows x width tokens."""
        key = (batch_size, width)
        if key not in self._memo:
            by_batch: dict[int, list[tuple[float, float]]] = {}
            for (b, w), ms in self.target_ms.items():
                by_batch.setdefault(b, []).append((w, ms))
            at = [(b, _interpolate(_monotone(sorted(points)), width, proportional=False))
                  for b, points in sorted(by_batch.items())]
            self._memo[key] = _interpolate(_monotone(at), batch_size)
        return self._memo[key]

    def draft(self, batch_size: int, k: int) -> float:
        """ms of drafting k tokens for batch_size rows (0 for k = 0 or without draft timings)."""
        if k == 0 or not self.draft_ms_per_token:
            return 0.0
        key = ("draft", batch_size)
        if key not in self._memo:
            self._memo[key] = _interpolate(sorted(self.draft_ms_per_token.items()), batch_size)
        return k * self._memo[key]

    def overhead(self, batch_size: int, k: int) -> float:
        """ms of the decode loop's own work in one step of batch_size rows (beyond the passes; 0 unmeasured)."""
        key = ("overhead", batch_size, k > 0)
        if key not in self._memo:
            ms = _interpolate(sorted(self.overhead_ms.items()), batch_size) \
                if self.overhead_ms else 0.0
            if k > 0 and self.spec_overhead_ms:
                ms += _interpolate(sorted(self.spec_overhead_ms.items()), batch_size)
            self._memo[key] = ms
        return self._memo[key]

    def step_ms(self, batch_size: int, k: int, width: float | None = None, context_tokens: int = 0) -> float:
        """ms of one decode step: verify at ``width`` (default K+1), drafting K, the loop's work, the context term."""
        return (self.target(batch_size, k + 1 if width is None else width) + self.draft(batch_size, k)
                + self.overhead(batch_size, k) + self.context_ms_per_token * context_tokens)

    def prefill_ms(self, prompt_tokens: int) -> float:
        """ms of one prefill pass over prompt_tokens tokens (all rows joining together)."""
        return self.prefill_fixed_ms + self.prefill_ms_per_token * prompt_tokens

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({b for b, _ in self.target_ms})

    def check_model(self, model: str) -> None:
        """Raise ValueError when these costs were measured on another model than ``model`` (either unknown: pass)."""
        if self.model and model and _short(self.model) != _short(model):
            raise ValueError(f"the step costs were measured on {self.model!r}; the workload is for {model!r}: "
                             "calibrate that model or give its costs")

    def merged(self, later: "StepCosts") -> "StepCosts":
        """These costs with ``later`` 's timings added (``later`` wins where both have one; its prefill and labels)."""
        return dataclasses.replace(
            later, target_ms=self.target_ms | later.target_ms,
            draft_ms_per_token=self.draft_ms_per_token | later.draft_ms_per_token,
            overhead_ms=self.overhead_ms | later.overhead_ms,
            spec_overhead_ms=self.spec_overhead_ms | later.spec_overhead_ms)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "drafter": self.drafter, "source": self.source,
                "target_ms": {f"{b}x{w}": ms for (b, w), ms in sorted(self.target_ms.items())},
                "draft_ms_per_token": {str(b): ms for b, ms in sorted(self.draft_ms_per_token.items())},
                "prefill_ms_per_token": self.prefill_ms_per_token, "prefill_fixed_ms": self.prefill_fixed_ms,
                "context_ms_per_token": self.context_ms_per_token, "width_rule": self.width_rule,
                "overhead_ms": {str(b): ms for b, ms in sorted(self.overhead_ms.items())},
                "spec_overhead_ms": {str(b): ms for b, ms in sorted(self.spec_overhead_ms.items())}}


def costs_from_dict(data: dict[str, Any], source: str = "file") -> StepCosts:
    """StepCosts from :meth:`StepCosts.as_dict`'s shape, a ``CostModel.as_dict`` (a Batch sweep's "cost_model"),
    a whole Batch sweep JSON, or a GPU profile of ``scripts/device_costs.py``. Raises ValueError otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"a costs file requires a JSON object; got {type(data).__name__}")
    if "cost_model" in data and "results" in data:  # a whole Batch sweep
        settings = data.get("settings", {})
        return costs_from_dict(data["cost_model"] | {"model": settings.get("target") or "",
                                                     "drafter": data.get("drafter", ""), "source": "Batch sweep"})
    if "rows" in data and "k" in data:  # scripts/device_costs.py
        k, settings = int(data["k"]), data.get("settings", {})
        target = {}
        for row in data["rows"]:
            target[(int(row["batch_size"]), 1)] = float(row["target_step_ms"])
            target[(int(row["batch_size"]), k + 1)] = float(row["verify_ms"])
        return StepCosts(target, {int(r["batch_size"]): float(r["draft_ms_per_token"]) for r in data["rows"]},
                         model=str(settings.get("target") or ""), drafter=str(settings.get("draft") or ""),
                         source=f"GPU profile ({settings.get('device', 'device')})")
    if "target_ms" not in data:
        raise ValueError(f"a costs file requires 'target_ms' {{'BxW': ms}} (the simulator's or a Batch sweep's cost "
                         f"model) or a device profile's 'rows'; got the keys {sorted(data)}")
    try:
        target = {_bxw(key): float(ms) for key, ms in data["target_ms"].items()}
        draft = {int(b): float(ms) for b, ms in (data.get("draft_ms_per_token") or {}).items()}
        overhead = {int(b): float(ms) for b, ms in (data.get("overhead_ms") or {}).items()}
        spec_overhead = {int(b): float(ms) for b, ms in (data.get("spec_overhead_ms") or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError("a costs file requires 'target_ms' as {'BxW': ms} and 'draft_ms_per_token' as {'B': ms}; "
                         f"got {str(data.get('target_ms'))[:80]}") from None
    return StepCosts(target, draft, float(data.get("prefill_ms_per_token", 0.0)),
                     float(data.get("prefill_fixed_ms", 0.0)), float(data.get("context_ms_per_token", 0.0)),
                     data.get("width_rule", "max"), data.get("model", "") or "", data.get("drafter", "") or "",
                     data.get("source", source), overhead, spec_overhead)


def read_costs(path: str | Path) -> StepCosts:
    """:func:`costs_from_dict` of a JSON file, or of a serve-bench result (:func:`costs_from_serve_bench`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"a costs file requires readable JSON; got {str(path)!r} ({error})") from None
    if isinstance(data, dict) and "levels" in data and "engines" in data:
        return costs_from_serve_bench(data)
    return costs_from_dict(data, path.name)


def costs_from_cost_model(cost, prefill_ms_per_token: float = 0.0, prefill_fixed_ms: float = 0.0,
                          model: str = "", drafter: str = "") -> StepCosts:
    """StepCosts of a ``lab.studies.auto_k.CostModel`` (medians of its samples)."""
    target = {key: statistics.median(s) for key, s in cost.target_ms.items() if s}
    draft = {b: statistics.median(s) for b, s in cost.draft_ms_per_token.items() if s}
    return StepCosts(target, draft, prefill_ms_per_token, prefill_fixed_ms, model=model, drafter=drafter,
                     source="this machine (batch passes)")


def costs_from_calibration(calibration, precision: str | None = None) -> StepCosts:
    """Batch-1 StepCosts of a ``lab.studies.calibrate.Calibration`` (larger batches: proportional, pessimistic)."""
    t = calibration.by_precision(precision or calibration.precision)
    target = {(1, 1): t.target_step_ms} | {(1, k + 1): ms for k, ms in t.verify_ms.items()}
    draft = {} if t.draft_step_ms is None else {1: t.draft_step_ms}
    return StepCosts(target, draft, prefill_ms_per_token=t.target_step_ms / max(1, calibration.context_tokens),
                     model=calibration.target, drafter=calibration.draft or calibration.drafter,
                     source=f"calibration ({t.precision}, batch 1)")


def costs_from_serve_bench(data: dict[str, Any], prefill_label: str | None = None) -> StepCosts:
    """Per-concurrency step costs of a serving engine from its own per-request timings (llama.cpp's ``timings``).

    The "off" endpoint (the second): a request's predicted_ms / output tokens
    is one step at batch = concurrency, width 1. The "on" endpoint (the first):
    predicted_ms / its steps (output tokens / (1 + accepted / drafts)) is one
    speculative step at width K+1, the draft's time folded in (draft 0).
    Prefill: prompt_ms / input tokens at concurrency 1, over both endpoints or
    only ``prefill_label`` 's ("on": the draft's prefill folded in; "off": the
    target's alone). Raises ValueError when the records carry no server timings.
    """
    endpoints = [e["label"] for e in data["settings"]["endpoints"]]
    llama = data["settings"].get("llama_server") or {}  # what serve-bench --llama-target records
    k = int(llama.get("k") or data["settings"].get("llama_k") or data["settings"].get("k") or 4)
    target: dict[tuple[int, int], float] = {}
    prefill = []
    for level in data.get("levels", []):
        records = [r for r in level.get("requests", []) if r.get("ok") and r.get("server_predicted_ms")
                   and (r.get("output_tokens") or 0) > 1]
        if not records:
            continue
        concurrency, on = int(level["max_concurrency"]), level["label"] == endpoints[0] and len(endpoints) > 1
        per_step = []
        for r in records:
            steps = r["output_tokens"] - 1
            if on and r.get("draft_tokens") and r.get("spec_steps"):
                steps = r["spec_steps"]
            elif on and r.get("draft_tokens"):
                steps = max(1.0, (r["output_tokens"] - 1) / (1.0 + (r.get("accepted_tokens") or 0)
                                                           / max(1, r["draft_tokens"] / k)))
            per_step.append(r["server_predicted_ms"] / steps)
        target[(concurrency, k + 1 if on else 1)] = statistics.median(per_step)
        if concurrency == 1 and prefill_label in (None, level["label"]):
            prefill += [r["server_prompt_ms"] / r["input_tokens"] for r in records
                        if r.get("server_prompt_ms") and r.get("input_tokens")]
    if not target:
        raise ValueError("the serve-bench result holds no per-request server timings (llama.cpp's 'timings'): "
                         "profile costs from llama-server, or give a costs file")
    settings = data["settings"]
    return StepCosts(target, {}, statistics.median(prefill) if prefill else 0.0, width_rule="mean",
                     model=str(llama.get("target") or settings.get("llama_target") or settings.get("model") or ""),
                     drafter=str(llama.get("draft") or settings.get("llama_draft") or endpoints[0]),
                     source="serve-bench (server timings)")


def _bxw(key: str) -> tuple[int, int]:
    b, w = str(key).lower().split("x")
    return int(b), int(w)


def _short(name: str) -> str:
    return Path(str(name)).name.lower()


def _interpolate(points: list[tuple[float, float]], x: float, proportional: bool = True) -> float:
    """Piecewise-linear through sorted (x, y), linear beyond the ends, never below 0. One point: y x/x0
    (``proportional``, for batch size) or flat (for width: nothing known about how it grows)."""
    if not points:
        return math.nan
    if len(points) == 1:
        return points[0][1] * x / points[0][0] if proportional else points[0][1]
    i = next((i for i in range(len(points) - 1) if x <= points[i + 1][0]), len(points) - 2)
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _monotone(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Running maximum of y over sorted x: more tokens per row never cost less (noise aside)."""
    out, top = [], 0.0
    for x, y in points:
        top = max(top, y)
        out.append((x, top))
    return out
