"""Prompt sets and the peer comparison with transformers' assisted generation (tiny models, no timing asserted)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_llama, tiny_tokenizer
from lab import prompts as prompt_sets
from lab.studies.peer import DrafterSpec, first_difference, run_peer_comparison
from lab.models import load_model
from lab.prompts import Prompt, load_prompt_sets, load_prompts, preset_names

PRESET_SETS = ("summarization", "code_editing", "translation", "open_qa", "creative_writing", "json_extraction")


def save_tiny_model(folder, seed: int, layers: int):
    """A tiny random Llama and its word-level tokenizer saved as a Hugging Face folder."""
    tiny_llama(seed=seed, layers=layers).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(target, draft) loaded through lab.models from folders, fp32: the real loading path."""
    root = tmp_path_factory.mktemp("tiny_bench")
    target = load_model(save_tiny_model(root / "target", seed=0, layers=3), dtype="fp32", device="cpu")
    draft = load_model(save_tiny_model(root / "draft", seed=1, layers=1), dtype="fp32", device="cpu")
    return target, draft


@pytest.fixture
def fake_spec_bench(tmp_path, monkeypatch):
    """A small Spec-Bench-shaped file: 4 categories of 6 questions, ids 1..24, in file order."""
    path = tmp_path / "question.jsonl"
    categories = ["writing", "translation", "summarization", "qa"]
    with open(path, "w") as out:
        for c, category in enumerate(categories):
            for i in range(6):
                qid = c * 6 + i + 1
                out.write(json.dumps({"question_id": qid, "category": category, "turns": [f"q{qid}", "second turn"]}) + "\n")
    monkeypatch.setenv("LAB_SPEC_BENCH", str(path))
    return path


# ---------------------------------------------------------------- prompt sets


def test_preset_sets_are_shipped():
    assert set(PRESET_SETS) <= set(preset_names())


@pytest.mark.parametrize("name", PRESET_SETS)
def test_preset_set_loads(name):
    loaded = load_prompts(name)
    assert 6 <= len(loaded) <= 8
    assert len({p.id for p in loaded}) == len(loaded)
    # Every prompt has text and a note saying whether acceptance should be high or low.
    assert all(p.text.strip() and p.category == name and p.note for p in loaded)


def test_preset_count_suffix_keeps_the_first():
    assert load_prompts("code_editing:2") == load_prompts("code_editing")[:2]


def test_spec_bench_category_takes_first_turns_in_file_order(fake_spec_bench):
    loaded = load_prompts("spec_bench:summarization:3")
    assert [p.id for p in loaded] == ["spec_bench/13", "spec_bench/14", "spec_bench/15"]
    assert [p.text for p in loaded] == ["q13", "q14", "q15"]  # first turn only
    assert {p.category for p in loaded} == {"summarization"}


def test_spec_bench_mix_is_a_deterministic_stratified_spread(fake_spec_bench):
    mix = load_prompts("spec_bench:mix:4")
    # 24 records, 4 picks: one from the middle of each stride of 6, i.e. one per category.
    assert [p.category for p in mix] == ["writing", "translation", "summarization", "qa"]
    assert mix == load_prompts("spec_bench:mix:4")


def test_prompt_sets_skip_prompts_already_chosen(fake_spec_bench):
    combined = load_prompt_sets(["spec_bench:summarization:6", "spec_bench:mix:4"])
    assert len(combined) == 10
    assert len({p.id for p in combined}) == 10
    assert sum(p.category == "summarization" for p in combined[6:]) == 0


def test_real_spec_bench_twenty_prompts():
    if not prompt_sets.spec_bench_path().is_file():
        pytest.skip("Spec-Bench file absent")
    chosen = load_prompt_sets(["spec_bench:summarization:10", "spec_bench:mix:10"])
    assert len({p.id for p in chosen}) == 20
    assert len({p.category for p in chosen[10:]}) >= 5  # the mix spans the Spec-Bench tasks


def test_missing_spec_bench_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_SPEC_BENCH", str(tmp_path / "absent.jsonl"))
    with pytest.raises(FileNotFoundError, match="Spec-Bench prompts are absent.*absent.jsonl"):
        load_prompts("spec_bench:summarization")


@pytest.mark.parametrize(
    "source, error",
    [
        ("spec_bench:poetry", "category requires one of writing"),
        ("no_such_set", "prompt set requires"),
        ("spec_bench:qa:0", "count requires"),
    ],
)
def test_bad_sources_say_what_is_expected(fake_spec_bench, source, error):
    with pytest.raises(ValueError, match=error):
        load_prompts(source)


def test_jsonl_path_in_either_shape(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"id": "a", "category": "code", "prompt": "rename x"}) + "\n\n"
        + json.dumps({"question_id": 7, "category": "qa", "turns": ["why?"]}) + "\n"
    )
    assert load_prompts(path) == [Prompt("mine/a", "code", "rename x"), Prompt("mine/7", "qa", "why?")]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompts(path)


# ---------------------------------------------------------------- peer comparison


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([1, 2, 3], [1, 2, 3], None),
        ([1, 2, 3], [1, 9, 3], 1),
        ([1, 2], [1, 2, 3], 2),  # a shorter output differs where it stops
        ([], [], None),
    ],
)
def test_first_difference(a, b, expected):
    assert first_difference(a, b) == expected


TINY_PROMPTS = [
    Prompt("tiny/1", "repeat", "t5 t6 t7 t5 t6 t7 t5 t6"),
    Prompt("tiny/2", "plain", "t9 t3 t12 t30"),
]

SUMMARY_FIGURES = (
    "acceptance_rate", "mean_acceptance_length", "ours_baseline_tokens_per_s", "ours_speculative_tokens_per_s",
    "speedup", "speedup_median", "hf_greedy_tokens_per_s", "hf_assisted_tokens_per_s", "hf_speedup",
    "ratio_ours_vs_hf_assisted", "ratio_ours_vs_hf_assisted_median", "ratio_ours_baseline_vs_hf_greedy",
    "ours_tokens_per_target_pass", "hf_tokens_per_target_pass",
)


@pytest.mark.parametrize("drafter, ks", [("draft-model", [2, 3]), ("prompt-lookup", [3]), ("layer-skip", [2])])
def test_peer_comparison_returns_every_figure_and_identical_outputs(tiny_pair, drafter, ks):
    target, draft = tiny_pair
    spec = DrafterSpec(drafter, draft if drafter == "draft-model" else None, exit_layer=1 if drafter == "layer-skip" else None)
    messages = []
    report = run_peer_comparison(target, spec, TINY_PROMPTS, k=ks, max_new_tokens=8,
                                 progress=lambda fraction, message: messages.append((fraction, message)))
    assert report.ks == tuple(ks)
    for k in ks:
        summary = report.summary(k)
        for name in SUMMARY_FIGURES:
            if drafter == "prompt-lookup" and name in ("acceptance_rate", "mean_acceptance_length"):
                continue  # a random tiny model may never repeat an n-gram: nothing drafted, NaN by convention
            assert summary[name] is not None and math.isfinite(summary[name]), name
            # Random tiny drafts may all be rejected (rate 0); speeds and ratios are positive.
            assert summary[name] >= 0 if name == "acceptance_rate" else summary[name] > 0, name
        # fp32 tiny models with peaked logits: every greedy output must agree token for token.
        assert summary["speculative_identical_to_baseline"] == 2
        assert summary["baseline_identical_to_hf_greedy"] == 2
        assert summary["hf_assisted_identical_to_hf_greedy"] == 2
        assert summary["mismatches"] == []
        if drafter != "prompt-lookup":
            assert summary["ours_draft_passes"] > 0 and summary["hf_draft_passes"] > 0
    # One warm-up message, then one per run: 2 prompts x (2 target-alone + 2 per K), ending at 100 %.
    assert len(messages) == 1 + 2 * (2 + 2 * len(ks)) and messages[-1][0] == pytest.approx(1.0)
    data = json.loads(json.dumps(report.as_dict()))  # JSON-clean
    assert [p["id"] for p in data["prompts"]] == ["tiny/1", "tiny/2"]
    assert data["settings"]["ks"] == ks
    assert "ours/HF assist" in report.format_table()


def test_peer_comparison_restores_the_assistant_settings_and_reports_partials(tiny_pair):
    target, draft = tiny_pair
    config = draft.model.generation_config
    before = (config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold)
    partial_sizes = []
    run_peer_comparison(target, DrafterSpec("draft-model", draft), TINY_PROMPTS, k=2, max_new_tokens=4, warmup=False,
                        on_prompt=lambda report: partial_sizes.append(len(report.prompts)))
    assert partial_sizes == [1, 2]  # partial reports after each prompt, for long runs
    assert (config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold) == before


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"name": "none"}, "requires a drafter in"),
        ({"name": "draft-model"}, "requires a draft model"),
    ],
)
def test_drafter_spec_refuses_bad_input(kwargs, error):
    with pytest.raises(ValueError, match=error):
        DrafterSpec(**kwargs)
