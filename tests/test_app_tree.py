"""Token trees in the app: Step-through draws each step's tree, Live reports the tree size, Compare runs a tree beside
its chain, Theory shows chain against tree (AppTest over tiny random models)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app_util import app_on, click, key, live_app, tiny_models  # noqa: E402, F401

PROMPT = "t3 t4 t5 t6 t3 t4 t5 t7 t3 t4 t5 t6 t3 t4"


def test_step_through_draws_the_tree(tiny_models):
    at = app_on("step", prompt=PROMPT, raw=True, max_new_tokens=10, tree_budget=8)
    at = click(click(click(at, "Start"), "Next cycle"), "Next cycle")
    assert not at.exception and not at.error, [e.value for e in at.error]
    session = at.session_state["step:session"]
    assert session.settings["tree budget"] == 8
    trees = [s for s in session.steps if s.tree is not None]
    assert trees, "prompt lookup found no n-gram: the prompt repeats on purpose"
    at.slider(key=key("step.view")).set_value(session.steps.index(trees[0]) + 1).run()
    specs = [c.proto.spec for c in at.get("plotly_chart")]  # the tree, and the timeline in its expander
    assert any("a tree of" in spec and "accepted" in spec for spec in specs)
    assert any("accepted path" in c.value for c in at.caption)


def test_live_reports_the_tree_size(tiny_models):
    at = live_app(prompt=PROMPT, raw=True, max_new_tokens=10, k=3, tree_budget=8)
    (button,) = [b for b in at.button if b.label == "Run"]
    button.click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(c.value.startswith("Token trees:") and "nodes per verify pass" in c.value for c in at.caption)
    assert any(c.value.startswith("Last run:") and "K=3, tree budget 8" in c.value for c in at.caption)


def test_theory_shows_chain_against_tree(tiny_models):
    at = app_on("theory")
    assert not at.exception
    assert any(h.value == "Chain or tree?" for h in at.subheader)
    at.slider(key=key("theory.v_slope")).set_value(0.0).run()
    assert not at.exception
