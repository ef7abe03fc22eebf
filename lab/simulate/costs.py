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
the first token; with ``prefill_at_least_a_pass``, never less than a one-token
pass over the joining rows (a prompt served from a prompt cache still costs
that pass: llama-server took 310 ms to start four cached prompts whose
per-token rate says 60).

With ``by_context`` (:class:`ContextCosts`, the lab's own engine timed by
``lab.simulate.profile.time_context``), context is charged from tables instead
of one slope: a step of B rows holding L tokens each costs the table's
one-token pass pass(B, L), plus what its width adds (target(B, w) - target(B, 1),
timed side by side), plus each drafted token's draft(B) + dpass(B, L) -
dpass(B, L_ref) (a separate draft model's table; L_ref the context its draft
timings were taken at), plus the loop's work; and a prefill of B rows x L
tokens costs the table's prefill(B, L), plus the draft model's when
speculating, plus the first step (the loop's first token comes from a step).
Batch sizes between measured ones interpolate linearly, without the running
maximum over B of the slope model (a noisy small batch would lift them all). On
this CPU a one-token pass of SmolLM2 at B = 8 costs 65 ms after 64 tokens and
212 ms after 768: no single slope fits both ends
(docs/2026-12-07-epyc-avx512bf16-workload.md).

Sources: the Batch sweep's ``CostModel`` (``lab.studies.auto_k``, measured
over real prompts by batch size), a batch-1 calibration
(``lab.studies.calibrate``), a GPU profile of ``scripts/device_costs.py``
(``lab.studies.costs.CostTable.as_dict``), a serve-bench result with
llama.cpp's own timings, or the simulator's costs JSON (:meth:`StepCosts.as_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lab.simulate.server_steps import server_steps

Table = dict[int, dict[int, float]]  # {batch size: {tokens per row: ms}}
LLAMA_KV_PAD = 256  # llama.cpp pads a KV stream's read to this many cells (llama_kv_cache::get_n_kv)


@dataclass(frozen=True)
class ContextCosts:
    """Costs by context, per batch size, in ms: what one slope cannot say (see the module docstring).

    target_pass_ms: {B: {L: ms of a one-token pass of B rows after L cached tokens each}}.
    target_prefill_ms: {B: {L: ms of one prefill of B rows x L tokens}}.
    draft_pass_ms, draft_prefill_ms: the same for a separate draft model ({}: the drafter has none).
    reference_tokens: {B: tokens per row cached when ``StepCosts.target_ms`` and its draft timings were taken}.
    Between measured points linear, beyond them linear from the last two (in L) or proportional to B
    (one batch size measured). Raises ValueError for an empty pass table or a negative time.
    """

    target_pass_ms: Table
    target_prefill_ms: Table
    reference_tokens: dict[int, int]
    draft_pass_ms: Table = field(default_factory=dict)
    draft_prefill_ms: Table = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.target_pass_ms or not self.target_prefill_ms:
            raise ValueError("context costs require one-token pass and prefill timings {B: {L: ms}}; got none")
        tables = (self.target_pass_ms, self.target_prefill_ms, self.draft_pass_ms, self.draft_prefill_ms)
        if any(not (ms >= 0) for t in tables for row in t.values() for ms in row.values()):
            raise ValueError("context costs require times >= 0 ms")

    @functools.cached_property
    def _sorted(self) -> dict[str, list[tuple[int, list[tuple[int, float]]]]]:
        """Each table as sorted points, once (the simulator asks at every step)."""
        return {name: [(b, sorted(row.items())) for b, row in sorted(getattr(self, name).items())]
                for name in ("target_pass_ms", "target_prefill_ms", "draft_pass_ms", "draft_prefill_ms")}

    def pass_ms(self, batch_size: float, tokens: float) -> float:
        """ms of the target's one-token pass of batch_size rows after ``tokens`` cached tokens each."""
        at = [(b, _signed(points, tokens)) for b, points in self._sorted["target_pass_ms"]]
        return max(0.0, _signed(at, batch_size, proportional=True))

    def pass_extra(self, batch_size: float, tokens: float, draft: bool = False) -> float:
        """ms a one-token pass of batch_size rows after ``tokens`` each costs over one at the reference context
        (negative below it; 0 without a draft table when ``draft``)."""
        table = self._sorted["draft_pass_ms" if draft else "target_pass_ms"]
        extra = [(b, _signed(points, tokens) - _signed(points, self.reference(b))) for b, points in table]
        return _signed(extra, batch_size, proportional=True)

    def prefill(self, batch_size: float, tokens: float, draft: bool = False) -> float:
        """ms of one prefill of batch_size rows x ``tokens`` each (0 without a draft table when ``draft``)."""
        table = self._sorted["draft_prefill_ms" if draft else "target_prefill_ms"]
        at = [(b, max(0.0, _signed(points, tokens))) for b, points in table]
        return max(0.0, _signed(at, batch_size, proportional=True))

    def reference(self, batch_size: float) -> float:
        """Tokens per row cached when the bare passes and draft timings were taken at this batch size (interpolated)."""
        if batch_size in self.reference_tokens:
            return self.reference_tokens[batch_size]
        return _signed(sorted(self.reference_tokens.items()), batch_size) if self.reference_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        table = lambda t: {str(b): {str(n): ms for n, ms in sorted(row.items())} for b, row in sorted(t.items())}  # noqa: E731
        return {"target_pass_ms": table(self.target_pass_ms), "target_prefill_ms": table(self.target_prefill_ms),
                "draft_pass_ms": table(self.draft_pass_ms), "draft_prefill_ms": table(self.draft_prefill_ms),
                "reference_tokens": {str(b): n for b, n in sorted(self.reference_tokens.items())}}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ContextCosts":
        """Raises ValueError on a malformed table."""
        try:
            table = lambda t: {int(b): {int(n): float(ms) for n, ms in row.items()} for b, row in (t or {}).items()}  # noqa: E731
            return ContextCosts(table(data["target_pass_ms"]), table(data["target_prefill_ms"]),
                                {int(b): int(n) for b, n in data["reference_tokens"].items()},
                                table(data.get("draft_pass_ms")), table(data.get("draft_prefill_ms")))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"a costs file's 'by_context' requires the tables {{'B': {{'L': ms}}}} ({error})") from None


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
    by_context: costs by context (:class:`ContextCosts`): when given, they replace
    context_ms_per_token and the prefill's per-token and fixed parts.
    context_rule: what a step's attention reads in a padded engine: "longest" (B x the longest
    row's tokens) or "sum" (each row's own: the lab's eager cache, whose padded slots cost
    nothing measurable here: a batch of 8 rows padded to 686 tokens, 1,549 of them real,
    stepped in 79 ms, as 8 rows of 194 tokens do, against 144 ms for 8 rows of 686).
    A flattened engine (width_rule "mean") reads the sum, unless ``context_pad`` is set.
    context_pad: 0, or the cells a KV stream's read is padded to: every row of a step
    then reads B x the longest row's tokens rounded up to it (llama.cpp's server with
    a KV stream per slot: n_kv is the longest stream's used cells padded to 256, for
    every stream in the batch; ``llama_kv_cache::get_n_kv``).
    width_rule: "max" (padded) or "mean" (flattened). prefill_at_least_a_pass: a
    prefill costs at least target(rows, 1) (serve-bench costs). model: the target's name
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
    by_context: ContextCosts | None = None
    context_rule: Literal["longest", "sum"] = "longest"
    prefill_at_least_a_pass: bool = False
    context_pad: int = 0
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
        if self.context_pad < 0:
            raise ValueError(f"context_pad requires an integer >= 0; got {self.context_pad}")
        if self.context_rule not in ("longest", "sum"):
            raise ValueError(f"context_rule requires 'longest' or 'sum'; got {self.context_rule!r}")

    def padded(self, tokens: float) -> float:
        """tokens rounded up to ``context_pad`` (unchanged without one)."""
        return _round_up(tokens, self.context_pad)

    def target(self, batch_size: int, width: float) -> float:
        """ms of one verify pass of batch_size rows x width tokens."""
        key = (batch_size, width)
        if key not in self._memo:
            by_batch: dict[int, list[tuple[float, float]]] = {}
            for (b, w), ms in self.target_ms.items():
                by_batch.setdefault(b, []).append((w, ms))
            # a batch size timed at one other width says nothing of this one (llama-server's steps: 7 rows were
            # seen only speculating, and their 2.6 s verify stood in for a 7-row one-token step)
            known = {b: points for b, points in by_batch.items()
                     if len(points) > 1 or points[0][0] == width} or by_batch
            at = [(b, _interpolate(_monotone(sorted(points)), width, proportional=False))
                  for b, points in sorted(known.items())]
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
        """ms of one decode step: verify at ``width`` (default K+1), drafting K, the loop's work, the context term.

        context_tokens: tokens cached over the batch as attention reads them (B x the longest row's in a
        padded engine); 0 charges no context (with ``by_context``: the reference context).
        """
        ms = (self.target(batch_size, k + 1 if width is None else width) + self.draft(batch_size, k)
              + self.overhead(batch_size, k))
        if self.by_context is None:
            return ms + self.context_ms_per_token * context_tokens
        width = k + 1 if width is None else width
        per_row = context_tokens / batch_size if context_tokens else self.by_context.reference(batch_size)
        ms = (self.by_context.pass_ms(batch_size, per_row) + self._width_extra(batch_size, width)
              + self.draft(batch_size, k) + self.overhead(batch_size, k))
        if k > 0 and self.draft_ms_per_token:
            ms += k * self.by_context.pass_extra(batch_size, per_row, draft=True)
        return max(0.0, ms)

    def _width_extra(self, batch_size: int, width: float) -> float:
        """ms a verify pass of ``width`` tokens per row costs over a one-token pass (each batch size's own timings,
        side by side; linear over batch size between them)."""
        key = ("width", batch_size, width)
        if key not in self._memo:
            by_batch: dict[int, list[tuple[float, float]]] = {}
            for (b, w), ms in self.target_ms.items():
                by_batch.setdefault(b, []).append((w, ms))
            extra = []
            for b, points in sorted(by_batch.items()):
                points = _monotone(sorted(points))
                extra.append((b, _interpolate(points, width, proportional=False)
                              - _interpolate(points, 1, proportional=False)))
            self._memo[key] = max(0.0, _signed(extra, batch_size, proportional=True))
        return self._memo[key]

    def prefill_ms(self, prompt_tokens: int, rows: int = 1, speculating: bool = False) -> float:
        """ms of one prefill pass over prompt_tokens tokens (all ``rows`` joining together, padded or summed).

        With ``by_context``: the table's prefill of ``rows`` x prompt_tokens / rows tokens, the draft
        model's too when ``speculating``, and the first step (a one-token pass at that context).
        """
        if self.by_context is None:
            ms = self.prefill_fixed_ms + self.prefill_ms_per_token * prompt_tokens
            return max(ms, self.target(rows, 1)) if self.prefill_at_least_a_pass else ms
        per_row = prompt_tokens / max(1, rows)
        ms = self.by_context.prefill(rows, per_row) + self.step_ms(rows, 0, 1, prompt_tokens)
        if speculating and self.draft_ms_per_token:
            ms += self.by_context.prefill(rows, per_row, draft=True)
        return ms

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
            spec_overhead_ms=self.spec_overhead_ms | later.spec_overhead_ms,
            by_context=_merged_context(self.by_context, later.by_context))

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "drafter": self.drafter, "source": self.source,
                "target_ms": {f"{b}x{w}": ms for (b, w), ms in sorted(self.target_ms.items())},
                "draft_ms_per_token": {str(b): ms for b, ms in sorted(self.draft_ms_per_token.items())},
                "prefill_ms_per_token": self.prefill_ms_per_token, "prefill_fixed_ms": self.prefill_fixed_ms,
                "context_ms_per_token": self.context_ms_per_token, "width_rule": self.width_rule,
                "context_rule": self.context_rule, "prefill_at_least_a_pass": self.prefill_at_least_a_pass,
                "context_pad": self.context_pad,
                "overhead_ms": {str(b): ms for b, ms in sorted(self.overhead_ms.items())},
                "spec_overhead_ms": {str(b): ms for b, ms in sorted(self.spec_overhead_ms.items())}} | (
                    {"by_context": self.by_context.as_dict()} if self.by_context is not None else {})


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
    by_context = ContextCosts.from_dict(data["by_context"]) if data.get("by_context") else None
    return StepCosts(target, draft, float(data.get("prefill_ms_per_token", 0.0)),
                     float(data.get("prefill_fixed_ms", 0.0)), float(data.get("context_ms_per_token", 0.0)),
                     data.get("width_rule", "max"), data.get("model", "") or "", data.get("drafter", "") or "",
                     data.get("source", source), overhead, spec_overhead, by_context,
                     data.get("context_rule", "longest"), bool(data.get("prefill_at_least_a_pass", False)),
                     int(data.get("context_pad", 0)))


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
    """Per-batch step costs of a serving engine from its own runs (llama.cpp's ``timings``, streamed token times).

    Steps (streamed records, :func:`lab.simulate.server_steps.server_steps`): each
    decode step the engine took, read from when its tokens arrived, with the rows
    it had. The "off" endpoint (the second) gives target(B, 1) as the median step
    of B rows; the "on" endpoint (the first) target(B, K+1) over the steps in which
    every row drafted K, the draft's time folded in (draft 0). Without streamed
    times (or no such step): a request's predicted_ms / its steps is one step at
    batch = concurrency (speculating: output tokens / (1 + accepted / drafts)).
    Prefill: prompt_ms against the prompt tokens processed (input less
    ``timings.cache_n``) at concurrency 1, fitted through the origin
    (``_prefill_fit``), over both endpoints or only ``prefill_label`` 's ("on":
    the draft's prefill folded in; "off": the target's alone), and at least a
    one-token pass over the joining rows.

    Context: llama-server keeps a KV stream per slot and a step reads every stream
    in it to the longest one's used cells, padded to 256 (``LLAMA_KV_PAD``). With
    ``prefill_label``, that endpoint's one-row steps fit ms = a + slope x the
    row's padded context, least squares, slope >= 0 (Qwen2.5-Coder 1.5B drafted by
    0.5B on one thread: 434 ms a speculative step at 64 prompt tokens, 548 at 658;
    the target's own step barely moves); the costs then charge slope x B x the
    longest row's padded context (``context_pad``), and each batch's step is the
    median of ms - that charge.
    Raises ValueError when the records carry no server timings.
    """
    endpoints = [e["label"] for e in data["settings"]["endpoints"]]
    llama = data["settings"].get("llama_server") or {}  # what serve-bench --llama-target records
    k = int(llama.get("k") or data["settings"].get("llama_k") or data["settings"].get("k") or 4)
    points: dict[tuple[str, int, bool], list[tuple[float, float]]] = {}  # (label, B, on): [(ms, context read)]
    prefill, streamed = [], True
    for level in data.get("levels", []):
        requests = level.get("requests", [])
        records = [r for r in requests if r.get("ok") and r.get("server_predicted_ms")
                   and (r.get("output_tokens") or 0) > 1]
        if not records:
            continue
        concurrency, on = int(level["max_concurrency"]), level["label"] == endpoints[0] and len(endpoints) > 1
        width = k + 1 if on else 1
        steps = [s for s in server_steps(requests, k if on else 0) if s.decode and set(s.widths) == {width}]
        for s in steps:  # what the step's attention read: every row to the longest's padded cells
            read = s.rows * _round_up(max(s.contexts), LLAMA_KV_PAD)
            points.setdefault((level["label"], s.rows, on), []).append((s.ms, read))
        if not steps:  # no streamed times: per request, charged to the level's concurrency
            streamed = False
            for r in records:
                n = r["output_tokens"] - 1
                if on and r.get("draft_tokens") and r.get("spec_steps"):
                    n = r["spec_steps"]
                elif on and r.get("draft_tokens"):
                    n = max(1.0, n / (1.0 + (r.get("accepted_tokens") or 0) / max(1, r["draft_tokens"] / k)))
                context = concurrency * ((r.get("input_tokens") or 0) + r["output_tokens"] / 2)
                points.setdefault((level["label"], concurrency, on), []).append((r["server_predicted_ms"] / n, context))
        if concurrency == 1 and prefill_label in (None, level["label"]):  # (tokens processed, ms)
            prefill += [(r["input_tokens"] - (r.get("server_cached_tokens") or 0), r["server_prompt_ms"])
                        for r in records if r.get("server_prompt_ms") and r.get("input_tokens")]
    if not points:
        raise ValueError("the serve-bench result holds no per-request server timings (llama.cpp's 'timings'): "
                         "profile costs from llama-server, or give a costs file")
    slope = 0.0
    if prefill_label is not None:
        alone = [p for (label, b, _), pts in points.items() if label == prefill_label and b == 1 for p in pts]
        slope = _slope([x for _, x in alone], [ms for ms, _ in alone])
    target: dict[tuple[int, int], float] = {}
    for (label, b, on), pts in sorted(points.items()):
        charge = slope if label == prefill_label else 0.0
        target[(b, k + 1 if on else 1)] = max(0.0, statistics.median(ms - charge * x for ms, x in pts))
    settings = data["settings"]
    return StepCosts(target, {}, _prefill_fit(prefill), context_ms_per_token=slope,
                     width_rule="mean",
                     model=str(llama.get("target") or settings.get("llama_target") or settings.get("model") or ""),
                     drafter=str(llama.get("draft") or settings.get("llama_draft") or endpoints[0]),
                     source="serve-bench (server timings)", prefill_at_least_a_pass=True,
                     context_pad=LLAMA_KV_PAD if slope and streamed else 0)


def _prefill_fit(points: list[tuple[int, float]]) -> float:
    """ms per prompt token from (tokens processed, ms) at concurrency 1: least squares through the origin over the
    prompts of 16 tokens or more (shorter ones, mostly served from the cache, cost about one pass, which
    ``prefill_at_least_a_pass`` charges), so long prompts weigh most. The median ms per prompt token predicted a
    658-token prompt 20 % fast: a cached prefix (the chat template's system prompt, 24 tokens) lowered every
    prompt's figure, and attention makes a long prompt's tokens dearer (llama-server, Qwen2.5-Coder 1.5B, one
    thread: 25.5 ms a token at 176 tokens, 27.4 at 647)."""
    kept = [(n, ms) for n, ms in points if n >= 16] or [(n, ms) for n, ms in points if n > 0]
    return sum(n * ms for n, ms in kept) / sum(n * n for n, _ in kept) if kept else 0.0


def _round_up(tokens: float, pad: int) -> float:
    """tokens rounded up to a multiple of pad (unchanged for pad <= 1)."""
    return math.ceil(tokens / pad) * pad if pad > 1 else tokens


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs, floored at 0 (0 for fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs))


def _bxw(key: str) -> tuple[int, int]:
    b, w = str(key).lower().split("x")
    return int(b), int(w)


def _short(name: str) -> str:
    return Path(str(name)).name.lower()


def _interpolate(points: list[tuple[float, float]], x: float, proportional: bool = True) -> float:
    """Piecewise-linear through sorted (x, y), linear beyond the ends, never below 0. One point: y x/x0
    (``proportional``, for batch size) or flat (for width: nothing known about how it grows)."""
    return max(0.0, _signed(points, x, proportional)) if points else math.nan


def _signed(points: list[tuple[float, float]], x: float, proportional: bool = False) -> float:
    """Piecewise-linear through sorted (x, y), linear beyond the ends (negative allowed). One point: y
    (flat), or y x/x0 when ``proportional``; none: 0."""
    if not points:
        return 0.0
    if len(points) == 1:
        return points[0][1] * x / points[0][0] if proportional and points[0][0] else points[0][1]
    i = next((i for i in range(len(points) - 1) if x <= points[i + 1][0]), len(points) - 2)
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _merged_context(earlier: ContextCosts | None, later: ContextCosts | None) -> ContextCosts | None:
    """Both tables' batch sizes (``later`` wins where both have one)."""
    if earlier is None or later is None:
        return later or earlier
    return ContextCosts(earlier.target_pass_ms | later.target_pass_ms,
                        earlier.target_prefill_ms | later.target_prefill_ms,
                        earlier.reference_tokens | later.reference_tokens,
                        earlier.draft_pass_ms | later.draft_pass_ms, earlier.draft_prefill_ms | later.draft_prefill_ms)


def _monotone(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Running maximum of y over sorted x: more tokens per row never cost less (noise aside)."""
    out, top = [], 0.0
    for x, y in points:
        top = max(top, y)
        out.append((x, top))
    return out
