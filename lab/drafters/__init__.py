"""Drafters behind one protocol (``base.Drafter``), and ``make_drafter`` to build one by name."""

from __future__ import annotations

from typing import Literal, get_args

from lab.drafters.base import Draft, DraftContext, Drafter
from lab.drafters.draft_model import DraftModelDrafter
from lab.drafters.layer_skip import LayerSkipDrafter, early_exit_view, num_layers
from lab.drafters.prompt_lookup import PromptLookupDrafter

DrafterName = Literal["none", "draft-model", "prompt-lookup", "layer-skip"]
DRAFTER_NAMES: tuple[str, ...] = get_args(DrafterName)


def make_drafter(
    name: str,
    target,
    draft=None,
    *,
    min_n: int = 1,
    max_n: int = 3,
    exit_layer: int | None = None,
) -> Drafter | None:
    """Build a drafter by its standard name; None for "none" (the target alone).

    target, draft: ``lab.models.LoadedModel`` (draft only for "draft-model").
    min_n, max_n: prompt lookup's n-gram sizes.
    exit_layer: layer-skip's exit; default a quarter of the target's layers.

    Raises ValueError for an unknown name or a missing draft, and
    ``lab.models.ModelError`` when the draft's tokenizer is not the target's.
    """
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
        from lab.models import check_same_tokenizer

        check_same_tokenizer(target, draft)
        return DraftModelDrafter(draft.model)
    raise ValueError(f"drafter requires one of {', '.join(DRAFTER_NAMES)}; got {name!r}")


__all__ = [
    "DRAFTER_NAMES",
    "Draft",
    "DraftContext",
    "DraftModelDrafter",
    "Drafter",
    "DrafterName",
    "LayerSkipDrafter",
    "PromptLookupDrafter",
    "early_exit_view",
    "make_drafter",
]
