"""Exactness on a real trained model: SmolLM2 in fp32, every drafter, against transformers' own greedy.

fp32 is the exactness reference: in bf16 a pass over K+1 tokens rounds differently
from a pass over one, so a near-tie can flip a greedy token (measured in the peer
benchmark and explained in the README).
"""

from __future__ import annotations

import pytest
import torch

from lab.config import DecodeConfig
from lab.drafters import DraftModelDrafter, make_drafter
from lab.engine import run
from lab.models import encode_prompt, load_model

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


@pytest.mark.parametrize("prompt", PROMPTS, ids=["summary", "qa"])
@pytest.mark.parametrize(
    "drafter_name, k",
    [("none", 1), ("prompt-lookup", 4), ("layer-skip", 3), ("draft-model", 4)],
)
def test_smollm2_fp32_speculative_greedy_equals_transformers_greedy(smollm2_fp32, references, prompt, drafter_name, k):
    if drafter_name == "draft-model":
        # A bf16 copy of the same model drafts for the fp32 target: one tokenizer, high but imperfect agreement.
        draft = load_model("smollm2-135m", dtype="bf16")
        drafter = DraftModelDrafter(draft.model)
    else:
        drafter = make_drafter(drafter_name, smollm2_fp32, exit_layer=8)
    result = run(smollm2_fp32, encode_prompt(smollm2_fp32, prompt), drafter, DecodeConfig(k=k, max_new_tokens=MAX_NEW_TOKENS))
    assert result.token_ids == references[prompt]
    if drafter_name != "none":
        assert result.stats.num_drafts > 0
