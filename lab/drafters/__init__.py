"""Drafters behind one batched protocol (``base.Drafter``; single-row ones through ``base.PerRowDrafter``),
and ``make_drafter`` to build one by name."""

from __future__ import annotations

from typing import Literal, get_args

from lab.drafters.bridge import VOCAB_BRIDGES, BridgedDraft, VocabBridge, VocabBridgeDrafter, check_bridge_sampling
from lab.drafters.base import Draft, DraftContext, Drafter, PerRowDrafter, RowDrafter, as_batch_drafter
from lab.drafters.draft_model import DraftModelDrafter
from lab.drafters.eagle import EagleDrafter, EagleHead, EagleHeadConfig
from lab.drafters.layer_skip import LayerSkipDrafter, early_exit_view, num_layers
from lab.drafters.prompt_lookup import PromptLookupDrafter

DrafterName = Literal["none", "draft-model", "prompt-lookup", "layer-skip", "eagle"]
DRAFTER_NAMES: tuple[str, ...] = get_args(DrafterName)
TREE_DRAFTERS: tuple[str, ...] = ("prompt-lookup", "draft-model", "layer-skip", "eagle")  # those that draft token trees


def make_drafter(
    name: str,
    target,
    draft=None,
    *,
    min_n: int = 1,
    max_n: int = 3,
    exit_layer: int | None = None,
    draft_vocab: int | None = None,
    vocab_subset=None,
    head: EagleHead | None = None,
    vocab_bridge: str = "none",
) -> Drafter | RowDrafter | None:
    """Build a drafter by its standard name; None for "none" (the target alone).

    Model drafters (draft-model, layer-skip, eagle) are batched ``Drafter`` s;
    prompt lookup is a ``RowDrafter`` (the decode loop copies it per row).

    target, draft: ``lab.models.LoadedModel`` (draft only for "draft-model").
    min_n, max_n: prompt lookup's n-gram sizes.
    exit_layer: layer-skip's exit; default a quarter of the target's layers.
    draft_vocab: N, trim the draft model's / the EAGLE head's vocabulary to the
        target's N most frequent tokens (``lab.vocab``; the table cached by
        ``python -m lab token-freq``, else one shipped in ``assets/vocab/``); None: the full vocabulary.
    vocab_subset: [N] int64 token ids to trim to, in place of draft_vocab.
    head: the EAGLE head; default the one trained for the target
        (``python -m lab train-head``), loaded from the model cache or ``assets/heads/``.
    vocab_bridge: how a draft model's tokens reach the target (``lab.drafters.bridge``):
        "none" refuses a draft with another tokenizer, "text" bridges exactly
        through text, "ids" sends its ids as they are (the trap). Only the
        draft-model drafter has a vocabulary of its own; other drafters ignore it.

    Raises ValueError for an unknown name or a missing draft, FileNotFoundError
    for a missing frequency table or head, and ``lab.models.ModelError`` when
    the draft's tokenizer is not the target's (and vocab_bridge is "none").
    """
    from lab.drafters.bridge import check_vocab_bridge

    check_vocab_bridge(vocab_bridge)
    if vocab_subset is None and draft_vocab is not None and name in ("draft-model", "eagle"):
        from lab.vocab import find_frequencies, load_frequencies, top_tokens

        counts = load_frequencies(find_frequencies(target.name))
        vocab_subset = top_tokens(counts, draft_vocab, always=target.eos_token_ids)
    if name == "none":
        return None
    if name == "prompt-lookup":
        return PromptLookupDrafter(min_n, max_n)
    if name == "layer-skip":
        layers = num_layers(target.model)
        return LayerSkipDrafter(target.model, exit_layer if exit_layer is not None else max(1, layers // 4))
    if name == "draft-model":
        if draft is None:
            raise ValueError("draft-model requires a draft model (e.g. --draft qwen2.5-coder-0.5b); got none")
        if vocab_bridge != "none":
            if vocab_subset is not None or draft_vocab is not None:
                raise ValueError("a trimmed draft vocabulary (draft_vocab) requires vocab_bridge 'none': "
                                 f"it lists the target's token ids; got vocab_bridge {vocab_bridge!r}")
            return VocabBridgeDrafter(DraftModelDrafter(draft.model), draft.tokenizer, target.tokenizer,
                                      vocab_bridge, draft_stop_ids=tuple(getattr(draft, "eos_token_ids", ())))
        from lab.models import check_same_tokenizer

        check_same_tokenizer(target, draft)
        if vocab_subset is not None:
            from lab.vocab import trimmed_view

            return DraftModelDrafter(trimmed_view(draft.model, vocab_subset))
        return DraftModelDrafter(draft.model)
    if name == "eagle":
        if head is None:
            from lab.drafters.eagle import find_head, load_head

            head, _ = load_head(find_head(target.name), device=next(target.model.parameters()).device)
        return EagleDrafter(target.model, head, vocab_subset)
    raise ValueError(f"drafter requires one of {', '.join(DRAFTER_NAMES)}; got {name!r}")


__all__ = [
    "DRAFTER_NAMES",
    "TREE_DRAFTERS",
    "VOCAB_BRIDGES",
    "BridgedDraft",
    "VocabBridge",
    "VocabBridgeDrafter",
    "check_bridge_sampling",
    "Draft",
    "DraftContext",
    "DraftModelDrafter",
    "Drafter",
    "PerRowDrafter",
    "RowDrafter",
    "as_batch_drafter",
    "EagleDrafter",
    "EagleHead",
    "EagleHeadConfig",
    "DrafterName",
    "LayerSkipDrafter",
    "PromptLookupDrafter",
    "early_exit_view",
    "make_drafter",
]
