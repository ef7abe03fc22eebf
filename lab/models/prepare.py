"""One-time preparation of a preset from its PyPI wheels: verified GGUF -> bf16 safetensors copy.

Loading a GGUF dequantizes every tensor and takes 16-60 s on a 2-core CPU, so
each preset is *prepared* once:

1. assemble the GGUF parts from the installed packages (streamed, hashed);
2. refuse the file unless its sha256 is the pinned one;
3. load it with transformers, dequantized to bf16, and re-create it as a plain
   model from its config (a GGUF-loaded model refuses to be saved);
4. save a safetensors copy, the tokenizer and the generation config into
   ``cache_dir() / <preset>/``, and write the marker ``lab_prepared.json`` last.

A folder without the marker is an interrupted preparation and is redone.
Loading the prepared copy then takes 0.4-7 s.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lab.models.presets import (
    MARKER_FILE,
    PRESETS,
    ModelError,
    ModelPreset,
    PresetLike,
    Progress,
    _stage,
    cache_dir,
    get_preset,
    is_prepared,
    package_file,
    prepared_dir,
)

PREPARED_DTYPE = torch.bfloat16
_HASH_CHUNK_BYTES = 8 * 1024 * 1024


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

    if preset.moe is not None:
        return _prepare_moe(preset, progress)
    sources = [package_file(preset, part) for part in preset.parts]  # fail fast on a missing package
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{preset.name}.lock"):
        if is_prepared(preset):  # another process finished while we waited
            report(1.0, f"{preset.name} is prepared")
            return prepared_dir(preset)
        return _prepare_locked(preset, sources, progress)


def _prepare_moe(preset: ModelPreset, progress: Progress | None) -> Path:
    """A MoE preset: its dense source prepared first (half the progress if needed), then MoEfied once."""
    from lab.models.moefy import build_moe_preset

    source_done = 0.0 if is_prepared(preset.moe.source) else 0.5
    prepare(preset.moe.source, _stage(progress, 0.0, source_done))
    with _exclusive(cache_dir() / f".{preset.name}.lock"):
        if is_prepared(preset):
            _stage(progress, 0.0, 1.0)(1.0, f"{preset.name} is prepared")
            return prepared_dir(preset)
        shutil.rmtree(prepared_dir(preset), ignore_errors=True)
        return build_moe_preset(preset, _stage(progress, source_done, 1.0))


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
