"""Map a workload: every policy at every load, the break-even load, the recommendation and its configuration.

``map_workload`` simulates the traffic at each load (a concurrency, a rate,
or a trace's arrivals rescaled) under every policy, on the same requests (one
seed). Per load it keeps each policy's :class:`~lab.simulate.engine.Summary`
and names the best: the least p50 latency (ties: more tokens/s).

- break-even load: where the best static K at the lowest load stops
  shortening the p50 latency against speculation off (found by bisection on
  simulated loads between the two listed loads around the crossing: whole
  clients for a closed loop; None when it pays at every load, the lowest load
  when it never pays). Static K is what a team ships by default, so it is the
  one whose limit matters.
- recommended policy: the one whose p50 latency is, at its worst load, the
  least above the best there (least maximum regret); among near-equals
  (within ``TIE``) the simplest (off, static, table, goodput, cascade), since
  what an engine cannot express must be approximated when shipped.
- configuration: the flags that realise it on vLLM, SGLang and llama.cpp
  (:func:`engine_configs`); goodput and Cascade are not options of those
  engines, so for them the fitted K-by-batch table is exported and the text says so.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from lab.simulate.acceptance import AcceptanceProfile
from lab.simulate.costs import StepCosts
from lab.simulate.engine import Batching, Summary, simulate
from lab.simulate.policies import Context, KByBatch, Off, StaticK, default_policies
from lab.simulate.traffic import Traffic

TIE = 0.02  # p50 latencies within 2 % count as equal: the simulator is not more exact than that
BACKLOG_GROWTH = 0.1  # requests in the system growing by over a tenth of the arrival rate: it cannot keep up
SIMPLICITY = ("off", "static", "k-by-batch", "goodput", "cascade")

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class PolicyRun:
    """One policy at one load: its label, kind (``Policy.name``), K (a static K, or the largest it may pick),
    mean K over row-steps, and the figures (seconds, tokens/s); peak_batch: the most rows a step held;
    backlog_growth: how fast the requests in the system (arrived, not finished) grew from the middle arrival
    to the last (requests/s): about 0 when the engine keeps up, about the arrival rate less the served rate
    when it does not (its queue, or with continuous batching its batch, grows with every request)."""

    label: str
    kind: str
    k: int
    mean_k: float
    summary: Summary
    peak_batch: int = 0
    backlog_growth: float = 0.0

    def as_dict(self) -> dict:
        return {"policy": self.label, "kind": self.kind, "k": self.k, "mean_k": self.mean_k,
                "peak_batch": self.peak_batch, "backlog_growth": self.backlog_growth} | asdict(self.summary)


@dataclass(frozen=True)
class LoadLevel:
    """Every policy at one load (a concurrency, or requests/s), and the best of them."""

    load: float
    runs: tuple[PolicyRun, ...]

    @property
    def off(self) -> PolicyRun:
        return next(r for r in self.runs if r.kind == "off")

    @property
    def best(self) -> PolicyRun:
        return min(self.runs, key=lambda r: (r.summary.latency_p50_s, -r.summary.tokens_per_s))

    def run(self, label: str) -> PolicyRun:
        return next(r for r in self.runs if r.label == label)


@dataclass(frozen=True)
class WorkloadMap:
    """The map: levels by load, the break-even load, the recommendation, its configuration and the decision in words.

    load_kind: "concurrency" or "rate" (requests/s). static_label: the static K the
    break-even is measured for. table: the K-by-batch table fitted on the costs.
    caveats: what limits the map, in words (an overloaded queue, costs extrapolated past the batch
    sizes timed); empty when nothing does.
    """

    load_kind: str
    levels: tuple[LoadLevel, ...]
    break_even_load: float | None
    static_label: str
    recommended: str
    recommended_kind: str
    table: dict[int, int]
    configs: dict[str, str]
    decision: str
    batching: str
    caveats: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """The CLI's JSON: per level, off and the best (policy, k, p50, p99, tokens/s), and every run."""
        def brief(run: PolicyRun) -> dict:
            s = run.summary
            return _clean({"policy": run.label, "k": run.k, "latency_p50_s": s.latency_p50_s,
                           "latency_p99_s": s.latency_p99_s, "tokens_per_s": s.tokens_per_s})
        levels = []
        for level in self.levels:
            off = brief(level.off)
            off.pop("policy"), off.pop("k")
            load = int(level.load) if self.load_kind == "concurrency" else level.load
            levels.append({self.load_kind: load, "off": off, "best": brief(level.best),
                           "runs": [_clean(r.as_dict()) for r in level.runs]})
        return {"load_kind": self.load_kind, "batching": self.batching, "levels": levels,
                "break_even_load": self.break_even_load, "break_even_policy": self.static_label,
                "recommended": self.recommended, "k_by_batch_size": {str(b): k for b, k in self.table.items()},
                "configs": self.configs, "decision": self.decision, "caveats": list(self.caveats)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)


def map_workload(traffic: Traffic, loads: Sequence[float], acceptance: AcceptanceProfile, costs: StepCosts,
                 policies: Sequence | None = None, batching: Batching = "continuous", k_max: int = 8,
                 seed: int = 0, max_batch: int | None = None, drafter: str = "", draft: str | None = None,
                 progress: Progress | None = None) -> WorkloadMap:
    """Simulate every policy at every load (see the module docstring).

    traffic: the load's shape; each of ``loads`` replaces its rate or concurrency
    (``Traffic.at_load``). policies: default :func:`~lab.simulate.policies.default_policies`
    (its table fitted for batch sizes up to the largest load). drafter, draft:
    for the exported configuration. progress(fraction, message) after each run.
    Raises ValueError on no loads, a load <= 0, and what ``simulate`` raises.
    """
    if not loads or min(loads) <= 0:
        raise ValueError(f"a workload map requires loads > 0; got {list(loads)}")
    acceptance.check_categories(traffic.categories)
    costs.check_model(acceptance.model)
    context = Context.of(costs, acceptance, max(k_max, 1))
    batch_sizes = _table_batch_sizes(traffic, loads, max_batch)
    policies = list(policies or default_policies(context, traffic.mix, batch_sizes, k_max))
    if not any(p.name == "off" for p in policies):
        policies.insert(0, Off())
    report = progress or (lambda fraction, message: None)
    levels = []
    total, done = len(loads) * len(policies), 0
    for load in sorted(loads):
        at = traffic.at_load(load)
        runs = []
        for policy in policies:
            result = simulate(at, acceptance, costs, policy, batching, max_batch, seed, context)
            runs.append(PolicyRun(policy.label, policy.name, policy.k_max, result.mean_k, result.summary(),
                                  result.peak_batch, _backlog_growth(result.arrival_s, result.finish_s)))
            done += 1
            report(done / total, f"load {load:g}: {policy.label}")
        levels.append(LoadLevel(float(load), tuple(runs)))
    table = next((p.table for p in policies if isinstance(p, KByBatch)),
                 KByBatch.fit(context, traffic.mix, batch_sizes, k_max).table)
    static_label, break_even = _break_even(levels)
    if break_even is not None and break_even > levels[0].load:  # between two listed loads: find it by simulating
        static = next(p for p in policies if p.label == static_label)
        break_even = _refine_break_even(levels, break_even, lambda load, policy: simulate(
            traffic.at_load(load), acceptance, costs, policy, batching, max_batch, seed, context).summary(),
            static, traffic.kind == "closed")
    recommended = _recommend(levels)
    kind = next(r.kind for r in levels[0].runs if r.label == recommended)
    k = next(r.k for r in levels[0].runs if r.label == recommended)
    configs = engine_configs(kind, k, table, drafter or acceptance.drafter, draft)
    load_kind = "concurrency" if traffic.kind == "closed" else "rate"
    decision = _decision(levels, recommended, kind, static_label, break_even, load_kind)
    saturated = _saturated(levels, load_kind)
    if saturated is not None:  # the sentence compares queue-bound figures there: say so in it
        decision = decision[:-1] + (f"; at {_load_text(saturated.load, load_kind)}"
                                    f"{'' if saturated is levels[-1] else ' and above'} no policy keeps up "
                                    "with the arrivals (see the caveats).")
    return WorkloadMap(load_kind, tuple(levels), break_even, static_label, recommended, kind, table, configs,
                       decision, batching, _caveats(levels, load_kind, costs))


def sensitivity(traffic: Traffic, load: float, acceptance: AcceptanceProfile, costs: StepCosts,
                batching: Batching = "continuous", k_max: int = 8, seed: int = 0,
                factors: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
                load_factors: Sequence[float] = (0.5, 1.0, 2.0, 4.0)) -> dict:
    """Which input would flip the on/off decision at ``load``: acceptance scaled, then the load scaled.

    For each factor, whether the best static K (1..k_max) beats speculation off
    on p50 latency by more than ``TIE`` (the recommendation's own tie, so the two never disagree at a
    near-tie). Returns {"acceptance": [(factor, pays, speedup)], "load":
    [(load, pays, speedup)], "flip": a sentence}; speedup = off p50 / best static p50.
    """
    def pays(acc: AcceptanceProfile, at: float) -> tuple[bool, float]:
        ctx = Context.of(costs, acc, k_max)
        t = traffic.at_load(at)
        off = simulate(t, acc, costs, Off(), batching, None, seed, ctx).summary().latency_p50_s
        best = min(simulate(t, acc, costs, StaticK(k), batching, None, seed, ctx).summary().latency_p50_s
                   for k in sorted({1, 2, 4, min(8, k_max)}) if k <= k_max)
        return best < off * (1 - TIE), off / best  # the decision's own tie: a near-equal does not pay
    by_acceptance = [(f, *pays(acceptance.scaled(f), load)) for f in factors]
    by_load = [(load * f, *pays(acceptance, load * f)) for f in load_factors]
    now = dict((f, p) for f, p, _ in by_acceptance).get(1.0, pays(acceptance, load)[0])
    flips = [f for f, p, _ in by_acceptance if p != now]
    loads = [x for x, p, _ in by_load if p != now]
    words = []
    if flips:
        f = min(flips, key=lambda f: abs(math.log(f)))
        words.append(f"acceptance x{f:g} (per-position rates {'lower' if f < 1 else 'higher'})")
    if loads:
        words.append(f"a load of {min(loads, key=lambda x: abs(math.log(x / load))):g}")
    state = "pays" if now else "does not pay"
    flip = (f"At load {load:g} speculation {state}; " + (" or ".join(words) + " would flip that." if words else
            "no acceptance from x0.25 to x1.5 and no load from x0.5 to x4 flips it."))
    return {"acceptance": by_acceptance, "load": by_load, "flip": flip}


def engine_configs(kind: str, k: int, table: dict[int, int], drafter: str, draft: str | None = None) -> dict[str, str]:
    """The flags that realise a policy on vLLM, SGLang and llama.cpp.

    kind: the policy's name ("off", "static", "k-by-batch", "goodput", "cascade").
    k: the static K (or the largest K). table: {batch size: K} for vLLM's
    ``num_speculative_tokens_per_batch_size`` (used for k-by-batch, goodput, cascade).
    drafter: "prompt-lookup" (n-gram) or a draft model; draft: its name or path.
    """
    if kind == "off":
        return {"vllm": "(no --speculative-config: speculation off)", "sglang": "(no --speculative-* flags)",
                "llama.cpp": "(no -md / --spec-* flags)", "note": "speculation off"}
    ngram = drafter.startswith("prompt-lookup") or drafter == "ngram"
    top = max(table.values()) if kind != "static" else k
    config: dict = ({"method": "ngram", "num_speculative_tokens": top, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
                    if ngram else {"model": draft or "DRAFT_MODEL", "num_speculative_tokens": top})
    note = ""
    if kind != "static":
        config["num_speculative_tokens_per_batch_size"] = {str(b): kk for b, kk in sorted(table.items())}
        if kind in ("goodput", "cascade"):
            note = (f"{kind} is not an option of these engines: the K-by-batch-size table fitted on the same costs "
                    "approximates it (vLLM); SGLang and llama.cpp take one K, the table's largest")
        else:
            note = (f"only vLLM takes a K per batch size; SGLang and llama.cpp take one K: their lines use the "
                    f"table's largest ({top}), a static policy")
    if ngram:
        sglang = f"--speculative-algorithm NGRAM --speculative-num-draft-tokens {top + 1}"
        llama = f"--spec-type ngram-simple --spec-draft-n-max {top} --spec-draft-n-min 0"
    else:
        sglang = (f"--speculative-algorithm STANDALONE --speculative-draft-model-path {draft or 'DRAFT_MODEL'} "
                  f"--speculative-num-steps {top} --speculative-eagle-topk 1 --speculative-num-draft-tokens {top + 1}")
        llama = (f"-md {draft or 'DRAFT.gguf'} --spec-type draft-simple --spec-draft-n-max {top} "
                 "--spec-draft-n-min 0 --spec-draft-p-min 0")
    return {"vllm": f"--speculative-config '{json.dumps(config)}'", "sglang": sglang, "llama.cpp": llama,
            "note": note}


# ---------------------------------------------------------------- helpers


def _table_batch_sizes(traffic: Traffic, loads: Sequence[float], max_batch: int | None) -> list[int]:
    top = max_batch or (int(max(loads)) if traffic.kind == "closed" else 64)
    sizes, b = [], 1
    while b < top:
        sizes.append(b)
        b *= 2
    return sizes + [top]


def _break_even(levels: list[LoadLevel]) -> tuple[str, float | None]:
    statics = [r for r in levels[0].runs if r.kind == "static"]
    if not statics:
        return "", None
    chosen = min(statics, key=lambda r: r.summary.latency_p50_s).label
    ratios = [(lv.load, lv.run(chosen).summary.latency_p50_s / lv.off.summary.latency_p50_s) for lv in levels]
    if ratios[0][1] >= 1.0:
        return chosen, ratios[0][0]
    for (x0, y0), (x1, y1) in zip(ratios, ratios[1:]):
        if y1 >= 1.0:
            return chosen, x0 + (1.0 - y0) * (x1 - x0) / (y1 - y0) if y1 != y0 else x1
    return chosen, None


def _refine_break_even(levels: list[LoadLevel], estimate: float, run: Callable, static, whole: bool) -> float:
    """The break-even between the two listed loads around ``estimate``, by bisection on simulated loads
    (whole clients for a closed loop: the first concurrency where the static K stops paying); a trial found the
    interpolated figure moved with the loads listed."""
    loads = [lv.load for lv in levels]
    high = next(x for x in loads if x >= estimate)
    low = max(x for x in loads if x < high)

    def pays(load: float) -> bool:
        return run(load, static).latency_p50_s < run(load, Off()).latency_p50_s

    if whole:
        low, high = int(low), int(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if pays(middle) else (low, middle)
        return float(high)
    for _ in range(8):  # 1/256 of the bracket
        middle = (low + high) / 2
        low, high = (middle, high) if pays(middle) else (low, middle)
    return (low + high) / 2


def _recommend(levels: list[LoadLevel]) -> str:
    labels = [r.label for r in levels[0].runs]
    regret = {label: max(lv.run(label).summary.latency_p50_s / lv.best.summary.latency_p50_s for lv in levels)
              for label in labels}
    least = min(regret.values())
    near = [r for r in levels[0].runs if regret[r.label] <= least * (1 + TIE)]
    return min(near, key=lambda r: (SIMPLICITY.index(r.kind) if r.kind in SIMPLICITY else 99, regret[r.label])).label


def _load_text(load: float, load_kind: str, *, estimate: bool = False) -> str:
    """A load as a reader counts it: whole concurrent requests (singular for 1), a rate in requests/s with one
    decimal when it is an interpolated estimate."""
    if load_kind == "concurrency":
        n = max(1, round(load))
        return f"{n} concurrent request" + ("" if n == 1 else "s")
    text = f"{load:.1f}" if estimate else f"{load:g}"
    return f"{text} request{'' if text == '1' else 's'}/s"


def _gain_percent(level: LoadLevel, label: str) -> float:
    """How much lower (positive) or higher (negative) the p50 latency of ``label`` is than off's, in percent."""
    return (1 - level.run(label).summary.latency_p50_s / level.off.summary.latency_p50_s) * 100


def _change(percent: float) -> str:
    return f"{percent:.0f} % lower p50 latency" if percent >= 0 else f"{-percent:.0f} % higher p50 latency"


def _decision(levels, recommended: str, kind: str, static_label: str, break_even: float | None, load_kind: str) -> str:
    """The recommendation in one sentence. A gain is cited only where it rounds to at least 1 %; where the
    recommended policy stops gaining, the sentence says from which load instead."""
    low, high = levels[0], levels[-1]
    if kind == "off":
        text = "Leave speculation off: no policy shortens the p50 latency enough at these loads"
    else:
        gains = [_gain_percent(level, recommended) for level in levels]
        tail = next((i for i in range(len(levels)) if all(g < 0.5 for g in gains[i:])), None)
        text = f"Turn speculation on with {recommended}: {_change(gains[0])} at {_load_text(low.load, load_kind)}"
        if tail is None:
            text += f", {_change(gains[-1])} at {_load_text(high.load, load_kind)}"
        elif tail > 0:
            where = _load_text(levels[tail].load, load_kind)
            last = tail == len(levels) - 1
            text += f"; at {where} it gains nothing" if last else f"; from {where} on it gains nothing"
            if gains[-1] <= -0.5:
                text += f" ({_change(gains[-1])} at {_load_text(high.load, load_kind)})"
        worst = max(level.run(recommended).summary.latency_p50_s / level.best.summary.latency_p50_s for level in levels)
        text += (f". It is the one policy never far from the best at any load (at worst {(worst - 1) * 100:.0f} % "
                 "slower p50 than that load's best, shown per load in the table), preferring the simplest when "
                 "several are that close")
    if static_label:
        if break_even is None:
            text += f"; {static_label} still pays at {_load_text(high.load, load_kind)}"
        else:
            text += (f"; {static_label} stops paying from about "
                     f"{_load_text(break_even, load_kind, estimate=True)}")
    return text + "."


def _caveats(levels: list[LoadLevel], load_kind: str, costs: StepCosts) -> tuple[str, ...]:
    """What limits the map: arrivals faster than a policy serves them (its backlog grows with every request
    simulated, so its latencies there say only that it cannot keep up), and batches past the largest timed one."""
    notes = []
    if load_kind == "rate":
        everyone = _saturated(levels, load_kind)
        for level in levels:
            if level is everyone:
                served = max(r.summary.requests_per_s for r in level.runs)
                later = "" if level is levels[-1] else " and above"
                notes.append(f"At {_load_text(level.load, load_kind)}{later}, requests arrive faster than any policy "
                             f"can serve them (at most {served:.1f} requests/s served there): the backlog grows with "
                             "every request simulated, so those latencies only say it cannot keep up. Lower the "
                             "rate or add capacity.")
                break
            behind = [r.label for r in level.runs if _overloaded(r, level.load)]
            if behind:
                names = ", ".join(behind[:3]) + (f" and {len(behind) - 3} more" if len(behind) > 3 else "")
                notes.append(f"At {_load_text(level.load, load_kind)}, {names} could not keep up: their backlog "
                             "grew along the run (at or past what they can serve), so their latencies there grow "
                             "with the number of requests simulated.")
    peak = max(r.peak_batch for level in levels for r in level.runs)
    top = max(costs.batch_sizes)
    if peak > top:
        notes.append(f"Batches reached {peak} rows, but the step costs were timed up to {top}: past that they are "
                     "extrapolated linearly. Time larger batches (or give a costs file that has them) before "
                     "trusting the loads that reach them.")
    return tuple(notes)


def _saturated(levels: list[LoadLevel], load_kind: str) -> LoadLevel | None:
    """The lowest rate at which every policy is overloaded (None for a closed loop, or when there is none)."""
    if load_kind != "rate":
        return None
    return next((lv for lv in levels if all(_overloaded(r, lv.load) for r in lv.runs)), None)


def _overloaded(run: PolicyRun, rate: float) -> bool:
    """The backlog grows by over a tenth of the arrival rate (and by more than two requests in all)."""
    return run.backlog_growth > BACKLOG_GROWTH * rate


def _backlog_growth(arrival_s, finish_s) -> float:
    """Requests in the system (arrived, not finished) at the last arrival less at the middle one, per second
    between them, less two requests of slack (0 for fewer than four requests or arrivals all at once)."""
    arrivals = sorted(arrival_s)
    if len(arrivals) < 4:
        return 0.0
    finishes = sorted(finish_s)
    middle, last = arrivals[len(arrivals) // 2], arrivals[-1]
    if last <= middle:
        return 0.0
    in_system = lambda t: bisect_right(arrivals, t) - bisect_right(finishes, t)  # noqa: E731
    return max(0.0, in_system(last) - in_system(middle) - 2) / (last - middle)


def _clean(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def with_drafter(profile: AcceptanceProfile, drafter: str) -> AcceptanceProfile:
    """The profile relabelled with a drafter name (for configurations)."""
    return replace(profile, drafter=drafter)
