"""How one step's token tree is drawn: node rows with a layout and a status, and a plain-text drawing.

Pure functions over a ``lab.trace.Step`` that carries a tree (``Step.tree``). The app draws the rows with
plotly (``app/render_tree.py``); notebooks print ``tree_text``. Status of a node, in the lab's vocabulary:

- accepted: on the accepted path (the target kept it);
- rejected: every other node (the target refused it, or never reached it because its parent was refused);
- and one extra row for the target's own token after the path: "corrected" or "bonus".
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.display import token_text
from lab.trace import Step


@dataclass(frozen=True)
class TreeNodeRow:
    """One drawn node. node: index in the tree (-1: the root, -2: the target's own token).

    depth: 0 for the root; row: vertical slot (leaves in order, a parent centred over its children).
    parent: the parent's node index (None for the root). draft_prob: None when the drafter gives none.
    """

    node: int
    parent: int | None
    token_id: int
    text: str
    depth: int
    row: float
    status: str
    draft_prob: float | None


def tree_rows(step: Step, tokenizer, context_ids: list[int]) -> list[TreeNodeRow]:
    """The rows of one tree step: the root (last committed token), every node, then the target's own token.

    context_ids: committed tokens before the step (its last is the root). Raises ValueError for a chain step.
    """
    tree = step.tree
    if tree is None:
        raise ValueError("drawing a tree requires a step with a token tree (tree budget > 0); got a chain step")
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    probs = None if tree.draft_probs is None else tree.draft_probs.tolist()
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    path = set(step.tree_path)
    end = step.tree_path[-1] if step.tree_path else -1
    final = step.final_token
    row_of: dict[int, float] = {}
    next_leaf = [0.0]

    def place(node: int) -> float:
        children = kids.get(node, [])
        extra = final is not None and node == end  # the target's own token hangs under the path's end
        if not children and not extra:
            row_of[node] = next_leaf[0]
            next_leaf[0] += 1
            return row_of[node]
        rows = [place(c) for c in children]
        if extra:
            row_of[-2] = next_leaf[0]
            next_leaf[0] += 1
            rows.append(row_of[-2])
        row_of[node] = sum(rows) / len(rows)
        return row_of[node]

    place(-1)
    depths = tree.depths
    root_token = context_ids[-1] if context_ids else tokens[0]
    out = [TreeNodeRow(-1, None, root_token, token_text(tokenizer, context_ids[:-1], root_token), 0, row_of[-1],
                       "root", None)]
    for i, token in enumerate(tokens):
        context = list(context_ids) + [tokens[a] for a in tree.path_to(i)[:-1]]
        out.append(TreeNodeRow(i, parents[i], token, token_text(tokenizer, context, token), depths[i], row_of[i],
                               "accepted" if i in path else "rejected", None if probs is None else probs[i]))
    if final is not None:
        context = list(context_ids) + [tokens[a] for a in step.tree_path]
        out.append(TreeNodeRow(-2, end, final, token_text(tokenizer, context, final), len(step.tree_path) + 1,
                               row_of[-2], step.final_kind, None))
    return out


def tree_text(step: Step, tokenizer, context_ids: list[int]) -> str:
    """A plain-text drawing of one tree step, one node a line, indented by depth: ``+`` accepted, ``x`` rejected,
    ``>`` the target's own token (corrected or bonus), with the draft probability where there is one."""
    marks = {"root": "*", "accepted": "+", "rejected": "x", "corrected": ">", "bonus": ">"}
    rows = tree_rows(step, tokenizer, context_ids)
    by_parent: dict[int | None, list[TreeNodeRow]] = {}
    for r in rows:
        by_parent.setdefault(r.parent, []).append(r)
    lines: list[str] = []

    def walk(r: TreeNodeRow) -> None:
        prob = "" if r.draft_prob is None else f"  (draft {r.draft_prob:.2f})"
        kind = "" if r.status in ("root", "accepted", "rejected") else f"  [{r.status}]"
        lines.append(f"{'    ' * r.depth}{marks[r.status]} {r.text!r}{prob}{kind}")
        for child in by_parent.get(r.node, []):
            if r.node != -2:
                walk(child)

    walk(rows[0])
    return "\n".join(lines)
