"""Self-speculative drafting: the target's own first N layers, its final norm and LM head.

LayerSkip (Elhoushi et al. 2024) and Draft & Verify (Zhang et al. 2024) draft with
a shallow exit of the target itself: no second model, no vocabulary to match, no
extra weights. The early-exit view shares every weight with the target; it keeps
its own KV cache for its N layers (kept exact by the same prefix rollback as a
draft model). Models not trained for early exit (SmolLM2, Qwen) accept little
from a shallow exit: the lab shows that honestly.
"""

from __future__ import annotations

import copy
import weakref

import torch

from lab.drafters.draft_model import DraftModelDrafter


def num_layers(model: torch.nn.Module) -> int:
    """Decoder layers of a transformers causal LM (``model.model.layers``)."""
    return len(model.model.layers)


def early_exit_view(model: torch.nn.Module, exit_layer: int) -> torch.nn.Module:
    """A causal LM that runs layers [0, exit_layer) then the final norm and LM head.

    Shares all parameters with ``model`` (nothing is copied or changed in it);
    only the module containers and the config are new.

    Raises ValueError unless 1 <= exit_layer < number of layers.
    """
    total = num_layers(model)
    if not 1 <= exit_layer < total:
        raise ValueError(f"layer-skip requires an exit layer in 1..{total - 1} for this target; got {exit_layer}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = exit_layer
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:exit_layer])
    inner = _shallow_module_copy(model.model)
    inner.layers = torch.nn.ModuleList(list(model.model.layers)[:exit_layer])
    inner.config = config
    outer = _shallow_module_copy(model)
    outer.model = inner
    outer.config = config
    return outer


def _shallow_module_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing parameters and children, with its own child registry."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


# target -> {exit layer: view}: one view per exit, so a compiled view (lab.kv) is compiled once.
_VIEWS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, torch.nn.Module]]" = weakref.WeakKeyDictionary()


class LayerSkipDrafter(DraftModelDrafter):
    """Drafts with the target's first ``exit_layer`` layers (see module docstring)."""

    name = "layer-skip"

    def __init__(self, target_model: torch.nn.Module, exit_layer: int) -> None:
        self.exit_layer = exit_layer
        views = _VIEWS.setdefault(target_model, {})
        if exit_layer not in views:
            views[exit_layer] = early_exit_view(target_model, exit_layer)
        super().__init__(views[exit_layer])
