"""A serving engine's steps read back from its streamed tokens, and the llama-server costs built on them."""

from __future__ import annotations

import dataclasses

import pytest

from lab.simulate import (
    AcceptanceProfile,
    Off,
    Request,
    StaticK,
    StepCosts,
    Traffic,
    acceptance_by_prompt,
    costs_from_dict,
    simulate,
)
from lab.simulate.costs import costs_from_serve_bench
from lab.simulate.server_steps import server_steps
from lab.theory import expected_tokens_per_step


def stream(prompt_id: str, sent_s: float, token_times_s: list[float], prompt: int = 50, **extra) -> dict:
    """A serve-bench record whose tokens arrived at token_times_s (s from the run's start)."""
    gaps = [(b - a) * 1e3 for a, b in zip(token_times_s, token_times_s[1:])]
    return {"prompt_id": prompt_id, "ok": True, "start_s": sent_s, "ttft_ms": (token_times_s[0] - sent_s) * 1e3,
            "itl_ms": gaps, "input_tokens": prompt, "output_tokens": len(token_times_s),
            "server_predicted_ms": (token_times_s[-1] - token_times_s[0]) * 1e3, "server_prompt_ms": 10.0} | extra


def two_row_run() -> list[dict]:
    """An engine that processed two prompts together (first tokens at 0.10 s), then stepped both rows for 0.30 s a
    step (each step 3 tokens a row: two accepted drafts and the target's own), then row b alone at 0.20 s a step,
    its last steps with the draft cut by the budget of 9 tokens."""
    a = [0.10] + [0.40] * 3 + [0.70] * 3 + [1.00] * 2  # 9 tokens; its last step made 2
    b = [0.10] + [0.40] * 3 + [0.70] * 3 + [1.00] + [1.20]  # row b: 1 token at 1.00, the last alone at 1.20
    return [stream("a", 0.0, a, prompt=40), stream("b", 0.0, b, prompt=300)]


def test_steps_are_the_clusters_of_streamed_tokens_with_their_rows_widths_and_contexts():
    steps = server_steps(two_row_run(), k=3)
    assert [round(s.ms) for s in steps] == [300, 300, 300, 200]
    assert [s.rows for s in steps] == [2, 2, 2, 1]
    assert [s.tokens for s in steps] == [6, 6, 3, 1]
    assert all(s.decode for s in steps)  # the first tokens came before the first step seen
    # before the third step each row had 7 of its 9 tokens: the draft is cut to 9 - 7 - 1 = 1, width 2
    assert [s.widths for s in steps] == [(4, 4), (4, 4), (2, 2), (1,)]
    assert steps[0].contexts == (41, 301) and steps[3].contexts == (308,)


def test_a_step_that_started_a_prompt_is_not_a_decode_step():
    run = two_row_run() + [stream("c", 0.55, [0.70, 1.00], prompt=20)]  # sent mid-step, first token at 0.70
    steps = server_steps(run, k=3)
    assert [s.decode for s in steps] == [True, False, True, True]
    assert steps[1].rows == 3  # c's prompt was processed in the step that gave a and b their third tokens


def test_bad_input():
    with pytest.raises(ValueError, match="k >= 0"):
        server_steps([], k=-1)
    assert server_steps([{"ok": False}], k=1) == []
    assert server_steps([stream("a", 0.0, [0.1, 0.2]) | {"itl_ms": []}], k=1) == []  # gaps missing: left out


def bench(levels: list[dict], k: int = 3) -> dict:
    return {"settings": {"endpoints": [{"label": "on"}, {"label": "off"}], "llama_server": {"k": k}},
            "engines": {}, "levels": levels}


def test_llama_server_costs_come_from_the_steps_at_the_batch_each_step_had():
    """The per-request average would charge row b's cheap lone step to batch 2; the steps say 300 ms at 2 rows."""
    off = [stream("a", 0.0, [0.1 + 0.05 * i for i in range(9)], prompt=40)]
    costs = costs_from_serve_bench(bench([{"label": "on", "max_concurrency": 2, "requests": two_row_run()},
                                          {"label": "off", "max_concurrency": 1, "requests": off}]))
    # only steps in which every row drafted K = 3: the two full two-row steps (the third is cut, the fourth alone
    # and cut too)
    assert costs.target_ms == {(2, 4): pytest.approx(300.0), (1, 1): pytest.approx(50.0)}
    assert costs.prefill_at_least_a_pass and costs.width_rule == "mean"
    # a prompt served from the cache still costs a one-token pass over its rows
    assert costs.prefill_ms(1, rows=1) == pytest.approx(50.0)
    assert costs_from_dict(costs.as_dict()) == costs


def test_llama_server_context_is_read_to_the_longest_slot_padded_to_256():
    """One-row steps of 400 ms at a 40-token context (pads to 256) and 450 ms at 300 (pads to 512): 50 ms more per
    256 cells read. A two-row step with rows of 40 and 300 tokens reads 2 x 512 cells."""
    alone = [stream("a", 0.0, [0.1, 0.5, 0.9], prompt=40), stream("b", 1.0, [1.1, 1.55, 2.0], prompt=300)]
    off = [stream("a", 0.0, [0.1, 0.15, 0.2], prompt=40)]
    costs = costs_from_serve_bench(bench([{"label": "on", "max_concurrency": 1, "requests": alone},
                                          {"label": "off", "max_concurrency": 1, "requests": off}], k=1),
                                   prefill_label="on")
    assert costs.context_ms_per_token == pytest.approx(50.0 / 256)
    assert costs.context_pad == 256
    assert costs.target_ms[(1, 2)] == pytest.approx(400.0 - 50.0)  # the median step less its 256 cells
    assert costs.target_ms[(1, 1)] == pytest.approx(50.0)  # the other endpoint's: charged nothing
    traffic = Traffic("closed", concurrency=2, requests=(Request(0.0, 40, 2), Request(0.0, 300, 2)), num_requests=2)
    acceptance = AcceptanceProfile.uniform(0.0)
    flat = StepCosts({(1, 1): 100.0, (2, 1): 100.0}, context_ms_per_token=0.1, width_rule="mean")
    padded = dataclasses.replace(flat, context_pad=256)
    # one decode step after the prefill: flat reads 41 + 301 tokens; padded 2 x 512
    assert simulate(traffic, acceptance, flat, Off()).summary().latency_p50_s == pytest.approx(
        simulate(traffic, acceptance, flat, Off()).summary().ttft_p50_s + (100.0 + 0.1 * 342) / 1e3)
    assert simulate(traffic, acceptance, padded, Off()).summary().latency_p50_s == pytest.approx(
        simulate(traffic, acceptance, padded, Off()).summary().ttft_p50_s + (100.0 + 0.1 * 1024) / 1e3)
    with pytest.raises(ValueError, match="context_pad"):
        dataclasses.replace(flat, context_pad=-1)


def test_acceptance_by_prompt_gives_each_prompt_its_own_rate():
    """Prompt a accepted 12 of 12 drafted tokens; b 9 of 22: a's mean acceptance length is 1 + K, b's 1 + 4 x 9/22."""
    def record(prompt_id, drafted, accepted):
        return stream(prompt_id, 0.0, [0.1, 0.2]) | {"draft_tokens": drafted, "accepted_tokens": accepted}
    data = bench([{"label": "on", "max_concurrency": 1, "requests": [record("a", 12, 12), record("b", 22, 9)],
                   "spec_decode_num_drafts": 9, "spec_decode_per_position_acceptance_rates": [0.9, 0.7, 0.5, 0.3]}],
                 k=4)
    profile = acceptance_by_prompt(data)
    assert set(profile.categories) == {"all", "a", "b"}
    assert profile.categories["all"].per_position == pytest.approx((0.9, 0.7, 0.5, 0.3))
    assert profile.categories["a"].per_position[0] == pytest.approx(1.0)
    a_b = profile.categories["b"].per_position[0]
    assert expected_tokens_per_step(a_b, 4) == pytest.approx(1 + 4 * 9 / 22, rel=1e-6)
    # requests keep their own rate in the simulator: a finishes 16 tokens in 3 steps of 5, always
    costs = StepCosts({(1, 1): 10.0, (1, 5): 10.0})
    traffic = Traffic("closed", concurrency=1, requests=(Request(0.0, 5, 16, "a"),), num_requests=1)
    result = simulate(traffic, profile, costs, StaticK(4))
    assert result.steps == 1 + 3
    with pytest.raises(ValueError, match="no per-request draft counts"):
        acceptance_by_prompt(bench([{"label": "on", "max_concurrency": 1, "requests": [stream("a", 0.0, [0.1])]}]))
