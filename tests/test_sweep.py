"""The batch-size sweep and the auto-K policy, on the tiny models (no timing is asserted, only figures and choices)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_VOCAB, reference_greedy
from lab.drafters import PerRowDrafter, Draft, DraftContext, PromptLookupDrafter
from lab.decode import run_batch
from lab.config import DecodeConfig
from lab.metrics import SpecDecodingStats
from lab.studies.auto_k import AutoK, CostModel, _interpolate
from lab.metrics import percentile
from lab.studies.batch_sweep import format_sweep, run_sweep

PROMPTS = [[8, 8, 8, 8, 8], [5, 9, 12, 5, 9, 30, 7], [3], [11, 12, 13, 14, 11, 12, 13, 14, 11, 12]]
NEW_TOKENS = 8
BATCH_SIZES = (1, 2, 4)


class LookupOracle:
    """Drafts the target's greedy continuation of its prompt, looked up (nearly free); or a wrong token everywhere.

    Works for any row of any batch: it finds the reference by the prompt itself.
    """

    def __init__(self, references: dict[tuple[int, ...], list[int]], agree: bool) -> None:
        self.name = "oracle" if agree else "contrarian"
        self.references = references
        self.agree = agree

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Draft:
        reference = self.references[tuple(ctx.token_ids[: ctx.num_prompt_tokens].tolist())]
        done = ctx.token_ids.shape[0] - ctx.num_prompt_tokens
        tokens = torch.tensor(reference[done : done + ctx.k], dtype=torch.long)
        return Draft(tokens if self.agree else (tokens + 1) % TINY_VOCAB)

    def observe(self, num_accepted: int) -> None:
        pass


def oracle(target, agree: bool) -> PerRowDrafter:
    references = {tuple(p): reference_greedy(target.model, p, NEW_TOKENS) for p in PROMPTS}
    return PerRowDrafter(lambda _: LookupOracle(references, agree))


@pytest.fixture(scope="module")
def lookup_sweep(tiny_target):
    return run_sweep(tiny_target, PROMPTS, PromptLookupDrafter(), DecodeConfig(k=3, max_new_tokens=NEW_TOKENS), BATCH_SIZES)


def test_sweep_holds_every_figure(lookup_sweep):
    sweep = lookup_sweep
    assert sweep.batch_sizes == list(BATCH_SIZES)
    for r in sweep.results:
        assert r.num_requests == len(PROMPTS)
        for run in (r.off, r.on, r.auto):
            assert len(run.latency_s) == len(run.first_token_s) == len(PROMPTS)
            assert 0 < run.ttft_p50_s <= run.latency_p50_s <= run.latency_p95_s
            assert run.tokens_per_s > 0 and run.num_output_tokens == len(PROMPTS) * NEW_TOKENS
        assert r.latency_speedup > 0 and r.throughput_speedup > 0
        assert len(r.on.stats.per_position_acceptance_rate) == 3
        assert r.off.stats.num_drafts == 0
        assert r.auto_k in range(0, 4) and r.auto_latency_vs_best > 0
        # fp32: batching changes nothing, speculation changes nothing.
        assert r.outputs_differ_on_vs_off == 0
        assert r.off.outputs_differ_from_batch_1 == r.on.outputs_differ_from_batch_1 == 0
    expected = next((r.batch_size for r in sweep.results if r.latency_speedup < 1), None)
    assert sweep.crossover_batch_size == expected
    assert sweep.cost.target(2, 4) > 0 and sweep.cost.draft(2, 3) >= 0


def test_cancelled_sweep_keeps_the_finished_batch_sizes(tiny_target, lookup_sweep):
    polls = []

    def cancel_after_batch_size_1() -> bool:
        polls.append(1)
        # calibration polls once per batch size (3), batch size 1 once per batch (4 prompts): stop at batch size 2.
        return len(polls) > len(BATCH_SIZES) + len(PROMPTS)

    config = DecodeConfig(k=3, max_new_tokens=NEW_TOKENS)
    sweep = run_sweep(tiny_target, PROMPTS, PromptLookupDrafter(), config, BATCH_SIZES, should_cancel=cancel_after_batch_size_1)
    assert sweep.batch_sizes == [1]
    assert sweep.settings["status"] == "cancelled" and sweep.settings["batch_sizes_planned"] == list(BATCH_SIZES)
    assert lookup_sweep.settings["status"] == "complete"
    # What finished is what an uncancelled sweep measures (greedy outputs and acceptance do not depend on timing).
    assert sweep.results[0].on.outputs == lookup_sweep.results[0].on.outputs
    assert json.loads(sweep.to_json())["batch_sizes"] == [1]
    assert format_sweep(sweep).splitlines()[-1] == "cancelled: 1 of 3 batch sizes finished"
    cancelled_at_once = run_sweep(tiny_target, PROMPTS, PromptLookupDrafter(), config, BATCH_SIZES, should_cancel=lambda: True)
    assert cancelled_at_once.results == [] and cancelled_at_once.settings["status"] == "cancelled"
    assert json.loads(cancelled_at_once.to_json())["crossover_batch_size"] is None


def test_acceptance_per_position_does_not_change_with_batch_size(lookup_sweep):
    """Each row drafts and accepts exactly as alone, so pooled acceptance is the same at every batch size."""
    first = lookup_sweep.results[0].on.stats
    for r in lookup_sweep.results[1:]:
        assert r.on.stats.accepted_per_position == first.accepted_per_position
        assert r.on.stats.num_drafts == first.num_drafts


def test_sweep_exports_json_and_a_table(lookup_sweep, tmp_path):
    path = tmp_path / "sweep.json"
    text = lookup_sweep.to_json(path)
    data = json.loads(path.read_text())
    assert json.loads(text) == data
    assert "crossover_batch_size" in data and data["batch_sizes"] == list(BATCH_SIZES)
    row = data["results"][0]
    for key in ("latency_speedup", "throughput_speedup", "per_position_acceptance_rate", "auto_k", "auto_latency_vs_best"):
        assert key in row
    for key in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "tokens_per_s"):
        assert isinstance(row["on"][key], float)
    assert data["cost_model"]["target_ms"]
    table = format_sweep(lookup_sweep)
    assert len(table.splitlines()) == len(BATCH_SIZES) + 3


@pytest.mark.parametrize("agree, speculates", [(False, False), (True, True)])
def test_policy_turns_speculation_off_for_a_useless_draft_and_on_for_a_perfect_one(tiny_target, agree, speculates):
    config = DecodeConfig(k=3, max_new_tokens=NEW_TOKENS)
    sweep = run_sweep(tiny_target, PROMPTS, oracle(tiny_target, agree), config, BATCH_SIZES)
    for r in sweep.results:
        assert (r.auto_k > 0) == speculates, f"batch size {r.batch_size}: auto K = {r.auto_k}"
        assert r.on.stats.acceptance_rate == (1.0 if agree else 0.0)
        assert r.outputs_differ_on_vs_off == 0
    # The fitted policy drives a batch step by step (K per current batch size); outputs stay exact.
    policy = sweep.policy()
    result = run_batch(tiny_target, PROMPTS, oracle(tiny_target, agree), config, k_policy=policy)
    assert result.token_ids == [reference_greedy(tiny_target.model, p, NEW_TOKENS) for p in PROMPTS]
    drafted = sum(len(s.drafted) for row in result.rows for s in row.steps)
    assert (drafted > 0) == speculates


# ---------------------------------------------------------------- the pure parts


@pytest.mark.parametrize(
    "points, x, expected",
    [
        ([(1, 10.0), (3, 30.0)], 2, 20.0),  # between two points
        ([(1, 10.0), (3, 30.0)], 5, 50.0),  # extrapolated along the last segment
        ([(2, 10.0), (4, 14.0)], 1, 8.0),  # extrapolated before the first
        ([(2, 10.0)], 4, 20.0),  # one point: proportional (the pessimistic guess)
        ([], 3, math.nan),
    ],
)
def test_interpolate(points, x, expected):
    assert _interpolate(points, x) == pytest.approx(expected, nan_ok=True)


def _costs(step_ms) -> CostModel:
    """A cost model from a formula over batch sizes 1..16 and widths 1..5."""
    cost = CostModel()
    for b in (1, 2, 4, 8, 16):
        for w in range(1, 6):
            cost.target_ms[(b, w)].append(step_ms(b, w))
        cost.draft_ms_per_token[b].append(0.1 * step_ms(b, 1))
    return cost


def test_policy_follows_the_cost_model():
    """Memory-bound until B x w reaches 16 token rows, compute-bound after: K falls to 0 as the batch grows."""
    cost = _costs(lambda b, w: max(16, b * w))
    policy = AutoK(cost, acceptance=0.7, k_max=4)
    choices = [policy(b) for b in (1, 2, 4, 8, 16)]
    assert choices[0] == 4 and choices[-1] == 0
    assert choices == sorted(choices, reverse=True)
    assert policy.predicted_speedup(16, 0) == pytest.approx(1.0)
    # Useless drafts never pay, even where verification is free.
    assert AutoK(cost, acceptance=0.0, k_max=4)(1) == 0
    assert AutoK(cost, acceptance=math.nan, k_max=4)(1) == 0


def test_policy_keeps_the_configured_k_unless_another_is_clearly_better():
    # Flat verify cost and cheap drafts: every K pays; K=4 is predicted best by a hair over K=3.
    cost = _costs(lambda b, w: 10.0)
    policy = AutoK(cost, acceptance=0.6, k_max=4, min_gain=0.05)
    speedups = {k: policy.predicted_speedup(1, k) for k in range(1, 5)}
    assert max(speedups, key=speedups.get) == 3 and speedups[3] < speedups[4] * 1.05  # 3 is best, but only just
    assert policy(1) == 4  # the configured K stays
    # A clearly better K is still taken: drafts cost half a step each, so K=4 loses and K=1 pays.
    cost = CostModel()
    for w in range(1, 6):
        cost.target_ms[(1, w)].append(10.0)
    cost.draft_ms_per_token[1].append(5.0)
    policy = AutoK(cost, acceptance=0.6, k_max=4, min_gain=0.05)
    assert policy.predicted_speedup(1, 4) < 1.0 < 1.05 < policy.predicted_speedup(1, 1)
    assert policy(1) == 1


def test_policy_fits_acceptance_from_measured_stats():
    stats = SpecDecodingStats(num_drafts=10, num_draft_tokens=40, num_accepted_tokens=40, target_forward_passes=20)
    policy = AutoK.from_stats(_costs(lambda b, w: 10.0), stats, k=4)
    assert policy.acceptance == pytest.approx(1.0, abs=1e-6)
    assert policy.draft_rate == 0.5
    # Half the steps draft (5 tokens), half do not (1 token): 3 expected tokens per step.
    assert policy.expected_tokens_per_step(4) == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("values, q, expected", [([3.0, 1.0, 2.0], 50, 2.0), ([1.0, 2.0], 95, 1.95), ([5.0], 95, 5.0)])
def test_percentile(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


@pytest.mark.real_model
def test_smollm2_sweep_by_name_writes_json(tmp_path):
    from lab.models import is_prepared
    from lab.studies.batch_sweep import run_sweep_by_name

    if not is_prepared("smollm2-135m"):
        pytest.skip("smollm2-135m is not prepared (scripts/setup.sh app prepares it)")
    out = tmp_path / "sweep.json"
    sweep = run_sweep_by_name(
        "smollm2-135m", "prompt-lookup", ["open_qa:2"], (1, 2), k=2, max_new_tokens=4, dtype="fp32", device="cpu", out=out
    )
    data = json.loads(out.read_text())
    assert data["batch_sizes"] == [1, 2] and data["settings"]["dtype"] == "float32"
    # fp32: batching and speculation change no output.
    assert all(r.outputs_differ_on_vs_off == 0 and r.off.outputs_differ_from_batch_1 == 0 for r in sweep.results)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": []}, "at least one prompt"),
        ({"drafter": None}, "requires a drafter"),
        ({"batch_sizes": (0, 2)}, "batch sizes require integers >= 1"),
        ({"k_max": 17}, "k_max requires an integer in 1..16; got 17"),
    ],
)
def test_sweep_refuses_bad_settings(tiny_target, kwargs, message):
    arguments = {"prompts": PROMPTS, "drafter": PromptLookupDrafter(), "batch_sizes": BATCH_SIZES} | kwargs
    k_max = arguments.pop("k_max", None)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run_sweep(tiny_target, config=DecodeConfig(k=2, max_new_tokens=2), k_max=k_max, **arguments)


def test_a_step_timed_at_zero_ms_predicts_nothing_instead_of_dividing_by_zero():
    """A cost model fed only by a sweep's own steps can hold a 0 ms pass (notebook 08's small mode divided by zero)."""
    from lab.studies.auto_k import AutoK, CostModel

    cost = CostModel()
    cost.target_ms[(1, 1)].append(0.0)
    cost.target_ms[(1, 5)].append(0.0)
    policy = AutoK(cost, acceptance=0.6, k_max=4)
    assert math.isnan(policy.predicted_speedup(1, 4))
    assert policy.choose(1) == 0
