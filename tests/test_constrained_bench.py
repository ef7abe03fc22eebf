"""The constrained-output study: every run accounted for, exact against the target alone, honest about validity."""

from __future__ import annotations

import json

import pytest

from lab.studies.peer import DrafterSpec
from lab.studies.constrained import (
    SETTINGS,
    TARGET_ALONE,
    ExtractionItem,
    load_extraction_items,
    run_constrained_study,
)
from lab.grammar import Constraint, GrammarError
from lab.models import is_prepared

pytestmark = pytest.mark.skipif(not is_prepared("smollm2-135m"), reason="needs SmolLM2's tokenizer (prepared preset)")

# Bounded strings so the random tiny model finishes most objects within the budget.
ITEMS = [
    ExtractionItem("person", "Extract the person as JSON.\n\nText: Ann, 30.",
                   {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                     "age": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["name", "age"]}),
    ExtractionItem("colour", "Pick a colour as JSON.",
                   {"type": "object", "properties": {"c": {"enum": ["red", "blue"]}}, "required": ["c"]}),
    ExtractionItem("person-2", "Extract the person as JSON.\n\nText: Bo, 41.",
                   {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                     "age": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["name", "age"]}),
]


@pytest.fixture(scope="module")
def models(smol_tiny_models):
    return smol_tiny_models


@pytest.fixture(scope="module")
def study(models):
    target, draft = models
    drafters = [DrafterSpec("prompt-lookup"), DrafterSpec("draft-model", draft=draft)]
    messages, saved = [], []
    result = run_constrained_study(target, drafters, ITEMS, k=3, max_new_tokens=24,
                                   progress=lambda fraction, message: messages.append((fraction, message)),
                                   on_item=lambda so_far: saved.append(len(so_far.runs)))
    assert saved == [6, 12, 18]  # after each item, 2 settings x (target alone + 2 drafters) more runs
    return result, messages


def test_every_extraction_schema_compiles(smol_tokenizer):
    items = load_extraction_items()
    assert len(items) == 20 and len({item.id for item in items}) == 20
    for item in items:
        Constraint(item.spec, smol_tokenizer, len(smol_tokenizer), (smol_tokenizer.eos_token_id,))


@pytest.mark.parametrize(
    "line, message",
    [("not json", "extract.jsonl:2: an extraction line requires"), ('{"prompt": "x"}', "'schema'"),
     ('{"prompt": " ", "schema": {}}', "non-empty prompt")],
)
def test_bad_extraction_lines_are_named(tmp_path, line, message):
    path = tmp_path / "extract.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "schema": {"type": "integer"}}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_extraction_items(path)


def test_every_item_runs_every_method_in_both_settings(study):
    result, messages = study
    assert result.methods == ["prompt-lookup n=1..3", "draft-model tiny-draft"]
    methods = [TARGET_ALONE, *result.methods]
    assert len(result.runs) == len(ITEMS) * len(SETTINGS) * len(methods)
    for item in ITEMS:
        for setting in SETTINGS:
            for method in methods:
                result.get(item.id, setting, method)  # present exactly where expected
    assert [fraction for fraction, _ in messages][-1] == 1.0
    # the order rotates from prompt to prompt: the first run differs between the first two items
    per_item = len(SETTINGS) * len(methods)
    first_run = lambda message: message.split(" ", 2)[2].split(":")[0]  # noqa: E731  "constrained target alone"
    assert first_run(messages[1][1]) != first_run(messages[1 + per_item][1])


def test_speculative_runs_are_exact_and_constrained_runs_follow_the_grammar(study):
    result, _ = study
    for r in result.runs:
        if r.method != TARGET_ALONE:
            assert r.identical_to_target, (r.item_id, r.setting, r.method)  # fp32 tiny models: token for token
            assert r.speedup is not None and r.speedup > 0
        else:
            assert r.speedup is None and r.identical_to_target is None
        if r.setting == "constrained":
            assert r.first_invalid is None  # every token the grammar allowed
            assert r.valid == (r.reason == "eos"), (r.item_id, r.text)  # finished means valid
        else:
            assert r.num_cut_tokens == 0
    assert any(r.valid for r in result.runs if r.setting == "constrained")


def test_summary_pools_per_method_and_setting(study):
    result, _ = study
    rows = result.summary()
    assert [(row["method"], row["setting"]) for row in rows] == [
        (method, setting) for method in [TARGET_ALONE, *result.methods] for setting in SETTINGS
    ]
    for row in rows:
        runs = [r for r in result.runs if r.method == row["method"] and r.setting == row["setting"]]
        assert row["prompts"] == len(ITEMS)
        assert row["output_tokens"] == sum(r.stats.num_output_tokens for r in runs)
        assert row["valid"] == sum(r.valid for r in runs)
        if row["method"] == TARGET_ALONE:
            assert row["acceptance_rate"] is None and row["speedup"] is None
            assert row["tokens_per_s"] == row["target_tokens_per_s"]
        else:
            accepted = sum(r.stats.num_accepted_tokens for r in runs)
            drafted = sum(r.stats.num_draft_tokens for r in runs)
            assert row["acceptance_rate"] == pytest.approx(accepted / drafted)
            assert row["identical_to_target"] == len(ITEMS)
    table = result.format_table()
    assert "draft-model tiny-draft" in table and "constrained" in table and "free" in table
    saved = json.loads(json.dumps(result.as_dict(), allow_nan=False))  # plain JSON, NaN written as null
    assert len(saved["runs"]) == len(result.runs) and saved["settings"]["item_ids"] == [i.id for i in ITEMS]


def test_refuses_nothing_to_run_and_bad_schemas(models):
    target, _ = models
    with pytest.raises(ValueError, match="at least one extraction item"):
        run_constrained_study(target, DrafterSpec("prompt-lookup"), [])
    with pytest.raises(ValueError, match="at least one drafter"):
        run_constrained_study(target, [], ITEMS)
    with pytest.raises(ValueError, match="K \\(num_speculative_tokens\\) requires"):
        run_constrained_study(target, DrafterSpec("prompt-lookup"), ITEMS, k=0)
    bad = ExtractionItem("bad", "p", {"type": "objec"})
    with pytest.raises(GrammarError, match="does not compile"):
        run_constrained_study(target, DrafterSpec("prompt-lookup"), [bad], warmup=False)
