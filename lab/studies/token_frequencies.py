"""Token frequencies: which tokens the target itself writes, the table a trimmed draft vocabulary keeps.

``build_token_frequencies`` decodes prompts greedily with the target alone
(through the batched engine) and counts the generated tokens; ``count_tokens``
counts any token lists (``python -m lab train-head`` counts its training
labels). The table is saved and read by ``lab.vocab`` (``save_frequencies``,
``load_frequencies``), under ``cache_dir() / vocab / <target>.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def count_tokens(sequences: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """[V] int64 occurrences of each token id in ``sequences``."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        if len(seq):
            counts += torch.bincount(torch.as_tensor(list(seq), dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return counts



def build_token_frequencies(
    target,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Count the tokens the target itself generates (greedy) for ``prompts``.

    target: ``lab.models.LoadedModel``-like (``.model``, ``.tokenizer``, ``.eos_token_ids``).
    prompts: user messages; the chat template is applied (``lab.prompts.encode_prompt``).
    Returns ([V] int64 counts over the generated tokens, the generated token lists).
    Uses the lab's batched engine with the target alone.
    """
    from lab.decode import run_batch
    from lab.config import DecodeConfig
    from lab.models import encode_prompt

    vocab_size = int(target.model.config.get_text_config().vocab_size)
    generated: list[list[int]] = []
    config = DecodeConfig(max_new_tokens=max_new_tokens)
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(target, p, True) for p in prompts[start : start + batch_size]]
        generated += run_batch(target, chunk, None, config).token_ids
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return count_tokens(generated, vocab_size), generated
