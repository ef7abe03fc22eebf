"""Growing a draft tree from a model drafter's next-token distributions.

Two shapes, both within a node budget N and a depth D:

- "dynamic": EAGLE-2's context-aware tree (Li et al. 2024, "EAGLE-2: Faster
  Inference of Language Models with Dynamic Draft Trees", section 4): each
  candidate's score is its cumulative draft log-probability (the sum along its
  path); at each depth the top-k candidates of that depth are expanded, each into
  its top-k children; finally the N candidates of highest score are kept
  (reranking). A path's score only falls with depth, so the kept set holds every
  kept node's ancestors.
- "static": a fixed top-k expansion (Medusa / SpecInfer's static trees): every
  node of a depth gets its top-k children, breadth first, until N nodes.

The drafter supplies ``expand(nodes)``: the draft's next-token logits after each
of those candidates ([F, V]), reading whatever cache it keeps. Nodes are chosen
deterministically (top-k), so the tree is verified as one-hot drafts
(``lab.tree``: exact under sampling too).

Under a grammar constraint each candidate's children are drawn from the draft's
logits masked by the grammar state after the candidate's root path
(``GrammarState.mask_after``): a forbidden token is never proposed, and a
candidate that completes the output gets no children.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lab.tree import DraftTree

TreeShape = Literal["dynamic", "static"]
TREE_SHAPES = ("dynamic", "static")


@dataclass
class Candidates:
    """The grown candidates, in the order made: token, parent (-1: root), depth, cumulative log-prob, draft prob."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)

    def add_children(self, parent: int, logits: torch.Tensor, topk: int) -> list[int]:
        """The top-k tokens of logits [V] as children of ``parent``; returns their indices."""
        logprobs = torch.log_softmax(logits.float(), -1)
        top = torch.topk(logprobs, min(topk, logprobs.shape[-1]))
        base = self.scores[parent] if parent >= 0 else 0.0
        depth = self.depths[parent] + 1 if parent >= 0 else 1
        made = []
        for token, logprob in zip(top.indices.tolist(), top.values.tolist()):
            if not logprob > float("-inf"):
                break  # masked by the grammar: fewer than topk tokens allowed (NaN: none allowed)
            made.append(len(self.tokens))
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(depth)
            self.scores.append(base + logprob)
            self.probs.append(float(torch.tensor(logprob).exp()))
        return made

    def ancestors(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            node = self.parents[node]
            if node >= 0:
                out.append(node)
        return out

    def path_tokens(self, node: int) -> list[int]:
        """The tokens from the root's child down to ``node``, inclusive."""
        return [self.tokens[a] for a in reversed(self.ancestors(node))] + [self.tokens[node]]

    def tree(self, kept: Sequence[int]) -> DraftTree:
        """The kept candidates (each with its parent kept) as a ``DraftTree`` in (depth, made) order."""
        order = sorted(kept, key=lambda c: (self.depths[c], c))
        index = {c: i for i, c in enumerate(order)}
        return DraftTree(
            torch.tensor([self.tokens[c] for c in order], dtype=torch.long),
            torch.tensor([index[self.parents[c]] if self.parents[c] >= 0 else -1 for c in order], dtype=torch.long),
            torch.tensor([self.probs[c] for c in order], dtype=torch.float32),
        )


def grow_tree(
    root_logits: torch.Tensor,
    expand: Callable[[list[int], Candidates], torch.Tensor],
    depth: int,
    budget: int,
    topk: int,
    shape: TreeShape = "dynamic",
    grammar=None,
) -> DraftTree | None:
    """Grow a draft tree of at most ``budget`` nodes and ``depth`` levels (see the module docstring).

    root_logits: [V] the draft's logits after the last committed token.
    expand: (candidate indices, candidates) -> [F, V] logits after each of them.
    topk: children per expanded node (and, dynamic, nodes expanded per depth).
    grammar: a ``lab.grammar.GrammarState`` at the committed prefix, or None: every node's children under
        its mask (see the module docstring). Returns None when the grammar allows no first token.
    Raises ValueError for an unknown shape or depth, budget or topk below 1.
    """
    if shape not in TREE_SHAPES:
        raise ValueError(f"tree shape requires one of {', '.join(TREE_SHAPES)}; got {shape!r}")
    if depth < 1 or budget < 1 or topk < 1:
        raise ValueError(f"growing a tree requires depth, budget and topk >= 1; got {depth}, {budget}, {topk}")
    cands = Candidates()
    if grammar is not None:
        root_logits = grammar.mask_next(root_logits)
        unmasked = expand

        def expand(frontier, cands):  # noqa: F811 (the drafter's expand, masked per candidate)
            logits = unmasked(frontier, cands)  # [F, V]
            return torch.stack([grammar.mask_after(cands.path_tokens(c), row) for c, row in zip(frontier, logits)])

    level = cands.add_children(-1, root_logits, min(topk, budget))
    if not level:
        return None
    for _ in range(depth - 1):
        if shape == "dynamic":
            frontier = sorted(level, key=lambda c: -cands.scores[c])[: min(topk, budget)]
        else:
            frontier = [c for c in level if c < budget]  # breadth first: only nodes that fit the budget grow
        if not frontier:
            break
        logits = expand(frontier, cands)  # [F, V]
        level = [child for row, node in zip(logits, frontier) for child in cands.add_children(node, row, topk)]
        if shape == "static" and len(cands.tokens) >= budget:
            break
    if shape == "static":
        return cands.tree(range(min(budget, len(cands.tokens))))
    kept: list[int] = []
    chosen = set()
    for c in sorted(range(len(cands.tokens)), key=lambda c: (-cands.scores[c], cands.depths[c], c)):
        if len(kept) == budget:
            break
        if cands.parents[c] < 0 or cands.parents[c] in chosen:
            kept.append(c)
            chosen.add(c)
    return cands.tree(kept)


def frontier_mask(
    frontier: Sequence[int], cands: Candidates, slot_of: dict[int, int], prefix_len: int, cached: int, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A drafter's 4-D mask and position ids to feed ``frontier`` after ``cached`` slots of its cache.

    prefix_len: the committed tokens at the front of the cache (all visible); slot_of: the cache slot of each
    candidate fed before (ancestors). Returns mask [1, 1, F, cached + F] (0 visible, dtype min elsewhere) and
    position ids [1, F] (prefix_len - 1 + depth). Records the frontier's slots in slot_of.
    """
    f = len(frontier)
    visible = torch.zeros(f, cached + f, dtype=torch.bool)
    visible[:, :prefix_len] = True
    for j, node in enumerate(frontier):
        for a in cands.ancestors(node):
            visible[j, slot_of[a]] = True
        visible[j, cached + j] = True
        slot_of[node] = cached + j
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    positions = torch.tensor([[prefix_len - 1 + cands.depths[n] for n in frontier]], dtype=torch.long)
    return mask[None, None], positions
