"""Compare runs reproduce direct engine calls; results export and reload."""

from __future__ import annotations

import math

import pytest

from lab.studies.compare import BASELINE, Comparison, DrafterSpec, measure_verify_cost, run_comparison
from lab.config import DecodeConfig
from lab.drafters import PromptLookupDrafter
from lab.decode import run
from lab.models import encode_prompt
from lab.theory import expected_tokens_per_step

PROMPTS = ["t5 t9 t12 t5 t9 t30 t7", "t11 t12 t13 t14 t11 t12 t13"]


@pytest.fixture(scope="module")
def comparison(tiny_target, tiny_draft):
    drafts = {"tiny-draft": tiny_draft}
    return run_comparison(
        tiny_target,
        PROMPTS,
        [DrafterSpec("prompt-lookup"), DrafterSpec("draft-model", draft="tiny-draft"), DrafterSpec("layer-skip", exit_layer=1)],
        [1, 3],
        DecodeConfig(max_new_tokens=12),
        load_draft=drafts.__getitem__,
        chat_template=False,
    )


def test_every_combination_runs_with_a_baseline(comparison):
    assert len(comparison.runs) == len(PROMPTS) * (1 + 3 * 2)
    assert [r.drafter for r in comparison.runs if r.k == 0] == [BASELINE, BASELINE]
    summary = comparison.summary()
    assert sorted(zip(summary.drafter, summary.k)) == sorted(
        (label, k) for label in ["prompt-lookup (n 1-3)", "draft-model (tiny-draft)", "layer-skip (exit 1)"] for k in [1, 3]
    )
    # Greedy: every run reproduces the target alone.
    assert (summary.identical_to_target == 1.0).all()


def test_compare_numbers_equal_direct_engine_calls(comparison, tiny_target):
    prompt_ids = encode_prompt(tiny_target, PROMPTS[1], chat_template=False)
    direct = run(tiny_target, prompt_ids, PromptLookupDrafter(1, 3), DecodeConfig(k=3, max_new_tokens=12))
    record = next(r for r in comparison.runs if r.prompt_index == 1 and r.drafter.startswith("prompt-lookup") and r.k == 3)
    assert record.token_ids == direct.token_ids
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position", "target_forward_passes"):
        assert record.metrics[key] == direct.stats.as_dict()[key]
    assert len(record.draft_ms) == len(direct.steps)


def test_summary_pools_counters_over_prompts(comparison):
    runs = [r for r in comparison.runs if r.drafter.startswith("draft-model") and r.k == 3]
    accepted = sum(r.metrics["num_accepted_tokens"] for r in runs)
    drafted = sum(r.metrics["num_draft_tokens"] for r in runs)
    row = comparison.summary().set_index(["drafter", "k"]).loc[("draft-model (tiny-draft)", 3)]
    assert row.acceptance_rate == pytest.approx(accepted / drafted)
    assert row.prompts == 2
    assert row.cost_ratio > 0
    passes = sum(r.metrics["target_forward_passes"] for r in runs)
    assert row.tokens_per_pass == pytest.approx(sum(r.metrics["num_output_tokens"] for r in runs) / passes)
    # v: the spec runs' verify time per pass over the baselines' time per step.
    base = [r for r in comparison.runs if r.drafter == BASELINE]
    base_step = sum(r.metrics["verify_s"] for r in base) / sum(r.metrics["target_forward_passes"] for r in base)
    assert row.verify_cost_ratio == pytest.approx(sum(r.metrics["verify_s"] for r in runs) / passes / base_step)
    assert row.draft_rate == pytest.approx(sum(r.metrics["num_drafts"] for r in runs) / passes)
    assert 0.9 < row.draft_rate < 1.0  # a draft model drafts at every step but where one token is left
    r, v = row.draft_rate, comparison.settings["verify_cost"]["3"]
    assert row.bare_verify_cost == v > 0
    tokens = r * expected_tokens_per_step(row.fitted_acceptance, 3) + 1 - r
    assert row.predicted_speedup_v == pytest.approx(tokens / (r * (3 * row.cost_ratio + v) + 1 - r))
    assert row.efficiency_v == pytest.approx(row.decode_speedup / row.predicted_speedup_v)


def test_measure_verify_cost_times_bare_passes(tiny_target):
    costs = measure_verify_cost(tiny_target, [0, 1, 7], context_tokens=16, repeats=3)
    assert set(costs) == {0, 1, 7}
    assert costs[0] == pytest.approx(1.0)
    assert all(v > 0 and math.isfinite(v) for v in costs.values())
    with pytest.raises(ValueError, match="K >= 0"):
        measure_verify_cost(tiny_target, [-1])
    with pytest.raises(ValueError, match="context window"):
        measure_verify_cost(tiny_target, [4], context_tokens=10**6)


def test_export_and_reload_round_trip(comparison):
    again = Comparison.from_json(comparison.to_json())
    assert again.settings == comparison.settings
    assert again.prompts == comparison.prompts
    assert [r.token_ids for r in again.runs] == [r.token_ids for r in comparison.runs]
    a, b = comparison.summary(), again.summary()
    assert list(a.columns) == list(b.columns)
    for column in ("acceptance_rate", "speedup", "cost_ratio", "efficiency"):
        assert all(math.isclose(x, y, rel_tol=1e-12) or (math.isnan(x) and math.isnan(y)) for x, y in zip(a[column], b[column]))
    csv = comparison.to_csv().splitlines()
    assert list(again.settings["verify_cost"]) == ["1", "3"]
    assert csv[0].startswith("prompt_index,drafter,k,output_tokens,acceptance_rate")
    assert csv[1].startswith("0,")  # 0-based, as in the JSON
    assert len(csv) == 1 + len(comparison.runs)


def test_reload_refuses_other_files():
    with pytest.raises(ValueError, match="not a comparison results file"):
        Comparison.from_json('{"hello": 1}')


def test_cancel_keeps_finished_runs(tiny_target):
    calls = {"n": 0}

    def cancel_after_some_steps():
        calls["n"] += 1
        return calls["n"] > 15

    result = run_comparison(
        tiny_target, PROMPTS, [DrafterSpec("prompt-lookup")], [2, 4], DecodeConfig(max_new_tokens=12),
        chat_template=False, should_cancel=cancel_after_some_steps,
    )
    assert result.runs[-1].cancelled
    assert 1 <= len(result.runs) < len(PROMPTS) * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": ["  "]}, "No prompts to compare"),
        ({"ks": []}, "No K values"),
        ({"ks": [0]}, "K \\(num_speculative_tokens\\) requires"),
    ],
)
def test_bad_requests_are_refused(tiny_target, kwargs, message):
    args = {"prompts": PROMPTS, "ks": [2]} | kwargs
    with pytest.raises(ValueError, match=message):
        run_comparison(tiny_target, args["prompts"], [DrafterSpec("prompt-lookup")], args["ks"], DecodeConfig(), chat_template=False)


def test_drafter_spec_validation():
    with pytest.raises(ValueError, match="draft-model requires a draft model name"):
        DrafterSpec("draft-model")
    with pytest.raises(ValueError, match="requires one of draft-model, prompt-lookup, layer-skip, eagle; got 'none'"):
        DrafterSpec("none")


def test_arms_are_interleaved_alternating_which_goes_first(tiny_target, monkeypatch):
    # drift (a clock slowing, a neighbour starting) must hit the target alone and the drafters alike: record the
    # order in which the engine is called and demand that the baseline goes first, then last, prompt by prompt
    import lab.studies.compare as compare_module

    calls = []
    real_decode = compare_module.decode

    def recording_decode(target, prompt_ids, drafter, config, **kwargs):
        calls.append("target alone" if drafter is None else f"K={config.k}")
        return real_decode(target, prompt_ids, drafter, config, **kwargs)

    monkeypatch.setattr(compare_module, "decode", recording_decode)
    prompts = PROMPTS + PROMPTS
    result = run_comparison(tiny_target, prompts, [DrafterSpec("prompt-lookup")], [1, 3], DecodeConfig(max_new_tokens=6),
                            chat_template=False, measure_verify=False)
    forward, backward = ["target alone", "K=1", "K=3"], ["K=3", "K=1", "target alone"]
    assert calls == forward + backward + forward + backward
    assert [(r.prompt_index, r.k) for r in result.runs] == [(0, 0), (0, 1), (0, 3), (1, 3), (1, 1), (1, 0),
                                                             (2, 0), (2, 1), (2, 3), (3, 3), (3, 1), (3, 0)]
    # runs that went before their baseline still get their speedup and exactness check once it ran
    assert all(r.identical_to_target and not math.isnan(r.speedup) for r in result.runs if r.k)
    assert all(r.load is not None and "loaded" in r.load for r in result.runs)
    assert result.settings["load"]["cores"] >= 1
