"""Train an EAGLE-style head on a target's own outputs, in minutes on a CPU.

Self-distillation (EAGLE, Li et al. 2024, trains on the target's generated text
for the same reason): the target greedily answers training prompts; one
forward pass over prompt + answer gives its final-norm hidden state f_t at every
position and its own next-token choice y_t = argmax LM_head(f_t). The head
learns, at every position t,

    predicted f_{t+1} = head(f_t, embed(x_{t+1}))

with cross-entropy of LM_head(predicted f_{t+1}) against the target's own
distribution there, softmax(LM_head(f_{t+1})) (EAGLE's loss; ``soft_labels=False``:
against its argmax y_{t+1} only), scored over the ``loss_vocab`` most frequent
tokens to keep the CPU cost down. A head that reads the final norm's output
adds a smooth-L1 regression to f_{t+1} (EAGLE-1's feature loss, which keeps
predicted features usable as the next step's input); one that reads fused
layers has none (EAGLE-3). Each feature layer's output is RMS-normed before the
fusion (``EagleHead.project``): raw residual streams carry a few dims of 10^4.
Two things narrow the gap between training (real features in) and drafting
(own predictions in): Gaussian noise on input features (EAGLE-1) and
unrolled steps that read the head's own predictions as drafting does
(EAGLE-3's "training-time test": step j at every position reads step j-1's
prediction, and attends to the real entries before its chain and to the
chain's own entries, through a block attention mask).

Training stops at ``max_train_s`` or after ``epochs``, whichever is first.
``python -m lab train-head`` wraps it all and saves the head with a checksum
(``lab.drafters.eagle.save_head``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lab.drafters.eagle import EagleHead, EagleHeadConfig

HELD_OUT_SOURCE = "spec_bench:mix:20"  # the measurement prompts: never trained on
TRAIN_SOURCES = ("summarization", "code_editing", "open_qa", "translation", "creative_writing", "spec_bench")


@dataclass(frozen=True)
class TrainConfig:
    """How to train a head.

    max_train_s: wall-clock budget of the optimisation loop in seconds.
    epochs: passes over the samples at most.
    lr: AdamW peak learning rate (linear warm-up over min(20, 2 % of the steps), then a cosine decay to 10 %
        over whichever budget, steps or ``max_train_s``, runs out first); weight_decay: AdamW's.
    batch_tokens: padded tokens per optimiser step (sequences of similar length are batched together).
    intermediate_size: the head's MLP width (None: the target's).
    loss_vocab: cross-entropy over this many most frequent label tokens (0: the full vocabulary).
    feature_weight: weight of the smooth-L1 feature loss (cross-entropy has weight 1).
    noise: std of the Gaussian noise on input features: relative to their std (final-norm features), or on the
        RMS-normed layer outputs (fused features: ``EagleHead.project``).
    unroll: training steps per position (EAGLE-3's "training-time test"): step 1 reads the target's
        features, step j > 1 the head's own step j-1 predictions, as drafted token j does; 1 to 8.
    soft_labels: cross-entropy against the target's whole distribution over the scored subset (EAGLE's loss:
        softmax of its LM head over its final-norm output), else against its argmax only.
    precision: "auto" (bf16 autocast on CUDA and on CPUs that run bf16 natively, by
        ``lab.hardware.host_float_precision``), "bf16" or "fp32". Master weights stay fp32.
    feature_layers: the target layers the head reads (``EagleHeadConfig.feature_layers``; the
        samples must have been collected with the same); empty: the final norm's output. With
        feature layers there is no feature regression (EAGLE-3): ``feature_weight`` is ignored.
    seed: for the initialisation, the order and the noise.
    """

    max_train_s: float = 600.0
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_tokens: int = 512
    intermediate_size: int | None = 1024
    loss_vocab: int = 4096
    feature_weight: float = 0.5
    noise: float = 0.05
    unroll: int = 3
    soft_labels: bool = True
    precision: str = "auto"
    feature_layers: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_train_s <= 0 or self.epochs < 1 or self.batch_tokens < 1:
            raise ValueError(
                f"training requires max_train_s > 0, epochs >= 1, batch_tokens >= 1; got "
                f"{self.max_train_s}, {self.epochs}, {self.batch_tokens}"
            )
        if not 1 <= self.unroll <= 8:
            raise ValueError(f"unroll requires 1 to 8 steps; got {self.unroll}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision requires auto, bf16 or fp32; got {self.precision!r}")


@dataclass
class Sample:
    """One training sequence. ids: [T] int64; features: [T, H] (final-norm output) or [T, n·H] (n feature
    layers' outputs); labels: [T] int64 (the target's argmax at each position); final: [T, H] the final norm's
    output where features are layers' outputs (what the target's LM head reads: its distribution, for soft
    labels), None where features already are it."""

    ids: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    final: torch.Tensor | None = None


@dataclass
class TrainReport:
    """What training did. losses: mean loss per optimiser step; train_s: seconds of the loop."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    epochs: float = 0.0
    train_s: float = 0.0
    collect_s: float = 0.0
    num_tokens: int = 0
    stopped_by: str = "epochs"


@torch.no_grad()  # not inference_mode: the features feed autograd later
def collect_samples(
    target,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 96,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    feature_layers: Sequence[int] = (),
) -> list[Sample]:
    """The target's greedy answers to the prompts, with its features and argmax labels at every position.

    target: ``lab.models.LoadedModel``-like. prompt_ids: encoded prompts.
    feature_layers: as ``EagleHeadConfig.feature_layers`` (empty: the final norm's output).
    Answers come from the lab's batched engine (target alone); features from one
    forward pass over prompt + answer, recorded by the same hooks the drafter uses
    (``TargetFeatures``), kept in float32 on the CPU: [T, H] or [T, n·H].
    """
    from lab.decode import run_batch
    from lab.config import DecodeConfig
    from lab.drafters.eagle import TargetFeatures

    model = target.model
    device = next(model.parameters()).device
    recorder = TargetFeatures(model, feature_layers)
    samples: list[Sample] = []
    config = DecodeConfig(max_new_tokens=max_new_tokens)
    final: list[torch.Tensor] = []
    norm_hook = model.model.norm.register_forward_hook(lambda module, args, output: final.append(output))
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = [list(p) for p in prompt_ids[start : start + batch_size]]
            answers = run_batch(target, chunk, None, config).token_ids
            for prompt, answer in zip(chunk, answers):
                ids = torch.tensor(prompt + answer, dtype=torch.long)
                recorder.attach(1)
                final.clear()
                logits = model(ids[None].to(device)).logits[0]  # [T, V]
                kept = final[-1][0].float().cpu() if feature_layers else None  # [T, H]
                samples.append(Sample(ids, recorder.feats[0].float().cpu(), logits.argmax(-1).cpu(), kept))
            if progress is not None:
                progress(min(start + batch_size, len(prompt_ids)), len(prompt_ids))
    finally:
        norm_hook.remove()
        recorder.detach()
    return samples


def train_head(
    target,
    samples: Sequence[Sample],
    config: TrainConfig = TrainConfig(),
    head: EagleHead | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    target_name: str = "",
) -> tuple[EagleHead, TrainReport]:
    """Train (``head`` in place when given, else a new one) and return the head in eval mode.

    target: the target (its embedding table and LM head are read, never trained).
    samples: from ``collect_samples``; those shorter than unroll + 2 tokens are skipped.
    progress(step, total_steps, loss): called after every optimiser step.
    Runs on the target's device; weights in float32, matmuls in bf16 where
    ``config.precision`` says so. Sequences are sorted into buckets of similar
    length and right-padded (causal attention: real positions never read the
    padding, whose loss is masked), at most ``config.batch_tokens`` padded tokens a step.

    Raises ValueError when no sample is long enough, or when the samples' feature width is not the head's.
    """
    model = target.model
    device = next(model.parameters()).device
    usable = [s for s in samples if s.ids.numel() >= config.unroll + 2]
    if not usable:
        raise ValueError(f"training requires samples of at least {config.unroll + 2} tokens; got none")
    hidden = int(model.config.get_text_config().hidden_size)
    layers = head.config.feature_layers if head is not None else config.feature_layers
    if usable[0].features.shape[1] != hidden * max(1, len(layers)):
        raise ValueError(
            f"training requires features of width {hidden * max(1, len(layers))} (feature layers {list(layers)}); got "
            f"{usable[0].features.shape[1]}: collect the samples with the same feature_layers"
        )
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if head is None:
        head = EagleHead(EagleHeadConfig.for_target(model, config.intermediate_size, target_name, config.feature_layers))
        _init_from_target(head, model)
    head = head.to(device).float().train().requires_grad_(True)
    embed = model.get_input_embeddings()
    lm_weight = model.get_output_embeddings().weight  # [V, H]
    vocab = lm_weight.shape[0]
    if config.loss_vocab and config.loss_vocab < vocab:
        counts = torch.bincount(torch.cat([s.labels for s in usable]), minlength=vocab)
        subset = torch.argsort(-counts, stable=True)[: config.loss_vocab].sort().values
    else:
        subset = torch.arange(vocab)
    remap = torch.full((vocab,), -100, dtype=torch.long)  # label id -> column of the scored subset (-100: ignored)
    remap[subset] = torch.arange(subset.numel())
    weight = lm_weight.detach()[subset.to(lm_weight.device)].float().to(device)  # [N, H]
    remap = remap.to(device)
    batches = _length_buckets(usable, config.batch_tokens)
    use_bf16 = _use_bf16(config.precision, device)

    total_steps = len(batches) * config.epochs
    warmup = min(20, max(1, total_steps // 50))
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    report = TrainReport(num_tokens=sum(s.ids.numel() for s in usable))
    start = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        rng.shuffle(batches)
        for index, batch in enumerate(batches):
            # Progress is the larger of steps and wall time spent: the schedule ends with whichever budget ends first.
            done = min(1.0, max(step / total_steps, (time.perf_counter() - start) / config.max_train_s))
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))
            for group in optimiser.param_groups:
                group["lr"] = config.lr * cosine * min(1.0, (step + 1) / warmup)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = _batch_loss(head, embed, weight, remap, [usable[i] for i in batch], config, device)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimiser.step()
            step += 1
            report.losses.append(loss.item())
            if progress is not None:
                progress(step, total_steps, report.losses[-1])
            if time.perf_counter() - start > config.max_train_s:
                report.stopped_by = "time budget"
                break
        if report.stopped_by == "time budget":
            report.epochs = epoch + (index + 1) / len(batches)
            break
        report.epochs = epoch + 1
    report.steps = step
    report.train_s = time.perf_counter() - start
    return head.eval().requires_grad_(False), report


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    from lab.hardware import host_float_precision

    return host_float_precision(device) == "bf16"


def _length_buckets(samples: Sequence[Sample], batch_tokens: int) -> list[list[int]]:
    """Indices of samples in batches of similar length, each at most ``batch_tokens`` padded tokens (or one sample)."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].ids.numel())
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest member is the longest
        if current and (len(current) + 1) * samples[i].ids.numel() > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current]


def _batch_loss(head, embed, weight, remap, batch: Sequence[Sample], config: TrainConfig, device) -> torch.Tensor:
    """Loss of a right-padded batch (module docstring): step j reads (f or predicted f at t+j-1, x_{t+j}) -> f_{t+j}, y_{t+j}."""
    length = max(s.ids.numel() for s in batch)
    hidden = batch[0].features.shape[1]
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    real = torch.zeros(len(batch), length, dtype=torch.bool)
    features = torch.zeros(len(batch), length, hidden)
    final = torch.zeros(len(batch), length, weight.shape[1]) if config.soft_labels and head.fuse is not None else None
    for b, s in enumerate(batch):
        n = s.ids.numel()
        ids[b, :n], labels[b, :n], features[b, :n] = s.ids, remap[s.labels.to(remap.device)].cpu(), s.features
        real[b, :n] = True
        if final is not None:
            if s.final is None:
                raise ValueError("soft labels require the samples' final-norm outputs: collect them with collect_samples")
            final[b, :n] = s.final
    ids, labels, real, features = ids.to(device), labels.to(device), real.to(device), features.to(device)  # [B, T] x3, [B, T, H]
    teacher = None
    if config.soft_labels:
        with torch.no_grad():  # the target's distribution over the subset at t+1: what step j's prediction is scored on
            read = features if final is None else final.to(device)
            teacher = torch.log_softmax((read[:, 1:] @ weight.T.to(read.dtype)).float(), dim=-1)  # [B, T-1, N]
    with torch.no_grad():
        token_embeds = embed(ids).float()  # [B, T, H]
    inputs = head.project(features[:, :-1], noise=config.noise)
    regress_to = features[:, 1:] if head.fuse is None else None  # fused features have no H-wide target
    total = features.new_zeros(())
    for j, predicted in enumerate(unrolled_predictions(head, inputs, token_embeds[:, 1:], config.unroll), start=1):
        chained = labels[:, 1:].clone()
        valid = real[:, 1:].clone()
        chained[:, : j - 1] = -100  # entries whose chain would start before the first position
        valid[:, : j - 1] = False
        total = total + _step_loss(predicted, regress_to, chained if teacher is None else valid, weight, config, teacher)
    return total / config.unroll


def unrolled_predictions(head: EagleHead, features: torch.Tensor, token_embeds: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The head's predictions at every entry for drafted positions 1 .. ``steps`` (EAGLE-3's "training-time test").

    features: [B, E, H] the target's f_p; token_embeds: [B, E, H] embeddings of x_{p+1}. Entry p predicts f_{p+1}.
    Returns ``steps`` tensors [B, E, H]: the j-th holds, at entry p, what the head drafts as its j-th token
    when the real features end at entry p - j + 1: step j reads step j-1's prediction at entry p - 1 and
    attends to the real entries up to p - j + 1 and to the chain's entries p - j + 2 .. p of steps 2 .. j,
    exactly as ``draft_row`` runs it (entries p < j - 1 are meaningless). Differentiable.
    """
    entries = features.shape[1]
    cache = head.new_cache()
    predicted = head(features, token_embeds, cache)  # step 1 from the target's features; the cache holds its entries
    out = [predicted]
    positions = torch.arange(entries, device=features.device)[None]
    for j in range(2, steps + 1):
        # The cache holds steps 1 .. j-1 side by side (E entries each); the block mask picks the chain.
        inputs = torch.cat([torch.zeros_like(predicted[:, :1]), predicted[:, :-1]], dim=1)
        predicted = head(inputs, token_embeds, cache, positions, _chain_mask(entries, j, features.device))
        out.append(predicted)
    return out


def _chain_mask(entries: int, step: int, device) -> torch.Tensor:
    """[1, 1, E, step * E] bool: which keys (step 1's entries, then steps 2 .. step's) a step-``step`` query at entry p reads.

    Real entries q <= p - step + 1 (step 1's block) and, for m = 2 .. step, entry p - step + m of step m's block.
    """
    p = torch.arange(entries, device=device)[:, None]  # [E, 1] query entries
    q = torch.arange(entries, device=device)[None, :]  # [1, E] key entries within a block
    blocks = [q <= p - step + 1] + [q == p - step + m for m in range(2, step + 1)]
    return torch.cat(blocks, dim=1)[None, None]


def _step_loss(predicted, features, labels, weight, config: TrainConfig, teacher=None) -> torch.Tensor:
    """Cross-entropy of LM_head(predicted) [B, T, H] against labels + smooth L1 to features [B, T, H] (None: no regression).

    labels: [B, T] int64 subset columns (-100: padding or outside the subset); with ``teacher`` [B, T, N] (the
    target's log-probabilities over the subset) labels is a [B, T] bool mask of the entries to score instead.
    """
    valid = labels if teacher is not None else labels != -100  # [B, T]
    if not bool(valid.any()):
        return predicted.sum() * 0.0
    chosen = predicted[valid]  # [n, H]
    logits = (chosen @ weight.T.to(chosen.dtype)).float()  # [n, N]
    if teacher is not None:
        ce = -(teacher[valid].exp() * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    else:
        ce = torch.nn.functional.cross_entropy(logits, labels[valid])
    if features is None or config.feature_weight == 0:
        return ce
    regression = torch.nn.functional.smooth_l1_loss(chosen.float(), features[valid])
    return ce + config.feature_weight * regression


def _init_from_target(head: EagleHead, model: torch.nn.Module) -> None:
    """Start the head's output norm from the target's final norm (both produce what the LM head reads)."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            head.decoder.norm.weight.copy_(norm.weight.float())


def heldout_acceptance(target, head: EagleHead, prompt_ids: Sequence[Sequence[int]], k: int = 5, max_new_tokens: int = 64):
    """Greedy decodes of the prompts with the head through ``lab.decode``; the pooled ``SpecDecodingStats``."""
    from lab.config import DecodeConfig
    from lab.drafters import EagleDrafter
    from lab.decode import run
    from lab.metrics import SpecDecodingStats

    stats = SpecDecodingStats()
    config = DecodeConfig(k=k, max_new_tokens=max_new_tokens)
    for ids in prompt_ids:
        stats.merge(run(target, list(ids), EagleDrafter(target.model, head), config).stats)
    return stats
