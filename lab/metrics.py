"""Speculative decoding statistics, with vLLM's conventions.

Definitions (vLLM v1 ``spec_decode/metrics.py``):

- num_drafts: steps at which the drafter proposed at least one token.
- num_draft_tokens: drafted tokens, summed over steps.
- num_accepted_tokens: drafted tokens the target kept. Acceptance measures
  verification, not the output: when an EOS or stop string inside an accepted
  draft ends the output, the drafted tokens the target verified after it still
  count as accepted (vLLM counts them the same way, before its stop checks);
  the app colours them nowhere, since they are never emitted.
- accepted_per_position[i]: drafts whose token at position i was accepted.
- per-position acceptance rate: accepted_per_position[i] / num_drafts (a draft
  shorter than i+1 counts as not accepted there, as in vLLM).
- acceptance rate: num_accepted_tokens / num_draft_tokens (NaN when nothing was drafted).
- mean acceptance length: 1 + num_accepted_tokens / num_drafts, so it counts the
  target's own (corrected or bonus) token: tokens per target step on drafted steps
  (NaN when nothing was drafted).
- token trees (``lab.tree``): a tree step counts as one draft of N tokens (its
  nodes) with its accepted depth as accepted tokens, so the mean acceptance
  length stays 1 + mean accepted depth (tokens per target step) and
  accepted_per_position[i] counts steps whose accepted depth exceeds i;
  num_tree_drafts and num_tree_nodes give the mean tree size. The acceptance
  rate (accepted / drafted) of a tree is low by construction: most nodes are
  alternatives, never on the accepted path.
- target_forward_passes: verify passes of the target after prefill (one per step).
- num_output_tokens: tokens committed to the output.
- wall_s: prefill plus all steps, seconds; tokens_per_s = num_output_tokens / wall_s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lab.trace import Finished, Prefilled, Step, TraceEvent


class AcceptanceRates:
    """The rates of the module docstring from four counters a class holds: num_drafts, num_draft_tokens,
    num_accepted_tokens and accepted_per_position (a mixin: ours and a serving engine's counters alike)."""

    num_drafts: float
    num_draft_tokens: float
    num_accepted_tokens: float
    accepted_per_position: "list[int] | tuple[float, ...]"

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else math.nan

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else math.nan

    @property
    def per_position_acceptance_rate(self) -> list[float]:
        return [n / self.num_drafts for n in self.accepted_per_position] if self.num_drafts else []


@dataclass
class SpecDecodingStats(AcceptanceRates):
    """Counters of one or more decodes; feed trace events to ``observe``."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    num_tree_drafts: int = 0
    num_tree_nodes: int = 0
    target_forward_passes: int = 0
    num_output_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0

    def observe(self, event: TraceEvent) -> None:
        """Count one trace event."""
        if isinstance(event, Prefilled):
            self.prefill_s += event.prefill_ms / 1e3
        elif isinstance(event, Step):
            self.target_forward_passes += 1
            self.num_output_tokens += len(event.emitted)
            self.draft_s += event.draft_ms / 1e3
            self.verify_s += event.verify_ms / 1e3
            if event.drafted:
                self.num_drafts += 1
                self.num_draft_tokens += len(event.drafted)
                self.num_accepted_tokens += event.num_accepted
                positions = len(event.drafted) if event.tree is None else max(event.tree.depths)  # a tree: its depth
                if len(self.accepted_per_position) < positions:
                    self.accepted_per_position += [0] * (positions - len(self.accepted_per_position))
                for i in range(event.num_accepted):
                    self.accepted_per_position[i] += 1
                if event.tree is not None:
                    self.num_tree_drafts += 1
                    self.num_tree_nodes += event.tree_size
        elif isinstance(event, Finished):
            self.wall_s += event.wall_s

    def merge(self, other: "SpecDecodingStats") -> None:
        """Add another run's counters to these (per-position counts aligned at position 0)."""
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        if len(self.accepted_per_position) < len(other.accepted_per_position):
            self.accepted_per_position += [0] * (len(other.accepted_per_position) - len(self.accepted_per_position))
        for i, n in enumerate(other.accepted_per_position):
            self.accepted_per_position[i] += n
        self.num_tree_drafts += other.num_tree_drafts
        self.num_tree_nodes += other.num_tree_nodes
        self.target_forward_passes += other.target_forward_passes
        self.num_output_tokens += other.num_output_tokens
        self.prefill_s += other.prefill_s
        self.draft_s += other.draft_s
        self.verify_s += other.verify_s
        self.wall_s += other.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def mean_tree_size(self) -> float:
        """Nodes per drafted tree (NaN without trees)."""
        return self.num_tree_nodes / self.num_tree_drafts if self.num_tree_drafts else math.nan

    def as_dict(self) -> dict:
        """Plain numbers for JSON: the counters and the derived rates (NaN becomes None)."""
        clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_position": list(self.accepted_per_position),
            "per_position_acceptance_rate": self.per_position_acceptance_rate,
            "acceptance_rate": clean(self.acceptance_rate),
            "mean_acceptance_length": clean(self.mean_acceptance_length),
            "num_tree_drafts": self.num_tree_drafts,
            "num_tree_nodes": self.num_tree_nodes,
            "mean_tree_size": clean(self.mean_tree_size),
            "target_forward_passes": self.target_forward_passes,
            "num_output_tokens": self.num_output_tokens,
            "prefill_s": self.prefill_s,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "wall_s": self.wall_s,
            "tokens_per_s": clean(self.tokens_per_s),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear between order statistics (numpy's default); NaN for no
    values. The one percentile of the Batch sweep, serve bench and workload simulator: the same numbers everywhere."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
