"""Train an EAGLE-style head on a target's own outputs, in minutes on a CPU.

Self-distillation (EAGLE, Li et al. 2024, trains on the target's generated text
for the same reason): the target greedily answers training prompts; one
forward pass over prompt + answer gives its final-norm hidden state f_t at every
position and its own next-token choice y_t = argmax LM_head(f_t). The head
learns, at every position t,

    predicted f_{t+1} = head(f_t, embed(x_{t+1}))

with two losses: cross-entropy of LM_head(predicted f_{t+1}) against y_{t+1}
(what greedy acceptance rewards; scored over the ``loss_vocab`` most frequent
tokens to keep the CPU cost down) plus a smooth-L1 regression to f_{t+1}
(EAGLE's feature loss, which keeps predicted features usable as the next
step's input). Two things narrow the gap between training (real features in)
and drafting (own predictions in): Gaussian noise on input features (EAGLE-1)
and an unrolled second step that reads the head's own predictions (a cheap
form of EAGLE-3's "training-time test").

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
    lr: AdamW learning rate (cosine decay to 10 %); weight_decay: AdamW's.
    batch_sequences: sequences per optimiser step.
    intermediate_size: the head's MLP width (None: the target's).
    loss_vocab: cross-entropy over this many most frequent label tokens (0: the full vocabulary).
    feature_weight: weight of the smooth-L1 feature loss (cross-entropy has weight 1).
    noise: std of the Gaussian noise on input features, relative to their std.
    unroll: training steps per position: 1 (real features in) or 2 (also on the head's own prediction).
    seed: for the initialisation, the order and the noise.
    """

    max_train_s: float = 600.0
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_sequences: int = 4
    intermediate_size: int | None = 1024
    loss_vocab: int = 8192
    feature_weight: float = 0.5
    noise: float = 0.05
    unroll: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_train_s <= 0 or self.epochs < 1 or self.batch_sequences < 1:
            raise ValueError(
                f"training requires max_train_s > 0, epochs >= 1, batch_sequences >= 1; got "
                f"{self.max_train_s}, {self.epochs}, {self.batch_sequences}"
            )
        if self.unroll not in (1, 2):
            raise ValueError(f"unroll requires 1 or 2; got {self.unroll}")


@dataclass
class Sample:
    """One training sequence. ids: [T] int64; features: [T, H] (final-norm output); labels: [T] int64 (argmax)."""

    ids: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor


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
) -> list[Sample]:
    """The target's greedy answers to the prompts, with its features and argmax labels at every position.

    target: ``lab.models.LoadedModel``-like. prompt_ids: encoded prompts.
    Answers come from the lab's batched engine (target alone); features from one
    forward pass of ``target.model.model`` over prompt + answer, kept in float32 on the CPU.
    """
    from lab.batch import run_batch
    from lab.config import DecodeConfig

    model = target.model
    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    samples: list[Sample] = []
    config = DecodeConfig(max_new_tokens=max_new_tokens)
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(p) for p in prompt_ids[start : start + batch_size]]
        answers = run_batch(target, chunk, None, config).token_ids
        for prompt, answer in zip(chunk, answers):
            ids = torch.tensor(prompt + answer, dtype=torch.long)
            hidden = model.model(ids[None].to(device)).last_hidden_state[0]  # [T, H]
            labels = lm_head(hidden).argmax(-1)  # [T]
            samples.append(Sample(ids, hidden.float().cpu(), labels.cpu()))
        if progress is not None:
            progress(min(start + batch_size, len(prompt_ids)), len(prompt_ids))
    return samples


def train_head(
    target,
    samples: Sequence[Sample],
    config: TrainConfig = TrainConfig(),
    head: EagleHead | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    target_name: str = "",
) -> tuple[EagleHead, TrainReport]:
    """Train (a copy of nothing: ``head`` is trained in place when given) and return the head in eval mode.

    target: the target (its embedding table and LM head are read, never trained).
    samples: from ``collect_samples``, each of length >= 3.
    progress(step, total_steps, loss): called after every optimiser step.
    Runs on the target's device, in float32.

    Raises ValueError when no sample is long enough.
    """
    model = target.model
    device = next(model.parameters()).device
    usable = [s for s in samples if s.ids.numel() >= 3]
    if not usable:
        raise ValueError("training requires samples of at least 3 tokens; got none")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if head is None:
        head = EagleHead(EagleHeadConfig.for_target(model, config.intermediate_size, target_name))
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
    feature_std = float(torch.cat([s.features[:64] for s in usable[:64]]).std())

    steps_per_epoch = math.ceil(len(usable) / config.batch_sequences)
    total_steps = steps_per_epoch * config.epochs
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    report = TrainReport(num_tokens=sum(s.ids.numel() for s in usable))
    start = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        order = list(range(len(usable)))
        rng.shuffle(order)
        for first in range(0, len(order), config.batch_sequences):
            batch = [usable[i] for i in order[first : first + config.batch_sequences]]
            lr_scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
            for group in optimiser.param_groups:
                group["lr"] = config.lr * lr_scale
            loss = sum(_sequence_loss(head, embed, weight, remap, s, config, feature_std, device) for s in batch) / len(batch)
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
            report.epochs = epoch + min(1.0, (first + config.batch_sequences) / len(order))
            break
        report.epochs = epoch + 1
    report.steps = step
    report.train_s = time.perf_counter() - start
    return head.eval().requires_grad_(False), report


def _sequence_loss(head, embed, weight, remap, sample: Sample, config: TrainConfig, feature_std: float, device) -> torch.Tensor:
    """Loss of one sequence (module docstring): position t reads (f_t, x_{t+1}) and must give f_{t+1}, y_{t+1}."""
    ids = sample.ids.to(device)  # [T]
    features = sample.features.to(device)  # [T, H]
    labels = remap[sample.labels.to(device)]  # [T] columns of the scored subset
    with torch.no_grad():
        token_embeds = embed(ids).float()  # [T, H]
    noisy = features[:-1] + config.noise * feature_std * torch.randn_like(features[:-1])
    predicted = head(noisy[None], token_embeds[None, 1:])[0]  # [T-1, H]: predicted f_1 .. f_{T-1}
    loss = _step_loss(predicted, features[1:], labels[1:], weight, config)
    if config.unroll == 2 and ids.numel() >= 4:
        # Second step on the head's own predictions: (predicted f_{t+1}, x_{t+2}) -> f_{t+2}.
        again = head(predicted[None, :-1], token_embeds[None, 2:])[0]  # [T-2, H]
        loss = 0.5 * (loss + _step_loss(again, features[2:], labels[2:], weight, config))
    return loss


def _step_loss(predicted, features, labels, weight, config: TrainConfig) -> torch.Tensor:
    logits = predicted @ weight.T  # [n, N]
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    if torch.isnan(ce):  # every label outside the scored subset
        ce = logits.sum() * 0.0
    regression = torch.nn.functional.smooth_l1_loss(predicted, features)
    return ce + config.feature_weight * regression


def _init_from_target(head: EagleHead, model: torch.nn.Module) -> None:
    """Start the head's output norm from the target's final norm (both produce what the LM head reads)."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            head.decoder.norm.weight.copy_(norm.weight.float())


def heldout_acceptance(target, head: EagleHead, prompt_ids: Sequence[Sequence[int]], k: int = 5, max_new_tokens: int = 64):
    """Greedy decodes of the prompts with the head through ``lab.engine``; the pooled ``SpecDecodingStats``."""
    from lab.config import DecodeConfig
    from lab.drafters import EagleDrafter
    from lab.engine import run
    from lab.metrics import SpecDecodingStats

    stats = SpecDecodingStats()
    config = DecodeConfig(k=k, max_new_tokens=max_new_tokens)
    for ids in prompt_ids:
        stats.merge(run(target, list(ids), EagleDrafter(target.model, head), config).stats)
    return stats
