"""Constrained output under speculation: always valid, and identical to constrained decoding without it."""

from __future__ import annotations

import json

import pytest
import torch

from lab.config import DecodeConfig
from lab.drafters import DraftContext, make_drafter
from lab.decode import run
from lab.grammar import Constraint, ConstraintSpec, GrammarError, first_invalid_token
from lab.sampling import SamplingParams

SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}}, "required": ["id", "tags"]}}, "required": ["user"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
    "array-of-objects": {"type": "array", "items": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}, "maxItems": 2},
    "enum": {"type": "string", "enum": ["red", "green", "blue"]},
    "enum-object": {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["status", "count"]},
    "number": {"type": "number", "minimum": -10, "maximum": 10},
    "integer-range": {"type": "integer", "minimum": -5, "maximum": 5},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "const": {"const": "ok"},
    "optional-fields": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "string", "maxLength": 4}}, "required": ["a"]},
    "short-string": {"type": "string", "maxLength": 6},  # escapes and unicode show up here
    "any-of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 3}]},
}
REGEXES = {
    "date": r"\d{4}-\d{2}-\d{2}",
    "identifier": r"[A-Za-z_][A-Za-z0-9_]{0,7}",
    "yes-no": r"(yes|no)",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "hex-colour": r"#[0-9a-f]{6}",
    "email": r"[a-z]{1,5}@[a-z]{1,5}\.(com|org)",
}
SPECS = (
    [pytest.param(ConstraintSpec("json_schema", json.dumps(s)), id=f"schema-{n}") for n, s in SCHEMAS.items()]
    + [pytest.param(ConstraintSpec("regex", r), id=f"regex-{n}") for n, r in REGEXES.items()]
    + [pytest.param(ConstraintSpec("any_json"), id="any-json")]
)
PROMPT = [1, 504, 2043, 314, 253, 3459, 28, 198]  # any ids: the tiny model is random


@pytest.fixture(scope="module")
def models(smol_tiny_models):
    return smol_tiny_models


def compile_for(target, spec) -> Constraint:
    return Constraint(spec, target.tokenizer, target.model.config.vocab_size, target.eos_token_ids)


@pytest.mark.parametrize("spec", SPECS)
def test_speculative_constrained_output_is_valid_and_exact(models, spec):
    target, draft = models
    constraint = compile_for(target, spec)
    reference = run(target, PROMPT, None, DecodeConfig(max_new_tokens=40), constraint=constraint)
    assert first_invalid_token(constraint, reference.token_ids) is None
    if reference.reason == "eos":
        assert constraint.is_valid(reference.text), reference.text
    for drafter_name in ("prompt-lookup", "draft-model", "layer-skip"):
        for k in (1, 3, 6):
            drafter = make_drafter(drafter_name, target, draft, exit_layer=1)
            result = run(target, PROMPT, drafter, DecodeConfig(k=k, max_new_tokens=40), constraint=constraint)
            assert result.token_ids == reference.token_ids, (drafter_name, k)


def test_most_constrained_runs_complete(models):
    """Validity is only checked on complete outputs: make sure most of them complete."""
    target, _ = models
    complete = 0
    for param in SPECS:
        spec = param.values[0]
        result = run(target, PROMPT, None, DecodeConfig(max_new_tokens=40), constraint=compile_for(target, spec))
        complete += result.reason == "eos"
    assert complete >= len(SPECS) * 2 // 3


def test_prompt_lookup_proposal_is_cut_at_first_forbidden_token(models):
    target, _ = models
    tok = target.tokenizer
    # The prompt ends with ' "b' seen before, so prompt lookup proposes '":', ' ', '2', ...;
    # under the "boolean" schema the first proposed token is forbidden and the proposal is cut.
    prompt = tok.encode('{"a": 1, "b": 2, "a": 1, "b', add_special_tokens=False)
    assert make_drafter("prompt-lookup", target, max_n=2).propose(
        DraftContext(torch.tensor(prompt), len(prompt), 4, SamplingParams())
    ).tokens.numel() == 4
    constraint = compile_for(target, ConstraintSpec("json_schema", json.dumps({"type": "boolean"})))
    result = run(target, prompt, make_drafter("prompt-lookup", target, max_n=2), DecodeConfig(k=4, max_new_tokens=8), constraint=constraint)
    assert any(step.cut_by_grammar for step in result.steps)
    assert result.steps[0].cut_by_grammar[:1] == (tok.encode('":', add_special_tokens=False)[0],)
    assert result.text in ("true", "false")


def test_naive_mode_breaks_on_some_case(models):
    """The teaching switch shows a real failure: invalid or different output somewhere."""
    target, draft = models
    broken = 0
    for param in SPECS:
        constraint = compile_for(target, param.values[0])
        exact = run(target, PROMPT, None, DecodeConfig(max_new_tokens=40), constraint=constraint)
        naive = run(target, PROMPT, make_drafter("draft-model", target, draft), DecodeConfig(k=3, max_new_tokens=40, grammar_mode="naive"), constraint=constraint)
        broken += naive.token_ids != exact.token_ids or first_invalid_token(constraint, naive.token_ids) is not None
    assert broken >= 1


def test_sampling_under_constraint_stays_valid_and_reproducible(models):
    target, draft = models
    constraint = compile_for(target, ConstraintSpec("json_schema", json.dumps(SCHEMAS["enum-object"])))
    config = DecodeConfig(k=3, max_new_tokens=40, temperature=1.0, seed=3)
    first = run(target, PROMPT, make_drafter("draft-model", target, draft), config, constraint=constraint)
    second = run(target, PROMPT, make_drafter("draft-model", target, draft), config, constraint=constraint)
    assert first.token_ids == second.token_ids
    assert first_invalid_token(constraint, first.token_ids) is None


@pytest.mark.parametrize(
    "spec, message",
    [
        (ConstraintSpec("json_schema", '{"type": "objec'), "The JSON schema is not valid JSON"),
        (ConstraintSpec("json_schema", '{"type": "objec"}'), "The JSON schema does not compile"),
        (ConstraintSpec("regex", "[a-"), "The regular expression does not compile: Regex parsing error at position 4: Unclosed '\\['"),
    ],
)
def test_bad_constraints_get_plain_messages(models, spec, message):
    target, _ = models
    with pytest.raises(GrammarError, match=message):
        compile_for(target, spec)


def test_empty_or_unknown_constraints_are_refused():
    with pytest.raises(ValueError, match="The constraint is empty: paste a JSON schema first"):
        ConstraintSpec("json_schema", " ")
    with pytest.raises(ValueError, match="constraint requires one of json_schema, regex, any_json; got 'xml'"):
        ConstraintSpec("xml")


def test_unsatisfiable_within_budget_is_reported_not_crashed(models):
    target, _ = models
    constraint = compile_for(target, ConstraintSpec("regex", r"a{50}"))
    result = run(target, PROMPT, make_drafter("prompt-lookup", target), DecodeConfig(k=3, max_new_tokens=10), constraint=constraint)
    assert result.reason == "max_new_tokens"
    assert not constraint.is_valid(result.text)
    assert first_invalid_token(constraint, result.token_ids) is None  # what was produced is a valid prefix
