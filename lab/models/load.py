"""Loading a model and its tokenizer: a preset (prepared first if needed) or a local Hugging Face folder.

Each model loads in its own precision (``load_model(..., precision=...)``):
fp32, bf16 or fp16, or bitsandbytes' int8 (LLM.int8), nf4 and fp4, quantised
from the bf16 copy while loading (4-bit takes tens of seconds on a CPU).
Device, dtype and precision names are resolved by ``lab.hardware``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lab.hardware import _DTYPE_NAMES, _DTYPES, QUANTIZED_PRECISIONS, resolve_device, resolve_dtype, resolve_precision
from lab.models.memory import weight_bytes
from lab.models.prepare import _as_id_set, prepare
from lab.models.presets import PRESETS, ModelError, ModelPreset, PresetLike, Progress, _stage, get_preset, is_prepared


@dataclass
class LoadedModel:
    """A causal LM ready for inference (eval mode, no grad) with its tokenizer.

    Attributes:
        name: the preset name or the folder path it was loaded from.
        model: a transformers ``PreTrainedModel``; forward takes ``input_ids`` [B, T]
            and returns logits [B, T, vocab_size].
        tokenizer: the matching transformers tokenizer.
        device: where the weights live.
        dtype: the weights' dtype; for a quantised model the compute dtype, in
            which its unquantised parts (embeddings, norms, LM head), activations
            and KV cache are held.
        num_parameters: parameter count, tied weights counted once (a 4-bit
            parameter tensor packs two weights per element; counted as weights).
        weight_bytes: bytes held by the weights on ``device``, quantisation
            scales included (see :func:`weight_bytes`).
        load_s: wall seconds spent loading (preparation excluded).
        precision: one of ``PRECISIONS``, e.g. ``"bf16"`` or ``"nf4"`` (default:
            the name of ``dtype``).
    """

    name: str
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    num_parameters: int
    weight_bytes: int
    load_s: float
    precision: str = ""

    def __post_init__(self) -> None:
        if not self.precision:
            self.precision = _DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))

    @property
    def is_quantized(self) -> bool:
        """True for int8, nf4 and fp4 (bitsandbytes) weights."""
        return self.precision in QUANTIZED_PRECISIONS

    @property
    def vocab_size(self) -> int:
        """Width of the logits (``config.vocab_size``); may exceed ``len(tokenizer)`` (padded embeddings)."""
        return int(self.model.config.get_text_config().vocab_size)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Sorted ids that end a generation: the tokenizer's EOS plus the generation config's (an int or a list)."""
        generation_config = getattr(self.model, "generation_config", None)
        ids = _as_id_set(self.tokenizer.eos_token_id)
        if generation_config is not None:
            ids |= _as_id_set(generation_config.eos_token_id)
        return tuple(sorted(ids))

    @property
    def tokenizer_name(self) -> str:
        """A human name for messages, e.g. ``"the tokenizer of smollm2-135m (49,152 tokens)"``."""
        return f"the tokenizer of {self.name} ({len(self.tokenizer):,} tokens)"


def _weights_error(folder: Path, preset: ModelPreset | None, error: Exception) -> ModelError:
    if preset is not None:
        fix = (
            f"The prepared copy looks corrupt. Delete the cache folder {folder} and rerun preparation "
            f"(`python -m lab prepare {preset.name}`, or load the preset again)."
        )
    else:
        fix = f"Check that {folder} holds a complete Hugging Face model (config.json, weights, tokenizer files)."
    return ModelError(f"Could not load the model in {folder}: {type(error).__name__}: {error}\n{fix}")


def _preset_or_none(name_or_path: PresetLike | os.PathLike) -> ModelPreset | None:
    if isinstance(name_or_path, ModelPreset):
        return name_or_path
    return PRESETS.get(str(name_or_path))


def _resolve_folder(
    name_or_path: PresetLike | os.PathLike, progress: Progress | None
) -> tuple[Path, ModelPreset | None]:
    """The folder to load from, preparing a preset first if needed; raises ModelError for an unknown name."""
    preset = _preset_or_none(name_or_path)
    if preset is not None:
        return prepare(preset, progress), preset
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        get_preset(str(name_or_path))  # not a preset either: raises the error that lists the presets
    return folder, None


def _loading_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SafetensorError)


def load_tokenizer(name_or_path: PresetLike | os.PathLike, progress: Progress | None = None) -> Any:
    """The tokenizer of a preset (prepared first if needed) or of a local model folder.

    Cheap once prepared (about a second); lets callers compare tokenizers
    (:func:`check_same_tokenizer`) without loading weights.

    Raises:
        ModelError: unknown name, missing package, or unreadable tokenizer files.
    """
    from transformers import AutoTokenizer

    folder, preset = _resolve_folder(name_or_path, progress)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except _loading_errors() as error:
        raise _weights_error(folder, preset, error) from error


def load_model(
    name_or_path: PresetLike | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: Progress | None = None,
    precision: str | None = None,
) -> LoadedModel:
    """Load a preset (preparing it once if needed) or a local Hugging Face model folder.

    The model is in eval mode with ``requires_grad_(False)`` and SDPA attention.

    Args:
        name_or_path: a preset name (see ``PRESETS``), a :class:`ModelPreset`, or
            a folder holding config.json, weights and tokenizer files.
        device: see ``lab.hardware.resolve_device`` (default: CUDA if available, else CPU).
        dtype: see ``lab.hardware.resolve_dtype`` (default ``"auto"``: bf16). With a
            quantised ``precision`` it is the compute dtype (``bnb_4bit_compute_dtype``,
            and the dtype of the layers left unquantised).
        progress: optional ``progress(fraction, message)``; preparation, when
            needed, takes the first 90 %.
        precision: the weights' precision, one of ``PRECISIONS`` or ``"auto"``
            (default: ``dtype``). ``"int8"`` is bitsandbytes' LLM.int8, ``"nf4"``
            and ``"fp4"`` its 4-bit formats; embeddings, norms and the LM head
            stay in the compute dtype. Greedy speculative output is exact relative
            to the model *as loaded*: a quantised target is a different reference.

    Raises:
        ModelError: unknown name (the message lists the presets), a missing
            package (with the pip command; bitsandbytes for a quantised precision),
            a checksum mismatch, or unreadable weights (the message names the
            cache folder to delete).
        ValueError: an invalid device, dtype or precision, a dtype the device
            cannot compute in, or a float ``precision`` that contradicts ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    precision, dtype = _precision_and_dtype(precision, dtype, device)
    preset = _preset_or_none(name_or_path)
    load_start = 0.9 if preset is not None and not is_prepared(preset) else 0.0  # preparing takes the first 90 %
    folder, preset = _resolve_folder(name_or_path, _stage(progress, 0.0, load_start))
    name = preset.name if preset is not None else str(name_or_path)

    quantized = precision in QUANTIZED_PRECISIONS
    _stage(progress, load_start, 1.0)(0.0, f"loading {name} ({precision} on {device})")
    started_s = time.perf_counter()
    experts_kwargs = _experts_kwargs(folder)  # an architecture transformers lacks fails here, before the tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            **experts_kwargs,
            dtype=dtype,
            attn_implementation="sdpa",
            # bitsandbytes quantises while placing the weights, and a quantised model refuses .to()
            device_map=str(device) if device.type == "cuda" or quantized else None,
            quantization_config=_quantization_config(precision, dtype) if quantized else None,
        )
    except _loading_errors() as error:
        raise _weights_error(folder, preset, error) from error
    except ImportError as error:  # transformers' own check of bitsandbytes / accelerate
        raise ModelError(f"Could not load {name} in {precision}: {error}") from error
    if not quantized:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    load_s = time.perf_counter() - started_s

    loaded = LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        num_parameters=_count_weights(model),
        weight_bytes=weight_bytes(model),
        load_s=load_s,
        precision=precision,
    )
    _stage(progress, load_start, 1.0)(1.0, f"{name} loaded in {load_s:.1f} s")
    return loaded


def _experts_kwargs(folder: Path) -> dict[str, str]:
    """The pinned experts backend (``lab.routing.EXPERTS_IMPLEMENTATION``) for a MoE folder, nothing for a dense one.

    Raises:
        ModelError: config.json names an architecture this transformers does not know.
    """
    import json

    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from lab.routing import EXPERTS_IMPLEMENTATION, moe_shape

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return {}  # the loader's own error says what is wrong with the folder
    if model_type not in CONFIG_MAPPING:
        raise ModelError(
            f"The model in {folder} has the architecture model_type={model_type!r}, which transformers "
            f"{transformers.__version__} does not know. The lab runs transformers causal LMs (for MoE: GraniteMoe, "
            "OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE); convert the model to one of them or upgrade transformers."
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except _loading_errors():
        return {}
    return {"experts_implementation": EXPERTS_IMPLEMENTATION} if moe_shape(config) is not None else {}


def _precision_and_dtype(
    precision: str | None, dtype: str | torch.dtype | None, device: torch.device
) -> tuple[str, torch.dtype]:
    """(precision name, compute dtype) from ``load_model``'s two arguments; see its docstring."""
    if precision is None or precision == "auto" and dtype not in (None, "auto"):
        dtype = resolve_dtype(dtype, device)
        return resolve_precision(dtype, device), dtype
    precision = resolve_precision(precision, device)
    if precision in QUANTIZED_PRECISIONS:
        compute_dtype = resolve_dtype(dtype, device)
        resolve_precision(compute_dtype, device)  # the device must compute in it too
        return precision, compute_dtype
    if dtype not in (None, "auto") and resolve_dtype(dtype, device) != _DTYPES[precision]:
        raise ValueError(
            f"precision {precision!r} and dtype {dtype!r} disagree: for a float precision give one of them, "
            "or the same value (dtype is the compute dtype only for int8, nf4 and fp4)"
        )
    return precision, _DTYPES[precision]


def _count_weights(model: torch.nn.Module) -> int:
    """Parameter count, tied weights once; a 4-bit parameter (two weights per uint8) counts its real weights."""
    total = 0
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        total += state.shape.numel() if state is not None else parameter.numel()
    return total


def _quantization_config(precision: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for int8, nf4 or fp4 (4-bit: blocks of 64, no double quantisation)."""
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=precision, bnb_4bit_compute_dtype=compute_dtype)
