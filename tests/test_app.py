"""The Streamlit app: pure rendering helpers, session helpers, and AppTest runs of every page.

AppTest runs the real scripts in this process. Most tests patch ``lab.models``'s
loaders (the app's only way to models) to return a tiny random model
(``app_util.tiny_models``), so a full Live run takes well under a second; one
``real_model`` test drives the page with SmolLM2 and prompt lookup end to end.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the app is not an installed package; its modules import as app.*
    sys.path.insert(0, str(ROOT))

import lab.models  # noqa: E402
from app import render, state, widgets  # noqa: E402
from app_util import MAIN, TIMEOUT_S, app_on, click, html_of, key, live_app, selectbox_labels, tiny_models  # noqa: E402, F401
from conftest import tiny_tokenizer  # noqa: E402
from lab.config import DecodeConfig  # noqa: E402
from lab.display import token_text  # noqa: E402
from lab.drafters import PromptLookupDrafter  # noqa: E402
from lab.decode import decode, run  # noqa: E402
from lab.trace import Step  # noqa: E402

PAGE_FILES = sorted(p.name for p in (ROOT / "app" / "app_pages").glob("*.py") if not p.name.startswith("_"))


# ---------------------------------------------------------------- render: token text and classes


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges: every UTF-8 byte is a token, as in GPT-2-style tokenizers."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_token_text_keeps_leading_space_and_joins_split_characters():
    # lab.display.token_text: the one copy the app and the notebooks both show tokens through.
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("a é")["input_ids"]  # 'a', ' ', then the two bytes of 'é'
    assert len(ids) == 4
    texts = [token_text(tokenizer, ids[:i], ids[i]) for i in range(len(ids))]
    assert texts[:2] == ["a", " "]
    assert texts[2] == "\ufffd"  # half a character: shown as the replacement mark
    assert texts[3] == "é"  # the completing byte carries the character
    assert token_text(tokenizer, [], ids[0]) == "a"


def step(drafted, num_accepted, emitted, final_kind, index=0) -> Step:
    return Step(index, tuple(drafted), num_accepted, tuple(emitted), final_kind, 0.1, 1.0, 10)


@pytest.mark.parametrize(
    "event, kinds, ids",
    [
        # 1 of 3 accepted: the refused draft token shows struck through before the correction
        (step([5, 6, 7], 1, [5, 9], "corrected"), ["accepted", "rejected", "corrected"], [5, 6, 9]),
        # all accepted: the target adds a bonus token
        (step([5, 6], 2, [5, 6, 8], "bonus"), ["accepted", "accepted", "bonus"], [5, 6, 8]),
        # no draft (target alone or no n-gram match)
        (step([], 0, [8], "target"), ["target"], [8]),
        # EOS (t1) among the accepted ones cuts the step: no rejection and no final token shown
        (step([5, 1, 7], 3, [5, 1], "bonus"), ["accepted", "accepted"], [5, 1]),
        # the budget cut the correction off: the rejected token is not shown either
        (step([5, 6], 1, [5], "corrected"), ["accepted"], [5]),
        # nothing accepted
        (step([6, 7], 0, [9], "corrected"), ["rejected", "corrected"], [6, 9]),
    ],
)
def test_step_pieces_classes(event, kinds, ids):
    pieces = render.step_pieces(event, [3, 4], tiny_tokenizer())
    assert [p.kind for p in pieces] == kinds
    assert [p.token_id for p in pieces] == ids
    assert all(p.step == event.index for p in pieces)


def test_tokens_html_escapes_and_marks_whitespace():
    pieces = [
        render.TokenPiece("<b>&", "accepted", 0, 10),
        render.TokenPiece("\n", "rejected", 0, 11),
        render.TokenPiece("", "bonus", 1, 12),
        render.TokenPiece("<|im_end|>", "target", 2, 13, special=True),
    ]
    html = render.tokens_html(pieces)
    assert "<b>" not in html and "&lt;b&gt;&amp;" in html
    assert render.NEWLINE_MARK in html and "\n" in html  # marked and kept
    assert "∅" in html  # an empty token stays visible
    assert 'class="tok tok-target tok-special"' in html
    for kind in ("accepted", "rejected", "bonus"):
        assert f'class="tok tok-{kind}"' in html
    assert html.startswith('<div class="tok-stream">') and "tok-caret" not in html
    assert "tok-caret" in render.tokens_html(pieces, streaming=True)
    assert "no tokens" in render.tokens_html([])


def test_legend_shows_every_class():
    legend = render.legend_html()
    for kind in render.TOKEN_KINDS:
        assert f'<span class="tok tok-{kind}">{kind}</span>' in legend


@pytest.mark.parametrize(
    "a, b, expected",
    [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [], None)],
)
def test_first_difference(a, b, expected):
    assert render.first_difference(a, b) == expected


@pytest.mark.parametrize(
    "value, text", [(0.5, "50 %"), (math.nan, "—"), (None, "—"), (1.0, "100 %")]
)
def test_format_rate(value, text):
    assert render.format_rate(value) == text


def test_format_number():
    assert render.format_number(1.2345, 2, "×") == "1.23×"
    assert render.format_number(math.nan) == "—"


def test_acceptance_figure():
    figure = render.acceptance_figure([0.9, 0.5, 0.25])
    (bar,) = figure.data
    assert list(bar.x) == [1, 2, 3] and list(bar.y) == [0.9, 0.5, 0.25]
    assert list(bar.text) == ["90 %", "50 %", "25 %"]
    empty = render.acceptance_figure([])
    assert any("nothing was drafted" in a.text for a in empty.layout.annotations)


def test_steps_rows():
    steps = [step([5, 6, 7], 1, [5, 9], "corrected", 0), step([], 0, [8], "target", 1)]
    rows = render.steps_rows(steps, tiny_tokenizer(), prompt_ids=[3, 4])
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["accepted"] == "1/3" and rows[1]["accepted"] == "—"
    assert rows[0]["drafted"] == " t5 t6 t7" and rows[0]["emitted"] == " t5 t9"
    assert rows[0]["final token"] == "corrected" and rows[1]["final token"] == "target"


# ---------------------------------------------------------------- state


def test_collect_run_matches_engine_and_streams(tiny_target):
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    config = DecodeConfig(k=3, max_new_tokens=12)
    seen = []
    record = state.collect_run(
        "prompt lookup", decode(tiny_target, prompt, PromptLookupDrafter(1, 3), config), tiny_target.tokenizer,
        prompt, on_step=lambda r: seen.append(len(r.steps)),
    )
    reference = run(tiny_target, prompt, PromptLookupDrafter(1, 3), config)
    assert record.token_ids == reference.token_ids and record.text == reference.text
    assert seen == list(range(1, len(record.steps) + 1))  # called once per step, with the record so far
    committed = [p.token_id for p in record.pieces if p.kind != "rejected"]
    assert committed == record.token_ids
    rejected = sum(1 for p in record.pieces if p.kind == "rejected")
    assert rejected == sum(1 for s in record.steps if s.final_kind == "corrected" and s.final_token is not None)
    assert record.stats.as_dict() | {"wall_s": 0, "prefill_s": 0, "draft_s": 0, "verify_s": 0, "tokens_per_s": 0} == (
        reference.stats.as_dict() | {"wall_s": 0, "prefill_s": 0, "draft_s": 0, "verify_s": 0, "tokens_per_s": 0}
    )


def test_widget_values_survive_and_defaults_do_not_overwrite():
    session = {key("live.k"): 7, "live:result": object(), "other": 1}
    state.set_defaults(session, {"live.k": 4, "live.seed": 0})
    assert session[key("live.k")] == 7 and session[key("live.seed")] == 0
    state.keep_widget_values(session)  # re-assigns only widget keys (a plain dict shows no change)
    assert session[key("live.k")] == 7


def test_runtime_resolves_auto():
    runtime = state.runtime({})
    assert runtime.device in ("cpu", "cuda") and runtime.dtype in ("bf16", "fp16", "fp32")
    assert runtime.engine == ("compiled" if runtime.device == "cuda" else "eager")
    assert state.runtime({key("device"): "cpu", key("dtype"): "fp32"}) == state.Runtime("cpu", "fp32")
    assert state.runtime({key("device"): "cpu", key("dtype"): "fp32", key("engine"): "static"}).engine == "static"


@pytest.mark.parametrize("engine", ["static", "compiled"])
def test_live_run_in_the_static_and_compiled_engines_is_exact(tiny_models, engine):
    at = live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=10, k=3)
    at.session_state[key("engine")] = engine
    at = click_run(at)
    assert not at.exception and not at.error
    assert any(f"**{engine}** engine" in c.value for c in at.sidebar.caption)
    assert any("Identical to the target alone" in s.value for s in at.success)


# ---------------------------------------------------------------- AppTest with a tiny model


def click_run(at: AppTest) -> AppTest:
    return click(at, "Run")


TINY_PROMPT = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4"


@pytest.mark.parametrize("page", PAGE_FILES)
def test_every_page_renders(tiny_models, page):
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT_S)
    at.run()
    at.switch_page(f"app_pages/{page}").run()
    assert not at.exception, at.exception
    assert not at.error
    assert tiny_models == []  # drawing a page never loads a model


def test_live_page_defaults(tiny_models):
    at = live_app()
    assert at.title[0].value == "Speculative Decoding Lab"
    assert at.selectbox(key=key("live.target")).value == "smollm2-135m"
    assert at.selectbox(key=key("live.drafter")).value == "prompt-lookup"
    assert "tok-legend" in html_of(at)
    assert at.text_area(key=key("live.prompt")).value.strip()


def test_live_run_renders_tokens_metrics_and_check(tiny_models):
    at = click_run(live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=12, k=3))
    assert not at.exception and not at.error
    html = html_of(at)
    assert 'class="tok tok-' in html
    assert 'class="tok-caret"' not in html  # the final render replaced the streaming one
    labels = [m.label for m in at.metric]
    for label in ("Acceptance rate", "Mean acceptance length", "Tokens/s", "Target forward passes", "Speedup vs target alone"):
        assert label in labels
    assert any("Identical to the target alone" in s.value for s in at.success)  # fp32 tiny model: exact
    # one run's speedup swung 0.80-1.09x under load: the page says so, as Compare and Batch do
    assert any("one short run on a shared CPU is noisy" in c.value and "use Compare" in c.value for c in at.caption)
    assert tiny_models == ["smollm2-135m"]  # loaded once, reused by the target-alone run

    at.run()  # a rerun (any widget change) keeps the last run and the inputs
    assert 'class="tok tok-' in html_of(at)
    assert at.text_area(key=key("live.prompt")).value == TINY_PROMPT
    assert tiny_models == ["smollm2-135m"]


def test_sampling_run_says_equal_in_distribution(tiny_models):
    at = click_run(live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=8, temperature=0.8, top_p=0.9))
    assert not at.exception and not at.error
    assert any("in distribution" in i.value for i in at.info)
    assert any("wrote different texts" in c.value for c in at.caption)  # the speedup is not like with like


@pytest.mark.parametrize("drafter", ["none", "draft-model", "layer-skip"])
def test_other_drafters_run(tiny_models, drafter):
    at = click_run(live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=6, drafter=drafter, target="qwen2.5-coder-1.5b"))
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert 'class="tok tok-' in html_of(at)


@pytest.mark.parametrize(
    "widgets, message",
    [
        (dict(prompt="   "), "prompt is empty"),
        # no preset shares SmolLM2's tokenizer: the stale Qwen choice in session state is refused, not loaded
        (dict(drafter="draft-model", target="smollm2-135m", draft="qwen2.5-coder-0.5b"), "No draft model shares"),
        (dict(target="local folder…", target_folder="/no/such/model"), "Unknown model"),
        (dict(target="local folder…", target_folder=""), "folder path"),
        (dict(drafter="draft-model", target="qwen2.5-coder-1.5b", draft="local folder…", draft_folder=""), "folder path"),
        (dict(min_n=3, max_n=2), "min_n <= max_n"),
        (dict(drafter="layer-skip", exit_layer=9), "exit layer"),
    ],
)
def test_errors_are_shown_and_the_app_keeps_running(tiny_models, widgets, message):
    at = click_run(live_app(**({"prompt": TINY_PROMPT, "raw": True, "max_new_tokens": 4} | widgets)))
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    # the app still works: fix the input and run again
    at.session_state[key("live.prompt")] = TINY_PROMPT
    for name, value in {"drafter": "prompt-lookup", "target": "smollm2-135m", "min_n": 1, "max_n": 3}.items():
        at.session_state[key(f"live.{name}")] = value
    at = click_run(at)
    assert not at.exception and not at.error
    assert 'class="tok tok-' in html_of(at)
    assert not any("previous run" in c.value for c in at.caption)
    # a failing run after a good one: the good result stays, said to be the previous run
    at.session_state[key("live.prompt")] = "   "
    at = click_run(at)
    assert any("prompt is empty" in e.value for e in at.error)
    assert any("the previous run, kept" in c.value for c in at.caption)
    assert 'class="tok tok-' in html_of(at)


@pytest.mark.parametrize(
    "target, drafts",
    [
        ("qwen2.5-coder-1.5b", ["qwen2.5-coder-0.5b"]),
        ("qwen2.5-coder-0.5b", ["qwen2.5-coder-1.5b"]),  # offered (same tokenizer), though larger than the target
        ("smollm2-135m", []),  # no other SmolLM2 preset; the target itself never drafts for itself
        ("qwen2.5-coder-1.5b-moe", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]),  # a MoE twin is a target only
        ("/a/local/folder", [n for n, p in lab.models.PRESETS.items() if p.moe is None]),  # checked at load
    ],
)
def test_compatible_drafts_share_the_target_tokenizer_family(target, drafts):
    assert widgets.compatible_drafts(target) == drafts


def test_checked_draft_refuses_what_cannot_draft():
    assert widgets.checked_draft("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert widgets.checked_draft("qwen2.5-coder-1.5b", "/my/draft") == "/my/draft"  # a folder: checked at load
    with pytest.raises(ValueError, match="No draft model shares the tokenizer of SmolLM2.*prompt lookup or layer skip"):
        widgets.checked_draft("smollm2-135m", "qwen2.5-coder-0.5b")
    with pytest.raises(ValueError, match="cannot draft for .*Pick one of Qwen2.5-Coder-0.5B"):
        widgets.checked_draft("qwen2.5-coder-1.5b", "smollm2-135m")
    with pytest.raises(ValueError, match="No draft model shares"):
        widgets.checked_draft("smollm2-135m", None)
    # the targets it suggests have a smaller model of their family to draft (not the 0.5B, whose only peer is larger)
    message = widgets.no_draft_message("smollm2-135m")
    assert "a target that has a draft model (Qwen2.5-Coder-1.5B" in message and "Qwen2.5-Coder-0.5B" not in message


@pytest.mark.real_model
def test_tokenizer_families_agree_with_the_real_tokenizers():
    # the app offers drafts by family without loading anything; the real tokenizers must agree
    prepared = [name for name in lab.models.PRESETS if lab.models.is_prepared(name)]
    if len(prepared) < 2:
        pytest.skip(f"needs two prepared presets; prepared: {prepared}")
    tokenizers = {name: lab.models.load_tokenizer(name) for name in prepared}
    for target in prepared:
        for draft in prepared:
            try:
                lab.models.check_same_tokenizer(tokenizers[target], tokenizers[draft])
                same = True
            except lab.models.ModelError:
                same = False
            assert same == (widgets.tokenizer_family(target) == widgets.tokenizer_family(draft)), (target, draft)


def test_live_draft_list_follows_the_target(tiny_models):
    at = live_app(drafter="draft-model", target="qwen2.5-coder-1.5b", draft="smollm2-135m").run()
    assert not at.exception and not at.error
    draft_box = at.selectbox(key=key("live.draft"))
    assert draft_box.options == ["Qwen2.5-Coder-0.5B-Instruct", widgets.LOCAL_FOLDER]
    assert draft_box.value == "qwen2.5-coder-0.5b"  # the stale SmolLM2 choice moved to the first that fits

    at.selectbox(key=key("live.target")).set_value("smollm2-135m").run()
    assert not at.exception and not at.error
    assert "Draft model" not in selectbox_labels(at)  # no select with nothing to pick ...
    (info,) = [i.value for i in at.info if "No draft model shares" in i.value]
    assert "SmolLM2-135M-Instruct" in info and "prompt lookup or layer skip" in info and "Qwen" in info
    assert "folder of a local model" in info
    assert [t.label for t in at.text_input] == ["Draft model folder"]  # ... but a local folder can still be typed

    at = click_run(at)  # nothing typed: the run says what to do, and loads nothing
    assert any("No draft model shares" in e.value for e in at.error)
    assert tiny_models == []


@pytest.mark.parametrize("page", ["compare", "batch", "step"])
def test_other_pages_offer_only_fitting_drafts(tiny_models, page):
    drafter = {"compare": dict(drafters=["draft-model"])}.get(page, dict(drafter="draft-model"))
    at = app_on(page, target="qwen2.5-coder-0.5b", **drafter)
    assert not at.exception and not at.error
    assert at.selectbox(key=key(f"{page}.draft")).options == ["Qwen2.5-Coder-1.5B-Instruct"]
    at.selectbox(key=key(f"{page}.target")).set_value("smollm2-135m").run()
    assert not at.exception and not at.error
    assert "Draft model" not in selectbox_labels(at)
    assert any("No draft model shares the tokenizer of SmolLM2" in i.value for i in at.info)


def test_corrupt_model_folder_is_shown(tiny_models, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    at = click_run(live_app(prompt=TINY_PROMPT, target="local folder…", target_folder=str(tmp_path)))
    assert not at.exception
    assert any("Could not load the model" in e.value for e in at.error), [e.value for e in at.error]


def test_out_of_memory_is_shown(tiny_models, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lab.models, "load_model", no_memory)
    at = click_run(live_app(prompt=TINY_PROMPT))
    assert not at.exception
    assert any("Out of memory" in e.value for e in at.error)


def test_prompt_beyond_context_window_is_shown(tiny_models):
    at = click_run(live_app(prompt=" ".join(["t3"] * 600), raw=True))  # the tiny model holds 512 positions
    assert not at.exception
    assert any("context window" in e.value for e in at.error)


# ---------------------------------------------------------------- AppTest with a real model


@pytest.mark.real_model
def test_live_page_with_smollm2_and_prompt_lookup():
    if not lab.models.is_prepared("smollm2-135m"):
        pytest.skip("smollm2-135m is not prepared (run scripts/setup.sh test)")
    st.cache_resource.clear()
    try:
        at = click_run(live_app(max_new_tokens=8))  # default prompt, SmolLM2, prompt lookup, compare on
        assert not at.exception and not at.error, [e.value for e in at.error]
        html = html_of(at)
        assert "tok tok-" in html
        assert {m.label for m in at.metric} >= {"Acceptance rate", "Tokens/s", "Speedup vs target alone"}
        # the card shows the tokens/s the speedup divides (a trial saw a single run's 11.9 beside 1.02x of 12.7)
        from app import render

        result = at.session_state["live:result"]
        (card,) = [m.value for m in at.metric if m.label == "Tokens/s"]
        assert card == render.format_number(result.speculative_tokens_per_s, 1)
        assert result.speedup == pytest.approx(result.speculative_tokens_per_s / result.baseline_tokens_per_s)
        # the exactness check says identical, or explains where bf16 rounding made it differ
        assert at.success or any("rounding near-tie, not a flaw" in i.value for i in at.info)
    finally:
        st.cache_resource.clear()


def test_live_says_why_speculation_lost_in_the_drafters_terms():
    from types import SimpleNamespace

    from app.app_pages.live import loss_hint

    def result(drafter: str, speedup: float | None, baseline: object = object()):
        label = widgets.DRAFTER_LABELS[drafter] + ", K=4"  # as Live names the run
        return SimpleNamespace(baseline=baseline, speedup=speedup, settings={"drafter": label})

    hint = loss_hint(result("layer-skip", 0.62))
    assert hint.startswith("Speculation lost here (0.62×).") and "Layer skip" in hint
    assert "break-even" in loss_hint(result("draft-model", 0.9))
    assert loss_hint(result("layer-skip", 1.3)) is None  # it paid
    assert loss_hint(result("layer-skip", None, baseline=None)) is None  # no baseline: nothing to say
    assert loss_hint(result("none", 0.9)) is None  # the target alone has nothing to lose
