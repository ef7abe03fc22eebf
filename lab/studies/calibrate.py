"""Host-adaptive defaults: time the passes on the machine at hand, then pick precision and K from the cost model.

Whether bf16 beats fp32, and which K pays, is a property of the hardware, not a
constant. On a CPU with native bf16 dot products (AVX-512 BF16, AMX) a bf16 pass
over K+1 tokens costs about one one-token pass; where bf16 is emulated the same
pass costs several; a GPU bound by the host charges per kernel launch. So
``calibrate`` measures, for each candidate precision:

- the target's one-token step (ms) and its verify pass over K+1 tokens, v(K) in steps;
- the draft model's one-token step, c in target steps (or c = 0 for prompt lookup);

over a cache of ``context_tokens`` random tokens (timings do not depend on the
weights' values), each the median of ``repeats`` passes after a warm-up. It
then predicts the time per generated token of speculation at each (precision, K)
with Leviathan et al.'s model, generalised by the measured verify cost v:

    ms per token = step_ms x (K c + v(K)) / E[tokens per step](a, K)

with E = (1 - a^(K+1)) / (1 - a) and a the per-token acceptance rate given
(defaults below: a prior, to be replaced by the acceptance a run measured), and
chooses the fastest. The result is cached per machine (CPU model and its bf16
flags, torch version, threads, GPU name) and model pair under
``lab.models.cache_dir() / "calibration"``, and says in words what it measured
and why it chose.

Token trees (``lab.tree``): the calibration also times verify passes over
N + 1 tokens for N in ``TREE_BUDGETS`` (out to 64), so v(N) is known, and
``lab.tree_theory`` picks the tree budget that pays at the same acceptance
(``Calibration.tree_budget``; 0 when no tree beats the best chain).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lab.hardware import machine_info, machine_key, resolve_device
from lab import device_queue
from lab.load import measure_load, worst
from lab.studies.passes import PassCosts, time_passes

DEFAULT_PRECISIONS = ("bf16", "fp32")
DEFAULT_KS = (1, 2, 3, 4, 6, 8)
TREE_BUDGETS = (8, 16, 32, 64)  # verify passes over N + 1 tokens timed for token trees
# Per-token acceptance priors, near what the README's "Measured" tables show on Spec-Bench prompts: the
# Qwen2.5-Coder 0.5B -> 1.5B pair accepts 72 % of drafted tokens at K=2 (a ~ 0.8), prompt lookup on SmolLM2
# 30 % (a ~ 0.4), layer skip under 1 %.
PRIOR_ACCEPTANCE = {"draft-model": 0.8, "prompt-lookup": 0.4, "layer-skip": 0.02}

Progress = Callable[[float, str], None]


@dataclass
class PrecisionTimings:
    """Measured at one precision. Times in ms (medians); v(K) and c in target steps (``lab.studies.passes.PassCosts``)."""

    precision: str
    target_step_ms: float
    verify_ms: dict[int, float]  # K -> one target pass over K+1 tokens
    draft_step_ms: float | None = None  # one draft pass over 1 token; None: no draft model (c = 0)
    tree_verify_ms: dict[int, float] = field(default_factory=dict)  # N -> one target pass over N+1 tokens

    def v_tree(self, budget: int) -> float:
        """v(N): a verify pass over N + 1 tokens in target steps (a chain's K counts as N = K)."""
        ms = self.tree_verify_ms.get(budget, self.verify_ms.get(budget))
        if ms is None:
            raise KeyError(f"no verify pass over {budget + 1} tokens was timed; timed: "
                           f"{sorted(set(self.verify_ms) | set(self.tree_verify_ms))}")
        return ms / self.target_step_ms

    @property
    def costs(self) -> PassCosts:
        """These timings in the lab's one cost vocabulary (batch 1: the draft's step is its cost per token)."""
        return PassCosts(self.target_step_ms, self.verify_ms, self.draft_step_ms)

    def v(self, k: int) -> float:
        """Verify cost in target steps: verify_ms[K] / target_step_ms."""
        return self.costs.v(k)

    @property
    def c(self) -> float:
        """The draft's cost per drafted token in target steps (0 without a draft model)."""
        return self.costs.c

    def ms_per_token(self, k: int, acceptance: float) -> float:
        """Predicted ms per generated token of speculation at K: step x (K c + v(K)) / E[tokens per step]."""
        return self.costs.ms_per_token(k, acceptance)


@dataclass
class Calibration:
    """What was measured on this machine for a target (and draft), and the precision and K it picks.

    acceptance: the per-token acceptance rate a the choice assumes (in [0, 1)).
    precision, k: the choice; predicted_ms_per_token and target_alone_ms_per_token
    at that precision; predicted_speedup = the target alone at its fastest
    precision over speculation at the choice.
    """

    target: str
    draft: str | None
    drafter: str
    machine: dict[str, Any]
    timings: list[PrecisionTimings]
    acceptance: float
    context_tokens: int
    repeats: int
    measured_at: str = ""
    wall_s: float = 0.0
    load: dict | None = None  # lab.load.LoadReport.as_dict() over the timed passes (None: cached before it existed)
    precision: str = field(init=False, default="")
    k: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.precision, self.k = self.best()

    @property
    def tree_budget(self) -> int:
        """The tree budget N the cost model picks at the chosen precision (``lab.tree_theory``), or 0 when the best
        chain (K) is predicted faster or no tree passes were timed."""
        from lab.theory import expected_speedup
        from lab.tree_theory import best_tree_budget

        t = self.by_precision(self.precision)
        if not t.tree_verify_ms:
            return 0
        costs = {n: t.v_tree(n) for n in sorted(set(t.verify_ms) | set(t.tree_verify_ms))}
        budget, tree = best_tree_budget(self.acceptance, t.c, costs)
        chain = expected_speedup(self.acceptance, self.k, t.c, t.v(self.k))
        return budget if tree > chain else 0

    def by_precision(self, precision: str) -> PrecisionTimings:
        for t in self.timings:
            if t.precision == precision:
                return t
        raise KeyError(f"no timings for precision {precision!r}; measured: {[t.precision for t in self.timings]}")

    def best(self, acceptance: float | None = None) -> tuple[str, int]:
        """The (precision, K) with the least predicted ms per token at ``acceptance`` (default: self.acceptance)."""
        a = self.acceptance if acceptance is None else acceptance
        return min(((t.precision, k) for t in self.timings for k in t.verify_ms),
                   key=lambda pk: self.by_precision(pk[0]).ms_per_token(pk[1], a))

    @property
    def predicted_ms_per_token(self) -> float:
        return self.by_precision(self.precision).ms_per_token(self.k, self.acceptance)

    @property
    def target_alone_ms_per_token(self) -> float:
        """The target alone at its fastest measured precision."""
        return min(t.target_step_ms for t in self.timings)

    @property
    def predicted_speedup(self) -> float:
        return self.target_alone_ms_per_token / self.predicted_ms_per_token

    def explain(self) -> str:
        """The measurement and the choice, in words (Markdown)."""
        lines = [f"Measured on {self.machine['cpu']} ({', '.join(self.machine['cpu_flags']) or 'no AVX flags read'}; "
                 f"{self.machine['device']}, {self.machine['threads']} threads, torch {self.machine['torch']}), "
                 f"over a {self.context_tokens}-token cache:"]
        for t in self.timings:
            draft = "" if t.draft_step_ms is None else f", draft step {t.draft_step_ms:.1f} ms (c = {t.c:.2f})"
            v = ", ".join(f"{t.v(k):.2f}" for k in sorted(t.verify_ms) if k in (1, 2, 4, 8))
            tree_v = ", ".join(f"{t.v_tree(n):.2f}" for n in sorted(t.tree_verify_ms))
            trees = f"; v(N={', '.join(map(str, sorted(t.tree_verify_ms)))}) = {tree_v}" if tree_v else ""
            lines.append(f"- **{t.precision}**: target step {t.target_step_ms:.1f} ms{draft}; "
                         f"verify cost v(K=1, 2, 4, 8) = {v} steps{trees}.")
        alone = min(self.timings, key=lambda t: t.target_step_ms)
        lines.append("")  # a paragraph of its own, not part of the last bullet
        lines.append(
            f"At an acceptance rate of {self.acceptance:.0%} per token, the cost model's fastest speculation is "
            f"**{self.precision}, K = {self.k}**: {self.predicted_ms_per_token:.1f} ms per token against "
            f"{alone.target_step_ms:.1f} ms for the target alone ({alone.precision}), a predicted "
            f"{self.predicted_speedup:.2f}x."
        )
        if any(t.tree_verify_ms for t in self.timings):
            lines.append("")
            budget = self.tree_budget
            lines.append(f"Token trees (`--tree-budget`): the cost model picks **N = {budget}**" + (
                " (a chain): the wider verify pass costs more than the extra accepted tokens bring"
                if budget == 0 else " nodes per verify pass, predicted faster than the best chain") + ".")
        if self.predicted_speedup < 1:
            lines.append("")
            lines.append("Speculation is predicted to lose here at this acceptance: the target alone is faster.")
        if self.load and self.load.get("loaded"):
            lines.append("")
            lines.append(f"Measured while the machine was busy: {self.load['reason']}; rerun for a clean figure "
                         "(calibrate again with refresh).")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(precision=self.precision, k=self.k, predicted_speedup=self.predicted_speedup,
                    tree_budget=self.tree_budget)
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Calibration":
        timings = [PrecisionTimings(t["precision"], t["target_step_ms"], {int(k): v for k, v in t["verify_ms"].items()},
                                    t.get("draft_step_ms"),
                                    {int(n): v for n, v in (t.get("tree_verify_ms") or {}).items()})
                   for t in data["timings"]]
        return Calibration(data["target"], data.get("draft"), data["drafter"], data["machine"], timings,
                           data["acceptance"], data["context_tokens"], data["repeats"], data.get("measured_at", ""),
                           data.get("wall_s", 0.0), data.get("load"))


def measure_precision(target_model, draft_model, precision: str, ks: Sequence[int],
                      context_tokens: int, repeats: int) -> PrecisionTimings:
    """``PrecisionTimings`` for already loaded models in one precision (see ``lab.studies.passes.time_passes``)."""
    widths = sorted({1, *(k + 1 for k in ks), *(n + 1 for n in TREE_BUDGETS)})
    target_ms = time_passes(target_model, widths, context_tokens, repeats)
    draft_ms = None if draft_model is None else time_passes(draft_model, [1], context_tokens, repeats)[1]
    return PrecisionTimings(precision, target_ms[1], {k: target_ms[k + 1] for k in ks}, draft_ms,
                            {n: target_ms[n + 1] for n in TREE_BUDGETS})


def calibration_path(target: str, draft: str | None, drafter: str, info: dict[str, Any]) -> Path:
    from lab.models import cache_dir

    name = f"{target}__{draft or drafter}.json".replace("/", "_")
    return cache_dir() / "calibration" / machine_key(info) / name


def calibrate(
    target: str,
    draft: str | None = None,
    drafter: str | None = None,
    device: str | torch.device = "auto",
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    ks: Sequence[int] = DEFAULT_KS,
    acceptance: float | None = None,
    context_tokens: int = 128,
    repeats: int = 3,
    refresh: bool = False,
    progress: Progress | None = None,
) -> Calibration:
    """Measure (or read the cached measurement of) a target/draft pair here, and choose precision and K.

    target, draft: preset names or model folders (``lab.models.load_model``);
        draft None: prompt lookup (c = 0) unless ``drafter`` says otherwise.
    drafter: "draft-model" (default with a draft), "prompt-lookup" (default without).
    device: "auto", "cpu" or "cuda". precisions: float precisions to compare.
    ks: the K values to consider (1..16). acceptance: the per-token acceptance
        rate a in [0, 1) the choice assumes; default ``PRIOR_ACCEPTANCE[drafter]``.
        A cached calibration is re-scored at a new acceptance without re-timing.
    refresh: time again even when a cached calibration exists.

    Returns a ``Calibration``; its JSON lies at :func:`calibration_path`.
    Raises ValueError for bad K, acceptance or precision; ``lab.models.ModelError``
    when a model cannot be loaded.
    """
    from lab.models import load_model
    from lab.models.presets import _stage

    drafter = drafter or ("draft-model" if draft is not None else "prompt-lookup")
    if drafter == "draft-model" and draft is None:
        raise ValueError("calibrate with drafter 'draft-model' requires a draft model; got none")
    if not ks or any(not 1 <= k <= 16 for k in ks):
        raise ValueError(f"calibrate requires K values in 1..16; got {list(ks)}")
    a = PRIOR_ACCEPTANCE.get(drafter, 0.5) if acceptance is None else acceptance
    if not 0.0 <= a < 1.0:
        raise ValueError(f"acceptance requires 0 <= a < 1; got {a}")
    bad = [p for p in precisions if p not in ("bf16", "fp32", "fp16")]
    if bad or not precisions:
        raise ValueError(f"calibrate compares float precisions bf16, fp32, fp16; got {list(precisions)}")
    device = resolve_device(device)
    info = machine_info(device)
    path = calibration_path(str(target), None if draft is None else str(draft), drafter, info)
    cached = None if refresh else _read(path)
    if cached is not None:
        timed = cached.timings[0]
        # an older calibration lacks the tree passes: it is still used (its tree budget is 0) rather than timed
        # again behind the caller's back (minutes for the Qwen pair, on a page render); "Measure again" or
        # ``refresh`` times them
        if {t.precision for t in cached.timings} >= set(precisions) and set(ks) <= set(timed.verify_ms):
            cached.acceptance = a
            cached.precision, cached.k = cached.best()
            return cached
    report = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    timings, loads = [], []
    for i, precision in enumerate(precisions):
        share = 1.0 / len(precisions)
        start_at = i * share
        target_model = load_model(target, device=device, dtype=precision,
                                  progress=_stage(report, start_at, start_at + 0.2 * share, f"{precision}: ")).model
        draft_model = None
        if drafter == "draft-model":
            draft_model = load_model(draft, device=device, dtype=precision,
                                     progress=_stage(report, start_at + 0.2 * share, start_at + 0.4 * share,
                                                     f"{precision}: ")).model
        report(i * share + 0.4 * share, f"timing {precision} passes of 1..{max(ks) + 1} tokens")
        # the device is held only while passes are timed, not while models load (nested in a caller's hold)
        with device_queue.hold(device, "calibrate"), measure_load() as meter:
            timings.append(measure_precision(target_model, draft_model, precision, ks, context_tokens, repeats))
        loads.append(meter.report)
        del target_model, draft_model
    busiest = worst(loads)
    calibration = Calibration(str(target), None if draft is None else str(draft), drafter, info, timings, a,
                              context_tokens, repeats, time.strftime("%Y-%m-%d %H:%M:%S"),
                              time.perf_counter() - start, None if busiest is None else busiest.as_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.as_dict(), indent=1))
    report(1.0, f"calibrated in {calibration.wall_s:.0f} s: {calibration.precision}, K={calibration.k}")
    return calibration


def cached_calibration(target: str, draft: str | None = None, drafter: str | None = None,
                       device: str | torch.device = "auto") -> Calibration | None:
    """The calibration cached for this machine and pair, or None (nothing is timed)."""
    drafter = drafter or ("draft-model" if draft is not None else "prompt-lookup")
    return _read(calibration_path(str(target), None if draft is None else str(draft), drafter,
                                  machine_info(resolve_device(device))))


def _read(path: Path) -> Calibration | None:
    """A cached calibration, or None when absent, corrupt or of an older layout (then it is measured again)."""
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
