"""A trimmed draft vocabulary: the draft scores only the N most frequent target tokens.

A draft's LM head over a 50k-150k vocabulary is a large share of the weights it
reads per token (about 28 % for Qwen2.5 0.5B). FR-Spec (Zhao et al. 2025,
"FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked
Speculative Sampling"), VocabTrim (Goel et al. 2025) and EAGLE-3's ``d2t`` map
keep only the rows of the N tokens the target emits most often. The target still
verifies over its full vocabulary, so nothing about exactness changes:

- greedy: a drafted token is kept only where it is the target's argmax; a token
  outside the subset is simply never drafted, and the target emits it itself;
- sampling: the draft distribution is zero outside the subset, so the
  acceptance rule min(1, target/draft) never divides by zero for a drafted
  token, and the residual max(0, target - draft) keeps all of the target's mass
  on tokens outside the subset: they are emitted as recovered tokens.

The frequency table counts the tokens of target-generated text
(``lab.studies.token_frequencies``; ``python -m lab token-freq``) and is cached
next to the prepared models, under ``cache_dir() / vocab / <target>.json``;
this module reads and writes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

VOCAB_FOLDER = "vocab"


class TrimmedLMHead(torch.nn.Module):
    """An LM head that scores only ``subset`` rows and gives -inf to every other token.

    weight: [V, H] the full head's weight; subset: [N] int64 token ids (unique).
    forward: hidden [..., H] -> logits [..., V] in the weight's dtype, -inf outside
    the subset. Only N x H weights are read; filling V logits costs V writes.
    """

    def __init__(self, weight: torch.Tensor, subset: torch.Tensor) -> None:
        super().__init__()
        subset = torch.as_tensor(subset, dtype=torch.long)
        if subset.ndim != 1 or subset.numel() == 0:
            raise ValueError(f"a trimmed head requires a non-empty [N] subset of token ids; got shape {tuple(subset.shape)}")
        if int(subset.max()) >= weight.shape[0] or int(subset.min()) < 0:
            raise ValueError(f"a trimmed head requires token ids in 0..{weight.shape[0] - 1}; got {int(subset.min())}..{int(subset.max())}")
        self.vocab_size = int(weight.shape[0])
        self.register_buffer("subset", subset.to(weight.device), persistent=False)
        self.weight = torch.nn.Parameter(weight.detach()[self.subset].clone(), requires_grad=False)  # [N, H]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = torch.nn.functional.linear(hidden, self.weight)  # [..., N]
        logits = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))  # [..., V]
        return logits.index_copy_(-1, self.subset, scores)


def trimmed_view(model: torch.nn.Module, subset: torch.Tensor) -> torch.nn.Module:
    """A causal LM sharing every weight with ``model`` except its LM head, trimmed to ``subset``.

    model: a transformers causal LM with ``lm_head`` (read, never changed).
    subset: [N] int64 token ids the draft may propose.
    Returns a shallow copy whose logits are [B, T, V] with -inf outside the subset.
    One view per model and subset is made and then reused: the trimmed rows are
    copied once, and a static or compiled engine (``lab.kv``) keeps its cache
    and graphs across decodes.
    """
    subset = torch.as_tensor(subset, dtype=torch.long)
    key = hashlib.sha256(subset.cpu().numpy().tobytes()).hexdigest()
    views = _VIEWS.setdefault(model, {})
    if key not in views:
        views[key] = _make_trimmed_view(model, subset)
    return views[key]


# model -> {sha256 of the subset: view}
_VIEWS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def _make_trimmed_view(model: torch.nn.Module, subset: torch.Tensor) -> torch.nn.Module:
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._parameters = dict(model._parameters)
    view._buffers = dict(model._buffers)
    view.lm_head = TrimmedLMHead(model.lm_head.weight, subset)
    return view


def top_tokens(counts: torch.Tensor, n: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The ``n`` most frequent token ids (ties: lower id first), plus ``always`` (e.g. EOS), sorted.

    counts: [V] int64 or float token counts. Returns [min(n, V) (+ always)] int64.
    Raises ValueError unless n >= 1.
    """
    if n < 1:
        raise ValueError(f"a trimmed vocabulary requires N >= 1; got {n}")
    order = torch.argsort(-counts.double(), stable=True)[: min(n, counts.numel())]
    ids = set(order.tolist()) | {int(t) for t in always if 0 <= int(t) < counts.numel()}
    return torch.tensor(sorted(ids), dtype=torch.long)


def frequency_path(target_name: str) -> Path:
    """Where a target's frequency table is cached: ``cache_dir() / vocab / <name>.json``."""
    from lab.models import cache_dir

    safe = Path(str(target_name)).name or "model"
    return cache_dir() / VOCAB_FOLDER / f"{safe}.json"


def find_frequencies(target_name: str) -> Path:
    """The frequency table to use for a target: the model cache's, else one shipped in ``assets/vocab/``
    (beside the head shipped in ``assets/heads/``). Returns the cache path (which may not exist) when neither
    holds one, so ``load_frequencies`` can say how to build it."""
    from lab.prompts import REPO_ROOT

    cached = frequency_path(target_name)
    shipped = REPO_ROOT / "assets" / VOCAB_FOLDER / cached.name
    return shipped if not cached.exists() and shipped.exists() else cached


def save_frequencies(counts: torch.Tensor, path: Path, meta: dict | None = None) -> Path:
    """Write counts (sparse: id -> count) with a sha256 of them; returns path."""
    nonzero = counts.nonzero().flatten().tolist()
    table = {str(i): int(counts[i]) for i in nonzero}
    body = json.dumps(table, sort_keys=True)
    record = {"vocab_size": int(counts.numel()), "sha256": hashlib.sha256(body.encode()).hexdigest(),
              "meta": meta or {}, "counts": table}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def load_frequencies(path: Path) -> torch.Tensor:
    """[V] int64 counts from ``save_frequencies``' file.

    Raises FileNotFoundError with the command to build it, ValueError when the checksum fails.
    """
    if not path.exists():
        raise FileNotFoundError(
            f"No token frequency table at {path}: build it with `python -m lab token-freq --target {path.stem}`."
        )
    record = json.loads(path.read_text())
    body = json.dumps(record["counts"], sort_keys=True)
    if hashlib.sha256(body.encode()).hexdigest() != record["sha256"]:
        raise ValueError(f"The token frequency table {path} fails its checksum: rebuild it with `python -m lab token-freq`.")
    counts = torch.zeros(int(record["vocab_size"]), dtype=torch.long)
    for token, count in record["counts"].items():
        counts[int(token)] = count
    return counts
