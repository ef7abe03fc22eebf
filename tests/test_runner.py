"""The static and captured paths (lab.runner): exact, fixed graphs, and a cache that only moves its position."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import OracleDrafter, TINY_VOCAB, reference_greedy, tiny_llama
from lab.config import DecodeConfig
from lab.drafters import DraftModelDrafter, LayerSkipDrafter, PromptLookupDrafter
from lab.drafters.base import Draft, DraftContext
from lab.engine import decode, run
from lab.runner import KVRunner, give_back, resolve_engine_mode, take_runner
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
    """The device-side position (what the model reads) is prompt + committed - 1 after each rollback, for both caches."""
    prompt = PROMPTS[2]
    reference = reference_greedy(tiny_target.model, prompt, 24)
    runner = KVRunner(tiny_target.model, MODES[mode]["engine_mode"], "eager")
    drafter = DraftModelDrafter(tiny_draft.model)
    committed = len(prompt)
    checked = 0
    for event in decode(tiny_target, prompt, drafter, DecodeConfig(k=4, max_new_tokens=24, **MODES[mode]), runner):
        if isinstance(event, Step):
            committed += len(event.emitted)
            assert runner.cache_length() == runner.length == event.target_cache_len == committed - 1
            # The draft holds the committed tokens and the accepted drafts it fed, never a rejected one.
            assert drafter.runner.cache_length() == drafter.runner.length == event.draft_cache_len
            assert drafter.cached_ids.tolist() == (list(prompt) + reference)[: event.draft_cache_len]
            checked += 1
    assert checked >= 5


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_graph_count_stays_fixed_across_acceptance_patterns(tiny_target, tiny_draft):
    """One captured graph per (model, width): random acceptance, short drafts and new prompts never add one."""
    config = DecodeConfig(k=4, max_new_tokens=16, **COMPILED)
    model_target = tiny_llama(seed=0, layers=3, hidden=48)  # shapes of its own: the first run makes its graphs
    model_draft = tiny_llama(seed=1, layers=1, hidden=16)
    target = type(tiny_target)(model_target, tiny_target.tokenizer)
    before = unique_graphs()
    first = run(target, PROMPTS[0], DraftModelDrafter(model_draft), config)
    after_first = unique_graphs()
    assert after_first - before == 2  # verify (width 5) and draft step (width 1)
    accepted = set()
    for seed, prompt in enumerate(PROMPTS * 3):
        reference = reference_greedy(model_target, prompt, 16)
        for drafter in (CoinFlipOracle(reference, len(prompt), seed), DraftModelDrafter(model_draft), PromptLookupDrafter()):
            result = run(target, prompt, drafter, config)
            assert result.token_ids == reference
            accepted |= {s.num_accepted for s in result.steps}
    assert accepted == {0, 1, 2, 3, 4}, "want every acceptance pattern"
    assert first.token_ids == reference_greedy(model_target, PROMPTS[0], 16)
    assert unique_graphs() == after_first


def test_graphs_are_one_per_width(tiny_target):
    """The target's verify pass (width K+1) and the draft's step (width 1): exactly two graphs.

    Models of one architecture share compiled graphs (their weights are graph inputs), so this test
    uses widths of its own to see its graphs being made.
    """
    before = unique_graphs()
    model_target = tiny_llama(seed=0, layers=3, hidden=40)
    model_draft = tiny_llama(seed=1, layers=1, hidden=24)
    target = type(tiny_target)(model_target, tiny_target.tokenizer)
    run(target, PROMPTS[0], DraftModelDrafter(model_draft), DecodeConfig(k=3, max_new_tokens=12, **COMPILED))
    assert unique_graphs() - before == 2


def test_static_runner_is_reused_and_never_shared():
    model = tiny_llama(seed=3, layers=1)
    first = take_runner(model, "static")
    second = take_runner(model, "static")
    assert first is not second  # taken twice at once: two caches
    first.reset(10)
    cache = first.cache
    give_back(first)
    again = take_runner(model, "static")
    assert again is first
    again.reset(12)  # fits: the same cache (same addresses), position back to 0
    assert again.cache is cache and again.length == 0 and again.cache_length() == 0
    again.reset(1000)  # does not fit: a larger one
    assert again.cache is not cache and again.capacity >= 1000
    assert take_runner(model, "eager") is not take_runner(model, "eager")


def test_runner_refuses_what_does_not_fit():
    model = tiny_llama(seed=3, layers=1)
    runner = KVRunner(model, "static")
    runner.reset(4)  # capacity rounds up to 256
    runner.forward(torch.zeros(1, 250, dtype=torch.long))
    with pytest.raises(ValueError, match="static cache holds 256 tokens"):
        runner.forward(torch.zeros(1, 2, dtype=torch.long), width=8)
    with pytest.raises(ValueError, match="1 <= n <= width"):
        runner.forward(torch.zeros(1, 3, dtype=torch.long), width=2)
    with pytest.raises(ValueError, match=r"0 <= length <= 250"):
        runner.crop(251)


@pytest.mark.parametrize("bad", [dict(engine_mode="fast"), dict(compile_backend="xla")])
def test_config_names_what_it_expects(bad):
    with pytest.raises(ValueError, match="requires one of"):
        DecodeConfig(**bad)


def test_auto_mode_compiles_only_on_cuda():
    assert resolve_engine_mode("auto", "cpu") == "eager"
    assert resolve_engine_mode("auto", "cuda") == "compiled"
    assert resolve_engine_mode("static", "cpu") == "static"
