"""A separate small draft model that shares the target's tokenizer.

The draft keeps its own KV cache across steps. Before drafting it compares the
tokens its cache holds with the committed tokens, crops the cache to their
common prefix (this is the rollback of rejected drafts) and feeds only what is
new, usually the correction or bonus token, then drafts k tokens one forward
pass each (Leviathan et al. 2023; transformers' AssistedCandidateGenerator does
the same bookkeeping).
"""

from __future__ import annotations

import torch

from lab.cache import crop_cache, keep_last, new_cache
from lab.drafters.base import Draft, DraftContext
from lab.sampling import logits_to_probs, sample


class DraftModelDrafter:
    """Drafts with a causal LM (``transformers`` model) that shares the target's vocabulary.

    model: a causal LM in eval mode; only read, never modified.
    The caller checks the tokenizer match (``lab.models.check_same_tokenizer``).
    """

    name = "draft-model"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self.cache = new_cache(self.model)
        self.cached_ids = torch.empty(0, dtype=torch.long)  # [C] tokens whose K/V the cache holds
        self._num_committed = 0

    def propose(self, ctx: DraftContext) -> Draft:
        token_ids = ctx.token_ids
        keep = min(_common_prefix_length(self.cached_ids, token_ids), token_ids.shape[0] - 1)
        crop_cache(self.cache, keep)
        inputs = token_ids[keep:].to(self.device)[None]  # [1, T-keep]
        tokens, probs = [], []
        for i in range(ctx.k):
            keep = keep_last(1, inputs.shape[1], self.device)  # not logits_to_keep=1: see keep_last
            logits = self.model(inputs, cache=self.cache, use_cache=True, logits_to_keep=keep).logits[0, -1]  # [V]
            if ctx.grammar is not None:
                logits = ctx.grammar.mask_next(logits)  # draft under the grammar
            if ctx.sampling.is_greedy:
                token = logits.argmax(-1)
                dist = torch.softmax(logits.float(), -1)
            else:
                dist = logits_to_probs(logits, ctx.sampling)
                token = sample(dist, ctx.generator)
            tokens.append(token)
            probs.append(dist)
            if ctx.grammar is not None:
                ctx.grammar.accept(int(token))
                if ctx.grammar.is_terminated:  # the grammar is complete: nothing can follow
                    break
            inputs = token.view(1, 1)
        if ctx.grammar is not None:
            ctx.grammar.rollback(len(tokens))
        drafted = torch.stack(tokens).cpu()  # [k]
        # The last drafted token was never fed: the cache holds committed + drafted[:-1].
        self.cached_ids = torch.cat([token_ids, drafted[:-1]])
        self._num_committed = token_ids.shape[0]
        return Draft(drafted, torch.stack(probs))

    def observe(self, num_accepted: int) -> None:
        """Roll the cache back now to the committed prefix it holds (committed + accepted drafts)."""
        keep = min(self._num_committed + num_accepted, self.cached_ids.shape[0])
        crop_cache(self.cache, keep)
        self.cached_ids = self.cached_ids[:keep]


def _common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two [N] int64 tensors."""
    n = min(a.shape[0], b.shape[0])
    mismatch = (a[:n] != b[:n]).nonzero()
    return int(mismatch[0]) if mismatch.numel() else n
