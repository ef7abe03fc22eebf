"""A separate small draft model that shares the target's tokenizer.

The draft keeps its own KV cache across steps. Before drafting it compares the
tokens its cache holds with the committed tokens, crops the cache to their
common prefix (this is the rollback of rejected drafts) and feeds only what is
new, usually the correction or bonus token, then drafts k tokens one forward
pass each (Leviathan et al. 2023; transformers' AssistedCandidateGenerator does
the same bookkeeping).

Its passes run through a ``lab.runner.KVRunner`` in the engine's mode: in the
static and compiled modes every draft step is one pass of width 1 (one captured
graph), and a catch-up of more than one new token runs eagerly. The drafted
tokens come back to the host once per proposal.
"""

from __future__ import annotations

import weakref

import torch

from lab.drafters.base import Draft, DraftContext, draft_token
from lab.runner import KVRunner, give_back, take_runner


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
        self._release()
        self.runner: KVRunner | None = None  # taken on the first proposal, in the engine's mode
        self._finalizer = None
        self.cached_ids = torch.empty(0, dtype=torch.long)  # [C] tokens whose K/V the cache holds
        self._num_committed = 0

    @property
    def cache(self):
        """The draft's KV cache (a transformers cache), or None before the first proposal."""
        return None if self.runner is None else self.runner.cache

    def propose(self, ctx: DraftContext) -> Draft:
        if self.runner is None:
            self.runner = take_runner(self.model, ctx.engine_mode, ctx.compile_backend)
            self.runner.reset(max(ctx.max_length, ctx.token_ids.shape[0] + ctx.k + 1))
            # A static cache goes back to the pool when this drafter is reset or dropped.
            self._finalizer = weakref.finalize(self, give_back, self.runner)
        runner = self.runner
        token_ids = ctx.token_ids
        keep = min(_common_prefix_length(self.cached_ids, token_ids), token_ids.shape[0] - 1)
        runner.crop(keep)
        inputs = token_ids[keep:].to(self.device)[None]  # [1, T-keep]
        tokens, probs = [], []
        for i in range(ctx.k):
            # A single new token runs through the width-1 graph; a longer catch-up (the prompt) eagerly.
            logits = runner.forward(inputs, width=1 if inputs.shape[1] == 1 else None, last_only=True)[0]  # [V]
            token, dist, done = draft_token(logits, ctx)  # under the grammar, if any
            tokens.append(token)
            probs.append(dist)
            if done:  # the grammar is complete: nothing can follow
                break
            inputs = token.view(1, 1)
        if ctx.grammar is not None:
            ctx.grammar.rollback(len(tokens))
        drafted = torch.stack(tokens).cpu()  # [k], the proposal's one host sync
        # The last drafted token was never fed: the cache holds committed + drafted[:-1].
        self.cached_ids = torch.cat([token_ids, drafted[:-1]])
        self._num_committed = token_ids.shape[0]
        return Draft(drafted, torch.stack(probs))

    def observe(self, num_accepted: int) -> None:
        """Roll the cache back now to the committed prefix it holds (committed + accepted drafts)."""
        keep = min(self._num_committed + num_accepted, self.cached_ids.shape[0])
        if self.runner is not None:
            self.runner.crop(keep)
        self.cached_ids = self.cached_ids[:keep]

    def _release(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # gives the runner back (once)


def _common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two [N] int64 tensors."""
    n = min(a.shape[0], b.shape[0])
    mismatch = (a[:n] != b[:n]).nonzero()
    return int(mismatch[0]) if mismatch.numel() else n
