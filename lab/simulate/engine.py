"""The iteration-level discrete-event simulation: requests through a batching engine, one decode step at a time.

Time advances by whole engine steps (Vidur's granularity). At each step:

1. arrivals up to now join the queue;
2. continuous batching: queued requests join the running batch (up to
   ``max_batch`` rows) and are prefilled in this step, which yields their first
   token; static batching: a new batch of up to ``max_batch`` queued requests
   starts only when the last one has finished, with one prefill;
3. the policy picks K for the running rows (``lab.simulate.policies``); a
   row with r tokens still to come drafts at most r - 1 (the lab's loop and
   llama.cpp's server cap a draft at the budget: near its end a request
   drafts less, and a short request's steps cost less than K drafts);
4. the step costs prefill + T(rows, width, context) (``lab.simulate.costs``);
5. each drafting row draws how many of its K tokens are accepted from its
   category's per-position rates (``lab.simulate.acceptance``) and gains them
   plus the target's own token; rows that reach their output length finish.

A closed loop (``Traffic`` "closed") sends a client's next request when its
last one ends; under static batching a batch's clients send together when the
whole batch has ended (the Batch page's way: latency is then measured from the
batch's submission, as there). Everything random draws from one
``random.Random(seed)``: the same seed gives the same result.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from typing import Literal

from lab.metrics import percentile
from lab.simulate.acceptance import AcceptanceProfile
from lab.simulate.costs import StepCosts
from lab.simulate.policies import Context, Policy
from lab.simulate.traffic import Traffic

Batching = Literal["continuous", "static"]
DEFAULT_MAX_BATCH = 256  # open loops: vLLM's default max_num_seqs


class _Row:
    """A running request (mutable, engine-private). remaining: output tokens still to come."""

    __slots__ = ("index", "category", "remaining", "context", "accepted", "expected", "off_steps")

    def __init__(self, index: int, category: str, remaining: int, context: int) -> None:
        self.index, self.category, self.remaining, self.context = index, category, remaining, context
        self.accepted = self.expected = 0.0
        self.off_steps = 0


@dataclass(frozen=True)
class Summary:
    """Per-request figures of a run, in seconds (TPOT: per output token after the first), and throughput.

    Percentiles are linear between order statistics, as the Batch page's and serve-bench's.
    tokens_per_s: output tokens over the span from the first arrival to the last finish.
    """

    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p95_s: float
    tpot_p99_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_mean_s: float
    tokens_per_s: float
    requests_per_s: float


@dataclass(frozen=True)
class SimResult:
    """One simulated run. Times in seconds from the start; per request in arrival (issue) order.

    steps: decode or prefill steps run; events: arrivals + steps + completions
    (a fixed count for a given input and seed). k_steps: {K: row-steps the policy chose that K for,
    before the budget cap}. busy_s: time the engine was stepping. peak_batch: the most rows any step held.
    """

    policy: str
    batching: str
    load: float
    arrival_s: tuple[float, ...]
    first_token_s: tuple[float, ...]
    finish_s: tuple[float, ...]
    output_tokens: tuple[int, ...]
    steps: int
    events: int
    k_steps: dict[int, int]
    busy_s: float
    peak_batch: int = 0

    @property
    def latency_s(self) -> list[float]:
        return [f - a for f, a in zip(self.finish_s, self.arrival_s)]

    @property
    def ttft_s(self) -> list[float]:
        return [f - a for f, a in zip(self.first_token_s, self.arrival_s)]

    @property
    def tpot_s(self) -> list[float]:
        return [(f - t) / (n - 1) for f, t, n in zip(self.finish_s, self.first_token_s, self.output_tokens) if n > 1]

    @property
    def mean_k(self) -> float:
        """Mean K over row-steps (0: never drafted)."""
        total = sum(self.k_steps.values())
        return sum(k * n for k, n in self.k_steps.items()) / total if total else 0.0

    def summary(self) -> Summary:
        latency, ttft, tpot = self.latency_s, self.ttft_s, self.tpot_s
        span = max(self.finish_s) - min(self.arrival_s)
        q = lambda xs, p: percentile(xs, p)  # noqa: E731
        return Summary(q(ttft, 50), q(ttft, 95), q(ttft, 99), q(tpot, 50), q(tpot, 95), q(tpot, 99),
                       q(latency, 50), q(latency, 95), q(latency, 99), sum(latency) / len(latency),
                       sum(self.output_tokens) / span if span > 0 else math.nan,
                       len(latency) / span if span > 0 else math.nan)


def simulate(traffic: Traffic, acceptance: AcceptanceProfile, costs: StepCosts, policy: Policy,
             batching: Batching = "continuous", max_batch: int | None = None, seed: int = 0,
             context: Context | None = None, late_joins: bool = False) -> SimResult:
    """Run the traffic through the engine under a policy (see the module docstring).

    max_batch: rows at most (default: the concurrency of a closed loop, else DEFAULT_MAX_BATCH, vLLM's max_num_seqs).
    late_joins: a closed loop's next request reaches a busy engine after its next step has begun, and joins
    the step after (an asynchronous server, such as llama-server, steps back to back while the response
    and the next request cross the network); False: it joins the very next step (the lab's own loop).
    context: a ``Context`` to share between runs of the same costs and acceptance (its memo speeds them up).
    Raises ValueError for a category the acceptance does not know, costs of another model, or a bad batching.
    """
    if batching not in ("continuous", "static"):
        raise ValueError(f"batching requires 'continuous' or 'static'; got {batching!r}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch requires an integer >= 1; got {max_batch}")
    acceptance.check_categories(traffic.categories)
    costs.check_model(acceptance.model)
    rng = random.Random(seed)
    requests = traffic.draw(rng)
    n = len(requests)
    closed = traffic.kind == "closed"
    cap = max_batch or (traffic.concurrency if closed else DEFAULT_MAX_BATCH)
    context = context or Context.of(costs, acceptance, max(policy.k_max, 1))
    arrival = [r.arrival_s for r in requests]
    first = [math.nan] * n
    finish = [math.nan] * n
    made = [0] * n
    cdfs: dict[tuple[str, int], tuple[float, ...]] = {}
    draft_rate = {c: a.draft_rate for c, a in acceptance.categories.items()}
    k_steps: dict[int, int] = {}
    waiting: deque[int] = deque()
    late: list[int] = []  # sent, but the engine's step had begun (``late_joins``)
    running: list[_Row] = []
    t = busy = 0.0
    steps = done = peak = 0
    issued = min(traffic.concurrency, n) if closed else 0
    if closed:
        waiting.extend(range(issued))
    next_arrival = 0  # open loop: the next request not yet queued
    use_context = costs.context_ms_per_token > 0 or costs.by_context is not None
    speculating = policy.k_max > 0  # a separate draft model prefills the prompts too
    finished_now: list[int] = []
    batch_members = 0  # static batching: requests in the batch now running

    def decode_step() -> float:
        """Steps 3-5 for the running rows: returns the step's ms, commits tokens, fills finished_now."""
        b = len(running)
        chosen = policy.choose(running, context)
        ks = [chosen] * b if isinstance(chosen, int) else chosen
        widths, gains, drafted = [], [], 0
        for row, k in zip(running, ks):
            k_steps[k] = k_steps.get(k, 0) + 1
            k = min(k, row.remaining - 1)  # no row drafts past its budget: its last token is the target's own
            drafted = max(drafted, k)
            if k <= 0 or (draft_rate[row.category] < 1.0 and rng.random() >= draft_rate[row.category]):
                widths.append(1)
                gains.append(1)
                row.off_steps += k <= 0
                continue
            row.off_steps = 0
            cdf = cdfs.get((row.category, k))
            if cdf is None:
                cdf = cdfs[(row.category, k)] = acceptance[row.category].accepted_cdf(k)
            accepted = bisect_right(cdf, rng.random())
            row.accepted += accepted
            row.expected += context.expected[row.category][k] - 1.0
            widths.append(k + 1)
            gains.append(accepted + 1)
        width = max(widths) if costs.width_rule == "max" else sum(widths) / b
        cached = 0
        if use_context:  # the tokens attention reads (``StepCosts.context_rule``)
            contexts = [row.context for row in running]
            if costs.context_pad:  # per-row KV streams read to the longest's used cells, padded (llama.cpp)
                cached = b * costs.padded(max(contexts))
            else:
                padded = costs.width_rule == "max" and costs.context_rule == "longest"
                cached = b * max(contexts) if padded else sum(contexts)
        ms = costs.step_ms(b, drafted, width, cached)
        keep = []
        for row, gain in zip(running, gains):
            gain = min(gain, row.remaining)
            row.remaining -= gain
            row.context += gain
            made[row.index] += gain
            if row.remaining > 0:
                keep.append(row)
            else:
                finished_now.append(row.index)
        running[:] = keep
        return ms

    while done < n:
        if not closed:
            while next_arrival < n and arrival[next_arrival] <= t:
                waiting.append(next_arrival)
                next_arrival += 1
            if not waiting and not running:
                t = arrival[next_arrival]
                continue
        step_ms = 0.0
        joiners: list[int] = []
        if late and not running:  # an idle engine waits for them
            waiting.extend(late)
            late.clear()
        if batching == "continuous" or not running:
            while waiting and len(running) + len(joiners) < cap:
                joiners.append(waiting.popleft())
            if batching == "static" and joiners:
                batch_members = len(joiners)
        if joiners:  # one prefill pass: a padded engine pads the joiners to the longest prompt
            lengths = [max(1, requests[i].prompt_tokens - requests[i].cached_tokens)  # a cached prefix is not fed
                       for i in joiners]
            tokens = len(lengths) * max(lengths) if costs.width_rule == "max" else sum(lengths)
            step_ms += costs.prefill_ms(tokens, len(lengths), speculating)
        peak = max(peak, len(running) + len(joiners))
        if running:
            step_ms += decode_step()
        t += step_ms / 1e3
        busy += step_ms / 1e3
        steps += 1
        waiting.extend(late)  # they arrived during this step
        late.clear()
        for i in joiners:
            first[i] = t
            made[i] = 1
            if requests[i].output_tokens > 1:
                running.append(_Row(i, requests[i].category, requests[i].output_tokens - 1, requests[i].prompt_tokens + 1))
            else:
                finished_now.append(i)
        for i in finished_now:
            finish[i] = t
        done += len(finished_now)
        if closed and finished_now:
            if batching == "continuous":
                released = len(finished_now)
            else:  # the whole batch's clients send together once it has ended
                released = batch_members if not running else 0
            for _ in range(min(released, n - issued)):
                arrival[issued] = t
                (late if late_joins else waiting).append(issued)
                issued += 1
        finished_now.clear()
    return SimResult(policy.label, batching, traffic.load, tuple(arrival), tuple(first), tuple(finish), tuple(made),
                     steps, n + steps + n, k_steps, busy, peak)

