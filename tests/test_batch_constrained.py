"""Constrained output in the batched engine: each row under its own matcher decodes exactly as if alone."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from lab.drafters import DraftModelDrafter, DraftContext, make_drafter
from lab.decode import run_batch, run
from lab.config import DecodeConfig
from lab.grammar import Constraint, ConstraintSpec, first_invalid_token
from lab.models import is_prepared
from lab.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not is_prepared("smollm2-135m"), reason="needs SmolLM2's tokenizer (prepared preset)")

# Bounded fields so the random tiny target completes the object within the budget.
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 99},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "role": {"enum": ["admin", "guest"]},
            },
            "required": ["id", "tags", "role"],
        }
    },
    "required": ["user"],
}
SPECS = {
    "nested-json": ConstraintSpec("json_schema", json.dumps(NESTED_SCHEMA)),
    "date": ConstraintSpec("regex", r"\d{4}-\d{2}-\d{2}"),
    "identifier": ConstraintSpec("regex", r"[A-Za-z_][A-Za-z0-9_]{0,7}"),
    "any-json": ConstraintSpec("any_json"),  # the random target writes long strings: cut by the budget
}
TEXT_PROMPTS = [
    '{"user": {"id": 12, "tags": ["a"], "role": "guest"}} {"user": {"id":',  # prompt lookup finds echoes
    "Date: 2024-01-31. Today is 2024-",
]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def models(smol_tiny_models):
    return smol_tiny_models


@pytest.fixture(scope="module")
def prompts(smol_tokenizer) -> list[list[int]]:
    """Four ragged prompts: 30, 22, 8 and 1 tokens."""
    encoded = [smol_tokenizer.encode(text, add_special_tokens=False) for text in TEXT_PROMPTS]
    return encoded + [[1, 504, 2043, 314, 253, 3459, 28, 198], [5]]


@pytest.fixture(scope="module")
def constraints(models):
    target, _ = models
    compile_for = functools.partial(Constraint, tokenizer=target.tokenizer, vocab_size=target.model.config.vocab_size,
                                    stop_token_ids=target.eos_token_ids)
    return {name: compile_for(spec) for name, spec in SPECS.items()}


def _step_view(steps) -> list[tuple]:
    return [(s.index, s.drafted, s.num_accepted, s.emitted, s.final_kind, s.cut_by_grammar) for s in steps]


def _counters(stats) -> tuple:
    return (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens, stats.accepted_per_position)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("drafter_name", ["draft-model", "prompt-lookup", "layer-skip"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_each_constrained_row_equals_its_prompt_decoded_alone(models, prompts, constraints, spec_name, drafter_name, k):
    """Tokens, stop reason, drafts and acceptances of ``lab.decode.run`` under the same constraint; valid output."""
    target, draft = models
    constraint = constraints[spec_name]
    config = DecodeConfig(k=k, max_new_tokens=NEW_TOKENS)
    drafter = functools.partial(make_drafter, drafter_name, target, draft, exit_layer=1)
    batched = run_batch(target, prompts, drafter(), config, constraint=constraint)
    for prompt, row in zip(prompts, batched.rows):
        alone = run(target, prompt, drafter(), config, constraint=constraint)
        assert row.token_ids == alone.token_ids
        assert row.reason == alone.reason
        assert _step_view(row.steps) == _step_view(alone.steps)
        assert _counters(row.stats) == _counters(alone.stats)
        assert first_invalid_token(constraint, row.token_ids) is None  # always a valid prefix
        if row.reason == "eos":
            assert constraint.is_valid(row.text), row.text
        else:
            assert row.reason == "max_new_tokens" and len(row.token_ids) == NEW_TOKENS
    if drafter_name != "prompt-lookup":
        assert sum(row.stats.num_accepted_tokens for row in batched.rows) > 0, "model drafts are accepted"


@pytest.mark.parametrize(
    "spec_name, reasons",
    [
        ("nested-json", ["eos"] * 4),
        ("date", ["eos"] * 4),
        ("identifier", ["eos"] * 4),
        ("any-json", ["max_new_tokens"] * 4),
    ],
)
def test_complete_outputs_are_valid_and_budget_cut_ones_are_valid_prefixes(models, prompts, constraints, spec_name,
                                                                             reasons):
    """Validity is asserted above only where outputs complete: pin which do, so both branches are exercised."""
    target, _ = models
    constraint = constraints[spec_name]
    result = run_batch(target, prompts, make_drafter("layer-skip", target, exit_layer=1),
                       DecodeConfig(k=3, max_new_tokens=NEW_TOKENS), constraint=constraint)
    assert [row.reason for row in result.rows] == reasons
    for row in result.rows:
        assert constraint.is_valid(row.text) == (row.reason == "eos"), row.text


def test_rows_finishing_by_grammar_leave_while_budget_rows_go_on(models, prompts, constraints):
    """With a budget between the rows' output lengths, complete rows stop on EOS and leave; the others are cut."""
    target, draft = models
    constraint = constraints["nested-json"]
    full = run_batch(target, prompts, None, DecodeConfig(max_new_tokens=NEW_TOKENS), constraint=constraint)
    lengths = sorted(len(row.token_ids) for row in full.rows)
    assert lengths[0] < lengths[-1], "the rows' JSON objects should differ in length"
    budget = lengths[0]
    result = run_batch(target, prompts, DraftModelDrafter(draft.model), DecodeConfig(k=3, max_new_tokens=budget),
                       constraint=constraint)
    for row, whole in zip(result.rows, full.rows):
        if len(whole.token_ids) <= budget:
            assert row.reason == "eos" and row.token_ids == whole.token_ids and constraint.is_valid(row.text)
        else:
            assert row.reason == "max_new_tokens" and row.token_ids == whole.token_ids[:budget]
            assert first_invalid_token(constraint, row.token_ids) is None
            # Only a row cut just before its EOS holds a complete object.
            assert constraint.is_valid(row.text) == (len(whole.token_ids) == budget + 1), row.text
    assert {row.reason for row in result.rows} == {"eos", "max_new_tokens"}


def test_draft_model_stops_drafting_a_row_whose_grammar_completed(models, prompts, constraints):
    """A date is complete after 10 characters: a row drafts EOS and no more, while other rows draft on."""
    target, draft = models
    constraint = constraints["date"]
    k = 4
    result = run_batch(target, prompts, DraftModelDrafter(draft.model), DecodeConfig(k=k, max_new_tokens=NEW_TOKENS),
                       constraint=constraint)
    eos = target.eos_token_ids[0]
    steps = [s for row in result.rows for s in row.steps]
    assert any(s.drafted and s.drafted[-1] == eos and len(s.drafted) < k for s in steps), "a row drafted EOS early"
    assert all(eos not in s.drafted[:-1] for s in steps), "nothing is drafted after the grammar completes"


def test_batch_draft_model_drafts_under_each_rows_grammar_and_rolls_it_back(models, prompts, constraints):
    """Per row the single-row drafter's proposal under that row's matcher (one row mid-output), then rolled back."""
    target, draft = models
    constraint = constraints["nested-json"]
    states = [constraint.new_state() for _ in prompts]
    prefix = target.tokenizer.encode('{"user": {"id', add_special_tokens=False)
    for token in prefix:  # row 1 has already output part of the object
        assert states[1].accept(token)
    committed = [torch.tensor(p) for p in prompts]
    committed[1] = torch.cat([committed[1], torch.tensor(prefix)])
    sampling = SamplingParams()
    contexts = [DraftContext(ids, len(p), 3, sampling, grammar=s) for ids, p, s in zip(committed, prompts, states)]
    allowed_before = [s.allowed() for s in states]
    batched = DraftModelDrafter(draft.model)
    batched.reset(len(prompts))
    drafts = batched.propose(contexts)
    for b, (ctx, drafted) in enumerate(zip(contexts, drafts)):
        assert torch.equal(states[b].allowed(), allowed_before[b]), "the matcher is back at the committed output"
        single = DraftModelDrafter(draft.model)
        single.reset(1)
        alone = single.propose([ctx])[0]
        assert drafted.tokens.tolist() == alone.tokens.tolist()
        output = (prefix if b == 1 else []) + drafted.tokens.tolist()
        assert first_invalid_token(constraint, output) is None


def test_seeded_sampling_under_a_constraint_samples_each_row_as_alone(models, prompts, constraints):
    target, draft = models
    constraint = constraints["nested-json"]
    sampled = functools.partial(DecodeConfig, k=3, max_new_tokens=24, temperature=1.0)
    result = run_batch(target, prompts, DraftModelDrafter(draft.model), sampled(seed=5), constraint=constraint)
    for i, (prompt, row) in enumerate(zip(prompts, result.rows)):
        alone = run(target, prompt, DraftModelDrafter(draft.model), sampled(seed=5 + i), constraint=constraint)
        assert row.token_ids == alone.token_ids
        assert first_invalid_token(constraint, row.token_ids) is None


def test_naive_grammar_mode_in_a_batch_breaks_each_row_as_it_does_alone(models, prompts, constraints):
    """The teaching switch runs in the one loop at any batch size: each row is what the naive mode gives alone."""
    target, draft = models
    config = DecodeConfig(k=3, max_new_tokens=16, grammar_mode="naive")
    constraint = constraints["date"]
    batched = run_batch(target, prompts, DraftModelDrafter(draft.model), config, constraint=constraint)
    for prompt, row in zip(prompts, batched.rows):
        alone = run(target, prompt, DraftModelDrafter(draft.model), config, constraint=constraint)
        assert row.token_ids == alone.token_ids
    # Without a constraint the grammar mode means nothing.
    assert len(run_batch(target, prompts[:2], None, config).rows) == 2
