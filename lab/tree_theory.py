"""The cost model for token trees: expected accepted length of the best tree of N nodes, and the budget that pays.

Model (Sequoia, Chen et al. 2024, "Sequoia: Scalable, Robust, and Hardware-aware Speculative Decoding",
section 3: positional acceptance). The draft's i-th ranked child of a node is accepted, when the target
reached that node and refused children 1 .. i-1, with probability a * s^(i-1): a is the chain's per-token
acceptance rate (rank 1), s in [0, 1] the sibling decay (s = 0: a second guess never helps, the chain;
s = 1: every guess is as good as the first, the optimistic bound). A node's value is the probability that
the accepted path reaches it: the product along its path of

    P(child of rank i) = a s^(i-1) * prod_{j < i} (1 - a s^(j-1)).

The expected tokens per step of a tree is 1 + the sum of its nodes' values. Values only fall from a node
to its children and to its younger siblings, so adding the most valuable candidate one at a time (a
priority queue) builds the best tree of every size N at once; with s = 0 it is the chain of N tokens and
1 + sum equals Leviathan's (1 - a^(N+1)) / (1 - a).

Cost: a verify pass over N + 1 tokens costs v(N) target steps (measured: ``lab.studies.calibrate``), and a
model drafter pays c per draft pass, one pass per depth of the tree. So

    speedup(N) = tokens(N) / (depth(N) c + v(N)).

Where v(N) stays near 1 (a GPU at batch 1: the pass is bound by reading the weights) a wider tree is
nearly free and trees win; where v(N) rises (a CPU past a few tokens, a GPU at large batch) the extra
nodes cost more than the few extra tokens they bring.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_SIBLING_DECAY = 0.5


@dataclass(frozen=True)
class TreePlan:
    """The best tree of ``len(parents)`` nodes under the model: parents (-1 = root) in the order added,
    each node's value (the probability the accepted path reaches it), and its depth."""

    parents: tuple[int, ...]
    values: tuple[float, ...]
    depths: tuple[int, ...]

    @property
    def expected_tokens(self) -> float:
        """Expected tokens per target step: 1 (the target's own) + the expected accepted depth."""
        return 1.0 + sum(self.values)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)


def _check(acceptance: float, decay: float, budget: int) -> None:
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance rate a requires 0 <= a <= 1; got {acceptance}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"sibling decay s requires 0 <= s <= 1; got {decay}")
    if budget < 0:
        raise ValueError(f"a tree budget requires N >= 0; got {budget}")


def best_tree(acceptance: float, budget: int, decay: float = DEFAULT_SIBLING_DECAY, max_depth: int = 64) -> TreePlan:
    """The best tree of ``budget`` nodes (at most ``max_depth`` deep) under the positional model above.

    Raises ValueError for a or s outside [0, 1] or a negative budget.
    """
    _check(acceptance, decay, budget)
    a = acceptance
    parents: list[int] = []
    values: list[float] = []
    depths: list[int] = []
    # heap of (-value, order, parent, rank, depth, refused_before): refused_before = prod_{j<rank} (1 - a s^(j-1))
    heap = [(-a, 0, -1, 1, 1, 1.0)]
    order = 1
    while heap and len(parents) < budget:
        negative, _, parent, rank, depth, refused = heapq.heappop(heap)
        node = len(parents)
        parents.append(parent)
        values.append(-negative)
        depths.append(depth)
        parent_value = values[parent] if parent >= 0 else 1.0
        # its younger sibling: reached when this one (and the elder ones) were refused
        refused_next = refused * (1.0 - a * decay ** (rank - 1))
        sibling = parent_value * refused_next * a * decay ** rank
        if sibling > 0:
            heapq.heappush(heap, (-sibling, order, parent, rank + 1, depth, refused_next))
            order += 1
        if depth < max_depth and -negative * a > 0:
            heapq.heappush(heap, (-(-negative) * a, order, node, 1, depth + 1, 1.0))
            order += 1
    return TreePlan(tuple(parents), tuple(values), tuple(depths))


MAX_DEPTH = 16  # as K_MAX: the deepest tree the drafters grow


def best_tree_for_cost(acceptance: float, budget: int, cost_ratio: float, verify_cost: float,
                       decay: float = DEFAULT_SIBLING_DECAY) -> tuple[TreePlan, float]:
    """The best tree of ``budget`` nodes once the draft's cost is counted, and its speedup tokens / (depth c + v(N)).

    A deeper tree costs a draft pass more per level, so the depth limit (1 .. 16) is chosen too.
    cost_ratio: c >= 0, the draft's time per draft pass in target steps (0: prompt lookup).
    verify_cost: v(N) > 0, one verify pass over N + 1 tokens in target steps.
    Raises ValueError for c < 0 or v <= 0 (and as ``best_tree``).
    """
    if cost_ratio < 0 or not verify_cost > 0:
        raise ValueError(f"a tree's speedup requires c >= 0 and v > 0; got c={cost_ratio}, v={verify_cost}")
    plans = [best_tree(acceptance, budget, decay, max_depth=d) for d in range(1, min(max(budget, 1), MAX_DEPTH) + 1)]
    return max(((p, p.expected_tokens / (p.depth * cost_ratio + verify_cost)) for p in plans), key=lambda ps: ps[1])


def tree_speedup(acceptance: float, budget: int, cost_ratio: float, verify_cost: float,
                 decay: float = DEFAULT_SIBLING_DECAY) -> float:
    """Predicted speedup of the best tree of ``budget`` nodes at its best depth (``best_tree_for_cost``)."""
    return best_tree_for_cost(acceptance, budget, cost_ratio, verify_cost, decay)[1]


def best_tree_budget(acceptance: float, cost_ratio: float, verify_costs: Mapping[int, float],
                     decay: float = DEFAULT_SIBLING_DECAY) -> tuple[int, float]:
    """The budget N among the measured ones ({N: v(N)}) with the highest predicted speedup, and that speedup.

    A chain of K tokens is the tree with decay 0; compare against ``lab.theory.best_k`` for the chain.
    Raises ValueError when no budget was measured.
    """
    if not verify_costs:
        raise ValueError("best_tree_budget requires measured verify costs {N: v(N)}; got none")
    return max(((n, tree_speedup(acceptance, n, cost_ratio, v, decay)) for n, v in sorted(verify_costs.items()) if n > 0),
               key=lambda nv: nv[1])
