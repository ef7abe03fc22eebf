"""Token trees: verify many draft continuations in one target pass, exactly.

A draft tree holds N nodes; node i is a drafted token whose parent is another
node (``parents[i] < i``) or the root (``parents[i] == -1``), the last committed
token. Every root-to-node path is one candidate continuation; a chain of K
tokens is the tree whose parents are -1, 0, 1, ..., K - 2.

The verify pass reads [root] + the N nodes (width N + 1) after the cached
prefix, through a 4-D attention mask in which each node sees the cached prefix,
the root, its own ancestors and itself, and nothing else; its position id is the
root's position plus its depth (SpecInfer, Miao et al. 2023, "tree attention";
Medusa and EAGLE-2 do the same). Column 0 of the pass's logits is the target
after the root, column i + 1 the target after node i.

Greedy (``verify_tree_greedy``): keep the longest root path whose every token
is the target's argmax after its parent, then the target's own argmax after the
path's last node (the correction, or the bonus at a leaf). Token for token the
target's greedy output.

Sampling (``verify_tree_sampling``): SpecInfer's multi-step speculative
sampling (Miao et al. 2023, Algorithm 2, "multi-step speculative sampling"):
at a node, visit its children in order; accept child x with probability
min(1, target(x) / draft(x)), else replace the target distribution by the
residual norm(max(target - draft, 0)) and try the next child; when every child
is rejected, sample the target's own token from what is left. Exact (the output
is distributed as the target's samples) in two cases, which are the two a
``DraftTree`` can hold:

- ``sampled_from`` is None: every node is a deterministic function of the
  context (prompt lookup's trie, a model's top-k or dynamic tree): each child is
  one-hot, so the rule is sequential sampling without replacement: accept x with
  the current target(x), else zero x and renormalise;
- ``sampled_from`` holds, per node, the draft distribution it was drawn from,
  and the children of one node are independent draws from one distribution
  (with replacement), as SpecInfer's proof requires.

A model's top-k children with their soft draft probabilities is neither: the
residual rule is then biased (``tests/test_tree.py`` shows it), so the lab's
model drafters build deterministic trees under sampling.

The cache after the step keeps the prefix, the root and the accepted path only:
``accepted_slots`` names the kept columns and ``lab.kv.RaggedCache.keep_slots``
gathers them into place (a copy of the path's K/V per layer, about one
attention read of N slots; re-feeding the path would cost a target pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lab.sampling import sample

TREE_BUDGET_MAX = 64


def check_tree_budget(budget: int, allow_chain: bool = True) -> int:
    """Validate a tree budget (draft nodes per verify pass): 0 means a chain (when allowed), else 1..64.

    Raises ValueError saying what is expected: an integer 0..64 (1..64 where a tree is required).
    """
    low = 0 if allow_chain else 1
    if isinstance(budget, bool) or not isinstance(budget, int) or not low <= budget <= TREE_BUDGET_MAX:
        what = "0 (a chain) or 1" if allow_chain else "1"
        raise ValueError(
            f"the tree budget (draft nodes per verify pass) requires an integer {what}..{TREE_BUDGET_MAX}; "
            f"got {budget!r}"
        )
    return budget


@dataclass(frozen=True)
class DraftTree:
    """A draft tree of N >= 1 nodes in topological order.

    tokens: [N] int64 CPU, the drafted token of each node.
    parents: [N] int64 CPU, each node's parent index (< its own), -1 for a child of the root.
    draft_probs: [N] float32 CPU, the draft's probability of each node's token given its
        parent (for display), or None for a deterministic drafter without one.
    sampled_from: [N, V] float32, the distribution each node was drawn from (children of one
        node drawn independently from one distribution), or None: deterministic nodes (one-hot).

    Raises ValueError for an empty tree, mismatched shapes, or a parent not before its child.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None
    sampled_from: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if n == 0 or self.parents.shape != self.tokens.shape:
            raise ValueError(f"a draft tree requires N >= 1 tokens and N parents; got {n} and {tuple(self.parents.shape)}")
        parents = self.parents.tolist()
        if any(not -1 <= p < i for i, p in enumerate(parents)):
            raise ValueError(f"a draft tree requires each parent before its child (or -1); got parents {parents}")

    @staticmethod
    def chain(tokens: torch.Tensor) -> "DraftTree":
        """The chain tokens[0] -> tokens[1] -> ... as a tree."""
        return DraftTree(tokens, torch.arange(tokens.shape[0], dtype=torch.long) - 1)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def depths(self) -> list[int]:
        """Each node's depth: 1 for a child of the root."""
        out: list[int] = []
        for p in self.parents.tolist():
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def children(self, node: int) -> list[int]:
        """The children of ``node`` (-1: the root), in order."""
        return [i for i, p in enumerate(self.parents.tolist()) if p == node]

    def subtree(self, keep: Sequence[bool]) -> "DraftTree | None":
        """The nodes with keep[i] True (each kept node's parent kept too), renumbered in order; None if none."""
        index: dict[int, int] = {-1: -1}
        for i, k in enumerate(keep):
            if k:
                index[i] = len(index) - 1
        nodes = [i for i in index if i >= 0]
        if not nodes:
            return None
        parents = self.parents.tolist()
        if any(parents[i] not in index for i in nodes):
            raise ValueError("a subtree requires each kept node's parent kept too")
        pick = torch.tensor(nodes, dtype=torch.long)
        return DraftTree(
            self.tokens[pick],
            torch.tensor([index[parents[i]] for i in nodes], dtype=torch.long),
            None if self.draft_probs is None else self.draft_probs[pick],
            None if self.sampled_from is None else self.sampled_from[pick],
        )

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root's child down to ``node``, inclusive."""
        parents = self.parents.tolist()
        path = []
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]


def tree_attention_mask(
    parents: torch.Tensor, prefix_len: int, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The verify pass's 4-D additive attention mask over [root] + N tree nodes after ``prefix_len`` cached tokens.

    parents: [N] int64 (as ``DraftTree.parents``). Returns [1, 1, N + 1, prefix_len + N + 1] of ``dtype``:
    0 where a query may attend, the dtype's minimum elsewhere. Query 0 (the root) sees the prefix and
    itself; query i + 1 (node i) sees the prefix, the root, its ancestors and itself.
    """
    n = parents.shape[0]
    visible = torch.zeros(n + 1, prefix_len + n + 1, dtype=torch.bool)
    visible[:, : prefix_len + 1] = True  # the cached prefix and the root
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            visible[i + 1, prefix_len + 1 :] = visible[p + 1, prefix_len + 1 :]  # the parent's ancestors
        visible[i + 1, prefix_len + 1 + i] = True  # itself
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def tree_position_ids(parents: torch.Tensor, prefix_len: int, device=None) -> torch.Tensor:
    """[1, N + 1] int64 position ids of [root] + N nodes: the root at prefix_len, a node at prefix_len + depth."""
    depths = DraftTree(torch.zeros_like(parents), parents).depths
    return (prefix_len + torch.tensor([0] + depths, dtype=torch.long))[None].to(device)


@dataclass(frozen=True)
class TreeVerdict:
    """Outcome of verifying one draft tree.

    path: the accepted nodes, root's child first (empty: none accepted).
    next_token: the target's own token after the path (the correction, or the bonus at a leaf).
    acceptance_probs, uniforms: per child tried, in the order tried, its acceptance probability and the
        uniform drawn against it (greedy: 1.0 / 0.0 and no uniforms).
    tried: the nodes tried, in order (aligned with acceptance_probs).
    bonus: the path ends at a leaf, so next_token is the bonus token (else a correction).
    """

    path: tuple[int, ...]
    next_token: int
    acceptance_probs: tuple[float, ...] = ()
    uniforms: tuple[float, ...] = ()
    tried: tuple[int, ...] = ()
    bonus: bool = False

    @property
    def num_accepted(self) -> int:
        """The accepted depth: tokens of the tree kept this step."""
        return len(self.path)

    def is_bonus(self, num_drafted: int) -> bool:
        """As ``lab.verify.Verdict.is_bonus``: True when the accepted path ends at a leaf."""
        return self.bonus


def verify_tree_greedy(target_logits: torch.Tensor, tree: DraftTree) -> TreeVerdict:
    """Greedy tree verification: the longest root path of target argmaxes, then the target's own token.

    target_logits: [N + 1, V] (any float dtype or device): column 0 after the root, column i + 1 after node i.
    Where several children carry the target's argmax (repeated tokens), the one with the deepest accepted
    path wins (earliest on ties): any of them is exact.
    """
    argmax = target_logits.argmax(-1).tolist()  # [N + 1], one host sync
    tokens = tree.tokens.tolist()
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents.tolist()):
        kids.setdefault(p, []).append(i)
    tried: list[int] = []

    def longest(node: int) -> list[int]:
        best: list[int] = []
        for child in kids.get(node, []):
            tried.append(child)
            if tokens[child] == argmax[node + 1]:
                path = [child] + longest(child)
                if len(path) > len(best):
                    best = path
        return best

    path = longest(-1)
    end = path[-1] if path else -1
    accepted = set(path)
    return TreeVerdict(tuple(path), argmax[end + 1], tuple(1.0 if t in accepted else 0.0 for t in tried), (),
                       tuple(tried), bonus=bool(path) and end not in kids)


def verify_tree_sampling(
    target_probs: torch.Tensor, tree: DraftTree, generator: torch.Generator | None
) -> TreeVerdict:
    """SpecInfer's multi-step speculative sampling over a tree (Miao et al. 2023, Algorithm 2).

    target_probs: [N + 1, V] float, processed target probabilities (rows sum to 1), columns as in
        ``verify_tree_greedy``.
    tree: deterministic (``sampled_from`` None) or with independent draws per node (see the module docstring).
    generator: the random source on target_probs' device.
    Returns the accepted path and the target's own token: the recovered token when every child of the last
    node was rejected, the bonus token at a leaf. The emitted tokens are distributed as the target's.
    """
    device = target_probs.device
    tokens = tree.tokens.tolist()
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents.tolist()):
        kids.setdefault(p, []).append(i)
    path: list[int] = []
    acceptance_probs: list[float] = []
    uniforms: list[float] = []
    tried: list[int] = []
    node = -1
    while True:
        residual = target_probs[node + 1].float().clone()  # [V]
        moved = False
        for child in kids.get(node, []):
            x = tokens[child]
            if tree.sampled_from is None:
                draft = torch.zeros_like(residual)
                draft[x] = 1.0
            else:
                draft = tree.sampled_from[child].to(device).float()
            acceptance = float(torch.clamp(residual[x] / draft[x].clamp_min(1e-30), max=1.0))
            uniform = float(torch.rand((), device=device, generator=generator))
            tried.append(child)
            acceptance_probs.append(acceptance)
            uniforms.append(uniform)
            if uniform < acceptance:
                path.append(child)
                node = child
                moved = True
                break
            left = (residual - draft).clamp_min(0.0)
            total = float(left.sum())
            # The residual can only vanish through rounding (target == draft): then the target itself is exact.
            residual = left / total if total > 0 else residual
        if not moved:
            next_token = int(sample(residual[None], generator)[0])
            return TreeVerdict(tuple(path), next_token, tuple(acceptance_probs), tuple(uniforms), tuple(tried),
                               bonus=bool(path) and node not in kids)


def accepted_slots(prefix_len: int, path: Sequence[int]) -> list[int]:
    """Cache slots to keep after a tree pass: the prefix, the root, then the accepted nodes' columns.

    prefix_len: tokens cached before the root. Node i's K/V sit at slot prefix_len + 1 + i.
    """
    return list(range(prefix_len + 1)) + [prefix_len + 1 + i for i in path]


def tree_verify_forward(cache, root_token: torch.Tensor, tree: DraftTree) -> torch.Tensor:
    """The target's verify pass over [root] + the tree's N nodes after its cached prefix (one row, eager).

    cache: a one-row ``lab.kv.RaggedCache`` holding every committed token but the root.
    root_token: [1] int64, the last committed token. Returns logits [1, N + 1, V].
    """
    prefix_len = cache.lengths[0]
    model = cache.model
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    mask = tree_attention_mask(tree.parents, prefix_len, dtype)
    positions = tree_position_ids(tree.parents, prefix_len)
    return cache.forward_tree(torch.cat([root_token.cpu(), tree.tokens]), mask, positions)


def refuse_tree_decode(budget: int, batch_size: int, mode: str, drafter, constraint, naive: bool = False) -> None:
    """Raise ValueError, saying why and what to do, where the decode loop cannot verify trees.

    Trees run at B = 1 in the eager engine, with a drafter that drafts trees; under a grammar constraint in
    the exact grammar mode only (the naive teaching mode shows a chain's mistakes). The target alone
    (drafter None) ignores the budget, as it ignores K.
    """
    if budget == 0 or drafter is None:
        return  # the target alone drafts nothing, chain or tree
    if not getattr(drafter, "drafts_trees", False):
        raise ValueError(f"the {drafter.name} drafter drafts chains only: set the tree budget to 0, or pick "
                         "prompt-lookup, draft-model, layer-skip or eagle for a tree")
    if batch_size > 1:
        raise ValueError(
            f"token trees require batch size 1; got {batch_size}. A tree widens every row's verify pass "
            "by its node budget, and a batch already fills the compute a tree would use for free (the EAGLE "
            "maintainers advise against trees at batch > 1): decode one prompt, or set the tree budget to 0")
    if mode != "eager":
        raise ValueError(f"token trees require the eager engine; got {mode!r}: a tree's mask and width change "
                         "every step, which a static or captured pass does not allow: pick the eager engine (--engine eager, or "
                         "Engine: eager or auto in the app's sidebar)")
    if constraint is not None and naive:
        raise ValueError("the naive grammar mode (a teaching demo of a chain's mistakes) drafts chains only: "
                         "set the tree budget to 0, or use the exact grammar mode for a tree")
