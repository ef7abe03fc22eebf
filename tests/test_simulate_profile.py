"""The decode loop's own work in the step-cost model (lab.simulate.profile, StepCosts' overhead terms)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from lab.simulate import AcceptanceProfile, Off, StaticK, StepCosts, Traffic, costs_from_dict, simulate
from lab.simulate.costs import costs_from_serve_bench
from lab.simulate.profile import loop_overheads, prefill_per_token_ms, profile_loop, step_walls_ms, with_loop_profile

BARE = StepCosts({(1, 1): 10.0, (1, 5): 14.0, (8, 1): 20.0, (8, 5): 40.0}, {1: 1.0, 8: 2.0}, model="m")


def fake_run(steps: list[tuple[int, int, float, int]], prefill_ms: float = 5.0) -> SimpleNamespace:
    """A BatchResult-like run: steps as (batch size, width, wall ms, cache slots per row), their time_s accumulated."""
    events, t_s = [], prefill_ms / 1e3
    for b, width, wall_ms, slots in steps:
        t_s += wall_ms / 1e3
        events.append(SimpleNamespace(batch_size=b, width=width, time_s=t_s, target_cache_slots=slots))
    return SimpleNamespace(prefill_ms=prefill_ms, steps=events)


def test_the_overhead_adds_to_every_step_and_the_spec_overhead_only_when_drafting():
    costs = dataclasses.replace(BARE, overhead_ms={1: 1.0, 8: 8.0}, spec_overhead_ms={1: 0.5, 8: 4.0})
    assert costs.step_ms(1, 0) == pytest.approx(10.0 + 1.0)
    assert costs.step_ms(1, 4) == pytest.approx(14.0 + 4 * 1.0 + 1.0 + 0.5)
    assert costs.step_ms(8, 4) == pytest.approx(40.0 + 4 * 2.0 + 8.0 + 4.0)
    assert costs.overhead(4, 0) == pytest.approx(4.0)  # linear between the measured batch sizes
    assert costs.overhead(16, 0) == pytest.approx(16.0)  # and beyond them
    assert BARE.overhead(8, 4) == 0.0  # unmeasured: no term


def test_overheads_survive_the_costs_json():
    costs = dataclasses.replace(BARE, overhead_ms={1: 1.5, 8: 9.0}, spec_overhead_ms={8: 3.0})
    again = costs_from_dict(costs.as_dict())
    assert again.overhead_ms == {1: 1.5, 8: 9.0} and again.spec_overhead_ms == {8: 3.0}
    assert again.step_ms(8, 4) == costs.step_ms(8, 4)


@pytest.mark.parametrize("field, value, message", [
    ("overhead_ms", {1: -1.0}, "times >= 0"),
    ("overhead_ms", {0: 1.0}, "batch sizes and widths >= 1"),
    ("spec_overhead_ms", {-2: 1.0}, "batch sizes and widths >= 1"),
])
def test_bad_overheads_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BARE, **{field: value})


def test_loop_overheads_are_the_median_wall_time_beyond_the_bare_passes():
    # off: steps at B = 8 take 26-28 ms (bare 20: overhead median 7); the run's tail at B = 1 is not a profile
    # of B = 1 (too few steps) and is left out; a run that starts at B = 1 is (bare 10, +2)
    off = fake_run([(8, 1, 27.0, 0.0), (8, 1, 26.0, 0.0), (8, 1, 28.0, 0.0), (1, 1, 99.0, 0.0), (1, 1, 99.0, 0.0)])
    alone = fake_run([(1, 1, 12.0, 0.0), (1, 1, 12.5, 0.0), (1, 1, 11.5, 0.0)])
    # on: B = 8 at width 5: bare 40 + 4 drafts x 2 + overhead 7 = 55; measured 58 -> spec overhead 3;
    # a step where no row drafted (width 1) is still charged the drafts: 20 + 8 + 7 + 3 = 38
    on = fake_run([(8, 5, 58.0, 8.0), (8, 1, 38.0, 8.0), (8, 5, 58.0, 8.0)])
    overhead, spec_overhead = loop_overheads([off, alone], [on], BARE, k=4)
    assert overhead == {8: pytest.approx(7.0), 1: pytest.approx(2.0)}
    assert spec_overhead == {8: pytest.approx(3.0)}
    # a step faster than its bare pass (noise) never makes a negative cost
    fast = fake_run([(1, 1, 8.0, 0.0)])
    assert loop_overheads([fast], [], BARE, k=4)[0] == {1: 0.0}


def test_merged_costs_take_the_later_timings_where_both_have_one():
    early = dataclasses.replace(BARE, overhead_ms={1: 1.0, 8: 8.0})
    later = StepCosts({(8, 1): 25.0}, {8: 3.0}, prefill_ms_per_token=2.0, model="m", overhead_ms={8: 9.0})
    both = early.merged(later)
    assert both.target_ms[(8, 1)] == 25.0 and both.target_ms[(1, 5)] == 14.0
    assert both.overhead_ms == {1: 1.0, 8: 9.0} and both.draft_ms_per_token == {1: 1.0, 8: 3.0}
    assert both.prefill_ms_per_token == 2.0 and both.step_ms(8, 0) == pytest.approx(25.0 + 9.0)


def test_the_first_steps_wall_time_starts_after_the_prefill():
    run = fake_run([(2, 1, 30.0, 0.0), (2, 1, 31.0, 0.0)], prefill_ms=100.0)
    assert [round(w, 6) for _, _, w, _, _ in step_walls_ms(run)] == [30.0, 31.0]
    assert prefill_per_token_ms([run], [50]) == pytest.approx(2.0)


def test_loop_overheads_refuse_no_off_steps_and_k_zero():
    with pytest.raises(ValueError, match="speculation off"):
        loop_overheads([], [], BARE, k=4)
    with pytest.raises(ValueError, match="K >= 1"):
        loop_overheads([fake_run([(1, 1, 12.0, 0.0)])], [], BARE, k=0)


def test_the_simulator_charges_the_overhead_per_step():
    """One request alone, speculation off, T = 10 + 2 ms: n tokens take prefill + (n - 1) x 12 ms."""
    costs = dataclasses.replace(BARE, overhead_ms={1: 2.0})
    traffic = Traffic("closed", concurrency=1, num_requests=3, output_tokens=11)
    result = simulate(traffic, AcceptanceProfile.uniform(0.5, model="m"), costs, Off(), seed=0).summary()
    assert result.latency_p50_s == pytest.approx(10 * 12.0 / 1e3)


def test_a_real_loop_profile_on_a_tiny_model(tiny_target):
    from lab.drafters import make_drafter

    drafter = make_drafter("prompt-lookup", tiny_target, None)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12, 9, 10]]
    off_runs, on_runs, prompt_tokens = profile_loop(tiny_target, drafter, prompts, [1, 2], k=2, max_new_tokens=6)
    assert prompt_tokens == [8, 16] and len(off_runs) == len(on_runs) == 2  # padded: 2 rows x 8
    bare = StepCosts({(1, 1): 0.0, (2, 1): 0.0, (2, 3): 0.0}, model="tiny")
    costs = with_loop_profile(bare, off_runs, on_runs, prompt_tokens, k=2)
    assert set(costs.overhead_ms) == {1, 2}  # zero bare cost: the whole wall time is the loop's
    assert all(ms > 0 for ms in costs.overhead_ms.values())
    assert costs.prefill_ms_per_token > 0 and "decode-loop profile" in costs.source
    assert simulate(Traffic(num_requests=4, output_tokens=6), AcceptanceProfile.uniform(0.5, model="tiny"), costs,
                    StaticK(2), seed=0).summary().latency_p50_s > 0
    with pytest.raises(ValueError, match="batch sizes >= 1"):
        profile_loop(tiny_target, drafter, prompts, [0], k=2)


def test_serve_bench_costs_read_the_launched_servers_settings():
    """serve-bench --llama-target records its servers under settings.llama_server: the model and K come from there."""
    record = {"ok": True, "server_predicted_ms": 310.0, "output_tokens": 32, "input_tokens": 40,
              "server_prompt_ms": 80.0, "draft_tokens": 40, "accepted_tokens": 20, "spec_steps": 10}
    bench = {"settings": {"endpoints": [{"label": "on"}, {"label": "off"}],
                          "llama_server": {"target": "qwen2.5-coder-1.5b", "draft": "qwen2.5-coder-0.5b", "k": 3}},
             "engines": {}, "levels": [
                 {"label": "on", "max_concurrency": 1, "requests": [record]},
                 {"label": "off", "max_concurrency": 1,
                  "requests": [record | {"server_predicted_ms": 155.0, "server_prompt_ms": 40.0}]}]}
    costs = costs_from_serve_bench(bench)
    assert costs.model == "qwen2.5-coder-1.5b"
    assert costs.target_ms == {(1, 4): pytest.approx(31.0), (1, 1): pytest.approx(5.0)}
    assert costs.prefill_ms_per_token == pytest.approx(1.5)  # both endpoints' (80 and 40 ms over 40 tokens)
    assert costs_from_serve_bench(bench, prefill_label="on").prefill_ms_per_token == pytest.approx(2.0)
    assert costs_from_serve_bench(bench, prefill_label="off").prefill_ms_per_token == pytest.approx(1.0)
    with pytest.raises(ValueError, match="measured on 'qwen2.5-coder-1.5b'"):
        costs.check_model("smollm2-135m")


def test_cached_costs_without_the_loop_profile_or_the_context_tables_count_as_none(tmp_path, monkeypatch):
    """An older cached file is timed again: bare passes alone predicted a batch of 8 21-30 % too fast, and one
    context slope missed a padded batch of long prompts."""
    import json

    from lab.simulate import measure
    from lab.simulate.costs import ContextCosts

    path = tmp_path / "costs.json"
    monkeypatch.setattr(measure, "costs_path", lambda *args, **kwargs: path)
    path.write_text(json.dumps(BARE.as_dict()))
    assert measure.cached_costs("m", "prompt-lookup") is None
    looped = dataclasses.replace(BARE, overhead_ms={1: 2.0}, context_ms_per_token=0.01)
    path.write_text(json.dumps(looped.as_dict()))
    assert measure.cached_costs("m", "prompt-lookup") is None
    tables = ContextCosts({1: {64: 10.0, 512: 12.0}}, {1: {64: 30.0, 512: 200.0}}, {1: 100})
    path.write_text(json.dumps(dataclasses.replace(looped, by_context=tables).as_dict()))
    cached = measure.cached_costs("m", "prompt-lookup")
    assert cached.overhead_ms == {1: 2.0} and cached.by_context == tables


def test_the_prefill_yields_the_first_token_as_the_simulator_counts_it():
    """The loop's first token costs its prefill and its first step: per prompt token plus a fixed first step."""
    off = [fake_run([(1, 1, 12.0, 0.0), (1, 1, 12.0, 0.0)], prefill_ms=100.0),
           fake_run([(8, 1, 30.0, 0.0), (8, 1, 27.0, 0.0)], prefill_ms=400.0)]
    on = [fake_run([(1, 5, 20.0, 4.0)], prefill_ms=100.0), fake_run([(8, 5, 50.0, 8.0)], prefill_ms=400.0)]
    costs = with_loop_profile(BARE, off, on, [50, 200], k=4)
    assert costs.prefill_ms_per_token == pytest.approx(2.0)
    assert costs.prefill_fixed_ms == pytest.approx(21.0)  # the median of the off runs' first steps, 12 and 30
    assert costs.prefill_ms(50) == pytest.approx(121.0)


def test_the_context_term_counts_a_padded_batch_as_rows_times_the_longest_row():
    """Two requests, prompts of 100 and 10 tokens, one step each: padded, the step reads 2 x 101 slots."""
    from lab.simulate import Request

    costs = StepCosts({(1, 1): 10.0, (2, 1): 10.0}, context_ms_per_token=0.01, model="m")
    traffic = Traffic("closed", concurrency=2, requests=(Request(0.0, 100, 2), Request(0.0, 10, 2)), num_requests=2)
    acceptance = AcceptanceProfile.uniform(0.5, model="m")
    padded = simulate(traffic, acceptance, costs, Off(), "static", seed=0).summary()
    flat = simulate(traffic, acceptance, dataclasses.replace(costs, width_rule="mean"), Off(), "static").summary()
    assert padded.latency_p50_s == pytest.approx((10.0 + 0.01 * 2 * 101) / 1e3)
    assert flat.latency_p50_s == pytest.approx((10.0 + 0.01 * (101 + 11)) / 1e3)
    # and the prefill pads the same way: 1 ms a token, 2 x 100 padded against 110 flattened
    prefilled = dataclasses.replace(costs, prefill_ms_per_token=1.0, context_ms_per_token=0.0)
    assert simulate(traffic, acceptance, prefilled, Off(), "static").summary().ttft_p50_s == pytest.approx(0.2)
    assert simulate(traffic, acceptance, dataclasses.replace(prefilled, width_rule="mean"), Off(),
                    "static").summary().ttft_p50_s == pytest.approx(0.11)


def test_loop_overheads_leave_the_context_term_to_the_context():
    """A step of 8 rows x 100 slots at 0.01 ms a token: 8 ms of it is context, not the loop's own work."""
    costs = dataclasses.replace(BARE, context_ms_per_token=0.01)
    overhead, _ = loop_overheads([fake_run([(8, 1, 30.0, 100)] * 3)], [], costs, k=4)
    assert overhead == {8: pytest.approx(30.0 - 20.0 - 8.0)}


def test_serve_bench_costs_fit_a_context_slope_per_endpoint():
    """Two requests alone on the "on" endpoint, 10 steps each: 400 ms a step at 50 tokens of context, 500 at 550
    (0.2 ms a token); at concurrency 2 a step of 1,000 ms over two slots of 300 tokens is 880 ms bare."""
    def record(prompt, step_ms):
        return {"ok": True, "server_predicted_ms": 10 * step_ms, "output_tokens": 16, "input_tokens": prompt,
                "server_prompt_ms": 1.0 * prompt, "draft_tokens": 40, "accepted_tokens": 5, "spec_steps": 10}
    bench = {"settings": {"endpoints": [{"label": "on"}, {"label": "off"}], "llama_server": {"k": 4}},
             "engines": {}, "levels": [
                 {"label": "on", "max_concurrency": 1, "requests": [record(42, 400.0), record(542, 500.0)]},
                 {"label": "on", "max_concurrency": 2, "requests": [record(292, 1000.0), record(292, 1000.0)]},
                 {"label": "off", "max_concurrency": 1, "requests": [record(42, 50.0) | {"draft_tokens": 0}]}]}
    costs = costs_from_serve_bench(bench, prefill_label="on")
    assert costs.context_ms_per_token == pytest.approx(0.2)
    assert costs.target_ms[(1, 5)] == pytest.approx(450.0 - 0.2 * 300)  # the median step less its mean context
    assert costs.target_ms[(2, 5)] == pytest.approx(1000.0 - 0.2 * 2 * 300)
    assert costs.step_ms(1, 4, 5, 550) == pytest.approx(500.0)  # the simulator gets the long request back
    assert costs.target_ms[(1, 1)] == pytest.approx(10 * 50.0 / 15)  # the other endpoint's: charged no slope
    assert costs_from_serve_bench(bench).context_ms_per_token == 0.0  # both endpoints pooled: no slope
