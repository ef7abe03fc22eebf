"""Host-adaptive defaults (lab.studies.calibrate): measured pass costs, the cost model's choice, the per-machine cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lab.studies.calibrate import (
    Calibration,
    PrecisionTimings,
    cached_calibration,
    calibrate,
    calibration_path,
)
from lab.studies.passes import time_passes
from lab.hardware import machine_info, machine_key, probe_float_precision
from lab.theory import expected_tokens_per_step


def timings(precision, step_ms, verify_ms, draft_ms=None):
    return PrecisionTimings(precision, step_ms, verify_ms, draft_ms)


def test_costs_in_target_steps():
    t = timings("bf16", 100.0, {1: 90.0, 4: 120.0}, draft_ms=40.0)
    assert t.c == pytest.approx(0.4)
    assert t.v(1) == pytest.approx(0.9) and t.v(4) == pytest.approx(1.2)
    # step x (K c + v(K)) / E[tokens]: 100 x (4 x 0.4 + 1.2) / E(0.5, 4)
    assert t.ms_per_token(4, 0.5) == pytest.approx(100 * 2.8 / expected_tokens_per_step(0.5, 4))
    assert timings("fp32", 50.0, {1: 50.0}).c == 0.0  # prompt lookup: no draft model


def calibration(timing_list, acceptance=0.8):
    return Calibration("t", "d", "draft-model", {"cpu": "x", "cpu_flags": [], "device": "cpu", "threads": 2,
                                                 "torch": "2"}, timing_list, acceptance, 128, 3)


def test_emulated_bf16_loses_to_fp32():
    """A host where a bf16 pass over K+1 tokens costs several one-token passes: fp32 wins."""
    emulated = timings("bf16", 90.0, {1: 180.0, 2: 260.0, 4: 330.0}, draft_ms=30.0)
    native32 = timings("fp32", 80.0, {1: 85.0, 2: 90.0, 4: 100.0}, draft_ms=28.0)
    cal = calibration([emulated, native32])
    assert cal.precision == "fp32"
    assert cal.k == min((1, 2, 4), key=lambda k: native32.ms_per_token(k, 0.8))
    assert cal.predicted_speedup == pytest.approx(80.0 / native32.ms_per_token(cal.k, 0.8))


def test_flat_bf16_verify_wins_and_k_follows_acceptance():
    bf16 = timings("bf16", 50.0, {1: 50.0, 2: 51.0, 4: 53.0, 8: 60.0}, draft_ms=5.0)
    fp32 = timings("fp32", 60.0, {1: 120.0, 2: 150.0, 4: 170.0, 8: 190.0}, draft_ms=6.0)
    assert calibration([bf16, fp32], acceptance=0.9).best() == ("bf16", 8)
    assert calibration([bf16, fp32], acceptance=0.3).best() == ("bf16", 1)


def test_explain_says_what_was_measured_and_why():
    cal = calibration([timings("bf16", 50.0, {1: 50.0, 2: 51.0, 4: 53.0, 8: 60.0}, draft_ms=20.0)], acceptance=0.1)
    text = cal.explain()
    assert "target step 50.0 ms" in text and "c = 0.40" in text and "v(K=1, 2, 4, 8) = 1.00, 1.02, 1.06, 1.20" in text
    assert f"K = {cal.k}" in text and "10%" in text
    assert cal.predicted_speedup < 1 and "predicted to lose" in text


def test_round_trip_through_json():
    cal = calibration([timings("bf16", 50.0, {1: 50.0, 2: 60.0}, 10.0), timings("fp32", 40.0, {1: 70.0, 2: 90.0})])
    again = Calibration.from_dict(json.loads(json.dumps(cal.as_dict())))
    assert again.as_dict() == cal.as_dict()


def test_time_passes_times_each_width_over_the_same_context():
    model = tiny_llama(seed=0, layers=2)
    ms = time_passes(model, [1, 3, 5], context_tokens=16, repeats=2)
    assert sorted(ms) == [1, 3, 5] and all(v > 0 for v in ms.values())
    with pytest.raises(ValueError, match="widths >= 1"):
        time_passes(model, [0], context_tokens=16)


def test_probe_picks_the_faster_of_its_own_timings():
    probe = probe_float_precision("cpu", repeats=3)
    assert set(probe["ms"]) == {"bf16", "fp32"}
    assert probe["precision"] == min(probe["ms"], key=lambda name: probe["ms"][name][5])


@pytest.fixture()
def tiny_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    out = {}
    for role, seed, layers in (("target", 0, 3), ("draft", 1, 1)):
        folder = tmp_path / role
        tiny_llama(seed=seed, layers=layers, hidden=64).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        out[role] = str(folder)
    return out


def test_calibrate_measures_caches_and_rescores(tiny_folders):
    cal = calibrate(tiny_folders["target"], tiny_folders["draft"], device="cpu", ks=(1, 2, 4), context_tokens=16,
                    repeats=1)
    assert [t.precision for t in cal.timings] == ["bf16", "fp32"]
    assert all(t.draft_step_ms > 0 and sorted(t.verify_ms) == [1, 2, 4] for t in cal.timings)
    assert (cal.precision, cal.k) == cal.best()
    path = calibration_path(tiny_folders["target"], tiny_folders["draft"], "draft-model", machine_info("cpu"))
    assert path.is_file() and machine_key(machine_info("cpu")) in str(path)
    # Cached: read back, not timed again; a new acceptance only re-scores.
    again = calibrate(tiny_folders["target"], tiny_folders["draft"], device="cpu", ks=(1, 2, 4), acceptance=0.05)
    assert again.measured_at == cal.measured_at and again.timings[0].target_step_ms == cal.timings[0].target_step_ms
    assert again.acceptance == 0.05 and (again.precision, again.k) == again.best()
    assert cached_calibration(tiny_folders["target"], tiny_folders["draft"], device="cpu") is not None
    assert cached_calibration(tiny_folders["target"], device="cpu") is None  # prompt lookup: not measured yet


def test_calibrate_prompt_lookup_has_no_draft_cost(tiny_folders):
    cal = calibrate(tiny_folders["target"], device="cpu", precisions=("fp32",), ks=(2,), context_tokens=8, repeats=1)
    assert cal.drafter == "prompt-lookup" and cal.timings[0].c == 0.0 and cal.k == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ks=(0,)), "K values in 1..16"),
        (dict(acceptance=1.0), "0 <= a < 1"),
        (dict(precisions=("int8",)), "float precisions"),
        (dict(drafter="draft-model"), "requires a draft model"),
    ],
)
def test_calibrate_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate("smollm2-135m", **kwargs)


def test_a_corrupt_cache_file_is_ignored(tiny_folders):
    path = calibration_path(tiny_folders["target"], None, "prompt-lookup", machine_info("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert cached_calibration(tiny_folders["target"], device="cpu") is None
    assert not math.isnan(calibrate(tiny_folders["target"], device="cpu", precisions=("fp32",), ks=(1,),
                                    context_tokens=8, repeats=1).predicted_speedup)


def test_cost_table_from_a_calibration_uses_the_same_c_and_v():
    from lab.studies.costs import from_calibration

    bf16 = timings("bf16", 50.0, {1: 50.0, 2: 55.0, 4: 60.0}, draft_ms=20.0)
    cal = calibration([bf16], acceptance=0.8)
    table = from_calibration(cal, k=4)
    (row,) = table.rows
    assert row.c == pytest.approx(bf16.c) and row.v == pytest.approx(bf16.v(4))
    # Leviathan with the same a, c, v: tokens per step over (K c + v)
    assert table.predicted_speedup(expected_tokens_per_step(0.8, 4))[0] == pytest.approx(
        expected_tokens_per_step(0.8, 4) / (4 * bf16.c + bf16.v(4)), rel=1e-6)
    assert from_calibration(cal).k == cal.k


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_time_passes_in_the_static_modes_at_a_batch(mode):
    model = tiny_llama(seed=0, layers=2, hidden=24)
    ms = time_passes(model, [1, 4], context_tokens=8, repeats=1, mode=mode, batch_size=3, backend="eager")
    assert sorted(ms) == [1, 4] and all(v > 0 for v in ms.values())
    with pytest.raises(ValueError, match="mode 'eager', 'static' or 'compiled'"):
        time_passes(model, [1], mode="graphs")


def test_a_cached_calibration_from_before_token_trees_is_used_not_timed_again(tiny_folders, monkeypatch):
    # A page render reads the cache; a calibration without the tree passes once made it re-time the pair silently.
    cal = calibrate(tiny_folders["target"], device="cpu", precisions=("fp32",), ks=(1, 2), context_tokens=8,
                    repeats=1)
    path = calibration_path(tiny_folders["target"], None, "prompt-lookup", machine_info("cpu"))
    old = json.loads(path.read_text())
    for timing in old["timings"]:
        timing.pop("tree_verify_ms", None)
    path.write_text(json.dumps(old))

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr("lab.studies.calibrate.measure_precision", no_timing)
    again = calibrate(tiny_folders["target"], device="cpu", precisions=("fp32",), ks=(1, 2))
    assert again.measured_at == cal.measured_at  # read back, not timed
    assert again.timings[0].tree_verify_ms == {} and again.tree_budget == 0
