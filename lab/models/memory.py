"""What a model costs in memory: its weights (quantisation scales included) and its KV cache per token."""

from __future__ import annotations

from typing import Any

import torch


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a model's weights hold: parameters and buffers (tied ones once) plus bitsandbytes' scales.

    A 4-bit weight is a uint8 tensor of packed pairs plus a ``quant_state``
    (one absmax per block of 64 weights, a 16-entry code); an int8 weight
    carries one fp32 scale per output row (``SCB``). Those scales are not
    parameters, so ``numel() * element_size()`` over parameters alone
    undercounts 4-bit models by about 12 %.
    """
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for parameter in model.parameters():
        scale = getattr(parameter, "SCB", None)  # int8: [out] fp32
        if isinstance(scale, torch.Tensor):
            tensors[id(scale)] = scale
        state = getattr(parameter, "quant_state", None)  # 4-bit: absmax [blocks], code [16], maybe nested
        while state is not None:
            for tensor in (state.absmax, state.code, getattr(state, "offset", None)):
                if isinstance(tensor, torch.Tensor):
                    tensors[id(tensor)] = tensor
            state = getattr(state, "state2", None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_cache_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one token adds to the KV cache: 2 (K, V) x layers x KV heads x head size x element size.

    Read from the config, so an early-exit view (``lab.drafters.layer_skip``)
    counts only its own layers. The cache holds the compute dtype (bf16 for a
    quantised model: only weights are quantised, not activations).
    """
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element_size = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_size


def kv_cache_bytes(model: torch.nn.Module, num_tokens: int) -> int:
    """Bytes of a KV cache holding ``num_tokens`` tokens for ``model`` (see :func:`kv_cache_bytes_per_token`)."""
    return kv_cache_bytes_per_token(model) * int(num_tokens)


def cache_bytes(cache: Any) -> int:
    """Bytes the key and value tensors of a transformers cache hold right now (a measured check of :func:`kv_cache_bytes`)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
