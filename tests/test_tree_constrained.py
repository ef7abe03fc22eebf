"""Token trees under a grammar constraint: each node's verify row masked by the grammar state after its root path,
greedy fp32 output token for token the target's alone under the same grammar (every tree drafter, a JSON schema and
a regex), the output always valid, and the loop's matcher after each step equal to a fresh one fed the output."""

from __future__ import annotations

import json

import pytest
import torch

from lab.config import DecodeConfig
from lab.decode import decode_batch, run
from lab.drafters import EagleHead, EagleHeadConfig, make_drafter
from lab.drafters.base import DraftContext
from lab.drafters.eagle import eagle3_layers
from lab.grammar import Constraint, ConstraintSpec, first_invalid_token
from lab.models import is_prepared
from lab.sampling import SamplingParams
from lab.trace import BatchStep
from test_exactness import reference_greedy

pytestmark = pytest.mark.skipif(not is_prepared("smollm2-135m"), reason="needs SmolLM2's tokenizer (prepared preset)")

NEW_TOKENS = 24
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
}
SPECS = {"json": ConstraintSpec("json_schema", json.dumps(SCHEMA)), "date": ConstraintSpec("regex", r"\d{4}-\d{2}-\d{2}")}
TEXTS = {"json": '{"id": 7, "ok": true} {"id": 42, "ok": false} {"id": 7, "ok": true} {"',
         "date": "Date: 2024-01-31. Today is 2024-01-31, tomorrow 2024-02-01. 2024-"}
DRAFTERS = [("prompt-lookup", None), ("draft-model", "dynamic"), ("draft-model", "static"), ("layer-skip", "dynamic"),
            ("eagle", "dynamic")]


@pytest.fixture(scope="module")
def models(smol_tiny_models):
    return smol_tiny_models


@pytest.fixture(scope="module")
def constraints(models) -> dict[str, Constraint]:
    return {name: Constraint.for_model(spec, models[0]) for name, spec in SPECS.items()}


def _drafter(name: str, shape: str | None, models):
    target, draft = models
    head = None
    if name == "eagle":
        torch.manual_seed(0)
        config = EagleHeadConfig.for_target(target.model, intermediate_size=16, target="tiny",
                                            feature_layers=eagle3_layers(len(target.model.model.layers)))
        head = EagleHead(config).eval().requires_grad_(False).to(target.model.device)
    drafter = make_drafter(name, target, draft, exit_layer=1, head=head)
    if shape is not None:
        drafter.tree_topk, drafter.tree_shape = 3, shape
    return drafter


def _watch_matchers(constraint: Constraint, monkeypatch) -> list:
    """Record every matcher the loop makes from ``constraint``."""
    made = []
    new_state = constraint.new_state

    def recording():
        state = new_state()
        made.append(state)
        return state

    monkeypatch.setattr(constraint, "new_state", recording)
    return made


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("drafter_name, shape", DRAFTERS, ids=[f"{n}-{s}" if s else n for n, s in DRAFTERS])
def test_constrained_greedy_tree_equals_target_alone(models, constraints, smol_tokenizer, monkeypatch,
                                                     spec_name, drafter_name, shape):
    target, _ = models
    constraint = constraints[spec_name]
    prompt = smol_tokenizer.encode(TEXTS[spec_name], add_special_tokens=False)
    expected = reference_greedy(target.model, prompt, NEW_TOKENS, target.eos_token_ids, constraint)
    made = _watch_matchers(constraint, monkeypatch)
    config = DecodeConfig(k=4, max_new_tokens=NEW_TOKENS, engine_mode="eager", tree_budget=8)
    output, trees, accepted = [], 0, 0
    for event in decode_batch(target, [prompt], _drafter(drafter_name, shape, models), config, constraint=constraint):
        if not isinstance(event, BatchStep):
            continue
        step = event.steps[0]
        if step.tree is not None:  # the drafter proposes only what the grammar allows after each node's root path
            before = constraint.new_state()
            assert all(before.accept(t) for t in output)
            assert before.tree_bitmask(step.tree.tokens.tolist(), step.tree.parents.tolist())[1] == [True] * len(step.tree)
        output += step.emitted
        trees += step.tree is not None
        accepted += step.num_accepted
        # The loop's matcher after the step: the state of a fresh matcher fed exactly the committed output.
        fresh = constraint.new_state()
        assert all(fresh.accept(t) for t in output)
        loop = made[0]
        assert loop.is_terminated == fresh.is_terminated
        if not fresh.is_terminated:
            assert torch.equal(loop.allowed(), fresh.allowed()), f"step {step.index}"
    assert output == expected
    assert trees > 0 and accepted > 0, "trees were drafted and some of their nodes accepted"
    assert first_invalid_token(constraint, output) is None
    if output[-1] in target.eos_token_ids:
        assert constraint.is_valid(smol_tokenizer.decode(output, skip_special_tokens=True))


def test_tree_rows_are_masked_by_the_state_after_each_root_path(models, constraints, smol_tokenizer):
    """Against a reference built by feeding each node's root path to a fresh matcher; a refused node and its subtree
    keep the parent's row, and the matcher ends where it began."""
    target, _ = models
    constraint = constraints["date"]
    digit = [smol_tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    dash = smol_tokenizer.convert_tokens_to_ids("-")
    # root -> 2 -> 0 -> 2 ; root -> 2 -> '-' (refused) -> 1 (below a refused node) ; root -> 1
    tokens = [digit[2], digit[0], dash, digit[2], digit[1], digit[1]]
    parents = [-1, 0, 0, 1, 2, -1]
    vocab = target.model.config.vocab_size
    logits = torch.randn(len(tokens) + 1, vocab)
    state = constraint.new_state()
    masked = state.mask_tree_positions(logits, tokens, parents)
    _, valid = state.tree_bitmask(tokens, parents)
    assert valid == [True, True, False, True, False, True]
    assert torch.equal(state.allowed(), constraint.new_state().allowed()), "the matcher ends where it began"

    def row_after(path: list[int]) -> torch.Tensor:
        fresh = constraint.new_state()
        assert all(fresh.accept(t) for t in path)
        return fresh.mask_next(logits[0])  # only the mask matters: compare -inf patterns below

    reference_paths = {0: [], 1: [0], 2: [0, 1], 3: [0], 4: [0, 1, 3], 5: [0], 6: [5]}  # row -> path of its mask
    for row, path in reference_paths.items():
        expected = torch.isinf(row_after([tokens[n] for n in path]))
        assert torch.equal(torch.isinf(masked[row]), expected), f"row {row}"


def test_prompt_lookup_trie_drops_continuations_the_grammar_refuses(models, constraints, smol_tokenizer):
    target, _ = models
    constraint = constraints["date"]
    ids = torch.tensor(smol_tokenizer.encode("2024-01 2024x 2024", add_special_tokens=False))
    grammar = constraint.new_state()  # the output so far is "2024": the grammar wants "-" next
    assert all(grammar.accept(t) for t in smol_tokenizer.encode("2024", add_special_tokens=False))
    drafter = _drafter("prompt-lookup", None, models)
    tree = drafter.propose(DraftContext(ids, 0, 4, SamplingParams(), None, grammar, tree_budget=16)).tree
    unconstrained = drafter.propose(DraftContext(ids, 0, 4, SamplingParams(), None, None, tree_budget=16)).tree
    assert smol_tokenizer.decode(tree.tokens) == "-01"  # 'x 20' and the space after '-01' are refused
    assert len(unconstrained) > len(tree) and torch.equal(grammar.allowed(), _after(constraint, "2024"))


def _after(constraint: Constraint, text_tokens) -> torch.Tensor:
    from lab.models import load_tokenizer

    fresh = constraint.new_state()
    assert all(fresh.accept(t) for t in load_tokenizer("smollm2-135m").encode(text_tokens, add_special_tokens=False))
    return fresh.allowed()


def test_constrained_sampled_tree_is_valid_and_reproducible(models, constraints, smol_tokenizer):
    target, _ = models
    constraint = constraints["json"]
    prompt = smol_tokenizer.encode(TEXTS["json"], add_special_tokens=False)
    config = DecodeConfig(k=3, max_new_tokens=NEW_TOKENS, engine_mode="eager", tree_budget=6,
                          temperature=1.0, seed=3)
    runs = [run(target, prompt, _drafter("draft-model", "dynamic", models), config, constraint=constraint)
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids
    assert first_invalid_token(constraint, runs[0].token_ids) is None
    assert any(s.tree is not None for s in runs[0].steps)


def test_naive_grammar_mode_refuses_trees(models, constraints, smol_tokenizer):
    target, _ = models
    config = DecodeConfig(k=3, max_new_tokens=4, engine_mode="eager", tree_budget=4, grammar_mode="naive")
    with pytest.raises(ValueError, match="naive grammar mode .* drafts chains only"):
        run(target, [5, 6, 7], _drafter("prompt-lookup", None, models), config, constraint=constraints["json"])


def test_constrained_tree_sampling_follows_the_masked_target(models, constraints, smol_tokenizer):
    """SpecInfer's rule on the masked, renormalised rows: the first emitted token is distributed as the target's
    masked distribution, and a node the grammar refuses is never accepted."""
    from lab.tree import DraftTree, verify_tree_sampling

    target, _ = models
    constraint = constraints["date"]
    digit = [smol_tokenizer.convert_tokens_to_ids(str(d)) for d in range(4)]
    dash = smol_tokenizer.convert_tokens_to_ids("-")
    vocab = target.model.config.vocab_size
    logits = torch.full((4, vocab), -30.0)
    logits[:, digit] = torch.tensor([1.0, 0.5, 0.0, -0.5])
    logits[:, dash] = 2.0  # the target's favourite, refused by the grammar at the start of a date
    tokens, parents = [dash, digit[0], digit[1]], [-1, -1, 1]
    probs = torch.softmax(constraint.new_state().mask_tree_positions(logits, tokens, parents), -1)
    expected = torch.softmax(logits[0, digit], -1)
    assert probs[0, dash] == 0 and torch.allclose(probs[0, digit], expected)
    tree = DraftTree(torch.tensor(tokens), torch.tensor(parents))
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 1000  # seeded: deterministic
    for _ in range(n):
        verdict = verify_tree_sampling(probs, tree, generator)
        assert 0 not in verdict.path
        first = tokens[verdict.path[0]] if verdict.path else verdict.next_token
        counts[digit.index(first)] += 1
    assert torch.allclose(counts / n, expected, atol=0.05), (counts / n, expected)
