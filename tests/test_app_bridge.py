"""The vocabulary bridge's controls on Live, Compare and Step-through, and Compare's one-click presets (AppTest).

Presets load as tiny random models (``app_util.tiny_models``): SmolLM2 with the
"t" word tokenizer, the Qwen presets with the "q" one, so SmolLM2 drafting for a
Qwen target is a real mismatch the bridge must carry.
"""

from __future__ import annotations

from app_util import app_on, click, key, live_app, tiny_models  # noqa: F401  (a fixture)

from app import widgets

TINY_PROMPT = "q3 q4 q5 q6 q3 q4 q5 q6"


def test_live_offers_every_model_once_a_bridge_is_on(tiny_models):
    at = live_app(drafter="draft-model", target="qwen2.5-coder-1.5b").run()
    assert at.selectbox(key=key("live.vocab_bridge")).value == "none"
    assert "smollm2-135m" not in at.selectbox(key=key("live.draft")).options
    at.selectbox(key=key("live.vocab_bridge")).set_value("text").run()
    assert "SmolLM2" in " ".join(at.selectbox(key=key("live.draft")).options)
    assert not at.warning
    at.selectbox(key=key("live.vocab_bridge")).set_value("ids").run()
    assert any("The ids trap" in w.value and "slower than the target alone" in w.value for w in at.warning)
    assert "THE TRAP" in widgets.VOCAB_BRIDGE_LABELS["ids"]
    assert tiny_models == []


def test_live_runs_smollm2_for_qwen_through_the_text_bridge(tiny_models):
    at = live_app(drafter="draft-model", target="qwen2.5-coder-1.5b", vocab_bridge="text", draft="smollm2-135m",
                  prompt=TINY_PROMPT, raw=True, max_new_tokens=8, k=2)
    at = click(at.run(), "Run")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Identical to the target alone" in s.value for s in at.success)
    assert sorted(set(tiny_models)) == ["qwen2.5-coder-1.5b", "smollm2-135m"]


def test_live_refuses_sampling_under_the_text_bridge(tiny_models):
    at = live_app(drafter="draft-model", target="qwen2.5-coder-1.5b", vocab_bridge="text", draft="smollm2-135m",
                  prompt=TINY_PROMPT, raw=True, max_new_tokens=8, temperature=0.7)
    at = click(at.run(), "Run")
    assert any("exact for greedy decoding only" in e.value for e in at.error)
    assert tiny_models == []  # refused before loading anything


def test_compare_preset_sets_the_k_trade_off(tiny_models):
    at = click(app_on("compare"), "The K trade-off")
    assert not at.exception
    assert at.selectbox(key=key("compare.target")).value == "qwen2.5-coder-1.5b"
    assert at.multiselect(key=key("compare.drafters")).value == ["draft-model"]
    assert at.multiselect(key=key("compare.ks")).value == [1, 2, 4, 8]
    assert at.selectbox(key=key("compare.draft")).value == "qwen2.5-coder-0.5b"
    assert tiny_models == []  # a preset only sets the choices


def test_compare_races_a_bridged_draft_beside_the_same_family_one(tiny_models):
    at = click(app_on("compare"), "Race a draft of another tokenizer")
    assert at.selectbox(key=key("compare.vocab_bridge")).value == "text"
    assert at.selectbox(key=key("compare.bridged_draft")).value == "smollm2-135m"
    for name, value in dict(source="Paste prompts", pasted=TINY_PROMPT, raw=True, max_new_tokens=6, ks=[2]).items():
        at.session_state[key(f"compare.{name}")] = value
    at = click(at.run(), "Run comparison")
    assert not at.exception and not at.error, [e.value for e in at.error]
    comparison = at.session_state["compare:comparison"]
    labels = {run.drafter for run in comparison.runs}
    assert "draft-model (smollm2-135m, text bridge)" in labels
    assert "draft-model (qwen2.5-coder-0.5b)" in labels
    bridged = [run for run in comparison.runs if "text bridge" in run.drafter]
    assert all(run.identical_to_target for run in bridged)


def test_step_through_shows_one_bridged_step(tiny_models):
    at = app_on("step", drafter="draft-model", target="qwen2.5-coder-1.5b", vocab_bridge="text",
                draft="smollm2-135m", prompt=TINY_PROMPT, raw=True, max_new_tokens=8, k=3)
    at = click(click(at, "Start"), "Next cycle")
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state["step:session"]
    assert session.bridged and session.bridged[0] is not None
    assert any("Through the vocabulary bridge" in m.value for m in at.markdown)
    table = at.dataframe[0].value
    assert set(table["vocabulary"]) <= {"draft", "target"} and "draft" in set(table["vocabulary"])
