"""Token trees (lab.tree): the mask against a hand-built reference, greedy exactness of every tree drafter in the
one decode loop, the cache after a step, the sampling rule's output distribution, and bad budgets refused."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VOCAB, OracleDrafter, reference_greedy
from lab.config import DecodeConfig
from lab.decode import decode_batch, run, run_batch
from lab.drafters import make_drafter
from lab.drafters.base import Draft, DraftContext
from lab.drafters.draft_model import DraftModelDrafter
from lab.drafters.prompt_lookup import find_ngram_trie
from lab.kv import RaggedCache
from lab.trace import BatchStep
from lab.tree import (
    DraftTree, accepted_slots, check_tree_budget, tree_attention_mask, tree_position_ids, verify_tree_greedy,
    verify_tree_sampling,
)

NEG = torch.finfo(torch.float32).min


def test_mask_matches_hand_built_reference():
    # Root r; nodes 0 (a) and 1 (b) children of r; 2 (c) child of 0; 3 (d) child of 2; prefix of 2 cached tokens.
    parents = torch.tensor([-1, -1, 0, 2])
    #          p0 p1 r  a  b  c  d
    visible = [[1, 1, 1, 0, 0, 0, 0],  # r
               [1, 1, 1, 1, 0, 0, 0],  # a
               [1, 1, 1, 0, 1, 0, 0],  # b
               [1, 1, 1, 1, 0, 1, 0],  # c
               [1, 1, 1, 1, 0, 1, 1]]  # d
    expected = torch.where(torch.tensor(visible, dtype=torch.bool), 0.0, NEG)[None, None]
    assert torch.equal(tree_attention_mask(parents, 2), expected)
    assert tree_position_ids(parents, 2).tolist() == [[2, 3, 3, 4, 5]]
    assert accepted_slots(2, [0, 2]) == [0, 1, 2, 3, 5]


def test_greedy_verdict_takes_longest_matching_path_with_repeated_tokens():
    # Target argmax after root: 5; after the second 5 (node 2): 7; after node 1 nothing matches.
    tree = DraftTree(torch.tensor([4, 5, 5, 7]), torch.tensor([-1, -1, -1, 2]))
    argmax = [5, 0, 9, 7, 3]  # columns: root, node 0..3
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), 10).float()
    verdict = verify_tree_greedy(logits, tree)
    assert verdict.path == (2, 3) and verdict.next_token == 3 and verdict.bonus
    verdict = verify_tree_greedy(logits, DraftTree(torch.tensor([6]), torch.tensor([-1])))
    assert verdict.path == () and verdict.next_token == 5 and not verdict.bonus


class TreeOracle:
    """Drafts a tree around the target's greedy continuation: a wrong first sibling, the right token twice (the
    second copy carries the longer right path), or (single=True) one node, right or wrong in turn."""

    name = "tree-oracle"
    drafts_trees = True

    def __init__(self, reference: list[int], num_prompt_tokens: int, single: bool = False) -> None:
        self.reference, self.num_prompt_tokens, self.single, self.calls = reference, num_prompt_tokens, single, 0

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Draft:
        done = ctx.token_ids.shape[0] - self.num_prompt_tokens
        right = self.reference[done : done + ctx.k]
        self.calls += 1
        if not right:
            return Draft.empty()
        wrong = (right[0] + 1) % TINY_VOCAB
        if self.single:
            token = right[0] if self.calls % 2 else wrong
            return Draft.of_tree(DraftTree(torch.tensor([token]), torch.tensor([-1])))
        tokens, parents = [wrong, right[0], right[0]], [-1, -1, -1]
        for i, token in enumerate(right[1:]):
            tokens.append(token)
            parents.append(2 if i == 0 else len(tokens) - 2)
        budget = max(1, min(ctx.tree_budget, len(tokens)))
        return Draft.of_tree(DraftTree(torch.tensor(tokens[:budget]), torch.tensor(parents[:budget])))

    def observe(self, num_accepted: int) -> None:
        pass


PROMPT = [5, 9, 12, 5, 9, 12, 5, 9, 3, 5, 9]


@pytest.mark.parametrize("single", [False, True])
def test_oracle_trees_are_exact(tiny_target, single):
    reference = reference_greedy(tiny_target.model, PROMPT, 20)
    config = DecodeConfig(k=3, max_new_tokens=20, engine_mode="eager", tree_budget=6)
    result = run(tiny_target, PROMPT, TreeOracle(reference, len(PROMPT), single), config)
    assert result.token_ids == reference
    trees = [s for s in result.steps if s.tree is not None]
    assert trees and all(s.tree_size == (1 if single else min(6, s.tree_size)) for s in trees)
    if not single:  # the right path hides under the second copy of the right token
        assert max(s.num_accepted for s in trees) == 3


@pytest.mark.parametrize("budget", [1, 4, 16])
def test_prompt_lookup_trie_is_exact(tiny_target, budget):
    prompt = [int(t) for t in torch.randint(2, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(4))]
    reference = reference_greedy(tiny_target.model, prompt, 24)
    config = DecodeConfig(k=4, max_new_tokens=24, engine_mode="eager", tree_budget=budget)
    result = run(tiny_target, prompt, make_drafter("prompt-lookup", tiny_target), config)
    assert result.token_ids == reference
    assert all(s.tree_size <= budget for s in result.steps)


def test_ngram_trie_merges_continuations_and_keeps_the_chain_first():
    ids = torch.tensor([1, 2, 3, 1, 2, 4, 9, 1, 2, 3, 7, 1, 2])
    tree = find_ngram_trie(ids, 1, 2, depth=2, budget=8)
    # "1 2" occurs at 7 (-> 3 7), 3 (-> 4 9), 0 (-> 3 1: shares the node 3); then "2" adds nothing new at depth 1.
    assert tree.tokens.tolist()[:4] == [3, 7, 4, 9]
    assert tree.parents.tolist()[:4] == [-1, 0, -1, 2]
    assert tree.tokens.tolist()[4] == 1 and tree.parents.tolist()[4] == 0
    assert find_ngram_trie(torch.tensor([1, 2, 3]), 1, 2, 2, 8) is None
    assert len(find_ngram_trie(ids, 1, 2, depth=2, budget=1)) == 1


def test_cache_holds_prompt_and_accepted_path_after_each_step(tiny_target):
    reference = reference_greedy(tiny_target.model, PROMPT, 12)
    cache = RaggedCache(tiny_target.model, 1)
    config = DecodeConfig(k=3, max_new_tokens=12, engine_mode="eager", tree_budget=6)
    committed = list(PROMPT)
    for event in decode_batch(tiny_target, [PROMPT], TreeOracle(reference, len(PROMPT)), config, target_cache=cache):
        if isinstance(event, BatchStep):
            committed += list(event.steps[0].emitted)
            if event.finished:
                break
            # The cache holds every committed token but the last: compare its K/V with a plain pass.
            assert cache.lengths == [len(committed) - 1]
            plain = tiny_target.model(torch.tensor([committed[:-1]]), use_cache=True).past_key_values
            for ours, theirs in zip(cache.layers, plain.layers):
                assert ours.keys.shape == theirs.keys.shape
                torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(ours.values, theirs.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", ["dynamic", "static"])
@pytest.mark.parametrize("budget", [1, 5, 12])
def test_draft_model_trees_are_exact(tiny_target, tiny_draft, shape, budget):
    prompt = [7, 3, 9, 11, 2, 30]
    reference = reference_greedy(tiny_target.model, prompt, 24)
    config = DecodeConfig(k=4, max_new_tokens=24, engine_mode="eager", tree_budget=budget)
    drafter = DraftModelDrafter(tiny_draft.model, tree_topk=3, tree_shape=shape)
    result = run(tiny_target, prompt, drafter, config)
    assert result.token_ids == reference
    assert all(1 <= s.tree_size <= budget for s in result.steps if s.drafted)
    assert max(s.num_accepted for s in result.steps) >= 1


def test_layer_skip_tree_is_exact(tiny_target):
    prompt = [7, 3, 9, 11, 2, 30]
    config = DecodeConfig(k=3, max_new_tokens=16, engine_mode="eager", tree_budget=8)
    result = run(tiny_target, prompt, make_drafter("layer-skip", tiny_target), config)
    assert result.token_ids == reference_greedy(tiny_target.model, prompt, 16)


def test_tree_sampling_output_follows_target():
    """SpecInfer's rule: the first emitted token's frequencies converge to the target's, for a deterministic tree
    with a repeated token and for children drawn independently from the draft; top-k soft children are biased."""
    g = torch.Generator().manual_seed(7)
    target = torch.softmax(2 * torch.randn(8, generator=g), -1)
    draft = torch.softmax(2 * torch.randn(8, generator=g), -1)
    probs = torch.stack([target] + [target] * 3)  # [N + 1, V]; deeper columns do not matter for the first token

    def tv(make_tree, samples=12000, seed=0):
        gen = torch.Generator().manual_seed(seed)
        counts = torch.zeros(8)
        for _ in range(samples):
            tree = make_tree(gen)
            verdict = verify_tree_sampling(probs[: len(tree) + 1], tree, gen)
            counts[tree.tokens[verdict.path[0]] if verdict.path else verdict.next_token] += 1
        return 0.5 * float((counts / samples - target).abs().sum())

    deterministic = DraftTree(torch.tensor([3, 5, 3]), torch.tensor([-1, -1, -1]))
    assert tv(lambda gen: deterministic) < 0.02

    def iid(gen):
        tokens = torch.multinomial(draft, 3, replacement=True, generator=gen)
        return DraftTree(tokens, torch.tensor([-1, -1, -1]), sampled_from=draft.expand(3, 8))

    assert tv(iid, seed=1) < 0.02
    top = torch.topk(draft, 3).indices
    soft_top_k = DraftTree(top, torch.tensor([-1, -1, -1]), sampled_from=draft.expand(3, 8))
    assert tv(lambda gen: soft_top_k, seed=2) > 0.05  # why model drafters build deterministic trees under sampling


def test_sampled_tree_decode_is_reproducible(tiny_target):
    config = DecodeConfig(k=3, max_new_tokens=12, engine_mode="eager", tree_budget=8, temperature=1.0, seed=3)
    drafter = make_drafter("prompt-lookup", tiny_target)
    first = run(tiny_target, PROMPT, drafter, config).token_ids
    assert first == run(tiny_target, PROMPT, drafter, config).token_ids and len(first) == 12


@pytest.mark.parametrize("budget", [-1, 65, 2.5, True])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(ValueError, match="tree budget .*requires an integer 0 \\(a chain\\) or 1..64"):
        DecodeConfig(tree_budget=budget)


def test_target_alone_ignores_the_tree_budget(tiny_target):
    config = DecodeConfig(k=3, max_new_tokens=6, engine_mode="eager", tree_budget=8)
    assert run(tiny_target, PROMPT, None, config).token_ids == reference_greedy(tiny_target.model, PROMPT, 6)


def test_zero_budget_refused_where_a_tree_is_required():
    with pytest.raises(ValueError, match="requires an integer 1..64; got 0"):
        check_tree_budget(0, allow_chain=False)


@pytest.mark.parametrize(
    "drafter, prompts, extra, message",
    [
        ("prompt-lookup", [PROMPT, PROMPT[:4]], {}, "token trees require batch size 1; got 2"),
        ("prompt-lookup", [PROMPT], {"engine_mode": "static"}, "token trees require the eager engine"),
        ("oracle", [PROMPT], {}, "the oracle drafter drafts chains only"),
    ],
)
def test_trees_refused_clearly_where_unsupported(tiny_target, drafter, prompts, extra, message):
    config = DecodeConfig(k=3, max_new_tokens=4, tree_budget=4, **({"engine_mode": "eager"} | extra))
    with pytest.raises(ValueError, match=message):
        chain = OracleDrafter(PROMPT, len(PROMPT), agree=True) if drafter == "oracle" else None
        run_batch(tiny_target, prompts, chain or make_drafter(drafter, tiny_target), config)


def test_tree_drawing_marks_the_accepted_path(tiny_target):
    from app.render_tree import tree_figure
    from lab.tree_view import tree_rows, tree_text

    reference = reference_greedy(tiny_target.model, PROMPT, 6)
    config = DecodeConfig(k=3, max_new_tokens=6, engine_mode="eager", tree_budget=6)
    step = run(tiny_target, PROMPT, TreeOracle(reference, len(PROMPT)), config).steps[0]
    rows = tree_rows(step, tiny_target.tokenizer, PROMPT)
    assert [r.node for r in rows if r.status == "accepted"] == list(step.tree_path) == [2, 3, 4]
    assert rows[0].status == "root" and rows[-1].status == step.final_kind == "bonus"
    text = tree_text(step, tiny_target.tokenizer, PROMPT)
    assert text.count("\n+ ") == 0 and text.count("+ ") == 3 and text.count("x ") == 2
    figure = tree_figure(step, tiny_target.tokenizer, PROMPT)
    assert {t.name for t in figure.data if t.name} == {"root", "accepted", "rejected", "bonus"}


@pytest.mark.parametrize("a, n", [(0.3, 1), (0.6, 4), (0.9, 8)])
def test_tree_model_without_siblings_is_leviathans_chain(a, n):
    from lab.theory import expected_tokens_per_step
    from lab.tree_theory import best_tree

    plan = best_tree(a, n, decay=0.0)
    assert plan.parents == tuple(range(-1, n - 1))  # a chain
    assert plan.expected_tokens == pytest.approx(expected_tokens_per_step(a, n))


def test_tree_model_hand_computed_and_budget_choice():
    from lab.tree_theory import best_tree, best_tree_budget

    # a = 0.5, s = 0.5: root's first child 0.5, its child 0.25, the second root child 0.5 * 0.25 = 0.125.
    plan = best_tree(0.5, 3, decay=0.5)
    assert plan.parents == (-1, 0, -1) and plan.values == pytest.approx((0.5, 0.25, 0.125))
    # Flat verify cost (a GPU at batch 1): the widest tree pays; a verify cost rising with N (this CPU): a small one.
    assert best_tree_budget(0.4, 0.0, {4: 1.0, 16: 1.0, 64: 1.0})[0] == 64
    assert best_tree_budget(0.4, 0.0, {4: 1.0, 16: 2.0, 64: 6.0})[0] == 4


def _eagle(target):
    from lab.drafters import EagleDrafter, EagleHead, EagleHeadConfig

    torch.manual_seed(0)
    config = EagleHeadConfig.for_target(target.model, intermediate_size=16, target="tiny")
    return EagleDrafter(target.model, EagleHead(config).eval().requires_grad_(False))


@pytest.mark.parametrize("which", ["draft-model", "eagle"])
def test_a_one_wide_tree_drafts_what_the_chain_drafts(tiny_target, tiny_draft, which):
    """A static tree with one child per node is the chain: same drafts at every step. For the EAGLE head this checks
    the head's tree mask and positions, and the folding of the target's tree-pass features along the accepted path."""
    def make():
        drafter = DraftModelDrafter(tiny_draft.model) if which == "draft-model" else _eagle(tiny_target)
        drafter.tree_topk, drafter.tree_shape = 1, "static"
        return drafter

    prompt = [7, 3, 9, 11, 2, 30, 7, 3, 9]
    chain = run(tiny_target, prompt, make(), DecodeConfig(k=3, max_new_tokens=20, engine_mode="eager"))
    tree = run(tiny_target, prompt, make(), DecodeConfig(k=3, max_new_tokens=20, engine_mode="eager", tree_budget=3))
    assert [s.drafted for s in tree.steps] == [s.drafted for s in chain.steps]
    assert all(s.tree is not None for s in tree.steps if s.drafted)
    assert tree.token_ids == chain.token_ids == reference_greedy(tiny_target.model, prompt, 20)


@pytest.mark.parametrize("budget", [1, 6, 16])
def test_eagle_dynamic_tree_is_exact(tiny_target, budget):
    prompt = [7, 3, 9, 11, 2, 30, 7, 3, 9]
    config = DecodeConfig(k=4, max_new_tokens=20, engine_mode="eager", tree_budget=budget)
    result = run(tiny_target, prompt, _eagle(tiny_target), config)
    assert result.token_ids == reference_greedy(tiny_target.model, prompt, 20)
    assert all(1 <= s.tree_size <= budget for s in result.steps if s.drafted)


def test_tree_pass_features_fold_along_the_accepted_path():
    from types import SimpleNamespace

    from lab.drafters.eagle_tree import fold_tree_features

    # recorded: 2 prefix tokens, the root, then the tree's 4 nodes in node order (features = their slot number)
    ids = torch.tensor([40, 41, 42, 5, 6, 7, 8])
    features = SimpleNamespace(ids=[ids], feats=[torch.arange(7.0)[:, None]])
    tree = DraftTree(torch.tensor([5, 6, 7, 8]), torch.tensor([-1, -1, 1, 2]))
    committed = torch.tensor([40, 41, 42, 6, 7, 9])  # path: node 1 (6), node 2 (7), then the target's 9
    fold_tree_features(features, 0, committed, tree, base=3)
    assert features.ids[0].tolist() == [40, 41, 42, 6, 7]
    assert features.feats[0].flatten().tolist() == [0, 1, 2, 4, 5]


def test_compare_runs_a_tree_beside_its_chain(tiny_target):
    from lab.studies.compare import DrafterSpec, run_comparison

    specs = [DrafterSpec("prompt-lookup"), DrafterSpec("prompt-lookup", tree_budget=8)]
    assert specs[1].label == "prompt-lookup (n 1-3, tree 8)"
    comparison = run_comparison(tiny_target, ["t3 t4 t5 t6 t3 t4 t5 t7 t3 t4 t5 t6 t3 t4"], specs, [3],
                                DecodeConfig(max_new_tokens=12, engine_mode="eager"), chat_template=False)
    summary = comparison.summary().set_index("drafter")
    assert set(comparison.settings["verify_cost"]) == {"3", "8"}  # v(K) for the chain, v(N) for the tree
    tree = summary.loc["prompt-lookup (n 1-3, tree 8)"]
    assert tree["tree_budget"] == 8 and 1 <= tree["mean_tree_size"] <= 8
    assert tree["bare_verify_cost"] == comparison.settings["verify_cost"]["8"]
    assert tree["identical_to_target"] == 1.0  # fp32: exact
    with pytest.raises(ValueError, match="tree budget"):
        DrafterSpec("prompt-lookup", tree_budget=65)


def test_bench_sweep_runs_trees_at_batch_size_one_only(tiny_target):
    from lab.drafters import PromptLookupDrafter
    from lab.studies.batch_sweep import run_sweep

    prompts = [PROMPT, PROMPT[2:]]
    config = DecodeConfig(k=3, max_new_tokens=8, engine_mode="eager", tree_budget=6)
    sweep = run_sweep(tiny_target, prompts, PromptLookupDrafter(), config, (1,))
    assert [r.batch_size for r in sweep.results] == [1]
    with pytest.raises(ValueError, match="token trees .*requires batch size 1 only|requires batch size 1 only"):
        run_sweep(tiny_target, prompts, PromptLookupDrafter(), config, (1, 2))


@pytest.mark.parametrize("tree_ms, expected", [
    ({8: 10.0, 16: 10.0, 32: 10.0, 64: 10.0}, 64),  # flat v(N) = 1 (a GPU at batch 1): the widest tree pays
    ({8: 20.0, 16: 40.0, 32: 80.0, 64: 160.0}, 4),  # v(N) rising steeply: no wider than the cheap passes (4 nodes)
])
def test_calibration_picks_the_tree_budget_by_measured_v(tree_ms, expected):
    from lab.studies.calibrate import Calibration, PrecisionTimings

    timing = PrecisionTimings("bf16", 10.0, {k: 10.0 for k in (1, 2, 4)}, None, tree_ms)
    machine = {"cpu": "test", "cpu_flags": [], "device": "cpu", "threads": 2, "torch": "x"}
    calibration = Calibration("t", None, "prompt-lookup", machine, [timing], 0.4, 16, 1)
    assert calibration.tree_budget == expected
    assert f"N = {expected}" in calibration.explain()
    assert Calibration.from_dict(calibration.as_dict()).timings[0].tree_verify_ms == tree_ms


def test_auto_engine_runs_a_tree_eager_even_where_it_would_capture_chains():
    # On CUDA "auto" means compiled; a tree cannot be captured, so "auto" takes it eager instead of refusing it.
    from lab.decode import loop_engine_mode

    drafter = make_drafter("prompt-lookup", None)
    tree = DecodeConfig(k=3, tree_budget=8)  # engine_mode "auto"
    assert loop_engine_mode(tree, "cuda", drafter) == "eager"
    assert loop_engine_mode(DecodeConfig(k=3), "cuda", drafter) == "compiled"  # a chain is still captured
    assert loop_engine_mode(DecodeConfig(k=3, tree_budget=8, engine_mode="static"), "cuda", drafter) == "static"
