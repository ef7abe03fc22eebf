"""Training smoke test: on a tiny random target the loss falls and acceptance on what it was shown rises.

A random tiny target has no structure for a one-layer head to generalise from
(measured: held-out acceptance at position 1 moves from 0.05 to 0.11), so the test
checks learning on the training prompts; generalisation is measured on real
targets (README, "Measured").
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY_VOCAB
from lab.drafters import EagleHead, EagleHeadConfig
from lab.train_head import TrainConfig, collect_samples, heldout_acceptance, train_head


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, TINY_VOCAB) for _ in range(rng.randrange(2, 8))] for _ in range(count)]


def test_training_lowers_the_loss_and_raises_acceptance(tiny_target):
    samples = collect_samples(tiny_target, random_prompts(48, seed=0), max_new_tokens=24, batch_size=16)
    assert len(samples) == 48
    first = samples[0]
    # Labels are the target's own greedy choices: after the prompt they are the next generated token.
    assert first.features.shape == (first.ids.numel(), tiny_target.model.config.hidden_size)
    assert torch.equal(first.labels[-25:-1], first.ids[-24:])
    config = TrainConfig(max_train_s=120, epochs=30, lr=1e-2, batch_sequences=8, intermediate_size=64, loss_vocab=0,
                         feature_weight=0.1)
    shown = random_prompts(48, seed=0)[:6]
    torch.manual_seed(0)
    untrained = EagleHead(EagleHeadConfig.for_target(tiny_target.model, 64)).eval().requires_grad_(False)
    before = heldout_acceptance(tiny_target, untrained, shown, k=4, max_new_tokens=24)
    head, report = train_head(tiny_target, samples, config)
    after = heldout_acceptance(tiny_target, head, shown, k=4, max_new_tokens=24)
    early, late = sum(report.losses[:5]) / 5, sum(report.losses[-5:]) / 5
    assert late < 0.4 * early, f"loss {early:.3f} -> {late:.3f}"
    assert report.steps == 30 * 6 and report.stopped_by == "epochs"
    # Measured: position-1 acceptance 0.01 -> 0.62, mean acceptance length 1.01 -> 2.22, loss 4.6 -> 1.2.
    assert before.per_position_acceptance_rate[0] < 0.15
    assert after.per_position_acceptance_rate[0] > 0.45
    assert after.mean_acceptance_length > before.mean_acceptance_length + 0.6, (before.as_dict(), after.as_dict())
    assert not head.training and not any(p.requires_grad for p in head.parameters())


def test_time_budget_stops_training(tiny_target):
    samples = collect_samples(tiny_target, random_prompts(8, seed=1), max_new_tokens=8)
    head, report = train_head(tiny_target, samples, TrainConfig(max_train_s=1e-3, epochs=50, batch_sequences=2, intermediate_size=16))
    assert report.stopped_by == "time budget" and report.steps == 1


def test_train_config_refuses_bad_values():
    with pytest.raises(ValueError, match="unroll requires 1 or 2; got 3"):
        TrainConfig(unroll=3)
    with pytest.raises(ValueError, match="max_train_s > 0"):
        TrainConfig(max_train_s=0)
