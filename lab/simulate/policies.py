"""How many tokens to draft at each step: the policies the workload simulator compares.

Each policy sees, at every step, the rows of the running batch (their
category and what they accepted so far) and the :class:`Context` (step costs,
each category's expected tokens per step by K), and returns one K for every
row, or one K per row. K = 0 is speculation off.

- :class:`Off`: the target alone.
- :class:`StaticK`: the same K at every step (vLLM's ``num_speculative_tokens``,
  llama.cpp's ``--draft-max``).
- :class:`KByBatch`: a K per batch size, looked up at each step: vLLM's
  ``num_speculative_tokens_per_batch_size``. :meth:`KByBatch.fit` derives the
  table from the costs and the acceptance: at each batch size the K of most
  tokens per millisecond.
- :class:`Goodput`: SmartSpec (Liu et al. 2024, arXiv 2406.14066): at every
  step, the K that maximises the batch's expected tokens over the step's time,
  given the categories of the rows now running.
- :class:`Cascade`: per-request utility gating (arXiv 2506.20675): each row's
  own acceptance is estimated as it runs; a row whose expected tokens per
  step cannot pay for the longer step stops drafting (and is tested again
  every ``retest_steps`` steps); the rows still drafting get the goodput K.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from lab.simulate.acceptance import K_LIMIT, AcceptanceProfile
from lab.simulate.costs import StepCosts

PRIOR_TOKENS = 4.0  # Cascade: how many accepted tokens the category's profile weighs as, against a row's own


@dataclass
class Context:
    """What a policy may read at a step: the costs, each category's expected tokens per step by K
    (``expected[category][K]``), and a memo for its own use."""

    costs: StepCosts
    acceptance: AcceptanceProfile
    expected: dict[str, list[float]]
    memo: dict = field(default_factory=dict)

    @staticmethod
    def of(costs: StepCosts, acceptance: AcceptanceProfile, k_max: int = K_LIMIT) -> "Context":
        return Context(costs, acceptance, {c: [a.expected_tokens(k) for k in range(k_max + 1)]
                                           for c, a in acceptance.categories.items()})


class Row(Protocol):
    """A running request as a policy sees it: its category, and accepted against expected draft tokens so far."""

    category: str
    accepted: float
    expected: float
    off_steps: int


class Policy(Protocol):
    name: str
    k_max: int

    def choose(self, rows: Sequence[Row], context: Context) -> int | list[int]: ...

    @property
    def label(self) -> str: ...


@dataclass(frozen=True)
class Off:
    """Speculation off."""

    name: str = "off"
    k_max: int = 0

    def choose(self, rows: Sequence[Row], context: Context) -> int:
        return 0

    @property
    def label(self) -> str:
        return "off"


@dataclass(frozen=True)
class StaticK:
    """The same K (1..16) at every step."""

    k: int
    name: str = "static"

    def __post_init__(self) -> None:
        _check_k(self.k, "static K")

    @property
    def k_max(self) -> int:
        return self.k

    def choose(self, rows: Sequence[Row], context: Context) -> int:
        return self.k

    @property
    def label(self) -> str:
        return f"static K={self.k}"


@dataclass(frozen=True)
class KByBatch:
    """K by batch size: the K of the largest listed batch size <= the running batch's (below all: the smallest's).

    table: {batch size: K in 0..16}.
    """

    table: dict[int, int]
    name: str = "k-by-batch"

    def __post_init__(self) -> None:
        if not self.table:
            raise ValueError("a K-by-batch-size table requires at least one entry; got none")
        for b, k in self.table.items():
            if b < 1:
                raise ValueError(f"a K-by-batch-size table requires batch sizes >= 1; got {b}")
            _check_k(k, "a K-by-batch-size entry", allow_zero=True)

    @property
    def k_max(self) -> int:
        return max(self.table.values())

    def k_at(self, batch_size: int) -> int:
        keys = sorted(self.table)
        return self.table[max((b for b in keys if b <= batch_size), default=keys[0])]

    def choose(self, rows: Sequence[Row], context: Context) -> int:
        return self.k_at(len(rows))

    @property
    def label(self) -> str:
        return "K by batch " + ", ".join(f"{b}:{k}" for b, k in sorted(self.table.items()))

    @staticmethod
    def fit(context: Context, mix: dict[str, float], batch_sizes: Sequence[int], k_max: int) -> "KByBatch":
        """At each batch size, the K in 0..k_max of most expected tokens per ms for rows drawn from ``mix``, never
        above the K of a smaller batch: drafting pays less as batches grow (the verify pass grows with rows and
        width, a row's expected tokens do not), so a K that rises again comes from timing noise between the batch
        sizes timed, or from costs extrapolated past them (a trial got 1:4, 2:1, 4:3, 8:0, 64:2)."""
        total = sum(mix.values())
        expected = [sum(w * context.expected[c][k] for c, w in mix.items()) / total for k in range(k_max + 1)]
        table, ceiling = {}, k_max
        for b in sorted(batch_sizes):
            table[b] = ceiling = min(ceiling, max(range(k_max + 1),
                                                  key=lambda k: b * expected[k] / context.costs.step_ms(b, k)))
        return KByBatch(_compact(table))


@dataclass(frozen=True)
class Goodput:
    """SmartSpec: at each step the K in 0..k_max that maximises expected tokens of the batch per ms of the step."""

    k_max: int = 8
    name: str = "goodput"

    def __post_init__(self) -> None:
        _check_k(self.k_max, "goodput's k_max")

    def choose(self, rows: Sequence[Row], context: Context) -> int:
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.category] = counts.get(row.category, 0) + 1
        key = (self.name, self.k_max, len(rows), tuple(sorted(counts.items())))
        k = context.memo.get(key)
        if k is None:
            b = len(rows)
            k = max(range(self.k_max + 1), key=lambda k: sum(n * context.expected[c][k] for c, n in counts.items())
                    / context.costs.step_ms(b, k))
            context.memo[key] = k
        return k

    @property
    def label(self) -> str:
        return f"goodput K<={self.k_max}"


@dataclass(frozen=True)
class Cascade:
    """Per-request utility gating: rows that cannot pay for the longer step draft nothing (see the module docstring).

    k_max: the largest K. margin: a row drafts when its predicted speedup of
    the step exceeds 1 + margin. retest_steps: a gated-off row drafts again
    after this many steps, to see whether it has changed.
    """

    k_max: int = 8
    margin: float = 0.0
    retest_steps: int = 16
    name: str = "cascade"

    def __post_init__(self) -> None:
        _check_k(self.k_max, "cascade's k_max")

    def choose(self, rows: Sequence[Row], context: Context) -> list[int]:
        b = len(rows)
        ratios = context.memo.get(("ratios", self.k_max, b))
        if ratios is None:  # a step at K in units of the plain step's time, inverted
            base = context.costs.step_ms(b, 0)
            ratios = context.memo[("ratios", self.k_max, b)] = [base / context.costs.step_ms(b, k)
                                                                for k in range(self.k_max + 1)]
        ks = range(1, self.k_max + 1)
        on, weight = [], {}  # weight: per category, the summed acceptance factors of the rows that draft
        for row in rows:
            factor = round((row.accepted + PRIOR_TOKENS) / (row.expected + PRIOR_TOKENS), 2)
            key = ("pays", self.k_max, b, row.category, factor)
            pays = context.memo.get(key)
            if pays is None:
                expected = context.expected[row.category]
                pays = context.memo[key] = max((1.0 + factor * (expected[k] - 1.0)) * ratios[k] for k in ks) \
                    > 1.0 + self.margin
            drafts = pays or row.off_steps >= self.retest_steps
            on.append(drafts)
            if drafts:
                weight[row.category] = weight.get(row.category, 0.0) + factor
        if not weight:
            return [0] * b
        # Tokens of the step at K: one per row, plus each drafting row's factor x its category's expected accepted.
        k = max(ks, key=lambda k: (b + sum(f * (context.expected[c][k] - 1.0) for c, f in weight.items())) * ratios[k])
        return [k if drafts else 0 for drafts in on]

    @property
    def label(self) -> str:
        return f"cascade K<={self.k_max}"


def default_policies(context: Context, mix: dict[str, float], batch_sizes: Sequence[int],
                     k_max: int = 8, static_ks: Sequence[int] = (1, 2, 3, 4, 6, 8)) -> list:
    """Off, static K for each of ``static_ks`` up to k_max, the fitted K-by-batch table, goodput and Cascade."""
    return [Off(), *(StaticK(k) for k in static_ks if k <= k_max),
            KByBatch.fit(context, mix, batch_sizes, k_max), Goodput(k_max), Cascade(k_max)]


def _compact(table: dict[int, int]) -> dict[int, int]:
    """Drop entries that repeat the K of the batch size before them."""
    out, last = {}, None
    for b in sorted(table):
        if table[b] != last:
            out[b] = last = table[b]
    return out


def _check_k(k: int, what: str, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(k, int) or not low <= k <= K_LIMIT:
        raise ValueError(f"{what} requires an integer K in {low}..{K_LIMIT}; got {k!r}")
