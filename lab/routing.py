"""Mixture-of-Experts routing seen from outside: which experts a forward pass reads.

Each token of a pass picks its own top-k of E experts, so a verify pass over
K+1 tokens reads the weights of the *union* of their experts: the reason a MoE
target's verify cost v(K) rises with K where a dense target's stays flat
(Cascade, arXiv 2506.20675; MoESD, arXiv 2505.19645). Under uniform,
independent routing a pass of T tokens touches on average

    E (1 - (1 - k/E)^T)

experts per layer (:func:`uniform_experts_touched`).

:class:`ExpertCounter` counts the distinct experts each layer's experts module
is asked to run in each forward pass. It hooks transformers' experts modules
(GraniteMoe, OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE and every architecture
built on ``use_experts_implementation``), whose forward receives the top-k
indices itself, so it works whether or not the router returns logits.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from lab.models.presets import ModelError

EXPERTS_IMPLEMENTATION = "grouped_mm"
"""transformers' experts backend the lab pins for MoE models. ``grouped_mm`` sorts the (token, expert) pairs by
expert and multiplies each expert's group once, skipping experts no token routes to, so a pass reads only the union
of the routed experts; unlike ``eager`` (a Python loop over the hit experts, also routed-only) it is captured by
``torch.compile`` with a static shape, so every engine mode runs it. ``batched_mm`` gathers one weight copy per
(token, expert) pair and would hide the union; the lab never uses it."""
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class MoeShape:
    """E and k of a MoE model: ``num_experts`` experts per MoE layer, ``top_k`` chosen per token."""

    num_experts: int
    top_k: int


def moe_shape(config: Any) -> MoeShape | None:
    """E and k read from a transformers config (its text config), or None for a dense model."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = next((getattr(config, field) for field in _EXPERT_COUNT_FIELDS if getattr(config, field, None)), None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
    if not experts or not top_k or int(experts) <= 1:
        return None
    return MoeShape(int(experts), int(top_k))


def uniform_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts per layer for ``tokens`` tokens each routed uniformly at random: E(1-(1-k/E)^T).

    Raises:
        ValueError: top_k not in 1..num_experts or tokens < 0.
    """
    if not 1 <= top_k <= num_experts or tokens < 0:
        raise ValueError(f"uniform_experts_touched requires 1 <= k <= E and tokens >= 0; "
                         f"got E={num_experts}, k={top_k}, tokens={tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _takes_top_k_index(module: torch.nn.Module) -> bool:
    try:
        return "top_k_index" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The experts modules of a transformers MoE, in layer order (modules whose forward takes ``top_k_index``).

    Raises:
        ModelError: the model is a MoE (by its config) but has no such module: its router cannot be hooked.
    """
    found = [module for module in model.modules() if _takes_top_k_index(module)]
    shape = moe_shape(model.config)
    if not found and shape is not None:
        raise ModelError(
            f"The MoE model ({type(model).__name__}, {shape.num_experts} experts, top {shape.top_k}) has no experts "
            "module whose forward takes `top_k_index`, so the lab cannot hook its router to count experts. "
            "It supports transformers MoE architectures built on the experts interface (GraniteMoe, OLMoE, "
            "Mixtral, Qwen2-MoE, Qwen3-MoE and the like); for this model, measure v(K) without expert counts."
        )
    return found


class ExpertCounter:
    """Context manager counting, per forward call of each experts module, the distinct experts routed to.

    ``records`` holds one ``(layer, tokens, distinct_experts)`` per call: the layer's position among the
    experts modules, the tokens in the call and how many distinct experts their top-k indices name.
    ``token_experts[layer]`` keeps each call's top-k indices [tokens, k] (int64, CPU) when ``keep_indices``.

    Raises (on entry):
        ModelError: a dense model, or a MoE whose router cannot be hooked.
    """

    def __init__(self, model: torch.nn.Module, keep_indices: bool = False) -> None:
        self.model = model
        self.keep_indices = keep_indices
        self.records: list[tuple[int, int, int]] = []
        self.token_experts: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._handles: list[Any] = []

    def __enter__(self) -> "ExpertCounter":
        if moe_shape(self.model.config) is None:
            raise ModelError(f"{type(self.model).__name__} is a dense model: it has no experts to count. "
                             "Give a MoE target (e.g. qwen2.5-coder-1.5b-moe).")
        for layer, module in enumerate(experts_modules(self.model)):
            self._handles.append(module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
            index = index.reshape(-1, index.shape[-1]).detach()  # [tokens, k]
            self.records.append((layer, index.shape[0], int(torch.unique(index).numel())))
            if self.keep_indices:
                self.token_experts[layer].append(index.cpu())
        return hook

    def mean_touched(self, tokens: int) -> float:
        """Mean over layers and calls of the distinct experts of calls over exactly ``tokens`` tokens (NaN if none)."""
        counts = [distinct for _, seen, distinct in self.records if seen == tokens]
        return sum(counts) / len(counts) if counts else float("nan")


def window_touched(token_experts: list[torch.Tensor], window: int) -> float:
    """Mean over layers and windows of the distinct experts ``window`` consecutive tokens route to.

    token_experts: per layer, the top-k indices of one sequence's tokens [T, k] (int64), as a full pass
    routed them: each token's routing depends only on its prefix, so a verify pass over any
    ``window`` consecutive tokens of it routes the same way. Returns NaN when T < window.
    """
    counts = []
    for indices in token_experts:
        for start in range(indices.shape[0] - window + 1):
            counts.append(int(torch.unique(indices[start:start + window]).numel()))
    return sum(counts) / len(counts) if counts else float("nan")
