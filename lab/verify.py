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
    """Greedy verification.

    target_logits: [K+1, V] the target's logits at the position before each
        drafted token and after the last one (any float dtype, any device).
    draft_tokens: [K] int64, K >= 0.
    """
    num_drafted = draft_tokens.shape[0]
    target_argmax = target_logits.argmax(-1).cpu()  # [K+1], the step's one host sync
    matches = (target_argmax[:num_drafted] == draft_tokens.cpu()).tolist()
    num_accepted = matches.index(False) if False in matches else num_drafted
    checked = [1.0] * num_accepted + ([0.0] if num_accepted < num_drafted else [])
    return Verdict(num_accepted, int(target_argmax[num_accepted]), tuple(checked))


def verify_sampling(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Verdict:
    """Rejection-sampling verification (Leviathan et al. 2023, Algorithm 1).

    target_probs: [K+1, V] float, processed target probabilities (rows sum to 1).
    draft_tokens: [K] int64.
    draft_probs: [K, V] float, the processed distributions the drafted tokens
        were sampled from, or None for a deterministic drafter (one-hot).
    generator: the random source on target_probs' device; seeded for reproducible runs.
    """
    num_drafted = draft_tokens.shape[0]
    device = target_probs.device
    draft_tokens = draft_tokens.to(device)
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(draft_tokens, target_probs.shape[-1]).float()
    else:
        draft_probs = _match_vocab(draft_probs.to(device).float(), target_probs.shape[-1])
    positions = torch.arange(num_drafted, device=device)
    target_at_draft = target_probs[positions, draft_tokens]  # [K]
    draft_at_draft = draft_probs[positions, draft_tokens]  # [K]
    acceptance = torch.clamp(target_at_draft / draft_at_draft.clamp_min(1e-30), max=1.0)  # [K]
    uniforms = torch.rand(num_drafted, device=device, generator=generator)  # [K]
    accepted = (uniforms < acceptance).tolist()
    num_accepted = accepted.index(False) if False in accepted else num_drafted
    if num_accepted < num_drafted:
        residual = (target_probs[num_accepted] - draft_probs[num_accepted]).clamp_min(0.0)  # [V]
        total = residual.sum()
        # The residual can only vanish through rounding (target == draft); then the target itself is exact.
        residual = residual / total if total > 0 else target_probs[num_accepted]
        next_token = int(sample(residual, generator))
    else:
        next_token = int(sample(target_probs[num_drafted], generator))
    checked = min(num_accepted + 1, num_drafted)
    return Verdict(
        num_accepted,
        next_token,
        tuple(acceptance[:checked].tolist()),
        tuple(uniforms[:checked].tolist()),
    )


def _match_vocab(probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pad or cut the last axis to vocab_size (models may pad their LM head differently)."""
    width = probs.shape[-1]
    if width == vocab_size:
        return probs
    if width > vocab_size:
        return probs[..., :vocab_size]
    return torch.nn.functional.pad(probs, (0, vocab_size - width))
