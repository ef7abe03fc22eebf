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
