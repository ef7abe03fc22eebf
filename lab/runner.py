"""One model's forward passes over its own KV cache: eager, static, or captured.

Where a decode step is bound by the host (a GPU in eager PyTorch: Python, the
dispatcher and one kernel launch per op set the step, not the weights), a small
draft costs as much per token as the big target, and speculation with a draft
model cannot pay. The cure, as in gpt-fast and vLLM, is to take the host out
of the step: a cache of fixed shape, passes of fixed width, and the pass
captured once (``torch.compile``, CUDA graphs on a GPU) and replayed.

Three modes (``EngineMode``):

- ``"eager"``: a transformers ``DynamicCache`` that grows with each pass and is
  cropped on rollback; every pass runs eagerly at its own width. The default on
  a CPU, where a pass is bound by the weights and compilation buys little.
- ``"static"``: a transformers ``StaticCache`` of fixed length. A pass of a
  declared width (1 for a draft step, K+1 for a verify pass) is padded to that
  width; rollback only moves the cache's position back (its length counter is a
  tensor, moved in place), so nothing is reshaped and nothing re-prefilled. The
  K/V written by padding or by rejected drafts lie beyond the position and are
  overwritten before any query can see them (the causal mask hides them).
- ``"compiled"``: ``"static"`` with each declared width run through
  ``torch.compile(fullgraph=True, dynamic=False)``; on CUDA in
  ``mode="reduce-overhead"`` (CUDA graphs). One graph per width and model,
  whatever the acceptance pattern: the cache position is a tensor, so no value
  the host changes reaches a guard. The default on CUDA.

Prefill and other passes of undeclared width run eagerly into the same cache.
``length`` is the host's own count of the tokens the cache holds, so reading it
costs no device sync.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Literal, get_args

import torch
from transformers import DynamicCache, StaticCache

from lab.cache import keep_last

EngineMode = Literal["auto", "eager", "static", "compiled"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]
RECOMPILE_LIMIT = 64
STATIC_LENGTH_STEP = 256  # a static cache is sized up to a multiple of this, so most decodes reuse it

# model -> {(backend, mode): compiled forward}: compiling is expensive, so each model compiles once.
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], Callable]]" = weakref.WeakKeyDictionary()


def resolve_engine_mode(mode: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"compiled"`` on CUDA, ``"eager"`` elsewhere; other modes as given.

    Raises ValueError for an unknown mode.
    """
    if mode not in get_args(EngineMode):
        raise ValueError(f"engine mode requires one of {', '.join(get_args(EngineMode))}; got {mode!r}")
    if mode == "auto":
        return "compiled" if torch.device(device).type == "cuda" else "eager"
    return mode


def compiled_forward(model: torch.nn.Module, backend: str = "inductor") -> Callable:
    """``model.forward`` under ``torch.compile(fullgraph=True, dynamic=False)``, made once per model and backend.

    On CUDA with the inductor backend the mode is ``"reduce-overhead"`` (the pass
    is captured as a CUDA graph and replayed). ``backend="eager"`` traces with
    dynamo but runs the captured graph eagerly: a cheap way to test that a decode
    keeps to a fixed set of graphs. Raises ValueError for an unknown backend.
    """
    if backend not in get_args(CompileBackend):
        raise ValueError(f"compile backend requires one of {', '.join(get_args(CompileBackend))}; got {backend!r}")
    device = next(model.parameters()).device
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else "default"
    per_model = _COMPILED.setdefault(model, {})
    key = (backend, mode)
    if key not in per_model:
        # All models of one architecture share the forward's code, and each width is a graph of it: K = 1..16,
        # drafts and layer-skip views need more than dynamo's default of 8 before it gives up compiling.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        per_model[key] = torch.compile(model.forward, backend=backend, mode=None if backend != "inductor" else mode,
                                       fullgraph=True, dynamic=False)
    return per_model[key]


class KVRunner:
    """Runs one causal LM's passes over its KV cache (see the module docstring).

    model: a transformers causal LM, batch 1, only read.
    mode: ``"eager"``, ``"static"`` or ``"compiled"`` (resolve ``"auto"`` first
        with :func:`resolve_engine_mode`).
    backend: the ``torch.compile`` backend of the compiled mode.

    Raises ValueError for an unknown mode or backend.
    """

    def __init__(self, model: torch.nn.Module, mode: str = "eager", backend: str = "inductor") -> None:
        if mode not in ("eager", "static", "compiled"):
            raise ValueError(f"KVRunner requires mode 'eager', 'static' or 'compiled'; got {mode!r}")
        self.model = model
        self.mode = mode
        self.backend = backend
        self.device = next(model.parameters()).device
        self._compiled = compiled_forward(model, backend) if mode == "compiled" else None
        self.cache: DynamicCache | StaticCache | None = None
        self.capacity = 0  # tokens the static cache can hold
        self.length = 0  # tokens the cache holds (host count: no device sync to read)

    @property
    def is_static(self) -> bool:
        return self.mode != "eager"

    def reset(self, max_length: int) -> None:
        """Empty the cache for a new sequence of at most ``max_length`` tokens (padding included).

        A static cache is kept when large enough (same addresses: captured graphs
        replay) and otherwise replaced by one of ``max_length`` rounded up to
        ``STATIC_LENGTH_STEP``. Raises ValueError if max_length < 1.
        """
        if max_length < 1:
            raise ValueError(f"KVRunner.reset requires max_length >= 1; got {max_length}")
        if not self.is_static:
            self.cache = DynamicCache(config=self.model.config)
        elif self.cache is None or self.capacity < max_length:
            self.capacity = -(-max_length // STATIC_LENGTH_STEP) * STATIC_LENGTH_STEP
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.capacity)
        elif self.length:
            self.cache.crop(-self.length)  # moves the position tensor back to 0, in place
        self.length = 0

    def forward(self, input_ids: torch.Tensor, width: int | None = None, last_only: bool = False) -> torch.Tensor:
        """Feed ``input_ids`` [1, n] int64 after the cached tokens; returns logits [n, V] (or [1, V] with last_only).

        width: the pass's declared width (n <= width). In the static modes the
            input is padded to it and, when compiled, runs through the captured
            graph for that width; None runs the pass eagerly at width n.
        last_only: keep only the last position's logits (drafting, prefill).
        The cache then holds ``length + n`` tokens. Raises ValueError when the
        pass does not fit the cache or n > width.
        """
        n = input_ids.shape[1]
        if n < 1 or (width is not None and n > width):
            raise ValueError(f"KVRunner.forward requires 1 <= n <= width; got n={n}, width={width}")
        padded_width = width if self.is_static and width is not None else n
        if self.is_static and self.length + padded_width > self.capacity:
            raise ValueError(
                f"the static cache holds {self.capacity} tokens; a pass of {padded_width} after {self.length} "
                "does not fit (reset with a larger max_length)"
            )
        if padded_width > n:
            pad = torch.zeros(1, padded_width - n, dtype=input_ids.dtype, device=input_ids.device)
            input_ids = torch.cat([input_ids, pad], dim=1)  # [1, width]
        input_ids = input_ids.to(self.device)
        if self._compiled is not None and width is not None:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
            # Every position's logits, always: one graph per width, whatever the caller keeps.
            logits = self._compiled(input_ids, cache=self.cache, use_cache=True).logits[0, :n].clone()  # [n, V]
        else:
            keep = keep_last(1, n, self.device) if last_only else 0  # an index tensor, never an int: see keep_last
            logits = self.model(input_ids, cache=self.cache, use_cache=True, logits_to_keep=keep).logits[0, :n]
        if padded_width > n:
            self.cache.crop(n - padded_width)  # the padding's K/V lie beyond the position now
        self.length += n
        return logits[-1:] if last_only else logits

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (roll back the rest).

        Raises ValueError if length is negative or longer than the cache.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"KVRunner.crop requires 0 <= length <= {self.length}; got {length}")
        if length < self.length:
            self.cache.crop(length - self.length)
        self.length = length

    def cache_length(self) -> int:
        """Tokens the cache itself says it holds (a device read in the static modes): for checks and tests."""
        return int(self.cache.get_seq_length())


# model -> idle static runners. A static cache is reused across decodes (its addresses stay, so captured
# graphs replay), but never by two decodes at once: a decode takes a runner and gives it back when done.
_IDLE: "weakref.WeakKeyDictionary[torch.nn.Module, list[KVRunner]]" = weakref.WeakKeyDictionary()
_IDLE_LOCK = threading.Lock()


def take_runner(model: torch.nn.Module, mode: str, backend: str = "inductor") -> KVRunner:
    """A runner for ``model`` in ``mode`` (resolved, not "auto"): an idle static one if any, else a new one.

    Give it back with :func:`give_back` when the sequence is done. Eager runners
    are always new (a DynamicCache is cheap to make). Raises ValueError for an
    unknown mode or backend.
    """
    if mode != "eager":
        with _IDLE_LOCK:
            idle = _IDLE.get(model, [])
            for i, runner in enumerate(idle):
                if runner.mode == mode and runner.backend == backend:
                    return idle.pop(i)
    return KVRunner(model, mode, backend)


def give_back(runner: KVRunner) -> None:
    """Return a runner taken with :func:`take_runner` (static ones are kept for the next decode)."""
    if runner.is_static:
        with _IDLE_LOCK:
            idle = _IDLE.setdefault(runner.model, [])
            if all(r is not runner for r in idle):
                idle.append(runner)
