"""Acceptance rules as pure functions: hand-made cases and distribution convergence."""

from __future__ import annotations

import pytest
import torch

from lab.sampling import SamplingParams, logits_to_probs
from lab.verify import verify_greedy, verify_sampling


def one_hot_logits(argmaxes: list[int], vocab: int = 6) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), vocab)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits  # [K+1, V]


@pytest.mark.parametrize(
    "target_argmax, drafted, num_accepted, next_token",
    [
        ([1, 2, 3, 4], [1, 2, 3], 3, 4),  # all match: bonus is the argmax after the last
        ([1, 2, 3, 4], [1, 5, 3], 1, 2),  # mismatch at 1: correction is the target's token there
        ([1, 2, 3, 4], [0, 2, 3], 0, 1),  # first rejected: later matches do not count
        ([4], [], 0, 4),  # no draft: the target's own next token
    ],
)
def test_verify_greedy_table(target_argmax, drafted, num_accepted, next_token):
    verdict = verify_greedy(one_hot_logits(target_argmax), torch.tensor(drafted, dtype=torch.long))
    assert (verdict.num_accepted, verdict.next_token) == (num_accepted, next_token)


def test_sampling_accepts_when_draft_equals_target():
    # Identical distributions: min(1, p/q) = 1, so every drafted token is accepted.
    probs = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), -1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        verdict = verify_sampling(probs, torch.tensor([2, 0, 5]), probs[:3], gen)
        assert verdict.num_accepted == 3
        assert verdict.acceptance_probs == pytest.approx((1.0, 1.0, 1.0))


def test_sampling_never_accepts_token_the_target_forbids():
    target = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])  # token 0 impossible at position 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        verdict = verify_sampling(target, torch.tensor([0]), None, gen)
        assert verdict.num_accepted == 0
        assert verdict.next_token in (1, 2)  # residual: target with token 0 removed


def empirical_tv(target: torch.Tensor, draft: torch.Tensor | None, draft_token_fn, samples: int, seed: int) -> float:
    """Total variation between the first emitted token's frequencies and the target's distribution."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(target.shape[-1])
    for _ in range(samples):
        token = draft_token_fn(gen)
        verdict = verify_sampling(target, torch.tensor([token]), None if draft is None else draft[None], gen)
        emitted = token if verdict.num_accepted == 1 else verdict.next_token
        counts[emitted] += 1
    return 0.5 * float((counts / samples - target[0]).abs().sum())


@pytest.mark.parametrize("drafter", ["model", "deterministic"])
def test_rejection_sampling_converges_to_target(drafter):
    """As vLLM tests its rejection sampler: TV distance to the target shrinks with samples."""
    g = torch.Generator().manual_seed(3)
    target = torch.softmax(2 * torch.randn(2, 8, generator=g), -1)  # [K+1=2, V=8]
    draft = torch.softmax(2 * torch.randn(8, generator=g), -1)  # a different distribution
    if drafter == "model":
        draw = lambda gen: int(torch.multinomial(draft, 1, generator=gen))  # noqa: E731
        draft_probs = draft
    else:
        draw = lambda gen: 3  # noqa: E731  always proposes token 3 (one-hot draft)
        draft_probs = None
    tv_small = empirical_tv(target, draft_probs, draw, 500, seed=0)
    tv_large = empirical_tv(target, draft_probs, draw, 20000, seed=1)
    assert tv_large < 0.02
    assert tv_large < tv_small


def test_treating_greedy_draft_as_soft_distribution_is_biased():
    """The wrong rule: a draft that always proposes its argmax but reports its soft probabilities."""
    g = torch.Generator().manual_seed(5)
    target = torch.softmax(2 * torch.randn(2, 8, generator=g), -1)
    draft = torch.softmax(2 * torch.randn(8, generator=g), -1)
    argmax = int(draft.argmax())
    tv_wrong = empirical_tv(target, draft, lambda gen: argmax, 20000, seed=2)
    tv_right = empirical_tv(target, None, lambda gen: argmax, 20000, seed=2)
    assert tv_right < 0.02
    assert tv_wrong > 0.05


@pytest.mark.parametrize(
    "params, expected_support",
    [
        (SamplingParams(temperature=0.0), {4}),
        (SamplingParams(temperature=1.0, top_k=2), {4, 3}),
        (SamplingParams(temperature=1.0, top_p=0.5), {4}),  # top token alone has mass > 0.5
        (SamplingParams(temperature=1.0), {0, 1, 2, 3, 4}),
    ],
)
def test_logits_to_probs_support(params, expected_support):
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 6.0])
    probs = logits_to_probs(logits, params)
    assert set(torch.nonzero(probs).flatten().tolist()) == expected_support
    assert float(probs.sum()) == pytest.approx(1.0)
