"""Models and tokenizers loaded once per process (``st.cache_resource``), shared by every session.

Shared models are never mutated: decoding keeps its KV caches outside the
model, and drafters that hold caches are built per run by the page.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import streamlit as st
import torch

from lab import hardware, models
from lab.models import LoadedModel, Progress

WARM_UP_TOKENS = 8


@dataclass(frozen=True)
class LoadedInfo:
    """What the sidebar shows about a loaded model: dtype is the compute dtype, precision the weights' ("nf4", ...)."""

    name: str
    device: str
    dtype: str
    num_parameters: int
    weight_bytes: int
    load_s: float
    precision: str = ""


class ModelStore:
    """The models this process holds, one per (model, device, precision), loaded once and shared by every session.

    A precision is one of ``lab.hardware.PRECISIONS``: "bf16", "fp32", "fp16"
    (a dtype) or "int8", "nf4", "fp4" (bitsandbytes). The same model in two
    precisions is two entries: a quantised target and its full-precision
    reference can be held side by side.

    Loading happens outside ``st.cache_resource``'s own function cache on
    purpose: a cached function that draws progress bars would have Streamlit
    replay those elements on every later hit. A lock per key makes two
    sessions asking for the same model wait for one load.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._models: dict[tuple[str, str, str], LoadedModel] = {}

    def get(self, name_or_path: str, device: str, precision: str, progress: Progress | None = None) -> LoadedModel:
        """The loaded model, loading it (with ``progress``) and running one warm-up pass the first time.

        The warm-up makes the first timed decode honest: the first forward pass
        after loading pays one-off setup costs (about a second on CPU). Errors
        are not remembered: the next call tries again.
        """
        key = (name_or_path, device, precision)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self._models:
                loaded = _load(name_or_path, device, precision, progress)
                with torch.inference_mode():
                    loaded.model(torch.zeros(1, WARM_UP_TOKENS, dtype=torch.long, device=loaded.device))
                with self._lock:
                    self._models[key] = loaded
            return self._models[key]

    def contains(self, name_or_path: str, device: str, precision: str) -> bool:
        with self._lock:
            return (name_or_path, device, precision) in self._models

    def loaded(self) -> list[LoadedInfo]:
        with self._lock:
            held = list(self._models.values())
        return [
            LoadedInfo(m.name, str(m.device), str(m.dtype).removeprefix("torch."), m.num_parameters, m.weight_bytes,
                       m.load_s, m.precision)
            for m in held
        ]

    def clear(self) -> None:
        """Forget every model (sessions decoding right now keep theirs until they finish)."""
        with self._lock:
            self._models.clear()


def _load(name_or_path: str, device: str, precision: str, progress: Progress | None) -> LoadedModel:
    """``lab.models.load_model`` in ``precision``: a float precision goes in as the dtype it is, so the call
    stays the original four-argument one for every model that is not quantised."""
    if precision in hardware.QUANTIZED_PRECISIONS:
        return models.load_model(name_or_path, device=device, progress=progress, precision=precision)
    return models.load_model(name_or_path, device=device, dtype=precision, progress=progress)


@st.cache_resource(show_spinner=False)
def model_store() -> ModelStore:
    """The process-wide model store."""
    return ModelStore()


def load_model(name_or_path: str, device: str, precision: str, progress: Progress | None = None) -> LoadedModel:
    """A model from the process-wide store in ``precision`` ("bf16", "nf4", ...; see ``ModelStore.get``)."""
    return model_store().get(name_or_path, device, precision, progress)


def is_loaded(name_or_path: str, device: str, precision: str) -> bool:
    """True when ``load_model`` would return at once."""
    return model_store().contains(name_or_path, device, precision)


@st.cache_resource(show_spinner=False)
def load_tokenizer(name_or_path: str):
    """``lab.models.load_tokenizer`` once per model: checks tokenizers match before loading a draft's weights."""
    return models.load_tokenizer(name_or_path)


@st.cache_resource(show_spinner=False)
def eagle_head(target_name: str):
    """The target's trained EAGLE-style head (``lab.drafters.eagle``), loaded once per process and never mutated.

    Raises FileNotFoundError (from ``lab.drafters.eagle.find_head``) when no head was trained for the target.
    """
    from lab.drafters.eagle import find_head, load_head

    head, _ = load_head(find_head(target_name))
    return head


def free_models() -> None:
    """Drop every loaded model, tokenizer and head (sessions still decoding keep theirs until they finish)."""
    model_store().clear()
    load_tokenizer.clear()
    eagle_head.clear()


def load_with_progress(name: str, device: str, precision: str, slot, what: str) -> LoadedModel:
    """A shared model; its preparation and loading progress shown in ``slot`` the first time, labelled ``what``."""
    if is_loaded(name, device, precision):
        return load_model(name, device, precision)
    bar = slot.progress(0.0, text=f"Loading the {what} {name}…")
    try:
        return load_model(name, device, precision,
                          progress=lambda fraction, message: bar.progress(fraction, text=f"{what}: {message}"))
    finally:
        slot.empty()


def load_for_role(name: str, what: str, runtime, slot) -> LoadedModel:
    """A shared model in the sidebar's precision for its role ("target" or "draft"); preparation and loading
    progress shown in ``slot`` the first time. ``runtime`` is ``app.state.Runtime``."""
    return load_with_progress(name, runtime.device, runtime.precision(what), slot, what)
