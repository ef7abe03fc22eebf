"""What a forward pass costs here: the lab's one pass timer and its one cost vocabulary, c and v(K).

Every study that times passes goes through :func:`time_pass_samples`: the
calibration (``lab.studies.calibrate``, through :func:`time_passes`), the bare
verify cost of a comparison (``lab.studies.compare.measure_verify_cost``, the
same) and the batch sweep's cost model (``lab.studies.auto_k``, over the batched
engine's ragged cache). Widths are interleaved round by round, so a drift of the
machine's speed hits every width alike; the device is synchronised around each
timed pass; each pass is rolled back, so every pass sees the same context.

The measured times become the cost model of ``lab.theory`` (Leviathan et al.,
generalised by a measured verify cost), in plain target steps:

- c = draft_ms_per_token / target_step_ms: drafting one token (0 without a draft model);
- v(K) = verify_ms[K] / target_step_ms: one target pass over K+1 tokens;
- ms per generated token = target_step_ms x (K c + v(K)) / E[tokens per step](a, K).

:class:`PassCosts` holds them; ``lab.studies.calibrate.PrecisionTimings`` (one
precision, batch 1) and ``lab.studies.costs.CostRow`` (one batch size, one K)
are read through it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lab.theory import expected_speedup, expected_tokens_per_step


def time_pass_samples(
    run_pass: Callable[[int], object],
    roll_back: Callable[[int], object],
    widths: Sequence[int],
    repeats: int,
    device: torch.device | str,
    warmup_rounds: int = 1,
) -> dict[int, list[float]]:
    """Milliseconds of ``run_pass(width)`` for each width, ``repeats`` timed rounds after ``warmup_rounds`` untimed.

    run_pass(width): one pass of that many tokens per row (it draws its own tokens).
    roll_back(width): undo it, untimed, so the next pass sees the same context.
    Rounds interleave the widths. The device is synchronised before and after
    each timed pass. Returns {width: [ms of each timed pass]}.
    """
    from lab.decode import sync_device

    samples: dict[int, list[float]] = {w: [] for w in widths}
    for round_ in range(warmup_rounds + repeats):
        for width in widths:
            sync_device(device)
            start = time.perf_counter()
            run_pass(width)
            sync_device(device)
            if round_ >= warmup_rounds:
                samples[width].append((time.perf_counter() - start) * 1e3)
            roll_back(width)
    return samples


def time_passes(
    model: torch.nn.Module,
    widths: Sequence[int],
    context_tokens: int = 128,
    repeats: int = 5,
    mode: str = "eager",
    batch_size: int = 1,
    backend: str = "inductor",
) -> dict[int, float]:
    """Median ms of one forward pass of each width after a cache of ``context_tokens`` random tokens.

    model: a causal LM. mode: the engine mode (``lab.kv``): "eager" (the ragged
    cache), "static" or "compiled" (the static cache in a batch bucket, a pass of
    a declared width; compiled, through ``compiled_forward(model, backend)``:
    CUDA graphs on a GPU), so the passes timed are the decode loop's own.
    batch_size: rows per pass, each with the same context. The cache is rolled
    back after every pass, so each pass sees the same context; one untimed round
    first (it compiles, in the compiled mode). Returns {width: ms}.
    Raises ValueError for widths < 1, repeats < 1, an empty context or an unknown mode.
    """
    from lab.kv import new_kv_cache

    if context_tokens < 1 or repeats < 1 or batch_size < 1 or any(w < 1 for w in widths):
        raise ValueError(f"time_passes requires context >= 1, repeats >= 1, batch >= 1, widths >= 1; got "
                         f"{context_tokens}, {repeats}, {batch_size}, {list(widths)}")
    if mode not in ("eager", "static", "compiled"):
        raise ValueError(f"time_passes requires mode 'eager', 'static' or 'compiled'; got {mode!r}")
    device = next(model.parameters()).device
    cache = new_kv_cache(model, batch_size, mode, context_tokens + max(widths), backend)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def run_pass(width: int) -> None:
        cache.forward(list(torch.randint(vocab, (batch_size, width), generator=generator)), width=width)  # B x [w]

    with torch.inference_mode():
        context = torch.randint(vocab, (context_tokens,), generator=generator)
        cache.forward([context] * batch_size, last_only=True)
        lengths = list(cache.lengths)
        samples = time_pass_samples(run_pass, lambda width: cache.keep(lengths), widths, repeats, device)
    return {w: statistics.median(ts) for w, ts in samples.items()}


def in_target_steps(ms: float, target_step_ms: float) -> float:
    """A time in plain target steps (the unit of c and v(K)): ms / target_step_ms."""
    return ms / target_step_ms


@dataclass
class PassCosts:
    """Measured pass costs of a target (and its drafter) at one batch size: ms medians, and c and v(K) from them.

    target_step_ms: one target pass over 1 token per row.
    verify_ms: K -> one target pass over K+1 tokens per row.
    draft_ms_per_token: drafting, per drafted token; None: no draft model (c = 0).
    """

    target_step_ms: float
    verify_ms: dict[int, float]
    draft_ms_per_token: float | None = None

    @property
    def c(self) -> float:
        """The draft's cost per drafted token in target steps (0 without a draft model)."""
        return 0.0 if self.draft_ms_per_token is None else in_target_steps(self.draft_ms_per_token, self.target_step_ms)

    def v(self, k: int) -> float:
        """Verify cost in target steps: verify_ms[K] / target_step_ms."""
        return in_target_steps(self.verify_ms[k], self.target_step_ms)

    def ms_per_token(self, k: int, acceptance: float) -> float:
        """Predicted ms per generated token of speculation at K: step x (K c + v(K)) / E[tokens per step]."""
        return self.target_step_ms * (k * self.c + self.v(k)) / expected_tokens_per_step(acceptance, k)

    def predicted_speedup(self, acceptance: float, k: int) -> float:
        """Leviathan's latency speedup (1-a^(K+1)) / ((1-a)(K c + v(K))) at per-token acceptance a."""
        return expected_speedup(acceptance, k, self.c, self.v(k))
