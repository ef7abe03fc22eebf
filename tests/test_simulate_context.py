"""Costs by context (lab.simulate.costs.ContextCosts): one-token passes and prefills tabulated by batch and context."""

from __future__ import annotations

import dataclasses

import pytest

from lab.simulate import AcceptanceProfile, Off, Request, StaticK, StepCosts, Traffic, costs_from_dict, simulate
from lab.simulate.costs import ContextCosts
from lab.simulate.profile import loop_overheads, time_context

# SmolLM2-like: a one-token pass grows slowly with context at B = 1 and fast at B = 8 (superlinear past 512)
TABLES = ContextCosts(
    target_pass_ms={1: {64: 50.0, 256: 60.0, 768: 66.0}, 8: {64: 65.0, 256: 90.0, 512: 125.0, 768: 212.0}},
    target_prefill_ms={1: {64: 160.0, 768: 1030.0}, 8: {64: 570.0, 768: 8430.0}},
    reference_tokens={1: 64, 8: 256},
    draft_pass_ms={1: {64: 10.0, 768: 14.0}, 8: {64: 12.0, 768: 40.0}},
    draft_prefill_ms={1: {64: 20.0, 768: 200.0}, 8: {64: 100.0, 768: 1600.0}},
)
BARE = StepCosts({(1, 1): 50.0, (1, 5): 60.0, (8, 1): 90.0, (8, 5): 110.0}, {1: 10.0, 8: 12.0}, model="m",
                 by_context=TABLES)


def test_a_pass_costs_its_table():
    assert TABLES.pass_ms(8, 768) == pytest.approx(212.0)
    assert TABLES.pass_ms(8, 640) == pytest.approx((125.0 + 212.0) / 2)  # linear between points
    assert TABLES.pass_ms(8, 1024) == pytest.approx(212.0 + 87.0)  # beyond: the last segment's slope
    assert TABLES.pass_ms(4, 768) == pytest.approx(66.0 + (212.0 - 66.0) * 3 / 7)  # linear over batch size
    # the draft's: over its reference context (its timings were taken there), negative below it
    assert TABLES.pass_extra(8, 768, draft=True) == pytest.approx(40.0 - (12.0 + 28.0 * 192 / 704))
    assert TABLES.pass_extra(1, 64, draft=True) == pytest.approx(0.0)
    assert TABLES.pass_extra(8, 64, draft=True) < 0.0


def test_a_step_is_the_tables_pass_plus_its_width_plus_each_drafted_token():
    padded = 8 * 768  # the simulator's count: rows x the longest row's cached tokens
    assert BARE.step_ms(8, 0, 1, padded) == pytest.approx(212.0)
    draft_extra = TABLES.pass_extra(8, 768, draft=True)
    assert BARE.step_ms(8, 4, 5, padded) == pytest.approx(212.0 + (110.0 - 90.0) + 4 * (12.0 + draft_extra))
    assert BARE.step_ms(8, 0, 1) == pytest.approx(90.0)  # no context given: the reference context (256)
    assert BARE.step_ms(4, 0, 5, 4 * 768) == pytest.approx(TABLES.pass_ms(4, 768) + 10.0 + 10.0 * 3 / 7)
    assert BARE.step_ms(8, 4, 5, 8 * 10) > 0.0  # far below every table: never negative


def test_a_noisy_small_batch_does_not_lift_the_larger_ones():
    """The slope model keeps a running maximum over batch size; the tables do not: B = 1 timed slow (say the
    machine's first seconds) must not charge B = 8 its time."""
    slow_first = dataclasses.replace(BARE, target_ms=BARE.target_ms | {(1, 1): 300.0, (1, 5): 310.0})
    assert slow_first.step_ms(8, 0, 1, 8 * 768) == pytest.approx(212.0)
    assert slow_first.target(8, 1) == pytest.approx(300.0)  # the slope model's running maximum


def test_a_prefill_is_the_table_plus_the_first_step_plus_the_drafts_when_speculating():
    first_step = BARE.step_ms(8, 0, 1, 8 * 768)
    assert BARE.prefill_ms(8 * 768, rows=8) == pytest.approx(8430.0 + first_step)
    assert BARE.prefill_ms(8 * 768, rows=8, speculating=True) == pytest.approx(8430.0 + first_step + 1600.0)
    pass_416 = 60.0 + 6.0 * (416 - 256) / 512  # the B = 1 table between 256 and 768
    assert BARE.prefill_ms(416, rows=1) == pytest.approx((160.0 + 1030.0) / 2 + pass_416)
    without_draft = dataclasses.replace(BARE, draft_ms_per_token={})  # prompt lookup: nothing else to prefill
    assert without_draft.prefill_ms(768, rows=1, speculating=True) == without_draft.prefill_ms(768, rows=1)


def test_the_simulator_charges_the_draft_prefill_only_to_a_policy_that_drafts():
    traffic = Traffic("closed", concurrency=1, requests=(Request(0.0, 768, 1),), num_requests=1)
    acceptance = AcceptanceProfile.uniform(0.5, model="m")
    off = simulate(traffic, acceptance, BARE, Off(), "static").summary()
    on = simulate(traffic, acceptance, BARE, StaticK(4), "static").summary()
    assert off.ttft_p50_s == pytest.approx(BARE.prefill_ms(768, 1) / 1e3)
    assert on.ttft_p50_s - off.ttft_p50_s == pytest.approx(200.0 / 1e3)


def test_the_simulator_reads_each_steps_context_from_the_table():
    """One request of 64 prompt tokens and 3 output tokens, off: prefill, then steps at 65 and 66 cached tokens."""
    traffic = Traffic("closed", concurrency=1, requests=(Request(0.0, 64, 3),), num_requests=1)
    result = simulate(traffic, AcceptanceProfile.uniform(0.5, model="m"), BARE, Off(), "static")
    expected_ms = BARE.prefill_ms(64, 1) + BARE.step_ms(1, 0, 1, 65) + BARE.step_ms(1, 0, 1, 66)
    assert result.summary().latency_p50_s == pytest.approx(expected_ms / 1e3)


def test_the_tables_survive_the_costs_json_and_a_merge():
    again = costs_from_dict(BARE.as_dict())
    assert again.by_context == TABLES
    assert again.step_ms(8, 4, 5, 8 * 700) == pytest.approx(BARE.step_ms(8, 4, 5, 8 * 700))
    later = dataclasses.replace(BARE, by_context=ContextCosts({2: {64: 55.0, 768: 80.0}}, {2: {64: 300.0}}, {2: 64}))
    merged = BARE.merged(later).by_context
    assert sorted(merged.target_pass_ms) == [1, 2, 8] and merged.reference_tokens == {1: 64, 2: 64, 8: 256}


@pytest.mark.parametrize("data, message", [
    ({"target_pass_ms": {"1": {"64": 1.0}}}, "by_context"),
    ({"target_pass_ms": {}, "target_prefill_ms": {}, "reference_tokens": {}}, "timings"),
    ({"target_pass_ms": {"1": {"64": -1.0}}, "target_prefill_ms": {"1": {"64": 1.0}}, "reference_tokens": {}},
     ">= 0"),
])
def test_bad_tables_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        costs_from_dict(BARE.as_dict() | {"by_context": data})


def test_loop_overheads_leave_the_tables_context_to_the_tables():
    """Steps of 8 rows x 768 slots measured at 215 ms: the table says 212 of it is the pass: 3 ms of loop work."""
    from types import SimpleNamespace

    steps, t_s = [], 0.005
    for _ in range(3):
        t_s += 0.215
        steps.append(SimpleNamespace(batch_size=8, width=1, time_s=t_s, target_cache_slots=768))
    overhead, _ = loop_overheads([SimpleNamespace(prefill_ms=5.0, steps=steps)], [], BARE, k=4)
    assert overhead == {8: pytest.approx(3.0)}


def test_time_context_times_every_context_of_a_tiny_model(tiny_target):
    passes, prefills = time_context(tiny_target.model, 2, contexts=(8, 32), repeats=1)
    assert sorted(passes) == [8, 32] and sorted(prefills) == [8, 32]
    assert all(ms > 0.0 for ms in [*passes.values(), *prefills.values()])
    with pytest.raises(ValueError, match="contexts >= 1"):
        time_context(tiny_target.model, 2, contexts=(0,))


def test_the_sum_rule_charges_each_rows_own_tokens_not_the_padding():
    """Prompts of 100 and 10 tokens in one static batch: "longest" reads 2 x 101 tokens a step, "sum" 101 + 11
    (the lab's eager cache: its padded slots cost nothing measurable)."""
    traffic = Traffic("closed", concurrency=2, requests=(Request(0.0, 100, 2), Request(0.0, 10, 2)), num_requests=2)
    acceptance = AcceptanceProfile.uniform(0.5, model="m")
    costs = StepCosts({(1, 1): 10.0, (2, 1): 10.0}, context_ms_per_token=0.01, model="m")
    summed = dataclasses.replace(costs, context_rule="sum")
    step = lambda c: simulate(traffic, acceptance, c, Off(), "static").summary().latency_p50_s  # noqa: E731
    assert step(costs) == pytest.approx((10.0 + 0.01 * 2 * 101) / 1e3)
    assert step(summed) == pytest.approx((10.0 + 0.01 * (101 + 11)) / 1e3)
    assert costs_from_dict(summed.as_dict()).context_rule == "sum"
    with pytest.raises(ValueError, match="context_rule"):
        dataclasses.replace(costs, context_rule="padded")


def test_loop_overheads_read_the_rows_own_tokens_under_the_sum_rule():
    """A step of 8 rows, slots padded to 768 but 1,536 tokens of their own (192 a row): the table's pass at 192."""
    from types import SimpleNamespace

    summed = dataclasses.replace(BARE, context_rule="sum")
    rows = tuple(SimpleNamespace(target_cache_len=192) for _ in range(8))
    steps, t_s = [], 0.005
    for _ in range(3):
        t_s += (TABLES.pass_ms(8, 192) + 2.0) / 1e3
        steps.append(SimpleNamespace(batch_size=8, width=1, time_s=t_s, target_cache_slots=768, steps=rows))
    overhead, _ = loop_overheads([SimpleNamespace(prefill_ms=5.0, steps=steps)], [], summed, k=4)
    assert overhead == {8: pytest.approx(2.0)}


def test_a_cached_prompt_skips_its_prefill_but_not_its_context():
    """llama-server's prompt cache: a prompt served before is fed one token, and every step still reads all of it."""
    costs = StepCosts({(1, 1): 10.0}, prefill_ms_per_token=2.0, context_ms_per_token=0.01, width_rule="mean",
                      model="m")
    acceptance = AcceptanceProfile.uniform(0.5, model="m")
    run = lambda cached: simulate(  # noqa: E731
        Traffic("closed", concurrency=1, requests=(Request(0.0, 500, 2, cached_tokens=cached),), num_requests=1),
        acceptance, costs, Off(), "continuous").summary()
    assert run(0).ttft_p50_s == pytest.approx(2.0 * 500 / 1e3)
    assert run(499).ttft_p50_s == pytest.approx(2.0 * 1 / 1e3)
    assert run(499).latency_p50_s - run(499).ttft_p50_s == pytest.approx((10.0 + 0.01 * 501) / 1e3)


def test_the_spec_overhead_leaves_the_drafts_prefill_to_the_prefill():
    """A draft model prefills at its first proposal: that step's 900 ms more is the draft prefill, which the
    tables charge; the other steps set the spec overhead (2 ms)."""
    from types import SimpleNamespace

    def run(walls):
        steps, t_s = [], 0.005
        for wall in walls:
            t_s += wall / 1e3
            steps.append(SimpleNamespace(batch_size=1, width=5, time_s=t_s, target_cache_slots=64))
        return SimpleNamespace(prefill_ms=5.0, steps=steps)

    spec_step = BARE.step_ms(1, 4, 5, 64)
    off = run([BARE.step_ms(1, 0, 1, 64)] * 3)
    short = run([spec_step + 900.0, spec_step + 2.0])  # a short run: two steps, the first with the prefill
    assert loop_overheads([off], [short], BARE, k=4)[1] == {1: pytest.approx(2.0)}
    no_draft_table = dataclasses.replace(BARE, by_context=dataclasses.replace(TABLES, draft_prefill_ms={}))
    assert loop_overheads([off], [short], no_draft_table, k=4)[1] == {1: pytest.approx(451.0)}  # kept: the median


def test_acceptance_from_runs_leaves_out_the_steps_the_budget_capped():
    """12 tokens at K = 4: steps with 12, 7 and 2 tokens to come; the first two could draft 4, the third only 1
    (then 0): only the first two count. A capped step's missing positions are the budget's, not the draft's."""
    from types import SimpleNamespace

    from lab.simulate import acceptance_from_runs

    def run(steps):  # (drafted, accepted, emitted) per step
        return SimpleNamespace(steps=[SimpleNamespace(steps=(SimpleNamespace(
            drafted=tuple(range(d)), num_accepted=a, emitted=tuple(range(e)), tree=None),)) for d, a, e in steps])

    full = run([(4, 4, 5), (4, 2, 3), (1, 1, 2), (0, 0, 1), (0, 0, 1)])  # 5 + 3 + 2 + 1 + 1 = 12 tokens
    missed = run([(0, 0, 1)] + [(4, 1, 2)] * 5 + [(1, 0, 1)])  # an n-gram miss first, then 1 accepted a step
    a = acceptance_from_runs([full, missed], k=4, max_new_tokens=12)
    # uncapped steps: full's first two; missed's first five (made 0, 1, 3, 5, 7: room for 4 while 12 - made >= 5)
    assert a.draft_rate == pytest.approx(6 / 7)
    assert a.per_position == pytest.approx((6 / 6, 2 / 6, 1 / 6, 1 / 6))
    with pytest.raises(ValueError, match="did not cap"):
        acceptance_from_runs([full], k=4, max_new_tokens=4)


def test_a_late_join_waits_for_the_step_in_flight():
    """Concurrency 2, one long and then short requests, steps of 10 ms: a short request's successor, sent as it
    ends, joins the next step at once (the lab's loop) or, reaching a busy server mid-step, the one after."""
    costs = StepCosts({(1, 1): 10.0, (2, 1): 10.0}, model="m")
    traffic = Traffic("closed", concurrency=2, requests=(Request(0.0, 4, 20), Request(0.0, 4, 3), Request(0.0, 4, 3)),
                      num_requests=3)
    acceptance = AcceptanceProfile.uniform(0.5, model="m")
    prompt = simulate(traffic, acceptance, costs, Off(), "continuous")
    late = simulate(traffic, acceptance, costs, Off(), "continuous", late_joins=True)
    assert prompt.ttft_s[2] == pytest.approx(0.010)  # its prefill rides the next step: one step
    assert late.ttft_s[2] == pytest.approx(0.020)  # the step in flight, then its own
    assert late.ttft_s[:2] == prompt.ttft_s[:2]  # an idle engine takes the first ones at once


def test_one_acceptance_serves_every_category_of_a_request_log():
    """The Workload page's sliders against a log with categories: each category gets the sliders' acceptance."""
    from lab.simulate.acceptance import CategoryAcceptance

    sliders = AcceptanceProfile.uniform(0.6, model="m")
    spread = sliders.for_every({"code", "qa"})
    assert set(spread.categories) == {"code", "qa"} and spread.model == "m"
    assert spread["qa"] == sliders.categories["all"]
    spread.check_categories({"code", "qa"})
    two = AcceptanceProfile({"a": CategoryAcceptance((0.5,)), "b": CategoryAcceptance((0.9,))})
    with pytest.raises(ValueError, match="one category"):
        two.for_every({"code"})


def test_a_k_by_batch_configuration_says_which_engines_follow_the_table():
    """SGLang and llama.cpp take one K: their lines are a static policy, and the note says so (a trial read
    'Realises: K by batch' over static flags)."""
    from lab.simulate import engine_configs

    configs = engine_configs("k-by-batch", 4, {1: 4, 2: 3, 8: 0}, "prompt-lookup")
    assert "num_speculative_tokens_per_batch_size" in configs["vllm"]
    assert "--spec-draft-n-max 4" in configs["llama.cpp"]
    assert "only vLLM takes a K per batch size" in configs["note"] and "(4)" in configs["note"]
