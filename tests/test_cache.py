"""KV-cache helpers, and the index form of logits_to_keep that avoids PyTorch's slow bf16 path."""

from __future__ import annotations

import pytest
import torch

from conftest import TinyLM, tiny_llama, tiny_tokenizer
from lab.batch import RaggedCache, make_batch_drafter
from lab.cache import crop_cache, keep_last, new_cache
from lab.config import DecodeConfig
from lab.drafters import DraftModelDrafter, make_drafter
from lab.engine import run


def test_keep_last_indexes_the_last_positions():
    assert keep_last(1, 5).tolist() == [4]
    assert keep_last(3, 3).tolist() == [0, 1, 2]
    for count, width in ((0, 4), (5, 4)):
        with pytest.raises(ValueError, match="1 <= count <= width"):
            keep_last(count, width)


def test_index_gives_the_same_logits_as_an_int(tiny_target):
    model = tiny_target.model
    tokens = torch.tensor([[5, 9, 12, 5, 9]], device=model.device)
    with torch.inference_mode():
        by_int = model(tokens, logits_to_keep=2).logits
        by_index = model(tokens, logits_to_keep=keep_last(2, 5, model.device)).logits
    assert by_index.shape == (1, 2, model.config.vocab_size)
    assert torch.equal(by_int, by_index)
    # The rows handed to the LM head are plainly strided (a slice would keep the outer stride 5 x hidden).
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
    with torch.inference_mode():
        model(tokens, logits_to_keep=keep_last(1, 5, model.device))
    handle.remove()
    hidden = model.config.hidden_size
    assert seen == [(hidden, hidden, 1)]


class _Spy:
    """Records the logits_to_keep of every forward call of a model (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[object] = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.seen.append(kwargs.get("logits_to_keep", 0))


def test_engine_and_drafters_never_slice_with_an_int():
    """Every multi-token pass that keeps some logits passes an index tensor (``keep_last``), never an int."""
    target = TinyLM(tiny_llama(seed=0, layers=3), tiny_tokenizer())
    draft = TinyLM(tiny_llama(seed=1, layers=1), tiny_tokenizer())
    spies = [_Spy(target.model), _Spy(draft.model)]
    prompt = [5, 9, 12, 5, 9, 30, 7]
    config = DecodeConfig(k=3, max_new_tokens=12)
    run(target, prompt, DraftModelDrafter(draft.model), config)
    run(target, prompt, make_drafter("layer-skip", target, exit_layer=1), config)
    cache = RaggedCache(target.model, 2)
    cache.forward([torch.tensor(prompt), torch.tensor(prompt[:3])], logits_to_keep=1)
    drafter = make_batch_drafter("draft-model", target, draft)
    from lab.batch import run_batch

    run_batch(target, [prompt, prompt[:3]], drafter, config)
    kept = [k for spy in spies for k in spy.seen]
    assert kept and any(isinstance(k, torch.Tensor) for k in kept)
    assert all(k == 0 or isinstance(k, torch.Tensor) for k in kept), kept


def test_crop_cache_rolls_back_and_refuses_bad_lengths(tiny_target):
    cache = new_cache(tiny_target.model)
    with torch.inference_mode():
        tiny_target.model(torch.tensor([[5, 9, 12, 5]], device=tiny_target.model.device), cache=cache, use_cache=True)
    crop_cache(cache, 2)
    assert cache.get_seq_length() == 2
    with pytest.raises(ValueError, match="0 <= length <= 2"):
        crop_cache(cache, 3)
