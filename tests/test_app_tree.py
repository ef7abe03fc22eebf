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
    branched = len(set(trees[0].tree.parents.tolist())) < len(trees[0].tree.parents)
    assert branched != any("never branched" in i.value for i in at.info)


def test_step_through_says_when_a_tree_never_branched(tiny_models):
    # "t3 t4" has one continuation in this prompt: the trie is a chain, and the page says so
    at = app_on("step", prompt="t3 t4 t5 t6 t3 t4 t5 t6 t3 t4", raw=True, max_new_tokens=10, tree_budget=8)
    at = click(click(at, "Start"), "Next cycle")
    assert not at.exception and not at.error
    (step,) = at.session_state["step:session"].steps
    assert step.tree is not None and step.tree.parents.tolist() == list(range(-1, len(step.tree.parents) - 1))
    assert any("never branched" in i.value for i in at.info)


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


def test_tree_figure_spreads_a_14_node_tree_so_labels_do_not_overlap():
    # labels sat above their markers in 34 px rows (stacked on each other), the top ones cut off, and the
    # legend under the plot covered the depth ticks 0 and 1
    import torch

    from app.render_tree import ROW_PX, tree_figure
    from conftest import tiny_tokenizer
    from lab.trace import Step
    from lab.tree import DraftTree

    parents = [-1, -1, -1, 0, 0, 1, 1, 2, 3, 3, 5, 7, 8, 10]
    tree = DraftTree(torch.arange(5, 19), torch.tensor(parents), draft_probs=torch.full((14,), 0.5))
    step = Step(index=2, drafted=(5, 8, 13), num_accepted=3, emitted=(5, 8, 13, 20), final_kind="corrected",
                draft_ms=1.0, verify_ms=2.0, target_cache_len=30, tree=tree, tree_path=(0, 3, 8))
    figure = tree_figure(step, tiny_tokenizer(), [3, 4, 4])
    nodes = [t for t in figure.data if t.mode == "markers+text"]
    points = [(x, y) for t in nodes for x, y in zip(t.x, t.y)]
    assert len(points) == 16 and len(set(points)) == 16  # root, 14 nodes, the corrected token: no two on one spot
    assert {t.textposition for t in nodes} == {"middle right"}  # beside the marker, not on the row above
    assert [t.text[0].strip() for t in nodes if t.name == "root"] == ["t4"]
    for depth in range(5):  # at one depth, nodes are a whole row (ROW_PX) apart at least
        rows = sorted(y for x, y in points if x == depth)
        assert all(b - a >= 1 for a, b in zip(rows, rows[1:])), (depth, rows)
    leaves = 8
    assert figure.layout.height >= ROW_PX * leaves + figure.layout.margin.t + figure.layout.margin.b
    low, high = figure.layout.yaxis.range  # reversed: row 0 at the top, half a row spare at both ends
    assert low > max(y for _, y in points) and high < min(y for _, y in points)
    assert figure.layout.xaxis.range[1] >= 4.5  # room right of the deepest node for its label
    assert figure.layout.legend.orientation == "h" and figure.layout.legend.y >= 1  # above the plot, off the ticks
