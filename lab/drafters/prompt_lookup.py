"""Prompt lookup decoding: draft by copying what followed the last n-gram before.

Saxena 2023 ("Prompt Lookup Decoding", github.com/apoorvumang/prompt-lookup-decoding),
as in vLLM's n-gram proposer: take the last n committed tokens (n from max_n
down to min_n), find their most recent earlier occurrence in the prompt or the
output so far, and propose the k tokens that followed it. No model, no cost
beyond the search; pays off where the output echoes its input.

As a token tree (``DraftContext.tree_budget`` > 0): every distinct continuation
of the matched n-grams, merged into a trie (longest n first, most recent
occurrence first, so the chain's own proposal is the trie's first path), up to
the node budget and depth k.
"""

from __future__ import annotations

import torch

from lab.drafters.base import Draft, DraftContext
from lab.tree import DraftTree


def find_ngram_continuation(token_ids: torch.Tensor, min_n: int, max_n: int, k: int) -> torch.Tensor:
    """Tokens that followed the most recent earlier occurrence of the longest matching suffix.

    token_ids: [T] int64. Tries n = max_n .. min_n; for the first n whose last-n
    suffix occurs earlier (ending before the last token), returns up to k tokens
    that followed that occurrence. Returns [K'] int64, K' in 0..k (0: no match).
    """
    total = token_ids.shape[0]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = token_ids[total - n :]  # [n]
        windows = token_ids[: total - 1].unfold(0, n, 1)  # [T-n, n], starts 0..T-n-1
        starts = (windows == suffix).all(-1).nonzero().flatten()
        if starts.numel() > 0:
            begin = int(starts[-1]) + n
            return token_ids[begin : begin + k].clone()
    return torch.empty(0, dtype=torch.long)


def find_ngram_trie(token_ids: torch.Tensor, min_n: int, max_n: int, depth: int, budget: int) -> DraftTree | None:
    """Every continuation of every earlier occurrence of the last n tokens (n = max_n .. min_n), as a trie.

    token_ids: [T] int64. Occurrences are taken longest n first, then most recent first; each adds up to
    ``depth`` following tokens, sharing the nodes of continuations with the same prefix, until ``budget``
    nodes. Returns a deterministic ``DraftTree`` (its first path is ``find_ngram_continuation``'s chain),
    or None when nothing matches.
    """
    total = token_ids.shape[0]
    tokens: list[int] = []
    parents: list[int] = []
    node_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = token_ids[total - n :]  # [n]
        windows = token_ids[: total - 1].unfold(0, n, 1)  # [T-n, n], starts 0..T-n-1
        for start in reversed((windows == suffix).all(-1).nonzero().flatten().tolist()):
            parent = -1
            for token in token_ids[start + n : start + n + depth].tolist():
                if (parent, token) not in node_of:
                    if len(tokens) == budget:
                        break
                    node_of[(parent, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                parent = node_of[(parent, token)]
            if len(tokens) == budget:
                break
        if len(tokens) == budget:
            break
    if not tokens:
        return None
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


class PromptLookupDrafter:
    """Drafts by n-gram matching against the prompt and the output so far.

    min_n, max_n: n-gram sizes tried, longest first (1 <= min_n <= max_n).
    Raises ValueError on bad sizes.
    """

    name = "prompt-lookup"
    drafts_trees = True

    def __init__(self, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup requires 1 <= min_n <= max_n; got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Draft:
        if ctx.tree_budget > 0:
            tree = find_ngram_trie(ctx.token_ids, self.min_n, self.max_n, ctx.k, ctx.tree_budget)
            if tree is not None and ctx.grammar is not None:  # drop the continuations the grammar refuses
                tree = tree.subtree(ctx.grammar.tree_bitmask(tree.tokens.tolist(), tree.parents.tolist())[1])
            return Draft.empty() if tree is None else Draft.of_tree(tree)
        proposal = find_ngram_continuation(ctx.token_ids, self.min_n, self.max_n, ctx.k)
        if ctx.grammar is None:
            return Draft(proposal)
        # Under a constraint: keep the proposal up to its first token the grammar forbids.
        allowed = 0
        for token in proposal.tolist():
            if not ctx.grammar.accept(token):
                break
            allowed += 1
        ctx.grammar.rollback(allowed)
        return Draft(proposal[:allowed], cut_by_grammar=tuple(proposal[allowed:].tolist()))

    def observe(self, num_accepted: int) -> None:
        pass
