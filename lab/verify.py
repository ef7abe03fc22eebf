"""Pure acceptance rules: which drafted tokens the target keeps.

Greedy: a drafted token is accepted while it equals the target's argmax at its
position; the first mismatch is replaced by the target's argmax (the correction),
and when every drafted token matches the target's argmax after the last one is
the bonus token. The result is token for token what the target alone produces.

Sampling: speculative (rejection) sampling of Leviathan et al. 2023
("Fast Inference from Transformers via Speculative Decoding", Algorithm 1) and
Chen et al. 2023 ("Accelerating LLM Decoding with Speculative Sampling"):
accept drafted token x at position i with probability
min(1, target_prob_i(x) / draft_prob_i(x)); at the first rejection sample the
recovered token from the residual norm(max(0, target_prob_i - draft_prob_i));
if all are accepted, sample the bonus token from target_prob_K. The emitted
tokens are distributed exactly as the target's own samples. A deterministic
drafter (prompt lookup) has a one-hot draft distribution: the rule becomes
"accept with probability target_prob_i(x)" and the residual is the target
distribution with x removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lab.sampling import sample


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one draft.

    num_accepted: how many leading drafted tokens the target kept (0..K).
    next_token: the target's own token after them: the correction when
        num_accepted < K, else the bonus token.
    acceptance_probs: per checked position, the probability with which the
        drafted token was accepted (greedy: 1.0 or 0.0). Length num_accepted + 1,
        or K when all were accepted.
    uniforms: the uniform draws compared against acceptance_probs (sampling
        only; empty for greedy).
    """

    num_accepted: int
    next_token: int
    acceptance_probs: tuple[float, ...] = ()
    uniforms: tuple[float, ...] = ()

    def is_bonus(self, num_drafted: int) -> bool:
        """True when the next token follows a fully accepted, non-empty draft."""
        return num_drafted > 0 and self.num_accepted == num_drafted


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> Verdict:
    """Greedy verification of one row: ``verify_greedy_batch`` at B = 1.

    target_logits: [K+1, V] the target's logits at the position before each
        drafted token and after the last one (any float dtype, any device).
    draft_tokens: [K] int64, K >= 0.
    """
    return verify_greedy_batch(target_logits[None], [draft_tokens])[0]


def verify_greedy_batch(target_logits: torch.Tensor, draft_tokens: Sequence[torch.Tensor]) -> list[Verdict]:
    """Greedy verification of a whole batch, with one host sync.

    target_logits: [B, W, V]; row b's first K_b + 1 columns are the target's
        logits before each of its drafted tokens and after the last (columns
        past K_b + 1 are padding, ignored).
    draft_tokens: B int64 tensors [K_b], K_b <= W - 1 (K_b = 0: no draft).
    Returns one ``Verdict`` per row.
    """
    target_argmax = target_logits.argmax(-1).cpu()  # [B, W], the step's one host sync
    verdicts = []
    for b, drafted in enumerate(draft_tokens):
        num_drafted = drafted.shape[0]
        matches = (target_argmax[b, :num_drafted] == drafted.cpu()).tolist()
        num_accepted = matches.index(False) if False in matches else num_drafted
        checked = [1.0] * num_accepted + ([0.0] if num_accepted < num_drafted else [])
        verdicts.append(Verdict(num_accepted, int(target_argmax[b, num_accepted]), tuple(checked)))
    return verdicts


def verify_sampling(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Verdict:
    """Rejection-sampling verification of one row: ``verify_sampling_batch`` at B = 1.

    target_probs: [K+1, V] float, processed target probabilities (rows sum to 1).
    draft_tokens: [K] int64.
    draft_probs: [K, V] float, the processed distributions the drafted tokens
        were sampled from, or None for a deterministic drafter (one-hot).
    generator: the random source on target_probs' device; seeded for reproducible runs.
    """
    return verify_sampling_batch(target_probs[None], [draft_tokens], [draft_probs], [generator])[0]


def verify_sampling_batch(
    target_probs: torch.Tensor,
    draft_tokens: Sequence[torch.Tensor],
    draft_probs: Sequence[torch.Tensor | None],
    generators: Sequence[torch.Generator | None],
) -> list[Verdict]:
    """Rejection-sampling verification of a whole batch (Leviathan et al. 2023, Algorithm 1), one host sync.

    target_probs: [B, W, V] float, processed target probabilities (rows sum to
        1); row b's first K_b + 1 columns are its own.
    draft_tokens: B int64 tensors [K_b].
    draft_probs: per row [K_b, V] float, the processed distributions the drafted
        tokens were sampled from, or None for a deterministic drafter (one-hot).
    generators: per row, its random source on target_probs' device (each row
        draws from its own, so a row samples what it samples alone).

    Each row draws its K_b uniforms, then one candidate token at every checked
    position (from the residual norm(max(0, target - draft)) at a drafted
    position, from the target itself after the last), all on the device; the
    host then reads every row's decisions and candidates at once and keeps the
    candidate at the first rejection (or the bonus). The candidates are drawn
    independently of the uniforms, so keeping one of them is a draw from the
    residual at that position: exact, at the price of K_b unused draws.
    """
    device = target_probs.device
    width = target_probs.shape[1]
    acceptance_rows, uniform_rows, candidate_rows = [], [], []
    for b, (drafted, probs, generator) in enumerate(zip(draft_tokens, draft_probs, generators)):
        num_drafted = drafted.shape[0]
        target = target_probs[b, : num_drafted + 1]  # [K_b+1, V]
        drafted = drafted.to(device)
        if probs is None:
            probs = torch.nn.functional.one_hot(drafted, target.shape[-1]).float()
        else:
            probs = _match_vocab(probs.to(device).float(), target.shape[-1])
        positions = torch.arange(num_drafted, device=device)
        target_at_draft = target[positions, drafted]  # [K_b]
        draft_at_draft = probs[positions, drafted]  # [K_b]
        acceptance = torch.clamp(target_at_draft / draft_at_draft.clamp_min(1e-30), max=1.0)  # [K_b]
        uniforms = torch.rand(num_drafted, device=device, generator=generator)  # [K_b]
        residual = (target[:num_drafted] - probs).clamp_min(0.0)  # [K_b, V]
        total = residual.sum(-1, keepdim=True)
        # The residual can only vanish through rounding (target == draft); then the target itself is exact.
        residual = torch.where(total > 0, residual / total.clamp_min(1e-30), target[:num_drafted])
        candidates = sample(torch.cat([residual, target[num_drafted:]]), generator)  # [K_b+1]
        pad = width - num_drafted
        acceptance_rows.append(torch.nn.functional.pad(acceptance, (0, pad)))
        uniform_rows.append(torch.nn.functional.pad(uniforms, (0, pad), value=1.0))
        candidate_rows.append(torch.nn.functional.pad(candidates, (0, width - num_drafted - 1)))
    acceptance, uniforms, candidates = (
        torch.stack(acceptance_rows).cpu(), torch.stack(uniform_rows).cpu(), torch.stack(candidate_rows).cpu()
    )  # [B, W] each: the step's one host sync
    verdicts = []
    for b, drafted in enumerate(draft_tokens):
        num_drafted = drafted.shape[0]
        accepted = (uniforms[b, :num_drafted] < acceptance[b, :num_drafted]).tolist()
        num_accepted = accepted.index(False) if False in accepted else num_drafted
        checked = min(num_accepted + 1, num_drafted)
        verdicts.append(
            Verdict(
                num_accepted,
                int(candidates[b, num_accepted]),
                tuple(acceptance[b, :checked].tolist()),
                tuple(uniforms[b, :checked].tolist()),
            )
        )
    return verdicts


def _match_vocab(probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pad or cut the last axis to vocab_size (models may pad their LM head differently)."""
    width = probs.shape[-1]
    if width == vocab_size:
        return probs
    if width > vocab_size:
        return probs[..., :vocab_size]
    return torch.nn.functional.pad(probs, (0, vocab_size - width))
