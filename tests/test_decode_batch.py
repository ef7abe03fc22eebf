"""Batched speculative decoding: every row decodes exactly as if alone, whatever the others accept."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import NoisyOracle, OracleDrafter, TinyLM, reference_greedy, tiny_llama
from lab.drafters import DraftModelDrafter, PerRowDrafter, as_batch_drafter, make_drafter, PromptLookupDrafter
from lab.trace import BatchFinished, BatchStep
from lab.kv import RaggedCache, new_cache
from lab.decode import decode_batch, run_batch, run
from lab.config import DecodeConfig

# Mixed lengths (1 to 12 tokens), some repetitive so prompt lookup finds matches.
PROMPTS = [
    [8, 8, 8, 8, 8],
    [5, 9, 12, 5, 9, 30, 7],
    [3],
    [11, 12, 13, 14, 11, 12, 13, 14, 11, 12],
    [40, 2],
    [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32],
    [17, 4, 17, 4],
    [33, 6, 19],
]
NEW_TOKENS = 14


@functools.lru_cache(maxsize=None)
def _reference(model_id: int, prompt: tuple[int, ...], max_new_tokens: int, eos: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reference_greedy(_MODELS[model_id], list(prompt), max_new_tokens, eos))


_MODELS: dict[int, torch.nn.Module] = {}


def reference(target: TinyLM, prompt, max_new_tokens: int) -> list[int]:
    """The target alone on this prompt, no cache, cut at the target's EOS (memoised: tests share prompts)."""
    _MODELS[id(target.model)] = target.model
    return list(_reference(id(target.model), tuple(prompt), max_new_tokens, tuple(target.eos_token_ids)))




def oracles(target: TinyLM, prompts, agree: bool, max_new_tokens: int = NEW_TOKENS) -> PerRowDrafter:
    """One oracle per row, drafting from the target's greedy output without EOS (so drafts run past an EOS)."""
    no_eos = TinyLM(target.model, target.tokenizer)
    refs = [reference(no_eos, p, max_new_tokens) for p in prompts]
    return PerRowDrafter(lambda i: OracleDrafter(refs[i], len(prompts[i]), agree))


def build_drafter(kind: str, target: TinyLM, draft: TinyLM, prompts, max_new_tokens: int = NEW_TOKENS):
    if kind == "agree":
        return oracles(target, prompts, True, max_new_tokens)
    if kind == "disagree":
        return oracles(target, prompts, False, max_new_tokens)
    # The draft shares the target's tokenizer, so also the EOS the test picked for the target.
    draft = TinyLM(draft.model, draft.tokenizer, target.eos_token_ids)
    return make_drafter(kind, target, draft, exit_layer=1)


def with_eos(target: TinyLM, eos: int) -> TinyLM:
    return TinyLM(target.model, target.tokenizer, (eos,))


def eos_in_one_row(target: TinyLM, prompts, max_new_tokens: int = NEW_TOKENS) -> tuple[int, int, int]:
    """A row and a token of its reference output (first seen at position 1..4) that no other row outputs.

    Returns (row, token, its first position). With that token as EOS one row stops, mid-draft,
    while the others go on.
    """
    refs = [reference(target, p, max_new_tokens) for p in prompts]
    for row, ref in enumerate(refs):
        others = {t for i, r in enumerate(refs) if i != row for t in r}
        for position in range(1, 5):
            if ref.index(ref[position]) == position and ref[position] not in others:
                return row, ref[position], position
    pytest.skip("no token unique to one row in this tiny model's outputs")


# ---------------------------------------------------------------- the ragged cache


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("compact", [False, True])
def test_batched_forward_with_holes_equals_unbatched(compact, attention):
    """Right padding, rejected-draft holes, a dropped row and compaction: each row's logits are its unbatched ones.

    Both attention implementations build their masks from our 2D mask (sdpa: boolean; eager: additive).
    """
    model = tiny_llama(seed=0, layers=3)
    model.set_attn_implementation(attention)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    cache = RaggedCache(model, 3, max_waste=0.0, min_wasted_slots=1 if compact else 10**6)
    with torch.inference_mode():
        cache.forward([torch.tensor(p) for p in prompts])
        # A "verify" of ragged drafts; each row then keeps a different number of them.
        drafted = [torch.tensor([1, 2, 3, 4]), torch.tensor([6]), torch.tensor([7, 8])]
        cache.forward(drafted)
        kept = [1, 0, 2]
        cache.keep([len(p) + n for p, n in zip(prompts, kept)])
        rows = [p + d[:n].tolist() for p, d, n in zip(prompts, drafted, kept)]
        assert cache.lengths == [len(r) for r in rows]
        # The row with the longest prompt leaves; holes are trimmed (and compacted).
        cache.select([1, 2])
        rows = rows[1:]
        cache.trim()
        if compact:
            assert cache.num_slots == max(len(r) for r in rows)
        logits = cache.forward([torch.tensor([9, 10, 11]), torch.tensor([12])])  # [2, 3, V]
        for b, (row, fed) in enumerate(zip(rows, [[9, 10, 11], [12]])):
            expected = model(torch.tensor([row + fed])).logits[0, -len(fed) :]  # [n, V]
            torch.testing.assert_close(logits[b, : len(fed)], expected, rtol=1e-4, atol=1e-4)


def test_keep_and_trim_drop_only_holes(tiny_target):
    cache = RaggedCache(tiny_target.model, 2, min_wasted_slots=10**6)  # never compacts
    with torch.inference_mode():
        cache.forward([torch.tensor([5, 6, 7]), torch.tensor([8])])  # slots: [5 6 7], [8 _ _]
        cache.forward([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])])  # [5 6 7 1 2 3], [8 _ _ 4 5 6]
    cache.keep([4, 1])  # row 0 keeps one new token, row 1 none
    assert cache.valid.tolist() == [[True] * 4 + [False, False], [True] + [False] * 5]
    assert cache.lengths == [4, 1]
    cache.trim()  # only all-hole trailing slots go
    assert cache.num_slots == 4
    assert cache.cache.layers[0].keys.shape[2] == 4
    cache.select([1])
    cache.trim()  # the dropped row's slots go too
    assert cache.valid.tolist() == [[True]]


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("batch_size", range(1, 9))
@pytest.mark.parametrize("kind", ["none", "prompt-lookup", "draft-model", "layer-skip", "agree", "disagree"])
def test_ragged_greedy_equals_each_prompt_alone(tiny_target, tiny_draft, kind, batch_size):
    """Mixed prompt lengths, one row stopping on EOS (mid-draft for the oracle), the rest at the budget."""
    prompts = PROMPTS[:batch_size]
    eos_row, eos, _ = eos_in_one_row(tiny_target, prompts)
    target = with_eos(tiny_target, eos)
    drafter = build_drafter(kind, target, tiny_draft, prompts)
    result = run_batch(target, prompts, drafter, DecodeConfig(k=4, max_new_tokens=NEW_TOKENS))
    for prompt, row in zip(prompts, result.rows):
        assert row.token_ids == reference(target, prompt, NEW_TOKENS)
    assert [row.reason for row in result.rows] == ["eos" if i == eos_row else "max_new_tokens" for i in range(batch_size)]
    if batch_size > 1:
        assert result.batch_sizes[-1] < batch_size, "the EOS row should have left the batch"


@pytest.mark.parametrize("k", [1, 3, 7])
def test_each_row_steps_as_the_single_row_engine(tiny_target, tiny_draft, k):
    """Per request: the same drafts, acceptances and emitted tokens as ``lab.decode.run``, so the same stats."""
    prompts = PROMPTS[:5]
    config = DecodeConfig(k=k, max_new_tokens=NEW_TOKENS)
    for single in (PromptLookupDrafter(1, 3), DraftModelDrafter(tiny_draft.model)):
        batched = run_batch(tiny_target, prompts, single, config)
        for prompt, row in zip(prompts, batched.rows):
            alone = run(tiny_target, prompt, single, config)
            assert _step_view(row.steps) == _step_view(alone.steps)
            assert _counters(row.stats) == _counters(alone.stats)
            if single.name == "draft-model":
                assert [s.draft_cache_len for s in row.steps] == [s.draft_cache_len for s in alone.steps]


def _step_view(steps) -> list[tuple]:
    return [(s.index, s.drafted, s.num_accepted, s.emitted, s.final_kind, s.target_cache_len) for s in steps]


def _counters(stats) -> dict:
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position", "target_forward_passes")
    return {name: getattr(stats, name) for name in names + ("num_output_tokens",)}


def test_eos_inside_an_accepted_draft_stops_only_that_row(tiny_target):
    prompts = PROMPTS[:4]
    eos_row, eos, position = eos_in_one_row(tiny_target, prompts, max_new_tokens=20)
    target = with_eos(tiny_target, eos)
    result = run_batch(target, prompts, oracles(target, prompts, True, 20), DecodeConfig(k=5, max_new_tokens=20))
    stopped = result.rows[eos_row]
    assert stopped.reason == "eos" and stopped.token_ids == reference(tiny_target, prompts[eos_row], 20)[: position + 1]
    # The whole draft was accepted, but nothing after the EOS was emitted.
    assert len(stopped.steps) == 1 and stopped.steps[0].num_accepted == 5 and len(stopped.steps[0].emitted) == position + 1
    for i, (prompt, row) in enumerate(zip(prompts, result.rows)):
        if i != eos_row:
            assert row.reason == "max_new_tokens" and row.token_ids == reference(tiny_target, prompt, 20)
    assert result.batch_sizes == [4, 3, 3, 3]


def test_finished_rows_leave_the_batch_and_emit_nothing_more(tiny_target):
    prompts = PROMPTS
    _, eos, _ = eos_in_one_row(tiny_target, prompts)
    target = with_eos(tiny_target, eos)
    cache = RaggedCache(target.model, len(prompts))
    done: set[int] = set()
    emitted = {r: [] for r in range(len(prompts))}
    sizes = []
    config = DecodeConfig(k=3, max_new_tokens=NEW_TOKENS)
    for event in decode_batch(target, prompts, PromptLookupDrafter(), config, target_cache=cache):
        if isinstance(event, BatchStep):
            assert not done & set(event.requests), "a finished request came back"
            assert cache.batch_size == event.batch_size, "the cache holds exactly the live rows"
            sizes.append(event.batch_size)
            for request, step in zip(event.requests, event.steps):
                emitted[request] += step.emitted
            done |= {row.request for row in event.finished}
        elif isinstance(event, BatchFinished):
            for row in event.rows:
                assert list(row.finished.token_ids) == emitted[row.request]
                assert 0 < row.first_token_s <= row.finished.wall_s <= event.wall_s
    # Rows finish at different steps (EOS, or fewer steps thanks to accepted drafts); the batch only shrinks.
    assert sizes[0] == len(prompts) and sizes[-1] < len(prompts) - 1
    assert sizes == sorted(sizes, reverse=True)



@pytest.mark.parametrize("compaction", ["every step", "never"])
def test_each_rows_cached_keys_and_values_equal_a_fresh_prefill(tiny_target, compaction, monkeypatch):
    """After steps with partial acceptances, holes, dropped rows and compaction, every live row's valid
    slots hold exactly the K/V of its committed tokens but the last."""
    prompts = PROMPTS
    _, eos, _ = eos_in_one_row(tiny_target, prompts, max_new_tokens=24)
    target = with_eos(tiny_target, eos)
    refs = [reference(TinyLM(target.model, target.tokenizer), p, 24) for p in prompts]
    drafter = PerRowDrafter(lambda i: NoisyOracle(refs[i], len(prompts[i]), phase=i))
    eager = compaction == "every step"
    cache = RaggedCache(target.model, len(prompts), max_waste=0.0, min_wasted_slots=1 if eager else 10**6)
    compactions = []
    compact = RaggedCache._compact
    monkeypatch.setattr(RaggedCache, "_compact", lambda self, length: (compactions.append(length), compact(self, length)))
    committed = [list(p) for p in prompts]
    checked = 0
    for event in decode_batch(target, prompts, drafter, DecodeConfig(k=4, max_new_tokens=24), target_cache=cache):
        if not isinstance(event, BatchStep):
            continue
        ended = {row.request for row in event.finished}
        for b, (request, step) in enumerate(zip(event.requests, event.steps)):
            committed[request] += step.emitted
            if request in ended:
                continue
            fresh = new_cache(target.model)
            with torch.inference_mode():
                target.model(torch.tensor([committed[request][:-1]], device=target.model.device), cache=fresh, use_cache=True)
            for layer_fresh, layer in zip(fresh.layers, cache.cache.layers):
                valid = cache.valid[b]
                torch.testing.assert_close(layer.keys[b][:, valid], layer_fresh.keys[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(layer.values[b][:, valid], layer_fresh.values[0], rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 3 * len(prompts)
    assert bool(compactions) == eager


def test_rejected_drafts_do_not_bloat_the_cache(tiny_target):
    """A never-agree drafter at K=7 writes 8 slots a step per row; holes are cut, so slots track real tokens."""
    prompts = PROMPTS[:4]
    cache = RaggedCache(tiny_target.model, len(prompts))
    config = DecodeConfig(k=7, max_new_tokens=NEW_TOKENS)
    events = decode_batch(tiny_target, prompts, oracles(tiny_target, prompts, False), config, target_cache=cache)
    steps = [e for e in events if isinstance(e, BatchStep)]
    longest = max(len(p) for p in prompts)
    for step in steps:
        assert max(s.target_cache_len for s in step.steps) <= longest + step.index
        # Slots after this step's rollback: at most the longest row + this step's 8 new slots + compaction slack.
        assert step.target_cache_slots <= 1.25 * (longest + step.index + 8) + 8


def test_k_policy_sets_k_per_batch_size(tiny_target):
    """A policy that drafts only while the batch is small: outputs stay exact, big-batch steps have no draft."""
    prompts = PROMPTS[:4]
    _, eos, _ = eos_in_one_row(tiny_target, prompts)
    target = with_eos(tiny_target, eos)
    config = DecodeConfig(k=4, max_new_tokens=NEW_TOKENS)
    result = run_batch(target, prompts, oracles(target, prompts, True), config, k_policy=lambda b: 0 if b > 3 else 2)
    assert [row.token_ids for row in result.rows] == [reference(target, p, NEW_TOKENS) for p in prompts]
    for step in result.steps:
        longest = max(len(s.drafted) for s in step.steps)
        assert longest == 0 if step.batch_size > 3 else longest <= 2


# ---------------------------------------------------------------- sampling, adapters, errors


def test_seeded_sampling_is_reproducible_and_each_row_samples_as_alone(tiny_target, tiny_draft):
    prompts = PROMPTS[:4]
    sampled = functools.partial(DecodeConfig, k=3, max_new_tokens=12, temperature=1.0, top_p=0.9)
    first = run_batch(tiny_target, prompts, DraftModelDrafter(tiny_draft.model), sampled(seed=7))
    second = run_batch(tiny_target, prompts, DraftModelDrafter(tiny_draft.model), sampled(seed=7))
    other = run_batch(tiny_target, prompts, DraftModelDrafter(tiny_draft.model), sampled(seed=8))
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids
    # Row i draws from its own generator seeded seed + i, in the single-row engine's order.
    for i, prompt in enumerate(prompts):
        alone = run(tiny_target, prompt, DraftModelDrafter(tiny_draft.model), sampled(seed=7 + i))
        assert first.rows[i].token_ids == alone.token_ids


def test_record_details_per_row(tiny_target, tiny_draft):
    config = DecodeConfig(k=3, max_new_tokens=8, record_details=True)
    result = run_batch(tiny_target, PROMPTS[:3], DraftModelDrafter(tiny_draft.model), config)
    for row in result.rows:
        for step in row.steps:
            assert len(step.details) == min(step.num_accepted + 1, len(step.drafted))
            assert all(d.accepted == (d.target_top[0][0] == d.draft_token) for d in step.details)


def test_as_batch_drafter_picks_the_batched_form(tiny_target, tiny_draft):
    assert as_batch_drafter(None) is None
    assert isinstance(as_batch_drafter(DraftModelDrafter(tiny_draft.model)), DraftModelDrafter)
    assert isinstance(as_batch_drafter(PromptLookupDrafter()), PerRowDrafter)
    layer_skip = make_drafter("layer-skip", tiny_target, exit_layer=1)
    assert isinstance(layer_skip, DraftModelDrafter) and layer_skip.name == "layer-skip"
    assert make_drafter("none", tiny_target) is None


def test_bad_policies_and_caches_are_refused(tiny_target):
    with pytest.raises(ValueError, match="k_policy requires an integer K in 0..16; got 17"):
        run_batch(tiny_target, PROMPTS[:2], PromptLookupDrafter(), DecodeConfig(), k_policy=lambda b: 17)
    with pytest.raises(ValueError, match="empty cache of 2 rows"):
        list(decode_batch(tiny_target, PROMPTS[:2], None, DecodeConfig(), target_cache=RaggedCache(tiny_target.model, 3)))


def test_empty_batches_and_prompts_are_refused(tiny_target):
    with pytest.raises(ValueError, match="at least one prompt"):
        run_batch(tiny_target, [], None, DecodeConfig())
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        run_batch(tiny_target, [[3], []], None, DecodeConfig())
    with pytest.raises(ValueError, match="context window is 512"):
        run_batch(tiny_target, [[3], [3] * 600], None, DecodeConfig())


# ---------------------------------------------------------------- a real model


@pytest.mark.real_model
def test_smollm2_fp32_batch_equals_each_prompt_alone():
    """The real left-padded, rotary, GQA path: three chat prompts of different lengths, fp32, batched = alone."""
    from lab.models import encode_prompt, is_prepared, load_model

    if not is_prepared("smollm2-135m"):
        pytest.skip("smollm2-135m is not prepared (scripts/setup.sh app prepares it)")
    smollm2 = load_model("smollm2-135m", device="cpu", dtype="fp32")
    texts = ["What is the capital of France?", "Repeat after me: one two three, one two three.", "Hi"]
    prompts = [encode_prompt(smollm2, text) for text in texts]
    config = DecodeConfig(k=4, max_new_tokens=10)
    batched = run_batch(smollm2, prompts, PromptLookupDrafter(), config)
    alone = [run(smollm2, p, None, config).token_ids for p in prompts]
    assert batched.token_ids == alone
