"""The machine at hand: device, dtype and precision resolution, the host probe, and machine identity.

Whether bf16 beats fp32 is a property of the hardware, not a constant: on a CPU
with native bf16 dot products (AVX-512 BF16, AMX) bf16 halves the bytes read and
wins; where bf16 is emulated it loses. :func:`host_float_precision` measures it
once per process with a one-second matmul probe, and :func:`resolve_dtype` /
:func:`resolve_precision` turn ``"auto"`` into that answer. :func:`machine_info`
names what decides pass costs here (CPU model and flags, torch, threads, GPU),
so measured costs can be cached per machine (``machine_key``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


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

    On a CPU, :func:`host_float_precision` times a bf16 and an fp32
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
    from lab.models.presets import ModelError  # lazy: lab.models imports this module

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


# ---------------------------------------------------------------- host probe and machine identity


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What decides pass costs here: CPU model and its bf16-relevant flags, torch, threads, GPU name."""
    device = torch.device(device)
    flags: list[str] = []
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in CPU_FLAGS if f in present]
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def machine_key(info: dict[str, Any]) -> str:
    """A short stable name for a machine (hash of ``machine_info``)."""
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]


# The host probe's shape: a Qwen2.5-1.5B MLP projection read by 1 and by 5 token rows.
PROBE_IN, PROBE_OUT, PROBE_ROWS = 1536, 8960, (1, 5)


def probe_float_precision(device: str | torch.device = "cpu", repeats: int = 15) -> dict[str, Any]:
    """Which float precision decodes faster on this host, from a one-second matmul probe (no model needed).

    Times ``x @ W.T`` with W [8960, 1536] (a 1.5B model's MLP projection) for 1
    and 5 rows of x, in bf16 and fp32, medians of ``repeats``. A pass of a real
    model is dominated by such products, so the probe tells whether bf16 runs
    natively (cheaper than fp32: half the bytes read) or is emulated (dearer).
    Returns {"precision": the faster at 5 rows, "ms": {precision: {rows: ms}}}.
    On CUDA the answer is bf16 where supported, else fp16, without timing.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"precision": "bf16" if torch.cuda.is_bf16_supported() else "fp16", "ms": {}}
    generator = torch.Generator().manual_seed(0)
    weight32 = torch.randn(PROBE_OUT, PROBE_IN, generator=generator)
    ms: dict[str, dict[int, float]] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        weight = weight32.to(dtype)
        ms[name] = {}
        for rows in PROBE_ROWS:
            x = torch.randn(rows, PROBE_IN, generator=generator).to(dtype)
            times = []
            for i in range(repeats + 1):
                start = time.perf_counter()
                torch.nn.functional.linear(x, weight)
                if i:
                    times.append((time.perf_counter() - start) * 1e3)
            ms[name][rows] = statistics.median(times)
    rows = PROBE_ROWS[-1]
    return {"precision": min(ms, key=lambda name: ms[name][rows]), "ms": ms}


_PROBED: dict[str, dict[str, Any]] = {}


def host_probe(device: str | torch.device = "cpu") -> dict[str, Any]:
    """``probe_float_precision(device)``, measured once per process and device."""
    key = str(torch.device(device))
    if key not in _PROBED:
        _PROBED[key] = probe_float_precision(device)
    return _PROBED[key]


def host_float_precision(device: str | torch.device = "cpu") -> str:
    """The float precision the host probe found faster (see :func:`probe_float_precision`)."""
    return host_probe(device)["precision"]
