"""A trimmed draft vocabulary: the draft proposes only N tokens, and the output stays the target's."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VOCAB, TinyLM, reference_greedy, tiny_llama, tiny_tokenizer
from lab.drafters import DraftModelDrafter, make_drafter
from lab.decode import run_batch, run
from lab.config import DecodeConfig
from lab.studies.token_frequencies import count_tokens
from lab.vocab import (
    TrimmedLMHead,
    load_frequencies,
    save_frequencies,
    top_tokens,
    trimmed_view,
)

PROMPTS = [[5, 9, 12, 5, 9, 30, 7], [3], [11, 12, 13, 14, 11, 12, 13, 14, 11, 12], [40, 2]]
SUBSET = torch.arange(0, TINY_VOCAB, 3)  # 16 of 48 tokens


def test_trimmed_head_scores_only_the_subset(tiny_draft):
    head = TrimmedLMHead(tiny_draft.model.lm_head.weight, SUBSET)
    hidden = torch.randn(2, 5, tiny_draft.model.config.hidden_size)
    logits = head(hidden)  # [2, 5, V]
    full = tiny_draft.model.lm_head(hidden)
    assert logits.shape == full.shape
    torch.testing.assert_close(logits[..., SUBSET], full[..., SUBSET])
    outside = torch.ones(TINY_VOCAB, dtype=torch.bool)
    outside[SUBSET] = False
    assert torch.isneginf(logits[..., outside]).all()
    assert head.weight.shape == (SUBSET.numel(), tiny_draft.model.config.hidden_size)


def test_trimmed_view_shares_weights_and_leaves_the_model_alone(tiny_draft):
    view = trimmed_view(tiny_draft.model, SUBSET)
    assert view.model is tiny_draft.model.model
    assert isinstance(view.lm_head, TrimmedLMHead)
    assert not isinstance(tiny_draft.model.lm_head, TrimmedLMHead)


@pytest.mark.parametrize(
    "counts, n, always, expected",
    [
        ([5, 0, 9, 9, 1], 2, (), [2, 3]),  # ties broken by lower id
        ([5, 0, 9, 9, 1], 2, (1,), [1, 2, 3]),  # EOS kept even when never seen
        ([5, 0, 9, 9, 1], 10, (), [0, 1, 2, 3, 4]),  # N larger than V: everything
    ],
)
def test_top_tokens_table(counts, n, always, expected):
    assert top_tokens(torch.tensor(counts), n, always).tolist() == expected


def test_frequency_table_round_trip_and_checksum(tmp_path):
    counts = count_tokens([[1, 2, 2, 7], [7, 7]], vocab_size=10)
    assert counts.tolist() == [0, 1, 2, 0, 0, 0, 0, 3, 0, 0]
    path = save_frequencies(counts, tmp_path / "t.json", {"prompts": 2})
    assert torch.equal(load_frequencies(path), counts)
    path.write_text(path.read_text().replace('"7": 3', '"7": 4'))
    with pytest.raises(ValueError, match="checksum"):
        load_frequencies(path)
    with pytest.raises(FileNotFoundError, match="token-freq"):
        load_frequencies(tmp_path / "absent.json")


def test_a_fresh_cache_uses_the_table_shipped_beside_the_shipped_head(tmp_path, monkeypatch):
    """assets/vocab/smollm2-135m.json ships with assets/heads/smollm2-135m: a trimmed head works on a fresh machine."""
    from lab.vocab import find_frequencies, frequency_path

    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    shipped = find_frequencies("smollm2-135m")
    assert shipped.parent.name == "vocab" and shipped.parent.parent.name == "assets"
    counts = load_frequencies(shipped)
    assert counts.numel() == 49152 and int(counts.sum()) == 129_491  # SmolLM2's argmax over its training data
    save_frequencies(torch.tensor([0, 5, 1]), frequency_path("smollm2-135m"))
    assert find_frequencies("smollm2-135m") == frequency_path("smollm2-135m")  # a table built here wins
    missing = find_frequencies("qwen2.5-coder-1.5b")  # none shipped: the cache path, and how to build it
    with pytest.raises(FileNotFoundError, match="token-freq --target qwen2.5-coder-1.5b"):
        load_frequencies(missing)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 4])
def test_trimmed_draft_greedy_equals_target_alone(tiny_target, tiny_draft, prompt, k):
    reference = reference_greedy(tiny_target.model, prompt, 24)
    drafter = make_drafter("draft-model", tiny_target, tiny_draft, vocab_subset=SUBSET)
    result = run(tiny_target, prompt, drafter, DecodeConfig(k=k, max_new_tokens=24))
    assert result.token_ids == reference
    drafted = [t for s in result.steps for t in s.drafted]
    assert drafted and set(drafted) <= set(SUBSET.tolist()), "the trimmed draft proposes only subset tokens"


def test_tokens_outside_the_subset_still_appear_greedy(tiny_target, tiny_draft):
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 24)
    outside = [t for t in reference if t not in set(SUBSET.tolist())]
    assert outside, "want a reference that uses tokens outside the subset"
    result = run(tiny_target, prompt, DraftModelDrafter(trimmed_view(tiny_draft.model, SUBSET)), DecodeConfig(k=3, max_new_tokens=24))
    assert result.token_ids == reference


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_trimmed_draft_ragged_batch_equals_each_prompt_alone(tiny_target, tiny_draft, batch_size):
    prompts = PROMPTS[:batch_size]
    drafter = make_drafter("draft-model", tiny_target, tiny_draft, vocab_subset=SUBSET)
    assert isinstance(drafter, DraftModelDrafter)
    result = run_batch(tiny_target, prompts, drafter, DecodeConfig(k=4, max_new_tokens=16))
    for prompt, row in zip(prompts, result.rows):
        assert row.token_ids == reference_greedy(tiny_target.model, prompt, 16)
        assert set(t for s in row.steps for t in s.drafted) <= set(SUBSET.tolist())


def test_trimmed_draft_sampling_follows_target_distribution():
    """Temperature 1, K=1: the first emitted token ~ the target's distribution, including tokens the draft cannot propose.

    The draft's distribution is zero outside the subset; the residual max(0, target - draft) carries the
    target's mass there, so those tokens are emitted as recovered tokens at their target frequency.
    """
    vocab = 8
    target = TinyLM(tiny_llama(seed=4, vocab_size=vocab), tiny_tokenizer(vocab))
    draft = trimmed_view(tiny_llama(seed=5, vocab_size=vocab, layers=1), torch.tensor([0, 2, 5]))
    prompt = [2, 5, 3]
    with torch.inference_mode():
        expected = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    samples = 1200
    counts = torch.zeros(vocab)
    drafter = DraftModelDrafter(draft)
    for seed in range(samples):
        result = run(target, prompt, drafter, DecodeConfig(k=1, max_new_tokens=2, temperature=1.0, seed=seed))
        assert set(result.steps[0].drafted) <= {0, 2, 5}
        counts[result.token_ids[0]] += 1
    tv = 0.5 * float((counts / samples - expected).abs().sum())
    assert tv < 0.07, f"total variation {tv:.3f}"
    outside = [t for t in range(vocab) if t not in (0, 2, 5)]
    expected_outside = float(expected[outside].sum())
    assert expected_outside > 0.1, "the test needs target mass outside the subset"
    assert abs(float(counts[outside].sum()) / samples - expected_outside) < 0.05


def test_trimmed_draft_sampled_batch_rows_sample_as_alone(tiny_target, tiny_draft):
    prompts = PROMPTS[:3]
    config = DecodeConfig(k=3, max_new_tokens=12, temperature=1.0, seed=11)
    batched = run_batch(tiny_target, prompts, make_drafter("draft-model", tiny_target, tiny_draft, vocab_subset=SUBSET), config)
    for i, prompt in enumerate(prompts):
        alone = run(tiny_target, prompt, make_drafter("draft-model", tiny_target, tiny_draft, vocab_subset=SUBSET),
                    DecodeConfig(k=3, max_new_tokens=12, temperature=1.0, seed=11 + i))
        assert batched.rows[i].token_ids == alone.token_ids


def test_a_trimmed_view_is_made_once_per_model_and_subset(tiny_target):
    from lab.vocab import trimmed_view

    subset = torch.arange(0, TINY_VOCAB, 2)
    view = trimmed_view(tiny_target.model, subset)
    assert trimmed_view(tiny_target.model, subset.clone()) is view  # same ids: the same view (and its engine caches)
    assert trimmed_view(tiny_target.model, subset[:-1]) is not view
