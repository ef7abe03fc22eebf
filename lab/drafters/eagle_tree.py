"""The EAGLE head drafting a token tree (EAGLE-2's dynamic tree, Li et al. 2024, section 4), one row.

The head's cache holds F entries from the target's real features (every committed token but the last).
The root's predicted feature gives the first depth's candidates; to expand a candidate the head reads
(the predicted feature its token was drawn from, the token's embedding) at position F - 1 + depth,
under a tree mask (the F real entries, the candidate's ancestors' entries, itself), and predicts the
feature its children are drawn from. The tree is grown and reranked by ``lab.drafters.tree_grow``; the
drafting entries are cropped afterwards, as for a chain.

After the target's tree pass the recorded target features run in node order, not along the accepted
path: ``fold_tree_features`` keeps the prefix and the root, then the accepted path's nodes (found by
walking the tree along the committed tokens), so the next proposal finds every committed token's real
feature in order. A node's feature under the tree mask is the one the same token has on the committed
path (it attended to exactly its ancestors), so nothing is recomputed.
"""

from __future__ import annotations

import torch

from lab.drafters.base import Draft, DraftContext
from lab.drafters.tree_grow import frontier_mask, grow_tree
from lab.kv import crop_cache
from lab.tree import DraftTree


def fold_tree_features(features, row: int, token_ids: torch.Tensor, tree: DraftTree, base: int) -> None:
    """Reorder ``TargetFeatures`` row ``row`` after a tree pass: its first ``base`` records (committed tokens up to
    the root), then the accepted path's records (node i's at base + i), matched against token_ids[base:]."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    keep, node = list(range(min(base, features.ids[row].shape[0]))), -1
    for token in token_ids[base:].tolist():
        child = next((c for c, p in enumerate(parents) if p == node and tokens[c] == token), None)
        if child is None or base + child >= features.ids[row].shape[0]:
            break
        keep.append(base + child)
        node = child
    index = torch.tensor(keep, dtype=torch.long)
    features.ids[row] = features.ids[row][index]
    features.feats[row] = features.feats[row][index.to(features.feats[row].device)]



def catch_up(drafter, row: int, ctx: DraftContext):
    """Feed the head the row's real features it has not read yet; (row state, the first draft's feature [H]).

    None when no feature is known yet (a one-token prompt) or ctx.k == 0. At least the last real entry is fed
    again: its output is the first draft's feature. Shared by the chain (``lab.drafters.eagle``) and the tree.
    """
    state = drafter.rows[row]
    token_ids = ctx.token_ids  # [T]
    drafter.features.follow_thread()
    num_feats = drafter.features.keep_prefix(row, token_ids[:-1])
    if num_feats == 0 or ctx.k <= 0:
        return None
    head, features = drafter.head, drafter.features.feats[row]  # [F, H]
    crop_cache(state.cache, min(state.num_real, num_feats - 1))
    start = state.cache.get_seq_length()
    next_ids = token_ids[start + 1 : num_feats + 1].to(features.device)  # x_{t+1} for t in [start, F)
    real = head.project(features[None, start:num_feats])  # [1, F - start, H]
    predicted = head(real, drafter.embed(next_ids)[None], state.cache)[0, -1]  # [H]
    state.num_real = num_feats
    return state, predicted


@torch.inference_mode()
def draft_tree_row(drafter, row: int, ctx: DraftContext, topk: int, shape: str) -> Draft:
    """One row's token tree from the EAGLE head: at most ctx.tree_budget nodes, ctx.k deep (deterministic)."""
    caught_up = catch_up(drafter, row, ctx)
    if caught_up is None:
        return Draft.empty()
    state, root = caught_up
    head, device = drafter.head, root.device
    predicted: dict[int, torch.Tensor] = {-1: root}  # candidate -> the feature its children are drawn from
    slot_of: dict[int, int] = {}

    def logits_of(feature: torch.Tensor) -> torch.Tensor:
        return drafter.lm_head(feature.to(drafter.lm_head.weight.dtype))

    def expand(frontier, cands) -> torch.Tensor:
        cached = state.cache.get_seq_length()
        mask, positions = frontier_mask(frontier, cands, slot_of, state.num_real, cached, torch.float32)
        inputs = torch.stack([predicted[cands.parents[n]] for n in frontier])[None]  # [1, F', H]
        tokens = torch.tensor([cands.tokens[n] for n in frontier], device=device)
        out = head(inputs, drafter.embed(tokens)[None], state.cache, position_ids=positions.to(device),
                   attention_mask=(mask == 0).to(device))[0]  # [F', H]
        for j, n in enumerate(frontier):
            predicted[n] = out[j]
        return logits_of(out)  # [F', V]

    tree = grow_tree(logits_of(root), expand, ctx.k, ctx.tree_budget, topk, shape, ctx.grammar)
    crop_cache(state.cache, state.num_real)  # drafting entries came from predicted features: never kept
    return Draft.empty() if tree is None else Draft.of_tree(tree)  # a trimmed head's logits already span the target's vocabulary (-inf outside)
