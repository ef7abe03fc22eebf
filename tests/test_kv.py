"""The KV-cache protocol (lab.kv): the eager ragged cache and the static/captured one in batch buckets.

Exact in every mode at B = 1 and B > 1, a fixed set of captured graphs whatever the acceptance
pattern, rollback that only moves lengths, storage pooled and never shared, and the index form of
logits_to_keep that avoids PyTorch's slow bf16 path.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import OracleDrafter, TINY_VOCAB, TinyLM, reference_greedy, tiny_llama, tiny_tokenizer
from lab.config import DecodeConfig
from lab.decode import decode, run, run_batch
from lab.drafters import DraftModelDrafter, LayerSkipDrafter, PromptLookupDrafter, make_drafter
from lab.drafters.base import Draft, DraftContext
from lab.kv import (
    RaggedCache, StaticKVCache, batch_bucket, crop_cache, idle_storages, keep_last, new_cache, new_kv_cache,
    resolve_engine_mode,
)
from lab.trace import Step

PROMPTS = [[5, 9, 12, 5, 9, 30, 7], [3], [11, 12, 13, 14, 11, 12, 13, 14, 11, 12]]
# The compiled mode on the CPU with dynamo's "eager" backend: the same capture (fullgraph, dynamic=False),
# run without inductor's code generation, so the suite stays fast.
COMPILED = dict(engine_mode="compiled", compile_backend="eager")
MODES = {"eager": dict(engine_mode="eager"), "static": dict(engine_mode="static"), "compiled": COMPILED}


class CoinFlipOracle(OracleDrafter):
    """Agrees with the target for a random number of leading positions, then proposes a wrong token.

    Gives every acceptance pattern (0..K accepted, short drafts near the budget) in a seeded order.
    """

    def __init__(self, reference, num_prompt_tokens, seed):
        super().__init__(reference, num_prompt_tokens, agree=True)
        self.random = random.Random(seed)

    def propose(self, ctx: DraftContext) -> Draft:
        tokens = super().propose(ctx).tokens.clone()
        wrong_at = self.random.randint(0, ctx.k)  # k: all agree
        if wrong_at < tokens.shape[0]:
            tokens[wrong_at] = (tokens[wrong_at] + 1) % TINY_VOCAB
        return Draft(tokens)


def make(kind, target, draft, reference, prompt):
    return {
        "none": lambda: None,
        "oracle": lambda: CoinFlipOracle(reference, len(prompt), seed=len(prompt)),
        "prompt-lookup": lambda: PromptLookupDrafter(1, 3),
        "draft-model": lambda: DraftModelDrafter(draft.model),
        "layer-skip": lambda: LayerSkipDrafter(target.model, 1),
    }[kind]()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kind", ["none", "oracle", "prompt-lookup", "draft-model", "layer-skip"])
def test_greedy_equals_target_alone_in_every_mode(tiny_target, tiny_draft, mode, prompt, k, kind):
    """fp32 greedy: token for token the target alone (no cache at all), with and without the static/captured path."""
    reference = reference_greedy(tiny_target.model, prompt, 20)
    drafter = make(kind, tiny_target, tiny_draft, reference, prompt)
    result = run(tiny_target, prompt, drafter, DecodeConfig(k=k, max_new_tokens=20, **MODES[mode]))
    assert result.token_ids == reference


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_sampling_is_the_same_draw_as_eager(tiny_target, tiny_draft, mode):
    """Seeded sampling: the static paths compute the same distributions, so they draw the same tokens."""
    prompt = PROMPTS[0]
    runs = [
        run(tiny_target, prompt, DraftModelDrafter(tiny_draft.model),
            DecodeConfig(k=3, max_new_tokens=24, temperature=1.0, seed=7, **MODES[m])).token_ids
        for m in ("eager", mode)
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_cache_position_equals_committed_tokens_after_every_step(tiny_target, tiny_draft, mode):
    """Each cache's length is prompt + committed - 1 after every rollback, target and draft alike."""
    prompt = PROMPTS[2]
    reference = reference_greedy(tiny_target.model, prompt, 24)
    cache = new_kv_cache(tiny_target.model, 1, MODES[mode]["engine_mode"], len(prompt) + 30, "eager")
    drafter = DraftModelDrafter(tiny_draft.model)
    committed = len(prompt)
    checked = 0
    config = DecodeConfig(k=4, max_new_tokens=24, **MODES[mode])
    for event in decode(tiny_target, prompt, drafter, config, target_cache=cache):
        if isinstance(event, Step):
            committed += len(event.emitted)
            assert cache.lengths == [event.target_cache_len] == [committed - 1]
            # The draft holds the committed tokens and the accepted drafts it fed, never a rejected one.
            assert drafter.cache.lengths == [event.draft_cache_len]
            assert drafter.cached_ids[0].tolist() == (list(prompt) + reference)[: event.draft_cache_len]
            checked += 1
    assert checked >= 5


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_graph_count_stays_fixed_across_acceptance_patterns(tiny_target, tiny_draft):
    """One captured graph per (model, width, bucket): random acceptance, short drafts and new prompts never add one."""
    config = DecodeConfig(k=4, max_new_tokens=16, **COMPILED)
    model_target = tiny_llama(seed=0, layers=3, hidden=48)  # shapes of its own: the first run makes its graphs
    model_draft = tiny_llama(seed=1, layers=1, hidden=16)
    target = type(tiny_target)(model_target, tiny_target.tokenizer)
    before = unique_graphs()
    first = run(target, PROMPTS[0], DraftModelDrafter(model_draft), config)
    after_first = unique_graphs()
    assert 2 <= after_first - before <= 3  # verify (width 5), draft step (width 1), and a 2-token catch-up if any
    accepted = set()
    for seed, prompt in enumerate(PROMPTS * 3):
        reference = reference_greedy(model_target, prompt, 16)
        for drafter in (CoinFlipOracle(reference, len(prompt), seed), DraftModelDrafter(model_draft), PromptLookupDrafter()):
            result = run(target, prompt, drafter, config)
            assert result.token_ids == reference
            accepted |= {s.num_accepted for s in result.steps}
    assert accepted == {0, 1, 2, 3, 4}, "want every acceptance pattern"
    assert first.token_ids == reference_greedy(model_target, PROMPTS[0], 16)
    assert unique_graphs() - before <= 3  # widths 5, 1 and 2: nothing else, whatever was accepted


def test_graph_count_stays_fixed_across_acceptance_patterns_at_batch_3(tiny_target):
    """At B > 1 too: one graph per (width, bucket). Rows that accept different numbers of tokens, rows that leave
    (the bucket shrinks from 4) and new batches add no graph once each (width, bucket) has been seen."""
    from lab.drafters import PerRowDrafter

    config = DecodeConfig(k=3, max_new_tokens=12, **COMPILED)
    model_target = tiny_llama(seed=0, layers=3, hidden=56)  # shapes of its own: its graphs are made here
    model_draft = tiny_llama(seed=1, layers=1, hidden=8)
    plain = [reference_greedy(model_target, p, 12) for p in PROMPTS]
    eos = (plain[0][3],)  # row 0 stops at its 4th token: it leaves the batch while the others go on
    target = TinyLM(model_target, tiny_target.tokenizer, eos)
    references = [reference_greedy(model_target, p, 12, eos) for p in PROMPTS]
    assert len({len(r) for r in references}) > 1, "want rows that finish at different steps"

    def runs(seed):
        accepted, shrank = set(), False
        for drafter in (PerRowDrafter(lambda i: CoinFlipOracle(plain[i], len(PROMPTS[i]), seed + i)),
                        DraftModelDrafter(model_draft)):
            result = run_batch(target, PROMPTS, drafter, config)
            assert result.token_ids == references
            accepted |= {s.num_accepted for step in result.steps for s in step.steps}
            shrank |= len(set(result.batch_sizes)) > 1
        assert shrank
        return accepted

    before = unique_graphs()
    seen = runs(0)
    made = unique_graphs() - before
    assert 0 < made <= 9  # verify (width 4), draft step (1), catch-up (2), in buckets 4, 2 and 1
    for seed in (10, 20, 30):
        seen |= runs(seed)
    assert seen >= {0, 1, 2, 3}, "want every acceptance pattern"
    assert unique_graphs() - before == made


def test_graphs_are_one_per_width(tiny_target):
    """The target's verify pass (width K+1) and the draft's step (width 1): two graphs, three with a catch-up.

    Models of one architecture share compiled graphs (their weights are graph inputs), so this test
    uses widths of its own to see its graphs being made.
    """
    before = unique_graphs()
    model_target = tiny_llama(seed=0, layers=3, hidden=40)
    model_draft = tiny_llama(seed=1, layers=1, hidden=24)
    target = type(tiny_target)(model_target, tiny_target.tokenizer)
    result = run(target, PROMPTS[0], DraftModelDrafter(model_draft), DecodeConfig(k=3, max_new_tokens=12, **COMPILED))
    catch_up = any(s.num_accepted == len(s.drafted) > 0 for s in result.steps[:-1])  # a bonus: 2 tokens to feed
    assert unique_graphs() - before == 2 + catch_up


def test_static_storage_is_reused_and_never_shared():
    model = tiny_llama(seed=3, layers=1)
    first = StaticKVCache(model, 1, 10)
    second = StaticKVCache(model, 1, 10)
    assert first.storage is not second.storage  # two caches at once: two storages
    first.forward([torch.tensor([5, 9])])
    storage = first.storage
    first.release()
    again = StaticKVCache(model, 1, 12)  # fits: the same storage (same addresses), lengths back to 0
    assert again.storage is storage and again.lengths == [0]
    bigger = StaticKVCache(model, 1, 1000)  # does not fit: a larger one
    assert bigger.storage is not storage and bigger.capacity >= 1000
    assert StaticKVCache(model, 3, 10).bucket == 4


def test_a_decode_gives_its_static_storage_back(tiny_target):
    model = tiny_llama(seed=4, layers=1)
    target = TinyLM(model, tiny_target.tokenizer)
    before = idle_storages(model)
    run_batch(target, PROMPTS, None, DecodeConfig(max_new_tokens=4, engine_mode="static"))
    assert idle_storages(model) == before + 1


def test_static_cache_refuses_what_does_not_fit():
    model = tiny_llama(seed=3, layers=1)
    cache = StaticKVCache(model, 1, 4)  # capacity rounds up to 256
    with torch.inference_mode():
        cache.forward([torch.zeros(250, dtype=torch.long)])
        with pytest.raises(ValueError, match="static cache holds 256 tokens"):
            cache.forward([torch.zeros(2, dtype=torch.long)], width=8)
        with pytest.raises(ValueError, match="n_b <= width"):
            cache.forward([torch.zeros(3, dtype=torch.long)], width=2)
    with pytest.raises(ValueError, match=r"0 <= lengths\[b\] <= \[250\]"):
        cache.keep([251])


@pytest.mark.parametrize("batch_size, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (16, 16), (17, 32)])
def test_batch_buckets_are_powers_of_two(batch_size, bucket):
    assert batch_bucket(batch_size) == bucket


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_rows_leaving_keep_the_others_exact(tiny_target, mode):
    """After select (rows leave; a static cache moves to a smaller bucket) the remaining rows' next logits
    equal a fresh pass over each row alone."""
    model = tiny_target.model
    rows = [torch.tensor(p) for p in PROMPTS]
    cache = new_kv_cache(model, 3, mode, 64)
    with torch.inference_mode():
        cache.forward(rows)
        cache.keep([len(PROMPTS[0]) - 2, 1, len(PROMPTS[2])])  # a rollback first
        cache.select([2, 0])
        if mode == "static":
            assert cache.bucket == 2
        nxt = [torch.tensor([7, 8]), torch.tensor([9])]
        logits = cache.forward(nxt)  # [2, 2, V]
        for b, (prompt, kept, new) in enumerate([(PROMPTS[2], len(PROMPTS[2]), nxt[0]),
                                                  (PROMPTS[0], len(PROMPTS[0]) - 2, nxt[1])]):
            alone = model(torch.cat([torch.tensor(prompt[:kept]), new])[None]).logits[0, -len(new):]
            torch.testing.assert_close(logits[b, : len(new)], alone, rtol=1e-4, atol=1e-4)
        assert cache.lengths == [len(PROMPTS[2]) + 2, len(PROMPTS[0]) - 1]


@pytest.mark.parametrize("bad", [dict(engine_mode="fast"), dict(compile_backend="xla")])
def test_config_names_what_it_expects(bad):
    with pytest.raises(ValueError, match="requires one of"):
        DecodeConfig(**bad)


def test_auto_mode_compiles_only_on_cuda():
    assert resolve_engine_mode("auto", "cpu") == "eager"
    assert resolve_engine_mode("auto", "cuda") == "compiled"
    assert resolve_engine_mode("static", "cpu") == "static"


def test_keep_last_indexes_the_last_positions():
    assert keep_last(1, 5).tolist() == [4]
    assert keep_last(3, 3).tolist() == [0, 1, 2]
    for count, width in ((0, 4), (5, 4)):
        with pytest.raises(ValueError, match="1 <= count <= width"):
            keep_last(count, width)


def test_index_gives_the_same_logits_as_an_int(tiny_target):
    model = tiny_target.model
    tokens = torch.tensor([[5, 9, 12, 5, 9]], device=model.device)
    with torch.inference_mode():
        by_int = model(tokens, logits_to_keep=2).logits
        by_index = model(tokens, logits_to_keep=keep_last(2, 5, model.device)).logits
    assert by_index.shape == (1, 2, model.config.vocab_size)
    assert torch.equal(by_int, by_index)
    # The rows handed to the LM head are plainly strided (a slice would keep the outer stride 5 x hidden).
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
    with torch.inference_mode():
        model(tokens, logits_to_keep=keep_last(1, 5, model.device))
    handle.remove()
    hidden = model.config.hidden_size
    assert seen == [(hidden, hidden, 1)]


class _Spy:
    """Records the logits_to_keep of every forward call of a model (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[object] = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.seen.append(kwargs.get("logits_to_keep", 0))


def test_engine_and_drafters_never_slice_with_an_int():
    """Every multi-token pass that keeps some logits passes an index tensor (``keep_last``), never an int."""
    target = TinyLM(tiny_llama(seed=0, layers=3), tiny_tokenizer())
    draft = TinyLM(tiny_llama(seed=1, layers=1), tiny_tokenizer())
    spies = [_Spy(target.model), _Spy(draft.model)]
    prompt = [5, 9, 12, 5, 9, 30, 7]
    config = DecodeConfig(k=3, max_new_tokens=12)
    run(target, prompt, DraftModelDrafter(draft.model), config)
    run(target, prompt, make_drafter("layer-skip", target, exit_layer=1), config)
    cache = RaggedCache(target.model, 2)
    cache.forward([torch.tensor(prompt), torch.tensor(prompt[:3])], last_only=True)
    drafter = make_drafter("draft-model", target, draft)
    run_batch(target, [prompt, prompt[:3]], drafter, config)
    kept = [k for spy in spies for k in spy.seen]
    assert kept and any(isinstance(k, torch.Tensor) for k in kept)
    assert all(isinstance(k, torch.Tensor) or k == 0 for k in kept), kept


def test_crop_cache_rolls_back_and_refuses_bad_lengths(tiny_target):
    cache = new_cache(tiny_target.model)
    with torch.inference_mode():
        tiny_target.model(torch.tensor([[5, 9, 12, 5]], device=tiny_target.model.device), cache=cache, use_cache=True)
    crop_cache(cache, 2)
    assert cache.get_seq_length() == 2
    with pytest.raises(ValueError, match="0 <= length <= 2"):
        crop_cache(cache, 3)


def test_rows_leaving_into_a_longer_pooled_storage_keep_their_tokens(tiny_target):
    """A smaller bucket may come from the pool with a larger capacity: the live rows' K/V are copied in place."""
    model = tiny_llama(seed=5, layers=1)
    longer = StaticKVCache(model, 1, 600)  # bucket 1, capacity 768: goes back to the pool
    with torch.inference_mode():
        longer.forward([torch.tensor([1])])
    longer.release()
    cache = StaticKVCache(model, 2, 10)  # bucket 2, capacity 256
    with torch.inference_mode():
        cache.forward([torch.tensor(PROMPTS[0]), torch.tensor(PROMPTS[2])])
        cache.select([1])  # bucket 1: the pooled 768-slot storage
        assert cache.bucket == 1 and cache.capacity == 768
        logits = cache.forward([torch.tensor([4])])
        alone = model(torch.tensor([PROMPTS[2] + [4]])).logits[0, -1]
    torch.testing.assert_close(logits[0, 0], alone, rtol=1e-4, atol=1e-4)
