"""Tiny random models and tokenizers built in the test: every code path in milliseconds."""

from __future__ import annotations

import os
from dataclasses import dataclass

import lab  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads, see lab/__init__.py)
from lab.drafters.base import Draft, DraftContext

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 48

# Where the shared tiny fixtures live. On a CUDA machine, `LAB_TEST_DEVICE=cuda pytest -m "not browser"`
# runs the exactness suite on the GPU (README, "On a GPU"); tests that build their own models stay on the CPU.
TEST_DEVICE = torch.device(os.environ.get("LAB_TEST_DEVICE", "cpu"))

# Tiny models run fastest on one thread, and a shared 2-core machine under load makes
# multi-threaded small matmuls up to 15x slower (measured: 146 ms vs 8.5 ms per forward).
torch.set_num_threads(1)


def tiny_tokenizer(vocab_size: int = TINY_VOCAB, prefix: str = "t") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words t0..t{V-1}; t1 is EOS."""
    vocab = {f"{prefix}{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=f"{prefix}0", eos_token=f"{prefix}1")


def tiny_llama(seed: int, vocab_size: int = TINY_VOCAB, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    """A random Llama with peaked logits (large init) so greedy argmax has no near-ties."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@dataclass
class TinyLM:
    """Stands in for ``lab.models.LoadedModel`` in unit tests."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    eos_token_ids: tuple[int, ...] = ()
    name: str = "tiny"


@pytest.fixture(scope="session", autouse=True)
def results_store_in_tmp(tmp_path_factory):
    """Every test (and every process a test starts) keeps its runs in a session tmp store, never the user's own
    (even when the user's environment sets ``LAB_RESULTS_DB``). A test that needs a store of its own sets the
    variable again (monkeypatch) or passes ``path``."""
    before = os.environ.get("LAB_RESULTS_DB")
    path = str(tmp_path_factory.mktemp("results") / "results.sqlite3")
    os.environ["LAB_RESULTS_DB"] = path
    yield path
    if before is None:
        os.environ.pop("LAB_RESULTS_DB", None)
    else:
        os.environ["LAB_RESULTS_DB"] = before


@pytest.fixture(scope="session", autouse=True)
def device_locks_in_tmp(tmp_path_factory):
    """The suite's timed runs queue among themselves (``lab.device_queue``), never behind a real measurement
    running on the machine (a 20-minute benchmark would time out every AppTest): locks in a session tmp folder,
    inherited by the processes a test starts."""
    before = os.environ.get("LAB_LOCK_DIR")
    os.environ["LAB_LOCK_DIR"] = str(tmp_path_factory.mktemp("locks"))
    yield os.environ["LAB_LOCK_DIR"]
    if before is None:
        os.environ.pop("LAB_LOCK_DIR", None)
    else:
        os.environ["LAB_LOCK_DIR"] = before


@pytest.fixture(scope="session")
def tiny_target() -> TinyLM:
    return TinyLM(tiny_llama(seed=0, layers=3).to(TEST_DEVICE), tiny_tokenizer())


@pytest.fixture(scope="session")
def tiny_draft() -> TinyLM:
    return TinyLM(tiny_llama(seed=1, layers=1).to(TEST_DEVICE), tiny_tokenizer())


def reference_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, eos=()) -> list[int]:
    """The target alone, greedy, re-reading the whole sequence every token (no cache at all)."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids], device=model.device)).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
            if token in eos:
                break
    return out


class OracleDrafter:
    """Proposes the target's own greedy continuation (always agrees), or a wrong token at every position.

    reference: the target's greedy output for the prompt; num_prompt_tokens: the prompt's length.
    """

    def __init__(self, reference: list[int], num_prompt_tokens: int, agree: bool) -> None:
        self.name = "oracle" if agree else "contrarian"
        self.reference = reference
        self.num_prompt_tokens = num_prompt_tokens
        self.agree = agree

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Draft:
        done = ctx.token_ids.shape[0] - self.num_prompt_tokens
        tokens = torch.tensor(self.reference[done : done + ctx.k], dtype=torch.long)
        if not self.agree:
            tokens = (tokens + 1) % TINY_VOCAB
        return Draft(tokens)

    def observe(self, num_accepted: int) -> None:
        pass


class NoisyOracle(OracleDrafter):
    """Agrees with the target except at one drafted position that moves each step (from ``phase``): partial
    acceptances of every length, for rollback tests."""

    def __init__(self, reference: list[int], num_prompt_tokens: int, phase: int = 0) -> None:
        super().__init__(reference, num_prompt_tokens, agree=True)
        self.calls = phase

    def propose(self, ctx: DraftContext) -> Draft:
        tokens = super().propose(ctx).tokens.clone()
        wrong_at = self.calls % (ctx.k + 1)
        self.calls += 1
        if wrong_at < tokens.shape[0]:
            tokens[wrong_at] = (tokens[wrong_at] + 1) % TINY_VOCAB
        return Draft(tokens)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (xgrammar needs real token strings); the preset must be prepared."""
    from lab.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tiny_models(smol_tokenizer) -> tuple[TinyLM, TinyLM]:
    """Tiny random target (3 layers) and draft (1 layer) over SmolLM2's tokenizer, stopping at its EOS."""
    vocab = len(smol_tokenizer)
    eos = (smol_tokenizer.eos_token_id,)
    target = TinyLM(tiny_llama(seed=0, vocab_size=vocab, layers=3).to(TEST_DEVICE), smol_tokenizer, eos, name="tiny-target")
    draft = TinyLM(tiny_llama(seed=1, vocab_size=vocab, layers=1).to(TEST_DEVICE), smol_tokenizer, eos, name="tiny-draft")
    return target, draft


def tiny_moe(seed: int, vocab_size: int = TINY_VOCAB, layers: int = 2, hidden: int = 32,
             num_experts: int = 8, top_k: int = 2) -> torch.nn.Module:
    """A random Qwen2-MoE (E experts, top k, no shared expert, grouped_mm experts backend) with peaked logits."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
        num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden // 2,
        shared_expert_intermediate_size=0, tie_word_embeddings=False,
    )
    config._experts_implementation = "grouped_mm"  # the backend the lab pins (lab.models.moefy)
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def smol_tiny_moe(smol_tokenizer) -> TinyLM:
    """A tiny random MoE target (3 layers, 8 experts, top 2) over SmolLM2's tokenizer."""
    eos = (smol_tokenizer.eos_token_id,)
    model = tiny_moe(seed=2, vocab_size=len(smol_tokenizer), layers=3).to(TEST_DEVICE)
    return TinyLM(model, smol_tokenizer, eos, name="tiny-moe")
