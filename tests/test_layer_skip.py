"""Self-speculative layer skip: exact at every exit layer, weights shared, target untouched."""

from __future__ import annotations

import pytest
import torch

from conftest import reference_greedy
from lab.kv import new_cache
from lab.config import DecodeConfig
from lab.drafters import LayerSkipDrafter, early_exit_view, make_drafter
from lab.decode import decode, run
from lab.trace import Step


@pytest.mark.parametrize("exit_layer", [1, 2])
@pytest.mark.parametrize("k", [1, 4])
def test_layer_skip_greedy_equals_target_alone(tiny_target, exit_layer, k):
    prompt = [5, 9, 12, 5, 9, 30, 7]
    reference = reference_greedy(tiny_target.model, prompt, 20)
    result = run(tiny_target, prompt, LayerSkipDrafter(tiny_target.model, exit_layer), DecodeConfig(k=k, max_new_tokens=20))
    assert result.token_ids == reference


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_early_exit_view_is_the_first_layers(tiny_target, exit_layer):
    model = tiny_target.model
    view = early_exit_view(model, exit_layer)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3  # target untouched
    assert all(a is b for a, b in zip(view.model.layers, model.model.layers[:exit_layer]))
    assert view.lm_head.weight is model.lm_head.weight
    ids = torch.tensor([[4, 8, 15, 16, 23]], device=model.device)
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
        # hidden_states[exit_layer] is the output of layer exit_layer-1, before the final norm.
        expected = model.lm_head(model.model.norm(out.hidden_states[exit_layer]))
        got = view(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_layer_skip_cache_equals_fresh_prefill(tiny_target, exit_layer):
    prompt = [5, 9, 12, 5, 9, 30, 7]
    drafter = LayerSkipDrafter(tiny_target.model, exit_layer)
    events = list(decode(tiny_target, prompt, drafter, DecodeConfig(k=3, max_new_tokens=16)))
    committed = prompt + list(events[-1].token_ids)
    steps = [e for e in events if isinstance(e, Step)]
    assert drafter.cache.lengths == [steps[-1].draft_cache_len]
    held = drafter.cached_ids[0].tolist()
    assert held == committed[: len(held)]
    fresh = new_cache(drafter.model)
    with torch.inference_mode():
        drafter.model(torch.tensor([held], device=tiny_target.model.device), cache=fresh, use_cache=True)
    assert len(fresh.layers) == exit_layer
    for a, b in zip(fresh.layers, drafter.cache.layers):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-4, atol=1e-5)


def test_make_drafter_names_and_errors(tiny_target):
    assert make_drafter("none", tiny_target) is None
    assert make_drafter("prompt-lookup", tiny_target).name == "prompt-lookup"
    assert make_drafter("layer-skip", tiny_target).exit_layer == 1  # a quarter of 3 layers, at least 1
    with pytest.raises(ValueError, match="layer-skip requires an exit layer in 1..2 for this target; got 3"):
        make_drafter("layer-skip", tiny_target, exit_layer=3)
    with pytest.raises(ValueError, match="draft-model requires a draft model"):
        make_drafter("draft-model", tiny_target)
    with pytest.raises(ValueError, match="drafter requires one of none, draft-model, prompt-lookup, layer-skip, eagle; got 'medusa'"):
        make_drafter("medusa", tiny_target)
