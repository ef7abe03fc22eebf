"""The workload simulator (lab.simulate) against closed forms, and its inputs' errors.

No model loads here: costs and acceptance are written by hand, so every
expected figure follows from a formula (Leviathan, Pollaczek-Khinchine).
"""

from __future__ import annotations

import io
import json
import math
import re

import pytest

from lab.simulate import (
    AcceptanceProfile,
    Cascade,
    CategoryAcceptance,
    Goodput,
    KByBatch,
    Off,
    StaticK,
    StepCosts,
    Traffic,
    acceptance_from_data,
    costs_from_dict,
    engine_configs,
    map_workload,
    read_trace,
    simulate,
)
from lab.studies.passes import PassCosts
from lab.theory import expected_speedup

STEP_MS = 20.0


def flat_costs(v: float = 1.0, draft_ms: float = 0.0, model: str = "", batch_growth: float = 0.0) -> StepCosts:
    """T(1, K+1) = STEP_MS x (1 + (v - 1) K / 4) (v(4) = v), draft_ms per drafted token; batches cost more by batch_growth."""
    target = {}
    for b in (1, 16):
        for w in range(1, 10):
            target[(b, w)] = STEP_MS * (1 + (v - 1) * (w - 1) / 4) * (1 + batch_growth * (b - 1))
    return StepCosts(target, {1: draft_ms, 16: draft_ms}, model=model)


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("a, k, c, v", [
    (0.6, 4, 0.0, 1.0),   # Leviathan's own setting: free draft, free verify
    (0.8, 3, 0.1, 1.25),  # a model draft, a verify pass that costs more (a CPU)
    (0.3, 2, 0.05, 1.1),  # prompt lookup's low acceptance
])
def test_zero_load_equals_the_single_request_prediction(a, k, c, v):
    """At (almost) no load a request is alone: its speedup over the target alone is Leviathan's, generalised by v."""
    costs = StepCosts({(1, 1): STEP_MS, (1, k + 1): STEP_MS * v}, {1: c * STEP_MS})
    traffic = Traffic("closed", concurrency=1, num_requests=300, output_tokens=401)  # one at a time: no queue
    acceptance = AcceptanceProfile.uniform(a)
    off = simulate(traffic, acceptance, costs, Off(), seed=1).summary()
    on = simulate(traffic, acceptance, costs, StaticK(k), seed=1).summary()
    # No prefill cost here; the last step's overshoot is the only bias (under 1 % at 400 tokens).
    assert off.latency_mean_s / on.latency_mean_s == pytest.approx(expected_speedup(a, k, c, v), rel=0.02)
    predicted_ms_per_token = PassCosts(STEP_MS, {k: STEP_MS * v}, c * STEP_MS).ms_per_token(k, a)
    assert on.latency_mean_s * 1e3 / 400 == pytest.approx(predicted_ms_per_token, rel=0.02)


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.8])
def test_m_d_1_queue_matches_pollaczek_khinchine(rho):
    """Poisson arrivals, one slot, deterministic service S, speculation off: mean wait = rho S / (2 (1 - rho))."""
    prefill_ms, out = 10.0, 4
    costs = StepCosts({(1, 1): STEP_MS}, prefill_fixed_ms=prefill_ms)
    service_s = (prefill_ms + (out - 1) * STEP_MS) / 1e3
    traffic = Traffic("poisson", rate_per_s=rho / service_s, num_requests=40_000, output_tokens=out)
    result = simulate(traffic, AcceptanceProfile.uniform(0.5), costs, Off(), max_batch=1, seed=3)
    waits = [latency - service_s for latency in result.latency_s]
    assert min(waits) >= -1e-9  # nobody is served faster than S
    expected = rho * service_s / (2 * (1 - rho))
    assert sum(waits) / len(waits) == pytest.approx(expected, rel=0.06)


@pytest.mark.parametrize("k", [1, 4])
def test_acceptance_zero_loses_by_the_drafts_cost(k):
    """Nothing accepted: one token per step, as off, but each step pays its drafted tokens: TPOT x (1 + K c),
    K capped at the tokens still to come less one (a request's last steps draft less)."""
    draft_ms = 3.0
    costs = flat_costs(v=1.0, draft_ms=draft_ms)
    traffic = Traffic("closed", concurrency=1, num_requests=20, output_tokens=33)
    acceptance = AcceptanceProfile.uniform(0.0)
    off = simulate(traffic, acceptance, costs, Off()).summary()
    on = simulate(traffic, acceptance, costs, StaticK(k)).summary()
    drafts = sum(min(k, remaining - 1) for remaining in range(1, 33))  # 32 steps after the prefill's token
    assert on.tpot_p50_s / off.tpot_p50_s == pytest.approx(1 + drafts / 32 * draft_ms / STEP_MS)
    assert drafts == 32 * k - k * (k + 1) // 2
    assert on.tokens_per_s < off.tokens_per_s


def test_acceptance_one_gains_k_plus_one_tokens_per_step():
    costs = flat_costs(v=1.0)
    traffic = Traffic("closed", concurrency=1, num_requests=5, output_tokens=41)
    on = simulate(traffic, AcceptanceProfile.uniform(1.0), costs, StaticK(4))
    assert on.steps == 5 * (1 + 8)  # one prefill, then 40 tokens in 8 steps of 5


# ---------------------------------------------------------------- determinism, bounds, speed


def test_same_seed_same_result_other_seed_other_result():
    traffic = Traffic("poisson", rate_per_s=20, num_requests=300, output_tokens=48, length_spread=0.5)
    costs, acceptance = flat_costs(v=1.3, batch_growth=0.1), AcceptanceProfile.uniform(0.6)
    first = simulate(traffic, acceptance, costs, Goodput(6), seed=7)
    assert simulate(traffic, acceptance, costs, Goodput(6), seed=7) == first
    assert simulate(traffic, acceptance, costs, Goodput(6), seed=8) != first


POLICIES = [Off(), StaticK(3), KByBatch({1: 4, 4: 2, 8: 0}), Goodput(5), Cascade(6)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.label)
def test_policies_never_choose_k_outside_their_bounds(policy):
    traffic = Traffic("poisson", rate_per_s=40, num_requests=300, output_tokens=40, mix={"qa": 1, "code": 1})
    acceptance = AcceptanceProfile({"qa": CategoryAcceptance((0.3, 0.1), 0.6),
                                    "code": CategoryAcceptance((0.9, 0.8, 0.7, 0.6))})
    result = simulate(traffic, acceptance, flat_costs(v=1.5, draft_ms=0.5, batch_growth=0.2), policy, max_batch=12)
    assert set(result.k_steps) <= set(range(policy.k_max + 1))
    if isinstance(policy, KByBatch):
        assert set(result.k_steps) <= set(policy.table.values())
    assert sum(result.output_tokens) == 300 * 40


def test_ten_thousand_requests_have_a_fixed_event_count():
    """The speed case of scripts/bench_simulate.py (which prints the time): its event count is fixed by the seed."""
    traffic = Traffic("closed", concurrency=16, num_requests=10_000, output_tokens=64)
    result = simulate(traffic, AcceptanceProfile.uniform(0.6), flat_costs(v=1.3, batch_growth=0.05), StaticK(3), seed=0)
    assert result.events == simulate(traffic, AcceptanceProfile.uniform(0.6), flat_costs(v=1.3, batch_growth=0.05),
                                     StaticK(3), seed=0).events
    assert result.events == 2 * 10_000 + result.steps
    assert sum(result.output_tokens) == 640_000


# ---------------------------------------------------------------- the map


def test_the_map_turns_speculation_off_where_batches_make_it_lose():
    """Batch 1 is memory bound (v ~ 1); at batch 16 a verify pass of 5 tokens costs 4 steps: it must stop paying."""
    target = {(1, 1): 20.0, (1, 5): 22.0, (16, 1): 40.0, (16, 5): 160.0}
    costs = StepCosts(target, {1: 0.2, 16: 0.4}, prefill_ms_per_token=0.05)
    result = map_workload(Traffic("closed", num_requests=120, output_tokens=32), [1, 4, 16],
                          AcceptanceProfile.uniform(0.6), costs, drafter="prompt-lookup")
    first, last = result.levels[0], result.levels[-1]
    assert first.best.kind != "off" and first.best.summary.latency_p50_s < first.off.summary.latency_p50_s
    assert last.run(result.static_label).summary.latency_p50_s > last.off.summary.latency_p50_s
    assert 1 < result.break_even_load < 16
    assert result.table[1] > 0 and result.table[max(result.table)] == 0
    data = json.loads(result.to_json())
    assert {"concurrency", "off", "best"} <= set(data["levels"][0])
    assert set(data["levels"][0]["best"]) == {"policy", "k", "latency_p50_s", "latency_p99_s", "tokens_per_s"}
    assert "num_speculative_tokens_per_batch_size" in json.dumps(result.configs) or result.recommended_kind == "static"
    assert result.decision.endswith(".")


@pytest.mark.parametrize("kind, k, expected", [
    ("static", 3, '"num_speculative_tokens": 3'),
    ("k-by-batch", 4, '"num_speculative_tokens_per_batch_size": {"1": 4, "8": 0}'),
])
def test_engine_configs_name_the_engines_knobs(kind, k, expected):
    configs = engine_configs(kind, k, {1: 4, 8: 0}, "prompt-lookup")
    assert expected in configs["vllm"]
    assert "--speculative-algorithm NGRAM" in configs["sglang"]
    assert "--spec-draft-n-max" in configs["llama.cpp"]


# ---------------------------------------------------------------- inputs and their errors


def test_a_negative_rate_is_refused():
    with pytest.raises(ValueError, match="rate > 0"):
        Traffic("poisson", rate_per_s=-1.0)


@pytest.mark.parametrize("text, name, message", [
    ("", "t.csv", "at least one request"),
    ("arrival_s,prompt_tokens,output_tokens\n", "t.csv", "no rows"),
    ("arrival_s,prompt_tokens\n0,5\n", "t.csv", "requires the columns"),
    ("arrival_s,prompt_tokens,output_tokens\n0,five,3\n", "t.csv", "line 2: expected numbers"),
    ('{"arrival_s": 0, "prompt_tokens": 5}\n', "t.jsonl", "line 1: expected the field 'output_tokens'"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 0}\n', "t.jsonl", "token counts >= 1"),
    ("not json\n", "t.jsonl", "line 1: expected a JSON object"),
])
def test_empty_or_malformed_traces_are_refused(text, name, message):
    with pytest.raises(ValueError, match=message):
        read_trace(io.StringIO(text), name)


def test_a_trace_reads_csv_and_jsonl_alike():
    csv_text = "arrival_s,prompt_tokens,output_tokens,category\n0.5,10,4,qa\n0.0,20,8,code\n"
    jsonl = '{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 4, "category": "qa"}\n' \
            '{"arrival_s": 0.0, "prompt_tokens": 20, "output_tokens": 8, "category": "code"}\n'
    assert read_trace(io.StringIO(csv_text), "t.csv") == read_trace(io.StringIO(jsonl), "t.jsonl")
    assert [r.category for r in read_trace(io.StringIO(csv_text), "t.csv")] == ["code", "qa"]


def test_unknown_categories_are_refused():
    traffic = Traffic("closed", num_requests=5, mix={"qa": 1.0, "poetry": 1.0})
    acceptance = AcceptanceProfile({"qa": CategoryAcceptance((0.5,))})
    with pytest.raises(ValueError, match=r"also has \['poetry'\]"):
        simulate(traffic, acceptance, flat_costs(), StaticK(2))


def test_costs_from_another_model_are_refused():
    acceptance = AcceptanceProfile.uniform(0.5, model="smollm2-135m")
    with pytest.raises(ValueError, match="measured on 'qwen2.5-coder-1.5b'"):
        simulate(Traffic(num_requests=2), acceptance, flat_costs(model="qwen2.5-coder-1.5b"), StaticK(2))


@pytest.mark.parametrize("data, message", [
    ({"target_ms": {}}, "require target timings"),
    ({"target_ms": {"1x5": 3.0}}, "width 1"),
    ({"target_ms": {"1x1": -3.0}}, "times >= 0"),
    ({"steps": 3}, "requires 'target_ms'"),
])
def test_malformed_costs_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        costs_from_dict(data)


@pytest.mark.parametrize("data, message", [
    ({"categories": {}}, "at least one category"),
    ({"categories": {"qa": {"per_position": [1.5]}}}, r"in \[0, 1\]"),
    ({"rates": [0.5]}, "requires {'categories'"),
])
def test_malformed_acceptance_is_refused(data, message):
    with pytest.raises(ValueError, match=message):
        acceptance_from_data(data)


def test_acceptance_reads_a_compare_result_and_a_serve_bench_result():
    # a run's metrics as the lab writes them (SpecDecodingStats.as_dict(), checked by lab.results_files)
    metrics = {"num_drafts": 10, "accepted_per_position": [6, 3], "target_forward_passes": 20, "num_draft_tokens": 20,
               "num_accepted_tokens": 9, "num_output_tokens": 29, "prefill_s": 0.01, "draft_s": 0.1, "verify_s": 1.0,
               "wall_s": 1.2, "acceptance_rate": 0.45, "mean_acceptance_length": 1.9, "tokens_per_s": 24.2}
    compare = {"settings": {"target": "smollm2-135m"}, "prompts": ["a"], "runs": [
        {"prompt_index": 0, "drafter": "prompt-lookup (n 1-3)", "k": 2, "token_ids": [], "text": "",
         "metrics": metrics}]}
    profile = acceptance_from_data(compare)
    assert profile.categories["all"].per_position == (0.6, 0.3)
    assert profile.categories["all"].draft_rate == 0.5
    assert profile.model == "smollm2-135m"
    bench = {"settings": {"endpoints": [{"label": "on"}, {"label": "off"}]}, "engines": {}, "levels": [
        {"label": "on", "spec_decode_num_drafts": 10, "spec_decode_per_position_acceptance_rates": [0.8, 0.5]},
        {"label": "on", "spec_decode_num_drafts": 30, "spec_decode_per_position_acceptance_rates": [0.6, 0.3]}]}
    assert acceptance_from_data(bench).categories["all"].per_position == pytest.approx((0.65, 0.35))


def test_per_position_rates_extend_by_the_last_conditional_rate():
    a = CategoryAcceptance((0.8, 0.4))
    assert a.rates(4) == pytest.approx((0.8, 0.4, 0.2, 0.1))
    assert a.accepted_cdf(2) == pytest.approx((0.2, 0.6, 1.0))
    assert a.expected_tokens(2) == pytest.approx(2.2)
    assert not math.isnan(a.scaled(0.5).expected_tokens(4))


def test_the_decision_counts_requests_and_cites_no_gain_as_a_gain():
    """1 concurrent request (singular), a whole-request break-even, and no "0 % lower" in a recommendation."""
    target = {(1, 1): 20.0, (1, 5): 22.0, (16, 1): 40.0, (16, 5): 160.0}
    costs = StepCosts(target, {1: 0.2, 16: 0.4}, prefill_ms_per_token=0.05)
    result = map_workload(Traffic("closed", num_requests=120, output_tokens=32), [1, 4, 16],
                          AcceptanceProfile.uniform(0.6), costs, drafter="prompt-lookup")
    text = result.decision
    assert "at 1 concurrent request;" in text or "at 1 concurrent request," in text
    assert "1 concurrent requests" not in text and " 0 % lower" not in text
    assert re.search(r"stops paying from about \d+ concurrent requests\.", text), text
    assert f"stops paying from about {round(result.break_even_load)} concurrent" in text
    last = result.levels[-1]
    if last.run(result.recommended).summary.latency_p50_s >= 0.995 * last.off.summary.latency_p50_s:
        assert "gains nothing" in text


def test_load_text_keeps_a_decimal_only_for_a_rate():
    from lab.simulate.study import _load_text
    assert _load_text(1, "concurrency") == "1 concurrent request"
    assert _load_text(6.86, "concurrency", estimate=True) == "7 concurrent requests"
    assert _load_text(6.86, "rate", estimate=True) == "6.9 requests/s"
    assert _load_text(2.0, "rate") == "2 requests/s"


def test_the_map_flags_an_overloaded_rate_and_costs_extrapolated_past_the_timed_batches():
    """A trial found a Poisson load past capacity shown as ordinary latencies, then only its first overloaded
    load named. One step of 16 rows costs 40 ms here, so 64 requests of 32 tokens at 1 request/s keep up; at 100
    and 200 requests/s nothing does. Batch sizes past 16 are extrapolated, and the map says so."""
    costs = StepCosts({(1, 1): 20.0, (1, 5): 22.0, (16, 1): 40.0, (16, 5): 160.0}, {1: 0.2, 16: 0.4})
    traffic = Traffic("poisson", rate_per_s=1.0, num_requests=64, output_tokens=32)
    calm = map_workload(traffic, [1.0], AcceptanceProfile.uniform(0.6), costs, k_max=4)
    assert calm.caveats == ()
    assert all(r.peak_batch <= 16 and r.backlog_growth == 0.0 for r in calm.levels[0].runs)
    busy = map_workload(traffic, [1.0, 100.0, 200.0], AcceptanceProfile.uniform(0.6), costs, k_max=4, max_batch=8)
    (overload,) = busy.caveats
    assert overload.startswith("At 100 requests/s and above, requests arrive faster than any policy can serve them")
    assert all(r.backlog_growth > 10 for lv in busy.levels[1:] for r in lv.runs)  # requests/s, of 100-200 arriving
    assert busy.as_dict()["caveats"] == [overload]
    assert busy.decision.endswith("; at 100 requests/s and above no policy keeps up with the arrivals (see the "
                                  "caveats).")
    assert "keeps up" not in calm.decision
    wide = map_workload(traffic, [1.0, 200.0], AcceptanceProfile.uniform(0.6), costs, k_max=4)
    assert wide.caveats[0].startswith("At 200 requests/s, requests arrive faster than any policy")
    assert wide.caveats[1].startswith("Batches reached 64 rows, but the step costs were timed up to 16")
    closed = map_workload(Traffic("closed", num_requests=40, output_tokens=16), [1, 32],
                          AcceptanceProfile.uniform(0.6), costs, k_max=4)
    assert closed.caveats == ("Batches reached 32 rows, but the step costs were timed up to 16: past that they are "
                              "extrapolated linearly. Time larger batches (or give a costs file that has them) "
                              "before trusting the loads that reach them.",)


def test_the_k_by_batch_table_never_raises_k_with_the_batch():
    """Timing noise made batch 4's one-token step slow and its verify nearly free: the raw per-batch optimum went
    4, then lower, then 4 again; the table keeps the lower K."""
    from lab.simulate import Context, KByBatch

    costs = StepCosts({(1, 1): 20.0, (1, 5): 21.0, (2, 1): 20.0, (2, 5): 60.0, (4, 1): 100.0, (4, 5): 104.0},
                      {1: 0.1, 2: 0.1, 4: 0.1})
    context = Context.of(costs, AcceptanceProfile.uniform(0.8), 4)
    raw = {b: max(range(5), key=lambda k: context.expected["all"][k] / costs.step_ms(b, k)) for b in (1, 2, 4)}
    assert raw[1] == 4 and raw[2] < 4 and raw[4] == 4
    table = KByBatch.fit(context, {"all": 1.0}, [1, 2, 4], 4).table
    assert table[1] == 4 and max(k for b, k in table.items() if b >= 2) == raw[2]
