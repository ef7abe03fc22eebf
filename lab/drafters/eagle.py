"""An EAGLE-style head: one decoder layer that drafts from the target's own hidden states.

EAGLE (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty"; EAGLE-2/3 refine it) drafts at the feature level. The head reads,
at position t, the target's hidden state there (f_t, here the output of the
target's final norm: what its LM head reads) and the embedding of the next token
x_{t+1}, and predicts the next hidden state f_{t+1}; the target's own LM head
(``lab.vocab``: trimmed or not) turns that into a draft distribution for
x_{t+2}. Drafting K tokens runs the head K times, each time on its own
predicted feature and the token it just drafted.

How the head gets the target's features without touching the decode loop: two
hooks on the target (``TargetFeatures``) record, for every forward pass, the
tokens fed and the final norm's output for them. The engines feed each
committed token exactly once before it can be drafted from (prefill, then
[last committed] + draft at every verify pass), so after rollback the recorded
features are those of every committed token but the last. At each proposal the
drafter keeps the longest recorded prefix that matches the committed tokens (a
rejected draft's features drop out there), feeds the head the new ones, and
drafts.

The head's KV cache rolls back exactly like a draft model's: entries computed
from the target's real features are kept; the entries of drafting steps (made
from predicted features) are cropped at the end of every proposal, so the cache
always equals a fresh pass over the committed tokens.

Nothing here changes what is emitted: the target verifies every drafted token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lab.kv import crop_cache
from lab.drafters.base import Draft, DraftContext, common_prefix_length, draft_token
from lab.drafters.eagle_tree import catch_up, draft_tree_row, fold_tree_features
from lab.tree import DraftTree
from lab.vocab import TrimmedLMHead

HEADS_FOLDER = "heads"
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"


# ---------------------------------------------------------------- the head


@dataclass(frozen=True)
class EagleHeadConfig:
    """Shape of a head; ``for_target`` reads the target's.

    hidden_size: the target's width H (the head reads and predicts H-vectors).
    intermediate_size: the head's MLP width (may be smaller than the target's).
    num_attention_heads, num_key_value_heads, head_dim: the head's attention.
    rope_theta, rms_norm_eps, max_position_embeddings: as the target's.
    vocab_size: the target's logits width V (checked when the head is attached).
    target: the target's name (a preset), for messages and the cache folder.
    feature_layers: target decoder layers (0-based) whose outputs the head reads, concatenated
        and fused to width H by a linear layer (EAGLE-3's low, middle and high features; see
        ``eagle3_layers``); empty: the final norm's output (EAGLE-1).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    vocab_size: int
    target: str = ""
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))  # JSON gives a list

    @classmethod
    def for_target(
        cls, model: torch.nn.Module, intermediate_size: int | None = None, target: str = "", feature_layers: Sequence[int] = ()
    ) -> "EagleHeadConfig":
        """The target's width and attention shape; MLP width ``intermediate_size`` (default: the target's).

        Raises ValueError when a feature layer is not one of the target's.
        """
        c = model.config.get_text_config()
        bad = [i for i in feature_layers if not 0 <= int(i) < c.num_hidden_layers]
        if bad:
            raise ValueError(f"feature layers require 0 .. {c.num_hidden_layers - 1} (the target's layers); got {bad}")
        rope = getattr(c, "rope_parameters", None) or {}
        return cls(
            hidden_size=c.hidden_size,
            intermediate_size=intermediate_size or c.intermediate_size,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
            rms_norm_eps=float(c.rms_norm_eps),
            max_position_embeddings=int(c.max_position_embeddings),
            vocab_size=int(c.vocab_size),
            target=target,
            feature_layers=tuple(int(i) for i in feature_layers),
        )

    def llama_config(self) -> LlamaConfig:
        """A one-layer Llama config of this shape (its own embedding table is unused: one row)."""
        return LlamaConfig(
            vocab_size=1,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=False,
        )


def eagle3_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high feature layers of an ``num_layers``-layer target: (2, L // 2, L - 3)
    (the choice of EAGLE-3's reference code and vLLM's default), deduplicated for tiny targets."""
    return tuple(sorted({min(2, num_layers - 1), num_layers // 2, max(0, num_layers - 3)}))


class EagleHead(torch.nn.Module):
    """fc([f_t ; norm(embed(x_{t+1}))]) -> one decoder layer -> norm = predicted f_{t+1}.

    forward(features [B, T, H], token_embeds [B, T, H], cache) -> [B, T, H] float32.
    The target's LM head reads the result (EAGLE-1's layout; the output norm makes
    it live on the scale of the target's final-norm output). With
    ``config.feature_layers`` the target's recorded features are [B, T, n·H]
    (n layers' outputs side by side) and ``project`` RMS-norms each layer's
    part and fuses them to H first (EAGLE-3); the head's own predictions are
    fed back as they are.
    """

    def __init__(self, config: EagleHeadConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        self.decoder = LlamaModel(config.llama_config())
        self.fuse = torch.nn.Linear(len(config.feature_layers) * h, h, bias=False) if config.feature_layers else None
        # Decoder layers' outputs are raw residual streams: a few "massive activation" dims reach 10^4 while most
        # stay near 1, so each layer's output is RMS-normed (as the target's next layer would) before the fusion.
        self.feature_norms = torch.nn.ModuleList(
            LlamaRMSNorm(h, eps=config.rms_norm_eps) for _ in config.feature_layers
        )

    def project(self, features: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
        """The target's recorded features [..., n·H] fused to [..., H] (identity without feature layers).

        noise: std of Gaussian noise added to the normed features before the fusion (training only; EAGLE-1's
        feature noise); without feature layers it is added to the features, relative to their std.
        """
        if self.fuse is None:
            return features if not noise else features + noise * features.std() * torch.randn_like(features)
        dtype = self.fuse.weight.dtype
        parts = features.to(dtype).chunk(len(self.feature_norms), dim=-1)
        normed = torch.cat([norm(part) for norm, part in zip(self.feature_norms, parts)], dim=-1)
        if noise:
            normed = normed + noise * torch.randn_like(normed)
        return self.fuse(normed)

    def forward(
        self,
        features: torch.Tensor,
        token_embeds: torch.Tensor,
        cache: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """position_ids [B or 1, T] and a boolean attention_mask [B or 1, 1, T, cache + T] (True: attend)
        are for training's unrolled steps (``lab.studies.train_head``); drafting leaves both None (causal, after the cache)."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([features.to(dtype), self.embed_norm(token_embeds.to(dtype))], dim=-1))  # [B, T, H]
        return self.decoder(inputs_embeds=x, cache=cache, use_cache=cache is not None, position_ids=position_ids,
                            attention_mask=attention_mask).last_hidden_state

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.decoder.config)

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


# ---------------------------------------------------------------- save / load


def head_dir(target_name: str) -> Path:
    """Where a target's trained head lives: ``cache_dir() / heads / <target>/``."""
    from lab.models import cache_dir

    return cache_dir() / HEADS_FOLDER / (Path(str(target_name)).name or "model")


def find_head(target_name: str) -> Path:
    """The folder of the head to use for a target: the model cache's, else one shipped in ``assets/heads/``.

    Returns the cache folder (which may not exist) when neither holds one, so
    ``load_head`` can say how to train it.
    """
    from lab.prompts import REPO_ROOT

    trained = head_dir(target_name)
    shipped = REPO_ROOT / "assets" / HEADS_FOLDER / trained.name
    if not (trained / CONFIG_FILE).exists() and (shipped / CONFIG_FILE).exists():
        return shipped
    return trained


def save_head(head: EagleHead, folder: Path, meta: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``head.safetensors`` (weights in ``dtype``) and ``head.json`` (config, sha256 of the weights, meta).

    Returns the folder. The checksum is checked by ``load_head``.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().to("cpu", dtype).contiguous() for name, t in head.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE))
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    record = {"config": asdict(head.config), "sha256": digest, "dtype": str(dtype).removeprefix("torch."), "meta": meta or {}}
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    return folder


def load_head(folder: Path, device: torch.device | str = "cpu") -> tuple[EagleHead, dict]:
    """A saved head (float32, eval mode, no grad) and its metadata.

    Raises FileNotFoundError (with the command that trains one) when absent,
    ValueError when the weights fail their sha256 checksum.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"No EAGLE head in {folder}: train one with `python -m lab train-head --target {folder.name}`."
        )
    record = json.loads((folder / CONFIG_FILE).read_text())
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    if digest != record["sha256"]:
        raise ValueError(
            f"The EAGLE head in {folder} fails its checksum (sha256 {digest[:12]}…, expected {record['sha256'][:12]}…): "
            "retrain it with `python -m lab train-head`."
        )
    head = EagleHead(EagleHeadConfig(**record["config"]))
    weights = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    missing = sorted(set(head.state_dict()) - set(weights))
    if missing:
        raise ValueError(
            f"The EAGLE head in {folder} was saved by an older version of the lab (it lacks {missing[0]}): "
            "retrain it with `python -m lab train-head`."
        )
    head.load_state_dict(weights)
    return head.to(device).eval().requires_grad_(False), record.get("meta", {})


# ---------------------------------------------------------------- the target's features


class TargetFeatures:
    """Records, per batch row, the tokens each target forward feeds and the final norm's output for them.

    model: a transformers causal LM with ``model.model.norm`` (Llama, Qwen2, ...).
    Hooks are registered by ``attach`` and removed by ``detach`` (or when this
    object is garbage collected). Only forwards run on the thread that called
    ``attach`` are recorded (a cached model may serve other sessions' threads).
    A padded eager batch forward (``lab.kv.RaggedCache``: a 2-D attention mask
    over cache + new slots) records only each row's valid new slots. A static
    cache's pass (a 4-D mask) records every column, padding included: a pad
    sits at the row's next positions and attends to exactly the row's tokens
    before it, so its features are those the same token would have there, and
    ``keep_prefix`` drops it unless that token is in fact committed.

    ids[b]: [F_b] int64 CPU; feats[b]: [F_b, H] float32 on the model's device, or
    [F_b, n·H] with ``layers``: the outputs of those decoder layers side by side.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int] = ()) -> None:
        self.model = model
        self.layers = tuple(layers)
        self._layer_out: dict[int, torch.Tensor] = {}
        self.ids: list[torch.Tensor] = []
        self.feats: list[torch.Tensor] = []
        self._handles: list = []
        self._thread: int | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._finalizer = None

    def attach(self, batch_size: int) -> None:
        """Start recording afresh for ``batch_size`` rows, on the calling thread."""
        hidden = int(self.model.config.get_text_config().hidden_size) * max(1, len(self.layers))
        device = next(self.model.parameters()).device
        self.ids = [torch.empty(0, dtype=torch.long) for _ in range(batch_size)]
        self.feats = [torch.empty(0, hidden, device=device) for _ in range(batch_size)]
        self._thread = threading.get_ident()
        self._pending = None
        if not self._handles:
            ref = weakref.ref(self)
            self._handles = [
                self.model.register_forward_pre_hook(functools.partial(_inputs_hook, ref), with_kwargs=True),
                self.model.model.norm.register_forward_hook(functools.partial(_norm_hook, ref)),
            ] + [
                self.model.model.layers[i].register_forward_hook(functools.partial(_layer_hook, ref, i)) for i in self.layers
            ]
            self._finalizer = weakref.finalize(self, _remove, list(self._handles))

    def detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._handles = []

    def follow_thread(self) -> None:
        """Record on the calling thread from now on: a decode paused between cycles (the app's Step-through)
        resumes on a new thread, and each proposal is followed by its verify pass on the proposal's thread."""
        self._thread = threading.get_ident()

    def keep_prefix(self, row: int, token_ids: torch.Tensor) -> int:
        """Drop row's records past their longest common prefix with ``token_ids`` [T]; returns its length."""
        keep = common_prefix_length(self.ids[row], token_ids)
        self.ids[row] = self.ids[row][:keep]
        self.feats[row] = self.feats[row][:keep]
        return keep

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows (the batch engine dropped finished requests)."""
        self.ids = [self.ids[i] for i in rows]
        self.feats = [self.feats[i] for i in rows]

    def _record_inputs(self, args, kwargs) -> None:
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None or threading.get_ident() != self._thread:
            self._pending = None
            return
        width = input_ids.shape[1]
        mask = kwargs.get("attention_mask")
        valid = None if mask is None or mask.ndim != 2 else mask[:, -width:].bool()  # [B, W] new slots
        self._pending = (input_ids, valid)

    def _record_hidden(self, hidden: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        outputs, self._layer_out = self._layer_out, {}
        if pending is None:
            return
        if self.layers:
            hidden = torch.cat([outputs[i] for i in self.layers], dim=-1)  # [B, W, n·H]
        input_ids, valid = pending  # [B, W], [B, W] or None
        if input_ids.shape[0] < len(self.ids):
            return  # not a forward of the batch being drafted for
        for b in range(len(self.ids)):  # a static cache's bucket may hold idle rows past the batch
            ids, feats = input_ids[b], hidden[b]  # [W], [W, H]
            if valid is not None:
                ids, feats = ids[valid[b]], feats[valid[b]]
            self.ids[b] = torch.cat([self.ids[b], ids.cpu()])
            self.feats[b] = torch.cat([self.feats[b], feats.detach().float()])


def _inputs_hook(ref, module, args, kwargs):
    owner = ref()
    if owner is not None:
        owner._record_inputs(args, kwargs)


def _layer_hook(ref, index, module, args, output):
    owner = ref()
    if owner is not None and owner._pending is not None:
        owner._layer_out[index] = output[0] if isinstance(output, tuple) else output


def _norm_hook(ref, module, args, output):
    owner = ref()
    if owner is not None:
        owner._record_hidden(output)


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------- drafting


class _HeadRow:
    """One sequence's head state: its KV cache and how many of its entries come from real features."""

    def __init__(self, head: EagleHead) -> None:
        self.cache = head.new_cache()
        self.num_real = 0


class EagleDrafter:
    """Drafts with an ``EagleHead`` over the target's hidden states, for every row of a batch (see module docstring).

    target_model: the target causal LM (hooks are added to it at ``reset``; its
        weights are only read). head: a trained (or untrained) ``EagleHead`` of
        the target's width. vocab_subset: [N] int64 token ids the head may
        propose (``lab.vocab``), or None for the full vocabulary.

    One recorder serves the batch and each row has its own head cache; rows
    draft one after another through the shared head (not in one padded pass):
    exact and simple; batching the head's passes is not done yet.

    Raises ValueError when the head's width or vocabulary is not the target's.
    """

    name = "eagle"
    reads_target_passes = True  # hooks on the target: the engine runs it eagerly or static, never compiled
    drafts_trees = True  # one row (``lab.drafters.eagle_tree``): EAGLE-2's dynamic tree
    tree_topk = 4
    tree_shape = "dynamic"

    def __init__(self, target_model: torch.nn.Module, head: EagleHead, vocab_subset: torch.Tensor | None = None) -> None:
        config = target_model.config.get_text_config()
        if head.config.hidden_size != config.hidden_size or head.config.vocab_size != config.vocab_size:
            raise ValueError(
                f"eagle requires a head trained for this target (width {config.hidden_size}, vocabulary "
                f"{config.vocab_size}); got width {head.config.hidden_size}, vocabulary {head.config.vocab_size}"
            )
        self.target_model = target_model
        self.head = head
        self.vocab_subset = vocab_subset
        self.embed = target_model.get_input_embeddings()
        lm_head = target_model.get_output_embeddings()
        self.lm_head = lm_head if vocab_subset is None else TrimmedLMHead(lm_head.weight, vocab_subset)
        self.features = TargetFeatures(target_model, head.config.feature_layers)
        self.rows: list[_HeadRow] = []

    def reset(self, batch_size: int) -> None:
        self.features.attach(batch_size)
        self.rows = [_HeadRow(self.head) for _ in range(batch_size)]
        self._last_tree: tuple[DraftTree, int] | None = None  # the last tree proposed, and where its nodes were recorded

    def propose(self, contexts: Sequence[DraftContext]) -> list[Draft]:
        if self._last_tree is not None:  # the target's tree pass recorded its nodes in node order: fold the path in
            fold_tree_features(self.features, 0, contexts[0].token_ids, *self._last_tree)
            self._last_tree = None
        if contexts and contexts[0].tree_budget > 0:
            draft = draft_tree_row(self, 0, contexts[0], self.tree_topk, self.tree_shape)
            if draft.tree is not None:
                self._last_tree = (draft.tree, contexts[0].token_ids.shape[0])
            return [draft]
        return [draft_row(self, b, ctx) for b, ctx in enumerate(contexts)]

    def observe(self, num_accepted: Sequence[int]) -> None:
        """Nothing to do now: the next proposal keeps the features that match the committed tokens."""

    def drop(self, keep: Sequence[int]) -> None:
        self.features.select(keep)
        self.rows = [self.rows[i] for i in keep]

    def cache_lengths(self) -> list[int]:
        """Entries each row's head cache holds."""
        return [row.cache.get_seq_length() for row in self.rows]




@torch.inference_mode()
def draft_row(drafter: EagleDrafter, row: int, ctx: DraftContext) -> Draft:
    """Draft up to ctx.k tokens for one row (the single-row and batched drafters share this).

    Steps: keep the recorded target features that match the committed tokens
    (F of them: every committed token but the last); feed the head the entries
    it lacks, (f_t, x_{t+1}) for t in [num_real, F); then draft ctx.k tokens
    autoregressively on predicted features; crop the head's cache back to its
    F real entries. Returns an empty draft when no feature is known yet (a
    one-token prompt) or ctx.k == 0.
    """
    caught_up = catch_up(drafter, row, ctx)
    if caught_up is None:
        return Draft.empty()
    state, predicted = caught_up
    head, device = drafter.head, predicted.device
    tokens, probs = [], []
    for i in range(ctx.k):
        logits = drafter.lm_head(predicted.to(drafter.lm_head.weight.dtype))  # [V]
        token, dist, done = draft_token(logits, ctx)  # under the grammar, if any
        if token is not None:
            tokens.append(token)
            probs.append(dist)
        if done:
            break
        if i + 1 < ctx.k:
            predicted = head(predicted[None, None], drafter.embed(token.view(1, 1).to(device)), state.cache)[0, -1]
    if ctx.grammar is not None:
        ctx.grammar.rollback(len(tokens))
    crop_cache(state.cache, state.num_real)  # drafting entries came from predicted features: never kept
    return Draft(torch.stack(tokens).cpu(), torch.stack(probs)) if tokens else Draft.empty()
