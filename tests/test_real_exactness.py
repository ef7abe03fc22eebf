"""Exactness on a real trained model: SmolLM2 in fp32, every drafter, against transformers' own greedy.

fp32 is the exactness reference: in bf16 a pass over K+1 tokens rounds differently
from a pass over one, so a near-tie can flip a greedy token (measured in the peer
benchmark and explained in the README).
"""

from __future__ import annotations

import pytest
import torch

from lab.config import DecodeConfig
from lab.drafters import DraftModelDrafter, EagleDrafter, EagleHead, EagleHeadConfig, make_drafter
from lab.drafters.eagle import find_head, load_head
from lab.decode import run
from lab.models import encode_prompt, load_model
from lab.vocab import trimmed_view

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Summarize in one sentence: The city council met on Tuesday. The city council voted to repair the bridge. "
    "The bridge repair will start in May and the bridge will reopen in September.",
    "What are the three primary colours? Answer briefly.",
]
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2_fp32():
    torch.set_num_threads(2)
    yield load_model("smollm2-135m", dtype="fp32")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def references(smollm2_fp32):
    """transformers' own greedy decoding of each prompt (the target alone, not our engine)."""
    out = {}
    for prompt in PROMPTS:
        ids = encode_prompt(smollm2_fp32, prompt)
        with torch.inference_mode():
            generated = smollm2_fp32.model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                eos_token_id=list(smollm2_fp32.eos_token_ids), pad_token_id=smollm2_fp32.eos_token_ids[0],
            )
        out[prompt] = generated[0, len(ids):].tolist()
    return out


def _head(target) -> EagleHead:
    """The trained head when the model cache or assets/ hold one, else an untrained one: exactness holds for both."""
    try:
        return load_head(find_head(target.name))[0]
    except FileNotFoundError:
        torch.manual_seed(0)
        return EagleHead(EagleHeadConfig.for_target(target.model, 256)).eval().requires_grad_(False)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["summary", "qa"])
@pytest.mark.parametrize(
    "drafter_name, k",
    [("none", 1), ("prompt-lookup", 4), ("layer-skip", 3), ("draft-model", 4), ("draft-model-trimmed", 4), ("eagle", 4),
     ("eagle-trimmed", 5)],
)
def test_smollm2_fp32_speculative_greedy_equals_transformers_greedy(smollm2_fp32, references, prompt, drafter_name, k):
    if drafter_name == "draft-model":
        # A bf16 copy of the same model drafts for the fp32 target: one tokenizer, high but imperfect agreement.
        draft = load_model("smollm2-135m", dtype="bf16")
        drafter = DraftModelDrafter(draft.model)
    elif drafter_name == "draft-model-trimmed":
        # The bf16 copy again, scoring only 2,000 tokens (every 20th id: many of the reference's tokens are outside).
        draft = load_model("smollm2-135m", dtype="bf16")
        drafter = DraftModelDrafter(trimmed_view(draft.model, torch.arange(0, 40_000, 20)))
    elif drafter_name.startswith("eagle"):
        drafter = EagleDrafter(smollm2_fp32.model, _head(smollm2_fp32),
                               torch.arange(0, 40_000, 20) if drafter_name == "eagle-trimmed" else None)
    else:
        drafter = make_drafter(drafter_name, smollm2_fp32, exit_layer=8)
    result = run(smollm2_fp32, encode_prompt(smollm2_fp32, prompt), drafter, DecodeConfig(k=k, max_new_tokens=MAX_NEW_TOKENS))
    assert result.token_ids == references[prompt]
    if drafter_name != "none":
        assert result.stats.num_drafts > 0
