"""The vocabulary bridge (``lab.drafters.bridge``): exact through text, the collapse through raw ids, the refusals.

Two real tokenizers (SmolLM2's, 49,152 tokens, as the draft's; Qwen's, 151,936,
as the target's) over tiny models: random ones (their output is any token, cut
characters included), and "chain" models that follow one script token by token
(a bigram table written into the weights), so a draft that writes the target's
text in its own tokens is an agreeing oracle: the text bridge must let it
through, the ids trap must not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lab.config import DecodeConfig
from lab.decode import run, run_batch
from lab.drafters import DraftModelDrafter, VocabBridgeDrafter, make_drafter
from lab.drafters.bridge import check_bridge_sampling
from lab.models import ModelError, encode_prompt, is_prepared, load_tokenizer

from conftest import TinyLM, tiny_llama

PROMPTS = ["naïve café", "Write 😀 and 日本語, then stop.", "def f(x):\n    return x"]


@pytest.fixture(scope="module")
def tokenizers():
    """(draft: SmolLM2's, target: Qwen's); skips where the prepared models are missing."""
    if not (is_prepared("smollm2-135m") and is_prepared("qwen2.5-coder-0.5b")):
        pytest.skip("needs the SmolLM2 and Qwen tokenizers (scripts/setup.sh app)")
    return load_tokenizer("smollm2-135m"), load_tokenizer("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def random_pair(tokenizers):
    draft_tok, target_tok = tokenizers
    target = TinyLM(tiny_llama(seed=1, vocab_size=len(target_tok)), target_tok, (target_tok.eos_token_id,), "qwen-tiny")
    draft = TinyLM(tiny_llama(seed=2, vocab_size=len(draft_tok)), draft_tok, (draft_tok.eos_token_id,), "smol-tiny")
    return target, draft


def chain_llama(vocab_size: int, chain: list[int], hidden: int = 96) -> LlamaForCausalLM:
    """A Llama whose greedy next token after chain[j] is chain[j+1] (any other token: id 0).

    The layers add nothing (o_proj and down_proj are zero), so the last hidden
    state is the current token's embedding: one-hot e_j for chain[j], which the
    LM head maps to chain[j+1].
    """
    if len(set(chain[:-1])) != len(chain) - 1 or len(chain) - 1 > hidden:
        raise ValueError(f"a chain needs distinct tokens (each has one successor), at most {hidden}; got {chain}")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.zero_()
    model.lm_head.weight.zero_()
    for j, (token, successor) in enumerate(zip(chain, chain[1:])):
        model.model.embed_tokens.weight[token, j] = 1.0
        model.lm_head.weight[successor, j] = 1.0
    return model


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (SmolLM2's and Qwen's tokenizers use it): each byte's character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_tokens(tokenizer, text: str) -> list[int]:
    """``text`` as one token per UTF-8 byte: a tokenization the tokenizer itself would not choose (cut characters)."""
    table = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([table[b] for b in text.encode()])


SCRIPT = ["Sure: naïve", " café", " 😀", " 日本", " done."]  # the emoji as four byte tokens in the target's script


@pytest.fixture(scope="module")
def chain_pair(tokenizers):
    """A target that writes SCRIPT (the emoji byte by byte), and a draft that writes it in SmolLM2's own tokens."""
    draft_tok, target_tok = tokenizers
    prompt = encode_prompt(target_tok, PROMPTS[0])
    target_script = []
    for piece in SCRIPT:
        target_script += byte_tokens(target_tok, piece) if "😀" in piece else target_tok.encode(piece)
    target_chain = [prompt[-1], *target_script, target_tok.eos_token_id]
    draft_prompt = draft_tok(target_tok.decode(prompt), add_special_tokens=False)["input_ids"]
    draft_chain = [draft_prompt[-1], *draft_tok.encode("".join(SCRIPT)), draft_tok.eos_token_id]
    target = TinyLM(chain_llama(len(target_tok), target_chain), target_tok, (target_tok.eos_token_id,), "qwen-chain")
    draft = TinyLM(chain_llama(len(draft_tok), draft_chain), draft_tok, (draft_tok.eos_token_id,), "smol-chain")
    return target, draft, prompt


def greedy(k: int = 4, max_new_tokens: int = 40) -> DecodeConfig:
    return DecodeConfig(k=k, max_new_tokens=max_new_tokens, temperature=0.0, engine_mode="eager")


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 4])
def test_text_bridge_is_exact_with_random_models(random_pair, prompt, k):
    # Random models write any tokens: cut characters, CJK pieces, the draft's own special tokens.
    target, draft = random_pair
    ids = encode_prompt(target, prompt)
    alone = run(target, ids, None, greedy(k))
    drafter = make_drafter("draft-model", target, draft, vocab_bridge="text")
    bridged = run(target, ids, drafter, greedy(k))
    assert bridged.token_ids == alone.token_ids
    assert len(bridged.steps) - 1 <= len(drafter.bridge_ms) <= len(bridged.steps)  # the last step (budget 1) drafts nothing


def test_text_bridge_is_exact_in_a_batch(random_pair):
    target, draft = random_pair
    prompts = [encode_prompt(target, p) for p in PROMPTS]
    alone = run_batch(target, prompts, None, greedy(3, 24))
    bridged = run_batch(target, prompts, make_drafter("draft-model", target, draft, vocab_bridge="text"), greedy(3, 24))
    assert bridged.token_ids == alone.token_ids


def test_chain_target_writes_the_script(chain_pair):
    # The oracle set-up itself: the target alone writes SCRIPT, cutting the emoji into its four bytes.
    target, _, prompt = chain_pair
    alone = run(target, prompt, None, greedy())
    assert alone.text == "".join(SCRIPT)
    assert alone.reason == "eos"


@pytest.mark.parametrize("engine_mode", ["eager", "static"])
def test_text_bridge_lets_an_agreeing_draft_through(chain_pair, engine_mode):
    target, draft, prompt = chain_pair
    config = DecodeConfig(k=4, max_new_tokens=40, temperature=0.0, engine_mode=engine_mode)
    alone = run(target, prompt, None, config)
    drafter = make_drafter("draft-model", target, draft, vocab_bridge="text")
    bridged = run(target, prompt, drafter, config)
    assert bridged.token_ids == alone.token_ids
    # Measured 8 of 13 accepted, 8 target passes against 15: the emoji's bytes, which the draft cannot cut the way the
    # target does, cost a plain step each.
    assert bridged.stats.acceptance_rate > 0.5, bridged.stats.as_dict()
    assert bridged.stats.target_forward_passes <= 0.6 * alone.stats.target_forward_passes
    # The draft's EOS ended a proposal and became the target's <|im_end|>, which the target accepted.
    notes = [s.drafted for s in bridged.steps]
    assert any(target.tokenizer.eos_token_id in drafted for drafted in notes)


def test_ids_trap_collapses_the_same_agreeing_draft(chain_pair):
    # Measured: the same oracle, its ids sent as they are, is accepted (almost) never.
    target, draft, prompt = chain_pair
    alone = run(target, prompt, None, greedy())
    text = run(target, prompt, make_drafter("draft-model", target, draft, vocab_bridge="text"), greedy())
    ids = run(target, prompt, make_drafter("draft-model", target, draft, vocab_bridge="ids"), greedy())
    assert ids.token_ids == alone.token_ids  # still exact: the target verified every wrong proposal
    assert ids.stats.num_draft_tokens > 0
    assert ids.stats.acceptance_rate < 0.1
    assert ids.stats.acceptance_rate < text.stats.acceptance_rate - 0.5
    assert ids.stats.target_forward_passes >= alone.stats.target_forward_passes - 1  # nothing saved: every step is a plain step plus a draft


def test_bridged_draft_records_one_step(chain_pair):
    target, draft, prompt = chain_pair
    drafter = make_drafter("draft-model", target, draft, vocab_bridge="text")
    steps = run(target, prompt, drafter, greedy(k=3, max_new_tokens=3)).steps
    assert steps
    bridged = drafter.last_bridged[0]
    assert bridged is not None
    assert "".join(bridged.draft_pieces).startswith(bridged.text[:4])
    assert "".join(bridged.target_pieces) == bridged.text[: len("".join(bridged.target_pieces))]
    assert len(bridged.target_tokens) <= 3


def test_cut_character_is_never_re_tokenized(chain_pair):
    # After the target's first byte of the emoji, the committed text ends inside a character: the window cannot be
    # continued by re-encoding, so the bridge proposes nothing rather than a token that re-spells the committed bytes.
    target, draft, prompt = chain_pair
    target_tok = target.tokenizer
    before = target_tok.encode("Sure: naïve café")
    committed = torch.tensor(prompt + before + byte_tokens(target_tok, " 😀")[:2])  # the space, then the first byte of four
    drafter = VocabBridgeDrafter(DraftModelDrafter(draft.model), draft.tokenizer, target_tok, "text")
    from lab.drafters.base import DraftContext
    from lab.sampling import SamplingParams

    ctx = DraftContext(committed, len(prompt), 4, SamplingParams(temperature=0.0))
    assert drafter._target_tokens(ctx, " 😀 日本") == []
    clean = DraftContext(torch.tensor(prompt + before), len(prompt), 4, SamplingParams(temperature=0.0))
    assert target_tok.decode(drafter._target_tokens(clean, " 😀 日本")) == " 😀 日本"


def test_none_refuses_a_mismatched_pair_and_names_the_bridge(random_pair):
    target, draft = random_pair
    with pytest.raises(ModelError, match="--vocab-bridge text"):
        make_drafter("draft-model", target, draft)


def test_unknown_bridge_is_refused(random_pair):
    target, draft = random_pair
    with pytest.raises(ValueError, match="vocab_bridge requires one of none, ids, text; got 'bytes'"):
        make_drafter("draft-model", target, draft, vocab_bridge="bytes")


@pytest.mark.parametrize("bridge, message", [("text", "the text bridge is exact for greedy decoding only"),
                                             ("ids", "greedy decoding only")])
def test_sampling_under_a_bridge_is_refused(random_pair, bridge, message):
    target, draft = random_pair
    with pytest.raises(ValueError, match=message):
        check_bridge_sampling(bridge, 0.7)
    sampled = DecodeConfig(k=2, max_new_tokens=4, temperature=0.7, seed=0, engine_mode="eager")
    with pytest.raises(ValueError, match=message):
        run(target, encode_prompt(target, PROMPTS[0]), make_drafter("draft-model", target, draft, vocab_bridge=bridge),
            sampled)
    check_bridge_sampling("none", 0.7)  # a same-vocabulary draft samples as before


@pytest.mark.real_model
def test_smollm2_drafts_for_qwen_through_the_text_bridge():
    from lab.models import load_model

    if not (is_prepared("smollm2-135m") and is_prepared("qwen2.5-coder-0.5b")):
        pytest.skip("needs smollm2-135m and qwen2.5-coder-0.5b prepared (scripts/setup.sh app)")
    torch.set_num_threads(2)
    try:
        target = load_model("qwen2.5-coder-0.5b", dtype="fp32")
        draft = load_model("smollm2-135m", dtype="fp32")
        config = greedy(k=4, max_new_tokens=24)
        rates = {}
        for prompt in ["Write a Python function that returns the square of a number.", "What is the capital of France?"]:
            ids = encode_prompt(target, prompt)
            alone = run(target, ids, None, config)
            for bridge in ("text", "ids"):
                result = run(target, ids, make_drafter("draft-model", target, draft, vocab_bridge=bridge), config)
                assert result.token_ids == alone.token_ids, (bridge, prompt)
                rates.setdefault(bridge, []).append(result.stats.acceptance_rate)
        assert min(rates["text"]) > 0
        assert sum(rates["ids"]) < sum(rates["text"]) / 2, rates
    finally:
        torch.set_num_threads(1)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def pair_dirs(random_pair, tmp_path_factory):
    """The random pair saved as model folders (Qwen's tokenizer with the target, SmolLM2's with the draft)."""
    root = tmp_path_factory.mktemp("bridge_cli")
    folders = {}
    for name, lm in zip(("target", "draft"), random_pair):
        lm.model.save_pretrained(root / name)
        lm.tokenizer.save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


def cli_generate(pair_dirs, *extra: str) -> list[str]:
    return ["generate", "--target", pair_dirs["target"], "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "8",
            "--prompt", PROMPTS[1], "--drafter", "draft-model", "--draft", pair_dirs["draft"], "--no-save", *extra]


def test_cli_generate_through_the_text_bridge(pair_dirs, capsys):
    from lab.cli import main

    assert main(cli_generate(pair_dirs, "--vocab-bridge", "text", "--k", "3", "--json", "--compare-baseline")) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["identical_to_baseline"] is True


@pytest.mark.parametrize("extra, message", [
    ((), "--vocab-bridge text"),
    (("--vocab-bridge", "text", "--temperature", "0.7"), "the text bridge is exact for greedy decoding only"),
    (("--vocab-bridge", "bytes"), "invalid choice: 'bytes'"),
])
def test_cli_refusals(pair_dirs, capsys, extra, message):
    from lab.cli import main

    assert main(cli_generate(pair_dirs, *extra)) == 2
    assert message in capsys.readouterr().err


def test_cli_bridge_requires_a_draft_model(capsys):
    from lab.cli import main

    argv = ["generate", "--target", "x", "--drafter", "prompt-lookup", "--vocab-bridge", "ids", "--prompt", "hi"]
    assert main(argv) == 2
    assert "--vocab-bridge ids requires --drafter draft-model" in capsys.readouterr().err
