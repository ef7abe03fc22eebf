"""The EAGLE head and trimmed vocabularies on the Live, Compare and Step-through pages (tiny models, AppTest)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the app is not an installed package; its modules import as app.*
    sys.path.insert(0, str(ROOT))

from app_util import app_on, click, html_of, key, live_app, tiny_loaded, tiny_models  # noqa: E402, F401
from lab.studies.compare import BASELINE  # noqa: E402
from lab.drafters import EagleHead, EagleHeadConfig  # noqa: E402
from lab.drafters.eagle import head_dir, save_head  # noqa: E402
from lab.studies.token_frequencies import count_tokens  # noqa: E402
from lab.vocab import frequency_path, save_frequencies  # noqa: E402

PROMPT = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4"


@pytest.fixture
def trained_cache(tmp_path, monkeypatch):
    """A model cache holding a (random) head and a frequency table for the tiny stand-in of smollm2-135m."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    target = tiny_loaded("smollm2-135m")
    torch.manual_seed(0)
    head = EagleHead(EagleHeadConfig.for_target(target.model, 16, target="smollm2-135m"))
    save_head(head, head_dir("smollm2-135m"), {"train_s": 1.0})
    save_frequencies(count_tokens([list(range(3, 20)) * 2], target.vocab_size), frequency_path("smollm2-135m"))
    return tmp_path


def test_compare_runs_the_head_and_its_trimmed_variant(tiny_models, trained_cache):
    at = app_on("compare", source="Paste prompts", pasted=PROMPT, raw=True, max_new_tokens=8, ks=[3],
                drafters=["eagle", "prompt-lookup"], draft_vocab=8192)
    at = click(at, "Run comparison")
    assert not at.exception and not at.error, [e.value for e in at.error]
    comparison = at.session_state["compare:comparison"]
    labels = {r.drafter for r in comparison.runs} - {BASELINE}
    assert labels == {"eagle", "eagle (vocab 8k)", "prompt-lookup (n 1-3)"}
    summary = comparison.summary()
    assert set(summary["drafter"]) == labels
    assert all(len(rates) == 3 for rates in summary["per_position_acceptance"])  # the per-position curves' data
    assert set(at.dataframe[0].value["identical to target"]) == {"yes (1/1)"}
    costs = at.table[0].value
    assert "one decoder layer" in " ".join(costs["what it uses"])


def test_live_runs_the_trimmed_head(tiny_models, trained_cache):
    at = click(live_app(prompt=PROMPT, raw=True, max_new_tokens=8, drafter="eagle", draft_vocab=8192), "Run")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert 'class="tok tok-' in html_of(at)
    assert "top 8,192 tokens" in at.session_state["live:result"].settings["drafter"]  # trimmed runs say so


def test_live_says_what_the_head_reads_and_how_it_measured(tiny_models, trained_cache, tmp_path):
    at = live_app(drafter="eagle")
    at.run()
    assert any("Head: reads the final norm (EAGLE-1)" in c.value for c in at.caption), [c.value for c in at.caption]
    at.session_state[key("live.target")] = "qwen2.5-coder-1.5b"  # none trained in this cache
    at.run()
    assert any("python -m lab train-head --target qwen2.5-coder-1.5b" in c.value for c in at.caption)


def test_draft_vocabulary_select_shows_full_by_default(tiny_models):
    at = live_app(drafter="eagle")
    at.run()
    select = at.selectbox(key=key("live.draft_vocab"))
    assert select.value == 0 and select.format_func(select.value) == "full"


@pytest.mark.parametrize(
    "target, message",
    [
        ("qwen2.5-coder-1.5b", "train-head"),  # no head anywhere: say how to train one
        # the head shipped for the real SmolLM2 does not fit its tiny stand-in: refused, not run
        ("smollm2-135m", "eagle requires a head trained for this target (width 32"),
    ],
)
def test_a_missing_or_unfitting_head_is_an_error_that_says_why(tiny_models, tmp_path, monkeypatch, target, message):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    at = click(live_app(prompt=PROMPT, raw=True, max_new_tokens=4, drafter="eagle", target=target), "Run")
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]


def test_step_through_the_head(tiny_models, trained_cache):
    at = app_on("step", prompt=PROMPT, raw=True, max_new_tokens=8, drafter="eagle")
    at = click(click(at, "Start"), "Next cycle")
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state["step:session"]
    assert len(session.steps) == 1 and len(session.steps[0].drafted) == 4
    at = click(click(at, "Next cycle"), "Next cycle")  # each click resumes the decode on a new thread
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state["step:session"]
    assert len(session.steps) == 3 and all(step.drafted for step in session.steps)
    assert any("Head: reads the final norm (EAGLE-1)" in c.value for c in at.caption)  # as on Live and Batch


def test_compare_plan_counts_the_trimmed_variants(tiny_models):
    at = app_on("compare", source="Paste prompts", pasted="a\n---\nb", drafters=["eagle", "prompt-lookup"], ks=[2, 4],
                draft_vocab=8192)
    at.run()
    # 2 prompts x (target alone + (eagle, eagle trimmed, prompt lookup) x 2 K) = 14
    assert any("**14 decodes**" in c.value for c in at.caption), [c.value for c in at.caption]


def test_batch_sweeps_the_trimmed_head_and_says_so(tiny_models, trained_cache):
    at = app_on("batch", source="Paste prompts", pasted=PROMPT + "\n---\nt7 t8 t9 t7 t8 t9", raw=True, max_new_tokens=8,
                k=3, batch_sizes=[1, 2], drafter="eagle", draft_vocab=8192, peer=True)
    assert any("Head: reads the final norm (EAGLE-1)" in c.value for c in at.caption), [c.value for c in at.caption]
    at = click(at, "Run sweep")
    assert not at.exception and not at.error, [e.value for e in at.error]
    sweep = at.session_state["batch:sweep"]
    assert sweep["drafter"] == "eagle" and sweep["settings"]["draft_vocab"] == 8192
    assert [row["batch_size"] for row in sweep["results"]] == [1, 2]
    # fp32 greedy: the head's tokens are the target's own at every batch size
    assert all(row["outputs_differ_on_vs_off"] == 0 for row in sweep["results"]), sweep["results"]
    assert "skipped" in sweep["peer_batch_1"]  # transformers has no trimmed draft vocabulary to compare with
    assert any("eagle (top 8,192 tokens), K=3" in m.value for m in at.success), [m.value for m in at.success]
