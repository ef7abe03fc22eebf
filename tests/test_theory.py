"""Leviathan formulas against hand-computed values."""

from __future__ import annotations

import math

import pytest

from lab.theory import acceptance_from_mean_length, best_k, expected_speedup, expected_tokens_per_step


@pytest.mark.parametrize(
    "a, k, tokens",
    [
        (0.8, 4, 3.3616),  # (1 - 0.8^5) / 0.2 = (1 - 0.32768) / 0.2
        (0.0, 4, 1.0),  # nothing accepted: the target's own token only
        (1.0, 4, 5.0),  # everything accepted: K + the bonus token
        (0.5, 1, 1.5),  # (1 - 0.25) / 0.5
    ],
)
def test_expected_tokens_per_step(a, k, tokens):
    assert expected_tokens_per_step(a, k) == pytest.approx(tokens)


def test_expected_speedup_with_verify_cost_hand_value():
    # a=0.8, K=4: 3.3616 tokens per step; a verify pass costing 1.5 steps and c=0.05: 3.3616 / (0.2 + 1.5).
    assert expected_speedup(0.8, 4, 0.05, verify_cost=1.5) == pytest.approx(1.97741, abs=1e-4)
    assert expected_speedup(0.8, 4, 0.05, verify_cost=1.0) == expected_speedup(0.8, 4, 0.05)
    with pytest.raises(ValueError, match="v > 0"):
        expected_speedup(0.8, 4, 0.05, verify_cost=0.0)


def test_best_k_with_a_verify_cost_prefers_shorter_drafts():
    # a=0.8, c=0.05: with v = 1 the best K is large; a verify pass that costs 2 steps leaves fewer tokens per second at every K.
    k_free, s_free = best_k(0.8, 0.05)
    k_costly, s_costly = best_k(0.8, 0.05, verify_cost=2.0)
    assert s_costly < s_free
    assert s_costly == pytest.approx(max(expected_speedup(0.8, k, 0.05, 2.0) for k in range(1, 17)))
    assert k_costly == max(range(1, 17), key=lambda k: expected_speedup(0.8, k, 0.05, 2.0))
    # With a free drafter at a = 0.9 the largest K wins whatever the single v (it scales every K alike).
    assert best_k(0.9, 0.0, 8, verify_cost=2.0) == (8, pytest.approx(expected_speedup(0.9, 8, 0.0) / 2.0))


def test_expected_speedup_hand_value():
    # The example: a=0.8, K=4, c=0.05 -> 3.3616 / 1.2 = 2.8013
    assert expected_speedup(0.8, 4, 0.05) == pytest.approx(2.8013, abs=1e-4)


def test_speculation_loses_when_acceptance_below_cost_at_k1():
    # K=1: speedup = (1 + a) / (1 + c) < 1 exactly when a < c.
    assert expected_speedup(0.3, 1, 0.4) < 1.0
    assert expected_speedup(0.5, 1, 0.4) > 1.0


@pytest.mark.parametrize("a, k", [(0.1, 2), (0.6, 4), (0.9, 8), (0.999, 3)])
def test_acceptance_from_mean_length_inverts(a, k):
    assert acceptance_from_mean_length(expected_tokens_per_step(a, k), k) == pytest.approx(a, abs=1e-6)


def test_acceptance_from_mean_length_edges():
    assert math.isnan(acceptance_from_mean_length(math.nan, 4))
    with pytest.raises(ValueError, match=r"requires a value in \[1, 5\] for K=4; got 6.0"):
        acceptance_from_mean_length(6.0, 4)


def test_best_k_prefers_long_drafts_when_cheap_and_accepted():
    k_cheap, _ = best_k(0.9, 0.01)
    k_dear, _ = best_k(0.6, 0.3)
    assert k_cheap > k_dear
    assert best_k(0.8, 0.05) == (max(range(1, 17), key=lambda k: expected_speedup(0.8, k, 0.05)), pytest.approx(max(expected_speedup(0.8, k, 0.05) for k in range(1, 17))))


def test_bad_inputs_say_what_was_expected():
    with pytest.raises(ValueError, match="requires 0 <= a <= 1; got 1.5"):
        expected_tokens_per_step(1.5, 4)
    with pytest.raises(ValueError, match="requires c >= 0; got -0.1"):
        expected_speedup(0.5, 4, -0.1)


def test_best_k_with_a_measured_v_per_k():
    # One v for every K flatters large K; a v(K) that grows picks a smaller K (the calibration's choice).
    assert best_k(0.4, 0.0, 16, verify_cost=1.0)[0] == 16
    k, speedup = best_k(0.4, 0.0, verify_costs={1: 0.94, 2: 1.00, 4: 1.13, 8: 1.22})
    assert k == 2 and speedup == pytest.approx(expected_speedup(0.4, 2, 0.0, 1.00))
