"""The Theory page's "This machine" section: calibrate a pair, see what was measured and why, use it on the sliders."""

from __future__ import annotations

import pytest

from app_util import app_on, click, key, tiny_models  # noqa: F401 (a fixture)
from lab.studies.calibrate import cached_calibration

PAIR = "smollm2-135m with prompt lookup"


def test_pairs_offer_prompt_lookup_and_same_family_drafts():
    from app.calibration import pairs

    options = pairs()
    assert options["qwen2.5-coder-1.5b with draft qwen2.5-coder-0.5b"] == ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
    assert options[PAIR] == ("smollm2-135m", None)
    assert not any("smollm2-135m with draft" in label for label in options)  # no draft of its tokenizer family


def test_theory_page_calibrates_explains_and_fills_the_sliders(tiny_models):
    at = app_on("theory", pair=PAIR)
    assert not at.exception
    assert any("Not calibrated on this machine yet" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) == 3  # the theory curves only (Leviathan's two, chain or tree)
    at = click(at, "Calibrate")
    assert not at.exception and not at.error
    calibration = cached_calibration("smollm2-135m", device="cpu")
    assert calibration is not None and calibration.drafter == "prompt-lookup"
    text = "\n".join(m.value for m in at.markdown)
    assert "fastest speculation is" in text and f"K = {calibration.k}" in text
    assert len(at.get("plotly_chart")) == 5  # + v(K) and the predicted time per token
    at = click(at, "Put this K, c, v(K) and a on the sliders above")
    timing = calibration.by_precision(calibration.precision)
    assert at.slider(key=key("theory.k")).value == calibration.k
    assert at.slider(key=key("theory.c")).value == 0.0  # prompt lookup costs no draft model
    assert at.slider(key=key("theory.v")).value == pytest.approx(min(max(round(timing.v(calibration.k), 2), 1.0), 3.0))
    assert at.slider(key=key("theory.a")).value == pytest.approx(0.4)  # prompt lookup's prior
    # The Best K card weighs each K with its measured v(K), so it names the calibration's own K (the fresh-user
    # trial saw "16" beside a calibration that chose 2, from one v for every K).
    (best,) = [m for m in at.metric if m.label.startswith("Best K")]
    if calibration.predicted_speedup >= 1:
        assert best.value.startswith(f"{calibration.k} (")
    at.slider(key=key("theory.v")).set_value(2.0).run()  # a v of one's own: one v for every K again
    assert "among the K this machine's calibration measured" not in [m for m in at.metric if m.label.startswith("Best K")][0].help


def test_a_new_acceptance_rescores_without_timing_again(tiny_models):
    at = click(app_on("theory", pair=PAIR), "Calibrate")
    first = cached_calibration("smollm2-135m", device="cpu")
    at.number_input(key=key("theory.prior_a")).set_value(0.9).run()
    assert not at.exception
    assert "acceptance rate of 90% per token" in "\n".join(m.value for m in at.markdown)
    again = cached_calibration("smollm2-135m", device="cpu")
    assert again.measured_at == first.measured_at  # read back from the cache, not measured again


def test_sidebar_says_why_auto_chose_its_precision(tiny_models):
    from lab.hardware import host_probe

    at = app_on("theory")
    probe = host_probe("cpu")
    (reason,) = [c.value for c in at.sidebar.caption if c.value.startswith("auto = ")]
    assert f"**{probe['precision']}**" in reason and f"{probe['ms']['fp32'][5]:.1f} ms in fp32" in reason


def test_live_offers_the_calibrated_k(tiny_models):
    from app_util import live_app

    at = live_app()
    assert any("Calibrate** the pair on the Theory page" in c.value for c in at.caption)  # prompt lookup, not calibrated
    at = click(app_on("theory", pair=PAIR), "Calibrate")
    chosen = cached_calibration("smollm2-135m", device="cpu").k
    at.switch_page("app_pages/live.py").run()
    at.session_state[key("live.k")] = chosen % 16 + 1  # any other K
    at.run()
    assert any(f"K = {chosen}** predicted fastest" in c.value for c in at.caption)
    at = click(at, f"Use K = {chosen}")
    assert at.slider(key=key("live.k")).value == chosen
