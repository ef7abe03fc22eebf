"""The Live page's constrained output: the cut token class, validity, bad schemas, naive vs exact, acceptance.

AppTest runs the real app; ``lab.models``'s loaders are patched (as in
``test_app.py``) to return tiny random models, here over SmolLM2's real
tokenizer because xgrammar needs real token strings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the app is not an installed package; its modules import as app.*
    sys.path.insert(0, str(ROOT))

import lab.models  # noqa: E402
from app import constrained, render  # noqa: E402
from app_util import click, key, live_app  # noqa: E402
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402
from lab.trace import Step  # noqa: E402

pytestmark = pytest.mark.skipif(not lab.models.is_prepared("smollm2-135m"), reason="needs SmolLM2's tokenizer")

# Prompt lookup finds '"b' earlier in this raw prompt and proposes '":', ' ', '2', ...: under a boolean
# schema its first proposed token is forbidden, so the grammar cuts the proposal (see test_grammar.py).
CUT_PROMPT = '{"a": 1, "b": 2, "a": 1, "b'
BOOLEAN = json.dumps({"type": "boolean"})
BOUNDED = json.dumps({"type": "object", "properties": {"status": {"enum": ["open", "closed"]},
                                                       "count": {"type": "integer", "minimum": 0, "maximum": 99}},
                      "required": ["status", "count"]})


# ---------------------------------------------------------------- render: the cut class


def cut_step(num_accepted: int, emitted, final_kind: str) -> Step:
    return Step(0, (5, 6), num_accepted, tuple(emitted), final_kind, 0.1, 1.0, 10, cut_by_grammar=(7, 8))


@pytest.mark.parametrize(
    "event, kinds, ids",
    [
        # both allowed draft tokens accepted; the two cut ones sit where the bonus token came
        (cut_step(2, [5, 6, 9], "bonus"), ["accepted", "accepted", "cut", "cut", "bonus"], [5, 6, 7, 8, 9]),
        # one rejected: struck through, then the cut ones, then the correction
        (cut_step(1, [5, 9], "corrected"), ["accepted", "rejected", "cut", "cut", "corrected"], [5, 6, 7, 8, 9]),
        # the budget cut the step before the target's token: neither rejected nor cut tokens are shown
        (cut_step(1, [5], "corrected"), ["accepted"], [5]),
        # the grammar cut the whole proposal: no draft at that step
        (Step(0, (), 0, (9,), "target", 0.1, 1.0, 10, cut_by_grammar=(7,)), ["cut", "target"], [7, 9]),
    ],
)
def test_cut_tokens_get_their_own_class(event, kinds, ids):
    pieces = render.step_pieces(event, [3, 4], tiny_tokenizer())
    assert [p.kind for p in pieces] == kinds
    assert [p.token_id for p in pieces] == ids
    assert [p.token_id for p in pieces if p.committed] == list(event.emitted)  # cut tokens are never output
    html = render.tokens_html(pieces)
    assert ('class="tok tok-cut"' in html) == ("cut" in kinds)


def test_cut_class_in_legend_css_and_steps_table():
    assert "cut" in render.TOKEN_KINDS
    assert '<span class="tok tok-cut">cut</span>' in render.legend_html()
    assert ".tok-cut" in (ROOT / "assets" / "app.css").read_text()
    rows = render.steps_rows([cut_step(2, [5, 6, 9], "bonus")], tiny_tokenizer(), prompt_ids=[3, 4])
    assert rows[0]["cut by grammar"] == " t7 t8" and rows[0]["emitted"] == " t5 t6 t9"
    plain = render.steps_rows([Step(0, (5,), 1, (5, 9), "bonus", 0.1, 1.0, 10)], tiny_tokenizer())
    assert "cut by grammar" not in plain[0]  # the column appears only in constrained runs


def test_tokens_html_marks_the_nth_output_token():
    pieces = render.step_pieces(cut_step(1, [5, 9], "corrected"), [3, 4], tiny_tokenizer())
    html = render.tokens_html(pieces, marks={1: "breaks here"})
    assert html.count("tok-mark") == 1
    assert 'class="tok tok-corrected tok-mark" title="breaks here' in html  # counts output tokens, not proposals
    assert render.tokens_html(pieces, marks={0: "a", 1: "b"}).count("tok-mark") == 2
    assert render.tokens_html(pieces, mark_at=1, mark="breaks here") == html  # the one-mark shorthand
    assert "tok-mark" not in render.tokens_html(pieces)


# ---------------------------------------------------------------- AppTest with tiny models over SmolLM2's tokenizer


@pytest.fixture(scope="module")
def smol_tokenizer():
    return lab.models.load_tokenizer("smollm2-135m")


@pytest.fixture
def tiny_models(monkeypatch, smol_tokenizer):
    """Every preset loads as a tiny random model over SmolLM2's tokenizer (so any pair shares it)."""
    loads = []

    def fake_load_model(name_or_path, device=None, dtype=None, progress=None):
        loads.append(str(name_or_path))
        model = tiny_llama(seed=0 if "1.5b" in str(name_or_path) or "smol" in str(name_or_path) else 1,
                           vocab_size=len(smol_tokenizer), layers=3 if "0.5b" not in str(name_or_path) else 1)
        return lab.models.LoadedModel(
            name=str(name_or_path), model=model, tokenizer=smol_tokenizer, device=torch.device("cpu"),
            dtype=torch.float32, num_parameters=sum(p.numel() for p in model.parameters()), weight_bytes=0, load_s=0.0,
        )

    monkeypatch.setattr(lab.models, "load_model", fake_load_model)
    monkeypatch.setattr(lab.models, "load_tokenizer", lambda name_or_path, progress=None: smol_tokenizer)
    st.cache_resource.clear()
    yield loads
    st.cache_resource.clear()  # never leave tiny models or their constraints cached under preset names


def streams(at: AppTest) -> list[str]:
    """The token streams drawn (the legend's sample spans are not one)."""
    return [h.value for h in at.html if 'class="tok-stream"' in h.value]


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def test_constrained_section_defaults(tiny_models):
    at = live_app()
    assert at.radio(key=key("live.constraint")).value == "off"
    assert json.loads(at.session_state[key("live.schema")]) == constrained.examples()[0].schema  # pre-filled
    naive = at.checkbox(key=key("live.naive"))
    assert naive.value is False and naive.disabled  # never the default, and only with a constraint
    assert "wrong way" in naive.label
    assert tiny_models == []


def test_legend_lists_cut_tokens_only_under_a_constraint(tiny_models):
    at = live_app()
    (legend,) = [h.value for h in at.html if h.value.startswith("<div class=\"tok-legend\">")]
    assert "tok-accepted" in legend and "tok-cut" not in legend
    at.radio(key=key("live.constraint")).set_value("regex").run()
    (legend,) = [h.value for h in at.html if h.value.startswith("<div class=\"tok-legend\">")]
    assert "tok-cut" in legend


def test_json_schema_run_shows_cut_tokens_and_valid(tiny_models):
    at = click(live_app(prompt=CUT_PROMPT, raw=True, constraint="json_schema", schema=BOOLEAN, max_n=2, k=4,
                        max_new_tokens=8), "Run")
    assert not at.exception and not at.error, texts(at.error)
    (speculative, baseline) = streams(at)
    assert 'class="tok tok-' in speculative and 'class="tok tok-cut"' in speculative
    assert any("Valid for its schema: yes." in s for s in texts(at.success))
    assert any("Identical to the target alone" in s for s in texts(at.success))  # the constraint keeps it exact
    assert any("The grammar cut" in c for c in texts(at.caption))
    assert any("constraint JSON schema" in c for c in texts(at.caption))  # the "Last run" line names it


def test_regex_run_is_valid(tiny_models):
    at = click(live_app(prompt="A date, please.", constraint="regex", regex=r"\d{4}-\d{2}-\d{2}", max_new_tokens=16),
               "Run")
    assert not at.exception and not at.error, texts(at.error)
    assert any("Valid for its regex: yes." in s for s in texts(at.success))


def test_example_loads_and_an_unfinished_output_says_raise_max_new_tokens(tiny_models):
    at = live_app(example="extract-04", max_new_tokens=6)
    at = click(at, "Load example")
    assert at.radio(key=key("live.constraint")).value == "json_schema"
    item = constrained.example("extract-04")
    assert at.text_area(key=key("live.prompt")).value == item.prompt
    assert json.loads(at.text_area(key=key("live.schema")).value) == item.schema
    at = click(at, "Run")  # six tokens cannot finish this object
    assert not at.exception and not at.error, texts(at.error)
    assert any(constrained.INCOMPLETE in w for w in texts(at.warning)), texts(at.warning)


@pytest.mark.parametrize(
    "widgets, message",
    [
        (dict(constraint="json_schema", schema='{"type": "objec'), "The JSON schema is not valid JSON"),
        (dict(constraint="json_schema", schema='{"type": "objec"}'), "The JSON schema does not compile"),
        (dict(constraint="regex", regex="[a-"), "The regular expression does not compile"),
        # xgrammar's message ends in "." and ours followed it: "not closed.. Fix it"
        (dict(constraint="regex", regex="(ab"), "The parenthesis is not closed. Fix it and run again."),
        (dict(constraint="regex", regex=""), "The constraint is empty: paste a regular expression first."),
    ],
)
def test_bad_constraint_shows_its_message_and_the_app_keeps_running(tiny_models, widgets, message):
    at = click(live_app(prompt=CUT_PROMPT, raw=True, max_new_tokens=4, **widgets), "Run")
    assert not at.exception
    assert any(message in e for e in texts(at.error)), texts(at.error)
    assert not any(".." in e for e in texts(at.error)), texts(at.error)  # xgrammar's "." then ours made ".."
    assert streams(at) == []  # no run started
    for name, value in widgets.items():  # the inputs are kept, to be fixed
        assert at.session_state[key(f"live.{name}")] == value
    at.session_state[key("live.schema")] = BOOLEAN
    at.session_state[key("live.constraint")] = "json_schema"
    at = click(at, "Run")
    assert not at.exception and not at.error, texts(at.error)
    assert streams(at)


def test_naive_mode_shows_the_broken_output_beside_the_exact_one(tiny_models):
    item = constrained.example("extract-01")
    at = click(live_app(prompt=item.prompt, constraint="json_schema", schema=json.dumps(item.schema), naive=True,
                        drafter="draft-model", target="qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b", k=4,
                        max_new_tokens=12), "Run")
    assert not at.exception, at.exception
    assert any("Naive (broken) vs exact" in m for m in texts(at.markdown))
    assert any("Naive speculation broke the output" in e for e in texts(at.error)), texts(at.error)
    assert any("naive speculation under a grammar is not exact" in w for w in texts(at.warning))
    drawn = streams(at)
    assert len(drawn) == 4  # naive and target alone above; naive and exact side by side below
    assert sum("tok-mark" in h for h in drawn) == 2  # where it breaks, on both sides (not in the streams above)
    assert "the grammar forbids this token" in drawn[2] or "first difference from the exact run" in drawn[2]
    labels = " ".join(texts(at.markdown))
    assert "naive (broken)" in labels and "JSON schema, exact" in labels


def test_also_run_without_the_constraint_shows_acceptance_with_and_without(tiny_models):
    at = click(live_app(prompt=CUT_PROMPT, raw=True, constraint="json_schema", schema=BOUNDED, unconstrained=True,
                        drafter="draft-model", target="qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b",
                        max_new_tokens=16), "Run")
    assert not at.exception and not at.error, texts(at.error)
    labels = {m.label for m in at.metric}
    assert {"Acceptance rate with the constraint", "Acceptance rate without it",
            "Mean acceptance length with", "Mean acceptance length without"} <= labels
    assert any(e.label.startswith("Output without the constraint") for e in at.expander)


def test_live_constrained_output_with_a_tree_budget(tiny_models):
    """Constrained output (a regex) with a tree: valid, identical to the target alone, the tree size reported."""
    at = live_app(prompt="A date: 2024-01-31, 2024-01-30, 2024-", raw=True, constraint="regex",
                  regex=r"\d{4}-\d{2}-\d{2}", max_new_tokens=16, k=3, tree_budget=8)
    (button,) = [b for b in at.button if b.label == "Run"]
    button.click()
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    assert any("Valid for its regex: yes." in s for s in texts(at.success))
    assert any("Identical to the target alone" in s for s in texts(at.success))
    assert any(c.startswith("Token trees:") for c in texts(at.caption))
    steps = at.session_state["live:result"].speculative.steps
    assert any(s.tree is not None and s.num_accepted > 0 for s in steps), "trees drafted under the grammar, accepted"
