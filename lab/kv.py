"""One KV-cache protocol for the decode loop: B rows in one cache, each row at its own length.

The ragged-batch trap: rows of one batch accept different numbers of drafted
tokens per step, so after one step they no longer line up. A cache that keeps
one shared length (one crop, one position counter) misaligns every row but the
one it follows. Here every row keeps its own length, and the position id of a
token is the number of that row's tokens before it.

Two implementations of ``KVCache``, picked by the engine mode (``EngineMode``):

- ``RaggedCache`` (``"eager"``): a transformers ``DynamicCache`` of
  [B, heads, slots, head_dim] that grows with each pass, plus a [B, slots] mask
  of which slots hold one of the row's tokens. Padding of a shorter row and
  rejected drafts are holes (masked); DynamicCache cannot crop one row, so
  rollback punches holes, slots that are holes in every row are cut off, and
  the cache is compacted when holes waste too much of it. At B = 1 there are
  never holes, so a pass is a plain cached forward and rollback a crop. The CPU
  default, where a pass is bound by the weights.
- ``StaticKVCache`` (``"static"`` and ``"compiled"``): fixed tensors of
  [bucket, heads, capacity, head_dim], where bucket is B rounded up to a power
  of two (``batch_bucket``) and capacity the longest sequence rounded up to
  ``STATIC_LENGTH_STEP``. Row b's tokens sit in slots 0 .. length_b - 1; a pass
  writes row b's new tokens at slots length_b, length_b + 1, ... (a scatter at
  the tokens' own positions) and attends through a 4-D mask (each query sees
  its row's slots up to its own position). Rollback only moves the host's
  per-row lengths back: stale K/V beyond a row's length are overwritten before
  any query can see them. A pass of a declared width (1 for a draft step, K+1
  for a verify pass) is padded to that width, so nothing is ever reshaped;
  compiled, each (width, bucket) is one graph captured by ``torch.compile``
  (CUDA graphs on a GPU) and replayed whatever the acceptance pattern. Rows
  that finish leave the bucket; when the batch fits a smaller bucket, the
  live rows move to a cache of that bucket. The default on CUDA, where an
  eager pass is bound by the host.

Prefill and passes of undeclared width run eagerly into the same cache.
``lengths`` is the host's own count of each row's tokens: reading it costs no
device sync.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, get_args, runtime_checkable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer

EngineMode = Literal["auto", "eager", "static", "compiled"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]
PAD_TOKEN_ID = 0  # fed in padded slots; any id works, the slot is masked or overwritten
COMPACT_MIN_WASTED_SLOTS = 8
STATIC_LENGTH_STEP = 256  # a static cache is sized up to a multiple of this, so most decodes reuse it
RECOMPILE_LIMIT = 64

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
        # All models of one architecture share the forward's code, and each (width, bucket) is a graph of it:
        # K = 1..16, batch buckets, drafts and layer-skip views need more than dynamo's default of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        per_model[key] = torch.compile(model.forward, backend=backend, mode=None if backend != "inductor" else mode,
                                       fullgraph=True, dynamic=False)
    return per_model[key]


def batch_bucket(batch_size: int) -> int:
    """The padded batch size a static cache holds: the next power of two (1, 2, 4, 8, ...).

    Raises ValueError for batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_bucket requires batch_size >= 1; got {batch_size}")
    return 1 << (batch_size - 1).bit_length()


def keep_last(count: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``logits_to_keep`` for a forward pass over ``width`` tokens that needs the last ``count`` positions' logits.

    Returns int64 [count] on ``device``: the positions width-count .. width-1, an
    index tensor that transformers' causal LMs take in place of an int.

    Why not ``logits_to_keep=count``: the model then applies its LM head to the
    slice ``hidden[:, -count:, :]``, whose outer stride stays width x hidden. On
    the CPU, PyTorch 2.13's bfloat16 ``F.linear`` takes a slow path for such a
    3-D input: measured here 166-480 ms instead of 8-16 ms for SmolLM2's head
    (batch 1), 1158 ms instead of 13 ms at batch 4. Indexing with a tensor
    copies the rows into a fresh, plainly strided tensor, and the head runs at
    full speed.

    Raises ValueError unless 1 <= count <= width.
    """
    if not 1 <= count <= width:
        raise ValueError(f"keep_last requires 1 <= count <= width; got count={count}, width={width}")
    return torch.arange(width - count, width, device=device)


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty DynamicCache for a causal LM (batch 1 passes outside the decode loop: timing, training)."""
    return DynamicCache(config=model.config)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer of a batch-1 DynamicCache (roll back the rest).

    Raises ValueError if length is negative or longer than the cache.
    """
    current = cache.get_seq_length()
    if not 0 <= length <= current:
        raise ValueError(f"crop_cache requires 0 <= length <= {current}; got {length}")
    if length < current:
        cache.crop(length - current)


@runtime_checkable
class KVCache(Protocol):
    """The decode loop's view of one model's KV cache over B rows (see the module docstring).

    lengths: per row, the tokens it holds (host ints). mode: "eager", "static" or "compiled".
    """

    mode: str
    lengths: list[int]

    @property
    def batch_size(self) -> int: ...

    @property
    def num_slots(self) -> int:
        """Slots per row the cache spans now (holes included): what an attention pass reads."""

    def forward(self, rows: Sequence[torch.Tensor], width: int | None = None, last_only: bool = False) -> torch.Tensor:
        """Feed row b its new tokens rows[b] ([n_b] int64, n_b >= 0) after its cached ones, in one pass.

        width: the pass's declared width (n_b <= width): static caches pad to it
            (and, compiled, replay its graph); None runs at max n_b, eagerly.
        Returns logits [B, W, V] with row b's own in columns 0 .. n_b - 1, or, with
        last_only, [B, V]: each row's logits after its last new token (rows
        with n_b = 0 get a meaningless row).
        """

    def keep(self, lengths: Sequence[int]) -> None:
        """Roll back: row b keeps its first lengths[b] tokens."""

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows (indices into the current batch, in order); the others stop costing work."""

    def trim(self) -> None:
        """Give back space that rollback left unused (between steps)."""


def new_kv_cache(
    model: torch.nn.Module, batch_size: int, mode: str, max_length: int = 0, backend: str = "inductor"
) -> "RaggedCache | StaticKVCache":
    """An empty cache of ``batch_size`` rows for ``model`` in a resolved engine mode.

    max_length: the most tokens a row will hold, padding included (static modes).
    Raises ValueError for an unknown mode, batch_size < 1, or a sliding-window model.
    """
    if mode == "eager":
        return RaggedCache(model, batch_size)
    if mode in ("static", "compiled"):
        return StaticKVCache(model, batch_size, max_length, compiled=mode == "compiled", backend=backend)
    raise ValueError(f"a KV cache requires mode 'eager', 'static' or 'compiled'; got {mode!r}")


def _last_columns(counts: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a right-padded pass: the distinct last columns to compute ([C] int64) and each row's index into them ([B])."""
    last = [max(n - 1, 0) for n in counts]
    columns = sorted(set(last))
    where = {c: i for i, c in enumerate(columns)}
    return (torch.tensor(columns, dtype=torch.long, device=device),
            torch.tensor([where[c] for c in last], dtype=torch.long, device=device))


def _pick_last(logits: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """logits [B, C, V] -> [B, V]: row b's column which[b]."""
    return logits[torch.arange(logits.shape[0], device=logits.device), which]


def _right_padded(rows: Sequence[torch.Tensor], batch: int, width: int) -> tuple[torch.Tensor, list[int]]:
    """[batch, width] int64 CPU ids with row b's tokens in columns 0 .. n_b - 1, and the counts n_b."""
    counts = [int(r.shape[0]) for r in rows]
    ids = torch.full((batch, width), PAD_TOKEN_ID, dtype=torch.long)
    for b, tokens in enumerate(rows):
        if counts[b]:
            ids[b, : counts[b]] = tokens.cpu()
    return ids, counts


def _check_full_attention(cache: Cache) -> None:
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError("the lab's caches require full-attention layers; got a sliding-window model")


# ---------------------------------------------------------------- eager: a growing ragged cache


class RaggedCache:
    """An eager cache shared by B rows, each of which sees only its own valid slots (see the module docstring).

    cache: a DynamicCache, per layer keys/values of [B, heads, S, head_dim].
    valid: [B, S] bool on the model's device; True where the slot holds the
        K/V of one of that row's tokens, in order.
    max_waste, min_wasted_slots: when ``trim`` compacts (see there).

    Raises ValueError for a model with sliding-window layers (their window
    counts slots, holes included, so it would not be the row's window).
    """

    mode = "eager"

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        max_waste: float = 0.25,
        min_wasted_slots: int = COMPACT_MIN_WASTED_SLOTS,
    ) -> None:
        self.model = model
        self.max_waste = max_waste
        self.min_wasted_slots = min_wasted_slots
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        _check_full_attention(self.cache)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)  # [B, S]
        self.lengths = [0] * batch_size
        self.dense = True  # every slot valid (no holes, no padding): always so at B = 1 from the start

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    @property
    def layers(self) -> list:
        """transformers' per-layer caches (``.keys``, ``.values``: [B, heads, slots, head_dim]), for inspection."""
        return self.cache.layers

    def forward(self, rows: Sequence[torch.Tensor], width: int | None = None, last_only: bool = False) -> torch.Tensor:
        if len(rows) != self.batch_size:
            raise ValueError(f"RaggedCache.forward requires {self.batch_size} rows; got {len(rows)}")
        width = max(1, max(int(r.shape[0]) for r in rows))  # eager: the pass's own width
        input_ids, counts = _right_padded(rows, self.batch_size, width)
        dense = self.dense and all(n == width for n in counts)
        keep = 0
        if last_only:
            columns, which = _last_columns(counts, self.device)
            keep = columns  # an index tensor, never an int: see keep_last
        new_valid = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]  # [B, W]
        new_valid = new_valid.to(self.device)
        if dense:
            # No holes and no padding (always so at B = 1): a plain cached pass.
            out = self.model(input_ids.to(self.device), cache=self.cache, use_cache=True, logits_to_keep=keep)
        else:
            lengths = torch.tensor(self.lengths, device=self.device)
            position_ids = lengths[:, None] + torch.arange(width, device=self.device)  # [B, W]; pads are holes
            attention_mask = torch.cat([self.valid, new_valid], dim=1)  # [B, S+W]
            out = self.model(
                input_ids.to(self.device),
                attention_mask=attention_mask.long(),
                position_ids=position_ids,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.lengths = [length + n for length, n in zip(self.lengths, counts)]
        self.dense = dense
        return _pick_last(out.logits, which) if last_only else out.logits

    def forward_tree(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """B = 1 without holes: feed tokens [n] int64 after the cached ones through a 4-D additive mask
        ([1, 1, n, cached + n]) at the given position ids ([1, n]); returns logits [1, n, V] (``lab.tree``)."""
        if self.batch_size != 1 or not self.dense:
            raise ValueError(f"a tree pass requires a one-row cache without holes; got {self.batch_size} rows")
        out = self.model(tokens[None].to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), cache=self.cache, use_cache=True)
        n = int(tokens.shape[0])
        self.valid = torch.cat([self.valid, torch.ones(1, n, dtype=torch.bool, device=self.device)], dim=1)
        self.lengths = [self.lengths[0] + n]
        return out.logits

    def keep_slots(self, slots: Sequence[int]) -> None:
        """B = 1 without holes: keep only these slots, in this order (a tree's accepted path into place).

        Copies the kept K/V of every layer (one gather); the row then holds len(slots) tokens.
        """
        if self.batch_size != 1 or not self.dense:
            raise ValueError(f"keep_slots requires a one-row cache without holes; got {self.batch_size} rows")
        slots = [int(s) for s in slots]
        if slots == list(range(len(slots))):
            self._slice(0, len(slots))  # the path already sits in place (a chain, or nothing accepted)
        else:
            index = torch.tensor(slots, dtype=torch.long, device=self.device)
            for layer in self.cache.layers:
                if getattr(layer, "is_initialized", False):
                    layer.keys = layer.keys.index_select(2, index)
                    layer.values = layer.values.index_select(2, index)
            self.valid = self.valid[:, : len(slots)]
        self.lengths = [len(slots)]

    def keep(self, lengths: Sequence[int]) -> None:
        lengths = [int(n) for n in lengths]
        if any(not 0 <= n <= have for n, have in zip(lengths, self.lengths)) or len(lengths) != self.batch_size:
            raise ValueError(f"RaggedCache.keep requires 0 <= lengths[b] <= {self.lengths}; got {lengths}")
        if self.dense and len(set(lengths)) == 1:
            self._slice(0, lengths[0])  # no holes before, none after: a crop (always so at B = 1)
        else:
            self.dense = False
            limit = torch.tensor(lengths, device=self.device)[:, None]  # [B, 1]
            self.valid = self.valid & (self.valid.long().cumsum(-1) <= limit)
        self.lengths = lengths

    def select(self, rows: Sequence[int]) -> None:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        if self.num_slots:
            self.cache.batch_select_indices(index)
        self.valid = self.valid[index]
        self.lengths = [self.lengths[i] for i in rows]

    def trim(self) -> None:
        """Cut slots that are holes in every row; compact when holes still waste > max_waste of the slots.

        Compaction copies the cache (about one attention pass over it), so it
        waits until at least min_wasted_slots slots would go. It moves each
        row's valid slots to the right end (order kept), so the cache shrinks to
        the longest row's token count.
        """
        if self.dense or self.num_slots == 0:
            return
        used = self.valid.any(0).nonzero().flatten()  # slots some row needs
        if used.numel() == 0:
            self._slice(0, 0)
            return
        first, last = int(used[0]), int(used[-1]) + 1
        if first > 0 or last < self.num_slots:
            self._slice(first, last)
        longest = max(self.lengths)
        wasted = self.num_slots - longest
        if wasted >= max(1, self.min_wasted_slots) and wasted > self.max_waste * self.num_slots:
            self._compact(longest)
        self.dense = bool(self.valid.all())

    def _slice(self, first: int, last: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.keys = layer.keys[:, :, first:last]
                layer.values = layer.values[:, :, first:last]
        self.valid = self.valid[:, first:last]

    def _compact(self, length: int) -> None:
        # A stable sort puts holes first and valid slots after, in their order.
        order = torch.sort(self.valid.to(torch.int8), dim=-1, stable=True).indices[:, -length:]  # [B, L]
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = layer.keys.gather(2, index)
                layer.values = layer.values.gather(2, index)
        self.valid = self.valid.gather(1, order)


# ---------------------------------------------------------------- static and compiled: fixed shapes


class _RowSlots(Cache):
    """A transformers ``Cache`` of fixed [bucket, heads, capacity, head_dim] tensors that writes each row's new
    K/V at that row's own slots (``slots``, set before every pass), not at one shared position."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[StaticLayer(max_cache_len=capacity) for _ in range(num_layers)])
        self.capacity = capacity
        self.slots: torch.Tensor | None = None  # [bucket, W] int64: where row b's j-th new token goes

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        index = self.slots[:, None, :, None]  # [bucket, 1, W, 1]
        layer.keys.scatter_(2, index.expand_as(key_states), key_states)
        layer.values.scatter_(2, index.expand_as(value_states), value_states)
        return layer.keys, layer.values

    @property
    def bucket(self) -> int | None:
        layer = self.layers[0]
        return layer.keys.shape[0] if layer.is_initialized else None


# model -> idle storages. A static cache's tensors are reused across decodes (their addresses stay, so captured
# graphs replay), but never by two decodes at once: a cache takes a storage and gives it back when released.
_IDLE: "weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[int, _RowSlots]]]" = weakref.WeakKeyDictionary()
_IDLE_LOCK = threading.Lock()


def _take_storage(model: torch.nn.Module, bucket: int, capacity: int) -> tuple[int, _RowSlots]:
    with _IDLE_LOCK:
        idle = _IDLE.get(model, [])
        for i, (held_bucket, storage) in enumerate(idle):
            if held_bucket == bucket and storage.capacity >= capacity:
                return idle.pop(i)
    layers = model.config.get_text_config().num_hidden_layers
    storage = _RowSlots(layers, capacity)
    _check_full_attention(storage)
    return bucket, storage


def _give_back(model: torch.nn.Module, bucket: int, storage: _RowSlots) -> None:
    with _IDLE_LOCK:
        idle = _IDLE.setdefault(model, [])
        if all(s is not storage for _, s in idle):
            idle.append((bucket, storage))


def idle_storages(model: torch.nn.Module) -> int:
    """Static cache storages kept for ``model`` (for tests: a decode gives back what it took)."""
    with _IDLE_LOCK:
        return len(_IDLE.get(model, []))


class StaticKVCache:
    """A static cache over B rows in a batch bucket (see the module docstring).

    model: a transformers causal LM, only read. batch_size: B >= 1.
    max_length: the most tokens a row will hold, padding included; the capacity
        is it rounded up to ``STATIC_LENGTH_STEP``.
    compiled: passes of a declared width run through ``compiled_forward``.

    Storage comes from a per-model pool and goes back on ``release`` (or when
    the cache is garbage-collected). Raises ValueError for a sliding-window model.
    """

    def __init__(
        self, model: torch.nn.Module, batch_size: int, max_length: int, compiled: bool = False,
        backend: str = "inductor",
    ) -> None:
        self.model = model
        self.mode = "compiled" if compiled else "static"
        self.backend = backend
        self.device = next(model.parameters()).device
        self._compiled = compiled_forward(model, backend) if compiled else None
        self.capacity = -(-max(max_length, 1) // STATIC_LENGTH_STEP) * STATIC_LENGTH_STEP
        self.lengths = [0] * batch_size
        self._finalizer = None
        self._attach(*_take_storage(model, batch_bucket(batch_size), self.capacity))

    def _attach(self, bucket: int, storage: _RowSlots) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self.bucket, self.storage = bucket, storage
        self.capacity = storage.capacity
        self._finalizer = weakref.finalize(self, _give_back, self.model, bucket, storage)

    def release(self) -> None:
        """Give the storage back to the pool (once); the cache is unusable afterwards."""
        self._finalizer()

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def num_slots(self) -> int:
        return self.capacity

    @property
    def layers(self) -> list:
        """transformers' per-layer caches (``.keys``, ``.values``: [bucket, heads, capacity, head_dim]), for inspection."""
        return self.storage.layers

    def forward(self, rows: Sequence[torch.Tensor], width: int | None = None, last_only: bool = False) -> torch.Tensor:
        if len(rows) != self.batch_size:
            raise ValueError(f"StaticKVCache.forward requires {self.batch_size} rows; got {len(rows)}")
        longest = max(int(r.shape[0]) for r in rows)
        if width is not None and longest > width:
            raise ValueError(f"StaticKVCache.forward requires n_b <= width; got n_b={longest}, width={width}")
        padded = width if width is not None else max(1, longest)
        if max(self.lengths) + padded > self.capacity:
            raise ValueError(
                f"the static cache holds {self.capacity} tokens a row; a pass of {padded} after "
                f"{max(self.lengths)} does not fit (make it with a larger max_length)"
            )
        input_ids, counts = _right_padded(rows, self.bucket, padded)  # rows past B are idle: pads at slot 0..
        starts = torch.tensor(self.lengths + [0] * (self.bucket - self.batch_size), device=self.device)
        position_ids = starts[:, None] + torch.arange(padded, device=self.device)  # [bucket, W]
        slots = torch.arange(self.capacity, device=self.device)
        visible = slots[None, None, None, :] <= position_ids[:, None, :, None]  # [bucket, 1, W, capacity]
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        attention_mask = torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill_(
            ~visible, torch.finfo(dtype).min
        )
        self.storage.slots = position_ids
        inputs = dict(attention_mask=attention_mask, position_ids=position_ids, cache=self.storage, use_cache=True)
        if self._compiled is not None and width is not None:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
            # Every position's logits, always: one graph per (width, bucket), whatever the caller keeps.
            logits = self._compiled(input_ids.to(self.device), **inputs).logits[: self.batch_size].clone()
            if last_only:
                logits = _pick_last(logits, torch.tensor([max(n - 1, 0) for n in counts], device=self.device))
        else:
            keep = 0
            if last_only:
                keep, which = _last_columns(counts, self.device)
            logits = self.model(input_ids.to(self.device), logits_to_keep=keep, **inputs).logits[: self.batch_size]
            if last_only:
                logits = _pick_last(logits, which)
        self.lengths = [length + n for length, n in zip(self.lengths, counts)]
        return logits

    def keep(self, lengths: Sequence[int]) -> None:
        lengths = [int(n) for n in lengths]
        if any(not 0 <= n <= have for n, have in zip(lengths, self.lengths)) or len(lengths) != self.batch_size:
            raise ValueError(f"StaticKVCache.keep requires 0 <= lengths[b] <= {self.lengths}; got {lengths}")
        self.lengths = lengths  # stale K/V beyond are overwritten before any query sees them

    def select(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        bucket = batch_bucket(max(1, len(rows)))
        layers = [layer for layer in self.storage.layers if layer.is_initialized]
        if bucket < self.bucket and layers:
            old = self.storage
            self._attach(*_take_storage(self.model, bucket, self.capacity))
            for layer, source in zip(self.storage.layers, old.layers):
                if not layer.is_initialized:
                    layer.lazy_initialization(source.keys[:bucket], source.values[:bucket])
                held = source.keys.shape[2]  # a pooled storage may be longer than the old one
                layer.keys[: len(rows), :, :held].copy_(source.keys.index_select(0, index))
                layer.values[: len(rows), :, :held].copy_(source.values.index_select(0, index))
            _give_back(self.model, batch_bucket(len(self.lengths)), old)
        else:
            for layer in layers:
                layer.keys[: len(rows)] = layer.keys.index_select(0, index)
                layer.values[: len(rows)] = layer.values.index_select(0, index)
        self.lengths = [self.lengths[i] for i in rows]

    def trim(self) -> None:
        pass  # nothing to give back: rollback already moved the lengths
