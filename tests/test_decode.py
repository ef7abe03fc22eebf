"""Exactness: speculative greedy output equals the target alone, whatever the drafter."""

from __future__ import annotations

import pytest
import torch

from conftest import NoisyOracle, OracleDrafter, TinyLM, reference_greedy
from lab.kv import new_cache, new_kv_cache
from lab.config import DecodeConfig
from lab.drafters import DraftModelDrafter, PromptLookupDrafter
from lab.decode import decode, run
from lab.trace import Finished, Prefilled, Step

PROMPTS = [
    [5, 9, 12, 5, 9, 30, 7],
    [3],
    [11, 12, 13, 14, 11, 12, 13, 14, 11, 12],
]




@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("drafter_kind", ["none", "agree", "disagree", "prompt-lookup", "draft-model"])
def test_greedy_equals_target_alone(tiny_target, tiny_draft, prompt, k, drafter_kind):
    reference = reference_greedy(tiny_target.model, prompt, 24)
    drafter = {
        "none": None,
        "agree": OracleDrafter(reference, len(prompt), agree=True),
        "disagree": OracleDrafter(reference, len(prompt), agree=False),
        "prompt-lookup": PromptLookupDrafter(1, 3),
        "draft-model": DraftModelDrafter(tiny_draft.model),
    }[drafter_kind]
    result = run(tiny_target, prompt, drafter, DecodeConfig(k=k, max_new_tokens=24))
    assert result.token_ids == reference
    assert result.reason == "max_new_tokens"


def test_always_agree_accepts_everything_and_takes_bonus(tiny_target):
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 20)
    result = run(tiny_target, prompt, OracleDrafter(reference, len(prompt), True), DecodeConfig(k=4, max_new_tokens=20))
    # 20 tokens in steps of 4 accepted + 1 bonus: 4 full steps of 5.
    assert [len(s.emitted) for s in result.steps] == [5, 5, 5, 5]
    assert all(s.final_kind == "bonus" for s in result.steps)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.mean_acceptance_length == 5.0
    assert result.stats.target_forward_passes == 4


def test_never_agree_emits_one_corrected_token_per_step(tiny_target):
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 10)
    result = run(tiny_target, prompt, OracleDrafter(reference, len(prompt), False), DecodeConfig(k=3, max_new_tokens=10))
    assert [s.num_accepted for s in result.steps] == [0] * 10
    assert all(s.final_kind == "corrected" and s.rejected == (s.drafted[0],) for s in result.steps[:-1])
    # With one token of budget left nothing is drafted: the last step is the target's alone.
    assert result.steps[-1].drafted == () and result.steps[-1].final_kind == "target"
    assert result.stats.acceptance_rate == 0.0
    assert result.stats.num_drafts == 9
    assert result.stats.per_position_acceptance_rate == [0.0, 0.0, 0.0]


def test_target_alone_steps_are_plain_decode_steps(tiny_target):
    result = run(tiny_target, PROMPTS[0], None, DecodeConfig(max_new_tokens=6))
    assert [s.emitted for s in result.steps] == [(t,) for t in result.token_ids]
    assert all(s.final_kind == "target" and s.drafted == () for s in result.steps)
    assert result.stats.num_drafts == 0
    assert result.stats.target_forward_passes == 6



@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("k", [2, 5])
def test_target_cache_equals_fresh_prefill(tiny_target, k, mode):
    """After many steps with rollbacks, the cached K/V equal a fresh prefill of the same tokens."""
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 30)
    cache = new_kv_cache(tiny_target.model, 1, mode, max_length=len(prompt) + 30 + k + 1)
    config = DecodeConfig(k=k, max_new_tokens=30, engine_mode=mode)
    events = list(decode(tiny_target, prompt, NoisyOracle(reference, len(prompt)), config, target_cache=cache))
    steps = [e for e in events if isinstance(e, Step)]
    assert any(0 < s.num_accepted < len(s.drafted) for s in steps), "want partial acceptances to exercise rollback"
    assert any(s.num_accepted == len(s.drafted) > 0 for s in steps), "want full acceptances too"
    committed = list(prompt) + list(events[-1].token_ids)
    assert committed[len(prompt):] == reference
    # The engine's invariant: the cache holds every committed token but the last.
    assert cache.lengths == [len(committed) - 1]
    fresh = new_cache(tiny_target.model)
    with torch.inference_mode():
        tiny_target.model(torch.tensor([committed[:-1]], device=tiny_target.model.device), cache=fresh, use_cache=True)
    held = len(committed) - 1  # a static cache is longer: what lies beyond its position is never read
    for layer_fresh, layer_engine in zip(fresh.layers, cache.layers):
        torch.testing.assert_close(layer_engine.keys[:, :, :held], layer_fresh.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer_engine.values[:, :, :held], layer_fresh.values, rtol=1e-4, atol=1e-5)


def test_draft_model_cache_tracks_committed_tokens(tiny_target, tiny_draft):
    prompt = PROMPTS[2]
    drafter = DraftModelDrafter(tiny_draft.model)
    steps = [e for e in decode(tiny_target, prompt, drafter, DecodeConfig(k=4, max_new_tokens=20)) if isinstance(e, Step)]
    committed = len(prompt)
    for s in steps:
        # After rollback the draft holds committed-before-step + accepted drafts (at most K-1 of them).
        assert s.draft_cache_len == committed + min(s.num_accepted, len(s.drafted) - 1)
        committed += len(s.emitted)


def test_eos_inside_accepted_draft_stops_there(tiny_target):
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 20)
    # An EOS at its first occurrence 1..3 sits inside the first K=5 draft.
    first = next(i for i in range(1, 4) if reference.index(reference[i]) == i)
    eos_token = reference[first]
    target = TinyLM(tiny_target.model, tiny_target.tokenizer, (eos_token,))
    result = run(target, prompt, OracleDrafter(reference, len(prompt), True), DecodeConfig(k=5, max_new_tokens=20))
    assert result.token_ids == reference[: first + 1]
    assert result.reason == "eos"
    # The whole draft was accepted, but nothing after the EOS was emitted.
    assert len(result.steps) == 1
    assert result.steps[0].num_accepted == 5 and len(result.steps[0].emitted) == first + 1


def test_stop_string_ends_decode_and_cuts_text(tiny_target):
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 20)
    word = tiny_target.tokenizer.decode([reference[4]])
    result = run(tiny_target, prompt, PromptLookupDrafter(), DecodeConfig(k=3, max_new_tokens=20, stop_strings=(word,)))
    first = reference.index(reference[4])
    assert result.reason == "stop_string"
    assert result.token_ids == reference[: first + 1]
    assert word not in result.text


def test_events_come_in_order_and_count_up(tiny_target):
    events = list(decode(tiny_target, PROMPTS[0], PromptLookupDrafter(), DecodeConfig(k=3, max_new_tokens=12)))
    assert isinstance(events[0], Prefilled) and events[0].num_prompt_tokens == len(PROMPTS[0])
    assert isinstance(events[-1], Finished)
    steps = events[1:-1]
    assert [s.index for s in steps] == list(range(len(steps)))
    assert sum(len(s.emitted) for s in steps) == len(events[-1].token_ids) == 12


def test_seeded_sampling_is_reproducible(tiny_target, tiny_draft):
    config = DecodeConfig(k=3, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = run(tiny_target, PROMPTS[0], DraftModelDrafter(tiny_draft.model), config)
    second = run(tiny_target, PROMPTS[0], DraftModelDrafter(tiny_draft.model), config)
    other = run(tiny_target, PROMPTS[0], DraftModelDrafter(tiny_draft.model), DecodeConfig(k=3, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8))
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_record_details_explains_each_checked_position(tiny_target, tiny_draft):
    config = DecodeConfig(k=4, max_new_tokens=10, record_details=True)
    result = run(tiny_target, PROMPTS[0], DraftModelDrafter(tiny_draft.model), config)
    for s in result.steps:
        assert len(s.details) == min(s.num_accepted + 1, len(s.drafted))
        for i, d in enumerate(s.details):
            assert d.accepted == (i < s.num_accepted)
            # Greedy: accepted exactly when the drafted token is the target's top token.
            assert d.accepted == (d.target_top[0][0] == d.draft_token)
            assert 0.0 <= d.draft_prob <= 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "K (num_speculative_tokens) requires an integer in 1..16; got 0"),
        ({"k": 17}, "got 17"),
        ({"max_new_tokens": 0}, "max_new_tokens requires"),
        ({"temperature": -1.0}, "temperature requires"),
        ({"top_p": 0.0}, "top_p requires"),
        ({"stop_strings": ("",)}, "stop_strings requires"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DecodeConfig(**kwargs)


def test_empty_and_oversized_prompts_are_refused(tiny_target):
    with pytest.raises(ValueError, match="prompt is empty"):
        run(tiny_target, [], None, DecodeConfig())
    with pytest.raises(ValueError, match="context window is 512"):
        run(tiny_target, [3] * 600, None, DecodeConfig())


def test_output_stops_at_context_window(tiny_target):
    result = run(tiny_target, [3] * 505, PromptLookupDrafter(), DecodeConfig(k=4, max_new_tokens=50))
    assert len(result.token_ids) == 7
    assert result.reason == "max_new_tokens"


def test_sampled_first_token_follows_target_distribution():
    """Through the whole engine (draft model, K=1, temperature 1): emitted tokens ~ the target's distribution."""
    from conftest import tiny_llama, tiny_tokenizer

    vocab = 8
    target = TinyLM(tiny_llama(seed=4, vocab_size=vocab), tiny_tokenizer(vocab))
    draft = tiny_llama(seed=5, vocab_size=vocab, layers=1)
    prompt = [2, 5, 3]
    with torch.inference_mode():
        expected = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    counts = torch.zeros(vocab)
    samples = 1200
    drafter = DraftModelDrafter(draft)
    for seed in range(samples):
        result = run(target, prompt, drafter, DecodeConfig(k=1, max_new_tokens=2, temperature=1.0, seed=seed))
        counts[result.token_ids[0]] += 1
    tv = 0.5 * float((counts / samples - expected).abs().sum())
    assert tv < 0.07, f"total variation {tv:.3f}"
