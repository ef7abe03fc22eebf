"""KV cache helpers over ``transformers``' DynamicCache (the library owns the cache)."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty DynamicCache for a causal LM."""
    return DynamicCache(config=model.config)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer (roll back the rest).

    Raises ValueError if length is negative or longer than the cache.
    """
    current = cache.get_seq_length()
    if not 0 <= length <= current:
        raise ValueError(f"crop_cache requires 0 <= length <= {current}; got {length}")
    if length < current:
        cache.crop(length - current)


def keep_last(count: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``logits_to_keep`` for a forward pass over ``width`` tokens that needs the last ``count`` positions' logits.

    Returns int64 [count] on ``device``: the positions width-count .. width-1, an
    index tensor that transformers' causal LMs take in place of an int.

    Why not ``logits_to_keep=count``: the model then applies its LM head to the
    slice ``hidden[:, -count:, :]``, whose outer stride stays width x hidden. On
    the CPU, PyTorch 2.13's bfloat16 ``F.linear`` takes a slow path for such a
    3-D input: measured here 166-480 ms instead of 8-16 ms for SmolLM2's head
    (batch 1), 1158 ms instead of 13 ms at batch 4. That silently tripled a draft
    model's cost per step. Indexing with a tensor copies the rows into a fresh,
    plainly strided tensor, and the head runs at full speed.

    Raises ValueError unless 1 <= count <= width.
    """
    if not 1 <= count <= width:
        raise ValueError(f"keep_last requires 1 <= count <= width; got count={count}, width={width}")
    return torch.arange(width - count, width, device=device)
