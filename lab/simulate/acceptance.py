"""Acceptance for the workload simulator: per-position rates per prompt category, and where they come from.

Conventions are vLLM's (``lab.metrics``): the per-position acceptance rate r_i
is the share of drafts whose token at position i was accepted, which needs
positions 1..i-1 accepted too, so r_1 >= r_2 >= ...; P(at least i drafted
tokens accepted | a draft) = r_i. A drafter that proposes nothing at some steps
(prompt lookup misses) has a draft_rate below 1: at those steps a row gets one
token, as from the target alone.

Beyond the positions measured, each further position keeps the last measured
conditional rate r_i / r_(i-1). Leviathan's model (``lab.theory``) is the
special case r_i = a^i, draft_rate 1 (:meth:`AcceptanceProfile.uniform`).

Sources: a Compare result (``lab.studies.compare.Comparison``), a serve-bench
result (``lab.studies.serve_bench``), a Batch sweep's JSON, or by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

K_LIMIT = 16  # the lab's K range (lab.config.K_MAX)


@dataclass(frozen=True)
class CategoryAcceptance:
    """One category's acceptance. per_position: r_1, r_2, ... (fractions of drafts, non-increasing, in [0, 1]);
    draft_rate: the fraction of steps at which the drafter proposes anything, in [0, 1]."""

    per_position: tuple[float, ...]
    draft_rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.per_position:
            raise ValueError("acceptance requires at least one per-position rate; got none")
        if any(not 0.0 <= r <= 1.0 for r in self.per_position):
            raise ValueError(f"per-position acceptance rates require values in [0, 1]; got {list(self.per_position)}")
        if not 0.0 <= self.draft_rate <= 1.0:
            raise ValueError(f"draft_rate requires a value in [0, 1]; got {self.draft_rate}")
        object.__setattr__(self, "per_position", _non_increasing(self.per_position))

    def rates(self, k: int) -> tuple[float, ...]:
        """r_1..r_K, extrapolated beyond the measured positions by the last conditional rate."""
        return _extend(self.per_position, k)

    def expected_tokens(self, k: int) -> float:
        """Mean tokens a row gets from one step at K (the target's own token included)."""
        if k == 0:
            return 1.0
        return 1.0 + self.draft_rate * sum(self.rates(k))

    def accepted_cdf(self, k: int) -> tuple[float, ...]:
        """P(accepted <= j) for j = 0..K, given a draft of K tokens."""
        rates = (1.0, *self.rates(k), 0.0)
        return tuple(1.0 - rates[j + 1] for j in range(k + 1))

    def scaled(self, factor: float) -> "CategoryAcceptance":
        """Each conditional rate r_i / r_(i-1) times factor (clipped to [0, 1]): a what-if for the sensitivity sweep."""
        out, previous, prior = [], 1.0, 1.0
        for r in self.per_position:
            conditional = r / prior if prior > 0 else 0.0
            previous *= min(1.0, conditional * factor)
            out.append(previous)
            prior = r
        return replace(self, per_position=tuple(out))


@dataclass(frozen=True)
class AcceptanceProfile:
    """Acceptance per category. categories: {name: CategoryAcceptance}; model: the target it was measured on
    ("" unknown); drafter: the drafter's label; source: where it came from, for a person."""

    categories: dict[str, CategoryAcceptance]
    model: str = ""
    drafter: str = ""
    source: str = "by hand"

    def __post_init__(self) -> None:
        if not self.categories:
            raise ValueError("an acceptance profile requires at least one category; got none")

    def __getitem__(self, category: str) -> CategoryAcceptance:
        try:
            return self.categories[category]
        except KeyError:
            raise ValueError(f"acceptance is known for the categories {sorted(self.categories)}; got a request of "
                             f"category {category!r}") from None

    def for_every(self, categories: set[str]) -> "AcceptanceProfile":
        """A one-category profile (sliders, a single rate) applied to each of ``categories`` (a request log's).
        Raises ValueError for a profile of several categories: which one a category gets is the user's call."""
        if len(self.categories) != 1:
            raise ValueError(f"one acceptance for every category requires a profile of one category; got "
                             f"{sorted(self.categories)}")
        (only,) = self.categories.values()
        return replace(self, categories={c: only for c in sorted(categories)})

    def check_categories(self, needed: set[str]) -> None:
        """Raise ValueError naming the categories the traffic has and the profile lacks."""
        unknown = sorted(needed - set(self.categories))
        if unknown:
            raise ValueError(f"acceptance is known for the categories {sorted(self.categories)}; the traffic also has "
                             f"{unknown}: measure them or map them onto known ones")

    def expected_tokens(self, category: str, k: int) -> float:
        return self[category].expected_tokens(k)

    def scaled(self, factor: float) -> "AcceptanceProfile":
        return replace(self, categories={c: a.scaled(factor) for c, a in self.categories.items()},
                       source=f"{self.source} x {factor:g}")

    @property
    def mean_acceptance_length(self) -> dict[str, float]:
        """Per category, the mean acceptance length at the measured K (counts the bonus token)."""
        return {c: 1.0 + sum(a.per_position) for c, a in self.categories.items()}

    @staticmethod
    def uniform(acceptance: float, draft_rate: float = 1.0, category: str = "all", **labels: str) -> "AcceptanceProfile":
        """Leviathan's model: every drafted token accepted with probability a, independently (r_i = a^i)."""
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance rate a requires 0 <= a <= 1; got {acceptance}")
        rates = tuple(acceptance ** i for i in range(1, K_LIMIT + 1))
        return AcceptanceProfile({category: CategoryAcceptance(rates, draft_rate)}, **labels)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "drafter": self.drafter, "source": self.source,
                "categories": {c: {"per_position": list(a.per_position), "draft_rate": a.draft_rate}
                               for c, a in self.categories.items()}}


def acceptance_from_dict(data: dict[str, Any], source: str = "file") -> AcceptanceProfile:
    """An AcceptanceProfile from :meth:`AcceptanceProfile.as_dict`'s shape (or just {"categories": ...}).

    Raises ValueError naming what was expected.
    """
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        raise ValueError(f"an acceptance file requires {{'categories': {{name: {{'per_position': [...]}}}}}}; got "
                         f"the keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    categories = {}
    for name, entry in data["categories"].items():
        if isinstance(entry, (int, float)):
            categories[name] = AcceptanceProfile.uniform(float(entry)).categories["all"]
            continue
        if not isinstance(entry, dict) or "per_position" not in entry:
            raise ValueError(f"category {name!r} requires 'per_position' (a list of rates) or one acceptance rate; "
                             f"got {entry!r}")
        categories[name] = CategoryAcceptance(tuple(float(r) for r in entry["per_position"]),
                                              float(entry.get("draft_rate", 1.0)))
    return AcceptanceProfile(categories, data.get("model", ""), data.get("drafter", ""), data.get("source", source))


def acceptance_from_comparison(comparison, drafter: str | None = None, k: int | None = None,
                               categories: dict[int, str] | None = None) -> AcceptanceProfile:
    """Per-position acceptance of one (drafter, K) of a Compare result, pooled per category.

    comparison: a ``lab.studies.compare.Comparison``. drafter, k: which runs
    (default: the drafter and K with the highest mean acceptance length).
    categories: prompt index -> category (default: settings["categories"] when
    present, else one category "all").
    """
    from lab.studies.compare import BASELINE

    runs = [r for r in comparison.runs if r.drafter != BASELINE and not r.cancelled]
    if not runs:
        raise ValueError("a Compare result requires at least one speculative run to read acceptance from; got none")
    if drafter is None or k is None:
        best = max(runs, key=lambda r: (r.metrics.get("mean_acceptance_length") or 0))
        drafter, k = drafter or best.drafter, k or best.k
    chosen = [r for r in runs if r.drafter == drafter and r.k == k]
    if not chosen:
        raise ValueError(f"the Compare result has no runs of {drafter!r} at K={k}; it has "
                         f"{sorted({(r.drafter, r.k) for r in runs})}")
    names = categories or {int(i): c for i, c in (comparison.settings.get("categories") or {}).items()} or {}
    pooled: dict[str, list[dict]] = {}
    for r in chosen:
        pooled.setdefault(names.get(r.prompt_index, "all"), []).append(r.metrics)
    return AcceptanceProfile({c: _pool_counts(ms) for c, ms in pooled.items()},
                             comparison.settings.get("target", ""), f"{drafter} K={k}", "Compare result")


def acceptance_from_serve_bench(data: dict[str, Any], label: str | None = None) -> AcceptanceProfile:
    """Acceptance of the speculative endpoint of a serve-bench result (``ServeBench.as_dict``), pooled over levels.

    Per-position rates where the engine reported them (its /metrics counters),
    else the mean acceptance length as Leviathan's a at the first level's K guess
    (geometric rates). Raises ValueError when no level reports acceptance.
    """
    label = label or data["settings"]["endpoints"][0]["label"]
    levels = [lv for lv in data.get("levels", []) if lv.get("label") == label]
    drafts = [(lv.get("spec_decode_num_drafts") or 0, lv) for lv in levels if lv.get("spec_decode_num_drafts")]
    if drafts:
        total = sum(n for n, _ in drafts)
        width = max(len(lv.get("spec_decode_per_position_acceptance_rates") or []) for _, lv in drafts)
        if width:
            rates = [sum(n * (lv["spec_decode_per_position_acceptance_rates"] + [0.0] * width)[i] for n, lv in drafts)
                     / total for i in range(width)]
            return AcceptanceProfile({"all": CategoryAcceptance(tuple(rates))}, _model(data), label,
                                     "serve-bench result (engine counters)")
    lengths = [lv["spec_decode_acceptance_length"] for lv in levels if lv.get("spec_decode_acceptance_length")]
    if not lengths:
        raise ValueError(f"the serve-bench result reports no acceptance for endpoint {label!r} (no speculation "
                         "counters and no per-request counts): give acceptance by hand or from a Compare result")
    from lab.theory import acceptance_from_mean_length

    settings = data.get("settings", {})
    k = int((settings.get("llama_server") or {}).get("k") or settings.get("llama_k") or 4)
    a = acceptance_from_mean_length(min(sum(lengths) / len(lengths), k + 1), k)
    return replace(AcceptanceProfile.uniform(a), model=_model(data), drafter=label,
                   source="serve-bench result (mean acceptance length)")


def acceptance_by_prompt(data: dict[str, Any], label: str | None = None) -> AcceptanceProfile:
    """Acceptance of each prompt of a serve-bench result, one category per ``prompt_id``, with "all" pooled.

    A prompt's rate comes from its requests' own draft counters (llama.cpp's
    ``timings.draft_n`` / ``draft_n_accepted``, summed over the endpoint's
    requests of that prompt): the mean acceptance length 1 + K x accepted /
    drafted, as Leviathan's a at K (geometric per-position rates). Requests differ
    far more than one step's draws do: on llama-server, Qwen2.5-Coder 1.5B drafted
    by 0.5B, one Spec-Bench prompt accepted 12 of 12 drafted tokens and another 9
    of 22; with one pooled profile every request finishes after about the same
    number of steps, and a closed loop's next requests all start together on an
    idle server. "all" is :func:`acceptance_from_serve_bench`.
    Raises ValueError when no request carries draft counters.
    """
    from lab.theory import acceptance_from_mean_length

    label = label or data["settings"]["endpoints"][0]["label"]
    settings = data.get("settings", {})
    k = int((settings.get("llama_server") or {}).get("k") or settings.get("llama_k") or 4)
    counts: dict[str, list[int]] = {}
    for level in data.get("levels", []):
        if level.get("label") != label:
            continue
        for r in level.get("requests", []):
            if r.get("ok") and r.get("draft_tokens"):
                pair = counts.setdefault(str(r["prompt_id"]), [0, 0])
                pair[0] += r.get("accepted_tokens") or 0
                pair[1] += r["draft_tokens"]
    if not counts:
        raise ValueError(f"the serve-bench result holds no per-request draft counts for endpoint {label!r}")
    pooled = acceptance_from_serve_bench(data, label)
    categories = {"all": pooled.categories["all"]}
    for prompt_id, (accepted, drafted) in counts.items():
        a = acceptance_from_mean_length(min(1.0 + k * accepted / drafted, k + 1.0), k)
        categories[prompt_id] = AcceptanceProfile.uniform(a).categories["all"]
    return AcceptanceProfile(categories, _model(data), label, "serve-bench result (per prompt)")


def acceptance_from_sweep(data: dict[str, Any]) -> AcceptanceProfile:
    """Acceptance pooled over a Batch sweep's JSON (``SweepResult.as_dict``): its 'on' runs' counters."""
    stats = [r["on"]["stats"] for r in data.get("results", []) if r.get("on", {}).get("stats")]
    if not stats:
        raise ValueError("the Batch sweep result holds no speculative runs to read acceptance from")
    return AcceptanceProfile({"all": _pool_counts(stats)}, data.get("settings", {}).get("target") or "",
                             f"{data.get('drafter', '')} K={data.get('k')}", "Batch sweep result")


def acceptance_from_runs(runs, k: int, max_new_tokens: int) -> CategoryAcceptance:
    """Per-position rates and draft rate from the lab's own batch-1 runs at K, leaving out budget-capped steps.

    runs: ``lab.decode.BatchResult`` s of one request each, decoded at K with a
    budget of ``max_new_tokens``. A step whose request had r tokens still to come
    could draft at most min(K, r - 1) (the loop's cap, which the simulator applies
    itself); such a capped step is left out, as its missing positions are the
    budget's, not the draft's. The engine's own counters keep them (a 12-token
    request of the Qwen pair drafts 4, 4, then 1 and 0: its counted draft rate
    was 0.75 where every uncapped step drafted). r_i: steps whose draft's first i
    tokens were accepted / steps that drafted; draft rate: steps that drafted /
    uncapped steps. Raises ValueError for K < 1 or no uncapped step.
    """
    if k < 1:
        raise ValueError(f"acceptance from runs requires K >= 1; got {k}")
    accepted, drafts, steps = [0] * k, 0, 0
    for run in runs:
        made = 0
        for batch_step in run.steps:
            step = batch_step.steps[0]
            if max_new_tokens - made - 1 >= k:  # uncapped: the budget left room for K drafted tokens
                steps += 1
                if step.drafted and step.tree is None:
                    drafts += 1
                    for i in range(min(step.num_accepted, k)):
                        accepted[i] += 1
            made += len(step.emitted)
    if not steps:
        raise ValueError("acceptance from runs requires at least one step the token budget did not cap: "
                         "decode more tokens than K + 1")
    return CategoryAcceptance(tuple(n / drafts for n in accepted) if drafts else (0.0,), drafts / steps)


def read_acceptance(path: str | Path) -> AcceptanceProfile:
    """An acceptance profile from any file the lab writes: a Compare result, a serve-bench or Batch sweep JSON,
    or the simulator's own acceptance JSON. Raises ValueError for anything else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"an acceptance file requires readable JSON; got {str(path)!r} ({error})") from None
    return acceptance_from_data(data, path.name)


def acceptance_from_data(data: Any, name: str = "file") -> AcceptanceProfile:
    """:func:`read_acceptance` on already parsed JSON."""
    if isinstance(data, dict) and "runs" in data and "prompts" in data:
        from lab.studies.compare import Comparison

        return acceptance_from_comparison(Comparison.from_json(json.dumps(data)))
    if isinstance(data, dict) and "levels" in data and "engines" in data:
        return acceptance_from_serve_bench(data)
    if isinstance(data, dict) and "results" in data and "cost_model" in data:
        return acceptance_from_sweep(data)
    return acceptance_from_dict(data, name)


# ---------------------------------------------------------------- helpers


def _pool_counts(stats: list[dict]) -> CategoryAcceptance:
    """Per-position rates and draft rate of pooled ``SpecDecodingStats.as_dict`` counters."""
    drafts = sum(s.get("num_drafts") or 0 for s in stats)
    if not drafts:
        return CategoryAcceptance((0.0,), 0.0)
    width = max(len(s.get("accepted_per_position") or []) for s in stats) or 1
    accepted = [sum((s.get("accepted_per_position") or [])[i] if i < len(s.get("accepted_per_position") or []) else 0
                    for s in stats) for i in range(width)]
    passes = sum(s.get("target_forward_passes") or 0 for s in stats)
    return CategoryAcceptance(tuple(a / drafts for a in accepted), min(1.0, drafts / passes) if passes else 1.0)


def _model(data: dict[str, Any]) -> str:
    settings = data.get("settings", {})
    llama = settings.get("llama_server") or {}  # serve-bench --llama-target's servers
    return llama.get("target") or settings.get("llama_target") or settings.get("model") or ""


def _non_increasing(rates: tuple[float, ...]) -> tuple[float, ...]:
    out, low = [], 1.0
    for r in rates:
        low = min(low, float(r))
        out.append(low)
    return tuple(out)


@lru_cache(maxsize=4096)
def _extend(rates: tuple[float, ...], k: int) -> tuple[float, ...]:
    if k <= len(rates):
        return rates[:k]
    last = rates[-1]
    before = rates[-2] if len(rates) > 1 else 1.0
    conditional = last / before if before > 0 else 0.0
    out = list(rates)
    while len(out) < k:
        out.append(out[-1] * conditional)
    return tuple(out)


def mean_rate(profile: AcceptanceProfile) -> float:
    """Leviathan's a fitted to the first category's rates at their measured K (for a sentence; NaN if none)."""
    from lab.theory import acceptance_from_mean_length

    a = next(iter(profile.categories.values()))
    k = len(a.per_position)
    return acceptance_from_mean_length(min(1.0 + sum(a.per_position), k + 1), k) if k else math.nan
