"""A serving engine's own speculation counters, read from its Prometheus ``/metrics`` text.

vLLM's ``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``,
``..._num_accepted_tokens`` and ``..._num_accepted_tokens_per_pos{position}``
(all ``_total`` counters); llama.cpp's same names under ``llamacpp:``
(``llama-server --metrics``); SGLang's gauges ``sglang:spec_accept_length`` /
``sglang:spec_accept_rate`` (a recent average, not a counter: it cannot be
diffed). Counters are summed over every other label (model, engine, rank) and
diffed before and after a run (:class:`SpecCounters`); they count every request
the server saw meanwhile, so a shared server's other traffic is in them.
Conventions are vLLM's (``lab.metrics``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lab.metrics import AcceptanceRates

ENGINE_PREFIXES = {"vllm:": "vllm", "llamacpp:": "llama.cpp", "sglang:": "sglang"}
_COUNTER_NAMES = {
    "spec_decode_num_drafts": "num_drafts",
    "spec_decode_num_draft_tokens": "num_draft_tokens",
    "spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
_PER_POSITION_NAME = "spec_decode_num_accepted_tokens_per_pos"


@dataclass(frozen=True)
class SpecCounters(AcceptanceRates):
    """An engine's speculation counters (totals since it started, or a difference of two snapshots).

    The rates (acceptance rate, mean acceptance length, per-position acceptance) follow ``lab.metrics``.

    engine: "vllm" or "llama.cpp". num_drafts: verify steps with a draft;
    num_draft_tokens / num_accepted_tokens: drafted / accepted tokens;
    accepted_per_position[i]: drafts whose token i was accepted.
    """

    engine: str
    num_drafts: float = 0.0
    num_draft_tokens: float = 0.0
    num_accepted_tokens: float = 0.0
    accepted_per_position: tuple[float, ...] = ()

    def __sub__(self, before: "SpecCounters") -> "SpecCounters":
        """The counts between the snapshot ``before`` and this one (positions aligned at 0)."""
        width = max(len(self.accepted_per_position), len(before.accepted_per_position))
        pad = lambda xs: tuple(xs) + (0.0,) * (width - len(xs))  # noqa: E731
        return SpecCounters(
            engine=self.engine,
            num_drafts=self.num_drafts - before.num_drafts,
            num_draft_tokens=self.num_draft_tokens - before.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens - before.num_accepted_tokens,
            accepted_per_position=tuple(a - b for a, b in zip(pad(self.accepted_per_position), pad(before.accepted_per_position))),
        )

    @property
    def per_position_acceptance(self) -> list[float]:
        """accepted_per_position[i] / num_drafts (``per_position_acceptance_rate``); empty when nothing was drafted."""
        return self.per_position_acceptance_rate


@dataclass(frozen=True)
class MetricsSnapshot:
    """What one scrape of ``/metrics`` said about speculation.

    engine: "vllm", "llama.cpp", "sglang", or "" when no known prefix appeared.
    counters: the spec-decode counters (vLLM, llama.cpp); None when absent
        (speculation off, or an engine without them).
    gauges: SGLang's ``spec_accept_length`` / ``spec_accept_rate`` when present.
    """

    engine: str
    counters: SpecCounters | None
    gauges: Mapping[str, float] = field(default_factory=dict)


def parse_metrics(text: str) -> MetricsSnapshot:
    """Parse a Prometheus text exposition into a :class:`MetricsSnapshot`.

    Samples are summed over labels other than ``position`` (several models,
    ranks or engines behind one server add up). ``_created`` samples are ignored.

    Raises:
        ValueError: the text is not Prometheus' text format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    engine = ""
    totals: dict[str, float] = {}
    per_position: dict[int, float] = {}
    gauges: dict[str, float] = {}
    seen_counter = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            prefix = next((p for p in ENGINE_PREFIXES if sample.name.startswith(p)), None)
            if prefix is None:
                continue
            engine = engine or ENGINE_PREFIXES[prefix]
            name = sample.name[len(prefix):]
            if name.endswith("_created"):
                continue
            name = name.removesuffix("_total")
            if name in _COUNTER_NAMES:
                totals[name] = totals.get(name, 0.0) + sample.value
                seen_counter = True
            elif name == _PER_POSITION_NAME and "position" in sample.labels:
                position = int(sample.labels["position"])
                per_position[position] = per_position.get(position, 0.0) + sample.value
            elif prefix == "sglang:" and name in ("spec_accept_length", "spec_accept_rate"):
                gauges[name] = gauges.get(name, 0.0) + sample.value
    counters = None
    if seen_counter:
        width = max(per_position) + 1 if per_position else 0
        counters = SpecCounters(
            engine=engine,
            num_drafts=totals.get("spec_decode_num_drafts", 0.0),
            num_draft_tokens=totals.get("spec_decode_num_draft_tokens", 0.0),
            num_accepted_tokens=totals.get("spec_decode_num_accepted_tokens", 0.0),
            accepted_per_position=tuple(per_position.get(i, 0.0) for i in range(width)),
        )
    return MetricsSnapshot(engine=engine, counters=counters, gauges=gauges)


def counters_between(before: MetricsSnapshot | None, after: MetricsSnapshot | None) -> SpecCounters | None:
    """The spec-decode counts a run added (after - before), or None when either scrape lacks counters."""
    if before is None or after is None or before.counters is None or after.counters is None:
        return None
    return after.counters - before.counters


# ---------------------------------------------------------------- one request
