"""A separate small draft model that shares the target's tokenizer, drafting every row of a batch at once.

The draft keeps its own KV cache across steps (``lab.kv``, in the engine's
mode). Before drafting, each row compares the tokens its cache holds with its
committed tokens, rolls its cache back to their common prefix (this is the
rollback of rejected drafts) and feeds only what is new, usually the correction
or bonus token; then k rounds of one batched forward each draft one token per
row (Leviathan et al. 2023; transformers' AssistedCandidateGenerator does the
same bookkeeping for one row). Rows that drafted enough feed nothing in later
rounds. In the static and compiled modes a draft round is one pass of width 1
(one captured graph per batch bucket) and a catch-up of two tokens one of width
2; a longer catch-up (the prompt) runs eagerly. The drafted tokens come back to
the host once per round.

A row with a grammar drafts under its mask, stops once the grammar is
complete, and leaves the matcher where it found it.

With a tree budget (one row, eager; ``lab.drafters.tree_grow``) it drafts a
token tree instead: top-k expansion, EAGLE-2's dynamic tree (``tree_shape``
"dynamic", the default) or a static one, each depth's expanded nodes fed in one
pass under a tree mask; the nodes' K/V are dropped afterwards, so the cache again
holds the committed tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lab.drafters.base import Draft, DraftContext, common_prefix_length
from lab.drafters.tree_grow import TREE_SHAPES, frontier_mask, grow_tree
from lab.kv import RaggedCache, new_kv_cache
from lab.sampling import logits_to_probs, sample

CAPTURED_CATCH_UP = 2  # catch-ups up to this many tokens run at a declared width (a captured graph when compiled)


class DraftModelDrafter:
    """Drafts with a causal LM (``transformers`` model) that shares the target's vocabulary.

    model: a causal LM in eval mode (or the target's early exit, or a trimmed
        view); only read, never modified. The caller checks the tokenizer match
        (``lab.models.check_same_tokenizer``).
    tree_topk: children per expanded node of a token tree (and, dynamic, nodes expanded per depth).
    tree_shape: "dynamic" (EAGLE-2) or "static" (fixed top-k expansion). Raises ValueError for bad values.
    """

    name = "draft-model"
    drafts_trees = True

    def __init__(self, model: torch.nn.Module, name: str | None = None, tree_topk: int = 4,
                 tree_shape: str = "dynamic") -> None:
        self.model = model
        if name is not None:
            self.name = name
        if tree_shape not in TREE_SHAPES or tree_topk < 1:
            raise ValueError(f"a draft tree requires tree_topk >= 1 and tree_shape in {TREE_SHAPES}; "
                             f"got {tree_topk}, {tree_shape!r}")
        self.tree_topk, self.tree_shape = tree_topk, tree_shape
        self.reset(1)

    def reset(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.cache = None  # made at the first proposal, in the engine's mode
        self.cached_ids = [torch.empty(0, dtype=torch.long) for _ in range(batch_size)]  # [C_b] per row
        self._num_committed: list[int | None] = [None] * batch_size

    def propose(self, contexts: Sequence[DraftContext]) -> list[Draft]:
        rounds = max((ctx.k for ctx in contexts), default=0)
        if rounds == 0:
            self._num_committed = [None] * len(contexts)
            return [Draft.empty() for _ in contexts]
        if contexts[0].tree_budget > 0:
            return [self._propose_tree(contexts[0])]
        if self.cache is None:
            first = contexts[0]
            longest = max(first.max_length, max(ctx.token_ids.shape[0] + ctx.k + 1 for ctx in contexts))
            self.cache = new_kv_cache(self.model, len(contexts), first.engine_mode, longest, first.compile_backend)
        greedy = contexts[0].sampling.is_greedy
        keep, feeds = [], []
        for b, ctx in enumerate(contexts):
            held = min(common_prefix_length(self.cached_ids[b], ctx.token_ids), ctx.token_ids.shape[0] - 1)
            keep.append(held)
            feeds.append(ctx.token_ids[held:] if ctx.k > 0 else ctx.token_ids[:0])
            self.cached_ids[b] = self.cached_ids[b][:held]
        self.cache.keep(keep)
        tokens: list[list[torch.Tensor]] = [[] for _ in contexts]
        probs: list[list[torch.Tensor]] = [[] for _ in contexts]
        wanted = [ctx.k for ctx in contexts]  # shrinks when a row's grammar completes
        for i in range(rounds):
            longest = max(int(feed.shape[0]) for feed in feeds)
            width = longest if longest <= CAPTURED_CATCH_UP else None
            logits = self.cache.forward(feeds, width=width, last_only=True)  # [B, V]
            logits = _mask_by_grammar(logits, [ctx.grammar if i < n else None for ctx, n in zip(contexts, wanted)])
            if greedy:
                argmax = logits.argmax(-1).cpu()  # [B], one transfer a round
                softmax = torch.softmax(logits.float(), -1)  # [B, V], for display only
            for b, ctx in enumerate(contexts):
                self.cached_ids[b] = torch.cat([self.cached_ids[b], feeds[b].cpu()])
                if i < wanted[b]:
                    if greedy:
                        token, dist = argmax[b], softmax[b]
                    else:
                        dist = logits_to_probs(logits[b], ctx.sampling)
                        token = sample(dist, ctx.generator)
                    if ctx.grammar is not None and not ctx.grammar.accept(int(token)):
                        wanted[b] = i  # every token this draft may propose is refused here: the draft ends
                        continue
                    tokens[b].append(token)
                    probs[b].append(dist)
                    if ctx.grammar is not None and ctx.grammar.is_terminated:  # complete: nothing can follow
                        wanted[b] = i + 1
            # Feed each row's newest token, unless that row has drafted enough (the last one is never fed).
            feeds = [
                tokens[b][-1].view(1).cpu() if i + 1 < wanted[b] else torch.empty(0, dtype=torch.long)
                for b in range(len(contexts))
            ]
            if not any(feed.numel() for feed in feeds):
                break
        for ctx, drafted in zip(contexts, tokens):
            if ctx.grammar is not None:
                ctx.grammar.rollback(len(drafted))
        self._num_committed = [ctx.token_ids.shape[0] if ctx.k > 0 else None for ctx in contexts]
        return [Draft(torch.stack(t).cpu(), torch.stack(p)) if t else Draft.empty() for t, p in zip(tokens, probs)]

    def _propose_tree(self, ctx: DraftContext) -> Draft:
        """One row's token tree of at most ctx.tree_budget nodes and depth ctx.k (deterministic: top-k)."""
        if self.cache is None:
            self.cache = RaggedCache(self.model, 1)
        total = ctx.token_ids.shape[0]
        held = min(common_prefix_length(self.cached_ids[0], ctx.token_ids), total - 1)
        self.cache.keep([held])
        root_logits = self.cache.forward([ctx.token_ids[held:]], last_only=True)[0]  # [V]
        self.cached_ids[0] = ctx.token_ids.clone()
        slot_of: dict[int, int] = {}
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32

        def expand(frontier, cands) -> torch.Tensor:
            mask, positions = frontier_mask(frontier, cands, slot_of, total, self.cache.lengths[0], dtype)
            tokens = torch.tensor([cands.tokens[n] for n in frontier], dtype=torch.long)
            return self.cache.forward_tree(tokens, mask, positions)[0]  # [F, V]

        tree = grow_tree(root_logits, expand, ctx.k, ctx.tree_budget, self.tree_topk, self.tree_shape, ctx.grammar)
        self.cache.keep([total])  # the nodes' K/V go; the committed tokens stay
        self._num_committed = [None]
        return Draft.empty() if tree is None else Draft.of_tree(tree)

    def observe(self, num_accepted: Sequence[int]) -> None:
        """Roll each row back now to its committed prefix (committed + accepted drafts)."""
        if self.cache is None:
            return
        keep = []
        for b, n in enumerate(num_accepted):
            committed = self._num_committed[b]
            held = self.cached_ids[b].shape[0]
            if committed is not None:
                held = min(committed + n, held)
            self.cached_ids[b] = self.cached_ids[b][:held]
            keep.append(held)
        self.cache.keep(keep)
        self.cache.trim()
        self._num_committed = [None] * len(self._num_committed)  # observed: a repeat is a no-op

    def drop(self, keep: Sequence[int]) -> None:
        if self.cache is not None:
            self.cache.select(keep)
        self.cached_ids = [self.cached_ids[i] for i in keep]
        self._num_committed = [self._num_committed[i] for i in keep]

    def cache_lengths(self) -> list[int | None]:
        """Tokens each row's cache holds (host counts), None before the first proposal."""
        return list(self.cache.lengths) if self.cache is not None else [None] * len(self.cached_ids)


def _mask_by_grammar(logits: torch.Tensor, grammars) -> torch.Tensor:
    """logits: [B, V]; rows with a grammar get its next-token mask (forbidden at -inf).

    Returns the logits unchanged when no row has a grammar, else float32 [B, V].
    """
    if all(grammar is None for grammar in grammars):
        return logits
    return torch.stack(
        [row.float() if grammar is None else grammar.mask_next(row) for row, grammar in zip(logits, grammars)]
    )
