"""Prompts and tokenizers: a prompt's token ids, and the check that a draft shares the target's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lab.models.load import LoadedModel
from lab.models.prepare import _as_id_set
from lab.models.presets import ModelError


def _is_tokenizer(obj: Any) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(obj, PreTrainedTokenizerBase)


def _tokenizer_of(loaded_or_tokenizer: LoadedModel | Any) -> Any:
    """The tokenizer itself, or the ``.tokenizer`` of a :class:`LoadedModel` (or anything shaped like one)."""
    return loaded_or_tokenizer if _is_tokenizer(loaded_or_tokenizer) else loaded_or_tokenizer.tokenizer


def encode_prompt(loaded_or_tokenizer: LoadedModel | Any, text: str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, ready for the first forward pass.

    With ``chat_template`` and a tokenizer that has one, ``text`` becomes a user
    message followed by the assistant header (``add_generation_prompt=True``);
    otherwise it is encoded as is, with BOS only where the tokenizer adds it by default.

    Returns:
        Token ids as a list of Python ints (length T of the prompt).

    Raises:
        ValueError: the prompt is empty or whitespace only.
    """
    if not text or not text.strip():
        raise ValueError("The prompt is empty: type a question or some text for the model to continue.")
    tokenizer = _tokenizer_of(loaded_or_tokenizer)
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        token_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the template holds any BOS
    else:
        token_ids = tokenizer(text)["input_ids"]
    return [int(token_id) for token_id in token_ids]


def _describe(loaded_or_tokenizer: LoadedModel | Any) -> str:
    if isinstance(loaded_or_tokenizer, LoadedModel):
        return loaded_or_tokenizer.tokenizer_name
    tokenizer = _tokenizer_of(loaded_or_tokenizer)
    source = getattr(loaded_or_tokenizer, "name", None) if not _is_tokenizer(loaded_or_tokenizer) else None
    source = source or Path(str(getattr(tokenizer, "name_or_path", "") or "")).name or type(tokenizer).__name__
    return f"the tokenizer of {source} ({len(tokenizer):,} tokens)"


def _eos_ids(loaded_or_tokenizer: LoadedModel | Any) -> tuple[int, ...]:
    if not _is_tokenizer(loaded_or_tokenizer) and getattr(loaded_or_tokenizer, "eos_token_ids", None):
        return tuple(sorted(loaded_or_tokenizer.eos_token_ids))
    return tuple(sorted(_as_id_set(_tokenizer_of(loaded_or_tokenizer).eos_token_id)))


def _logit_width(loaded_or_tokenizer: LoadedModel | Any) -> int | None:
    model = None if _is_tokenizer(loaded_or_tokenizer) else getattr(loaded_or_tokenizer, "model", None)
    config = getattr(model, "config", None)
    return int(config.get_text_config().vocab_size) if config is not None else None


def check_same_tokenizer(target: LoadedModel | Any, draft: LoadedModel | Any) -> None:
    """Refuse a draft whose tokenizer differs from the target's.

    A drafter proposes token ids; ids from another vocabulary mean other text,
    so the target rejects nearly every draft and acceptance collapses without
    any error. Compares the vocabularies (token -> id, added tokens included),
    the EOS ids and, for two loaded models, the logit widths.

    Args:
        target, draft: :class:`LoadedModel` (or any object with ``.tokenizer``,
            optionally ``.model`` and ``.eos_token_ids``) or bare tokenizers.

    Raises:
        ModelError: naming both tokenizers and what differs.
    """
    target_tokenizer, draft_tokenizer = _tokenizer_of(target), _tokenizer_of(draft)
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    differences = []
    if len(target_vocab) != len(draft_vocab):
        differences.append(f"vocabulary sizes differ ({len(target_vocab):,} vs {len(draft_vocab):,} tokens)")
    if target_vocab != draft_vocab:
        mismatched = [token for token, token_id in target_vocab.items() if draft_vocab.get(token) != token_id]
        if mismatched:
            example = mismatched[0]
            differences.append(
                f"{len(mismatched):,} target tokens have another id or none in the draft "
                f"(e.g. {example!r} is {target_vocab[example]} in the target, {draft_vocab.get(example)} in the draft)"
            )
    if _is_tokenizer(target) or _is_tokenizer(draft):  # compare like with like: the tokenizers' own EOS
        target_eos, draft_eos = (tuple(sorted(_as_id_set(t.eos_token_id))) for t in (target_tokenizer, draft_tokenizer))
    else:  # two models: their full stop sets (tokenizer EOS plus generation config)
        target_eos, draft_eos = _eos_ids(target), _eos_ids(draft)
    if target_eos != draft_eos:
        differences.append(f"end-of-sequence ids differ ({list(target_eos)} vs {list(draft_eos)})")
    target_width, draft_width = _logit_width(target), _logit_width(draft)
    if target_width is not None and draft_width is not None and target_width != draft_width:
        differences.append(f"logit widths differ ({target_width:,} vs {draft_width:,})")
    if differences:
        raise ModelError(
            f"The draft uses {_describe(draft)}, which is not the target's ({_describe(target)}): "
            + "; ".join(differences)
            + ". A draft model must share the target's tokenizer exactly: its proposals are token ids, "
            "and ids from another vocabulary mean other text, so the target would reject almost every "
            "draft and acceptance would collapse silently. Pick a draft from the target's family "
            "(e.g. qwen2.5-coder-0.5b drafting for qwen2.5-coder-1.5b), or bridge the two vocabularies "
            "through text: --vocab-bridge text (exact for greedy decoding)."
        )
