"""Compare drafters and K values on the same prompts, against the target alone.

Every (drafter, K) combination runs on every prompt; the target alone runs once
per prompt through the same engine as the baseline. The two arms are
interleaved: runs of one prompt follow each other, and the order alternates
from prompt to prompt (even prompts: target alone first, then every drafter x
K; odd prompts: the drafter x K runs in reverse order, then the target alone),
so a drift of the machine's speed (a clock slowing, a neighbour starting) hits
the baseline and the speculative runs alike instead of only the arm that ran
late. ``Comparison.runs`` lists the runs in the order they ran. The whole
comparison holds its device in ``lab.device_queue`` (no other timed run of the
lab shares the cores meanwhile), and each run carries a ``lab.load`` report
(``RunRecord.load``; the first loaded one, else the longest, in
settings["load"]) saying whether anything outside the lab was busy meanwhile.
Results export to JSON (complete, reloadable) and CSV (one row per run).

Speedup conventions:
- speedup: tokens/s of the run over tokens/s of the target alone on the same
  prompt, end to end (prefill included): what a user waiting for the answer feels.
- decode_speedup: the same over the decode phase only (prefill excluded, it is
  identical in both); this is what Leviathan's formula predicts, so
  efficiency = decode_speedup / predicted_speedup.
- cost_ratio c: draft time per drafted token over the target alone's time per
  decode step, both measured in this comparison.
- verify_cost_ratio: the in-loop time of one verify pass (K'+1 tokens,
  acceptance and rollback included) over the target alone's time per step.
- bare verify cost v(K): one bare forward pass over K+1 tokens in plain
  one-token steps (``measure_verify_cost``, stored in settings["verify_cost"]).
  Leviathan's model assumes v = 1, true where a step is bound by reading the
  weights; on a CPU a pass over K+1 tokens costs more. verify_cost_ratio above
  v(K) is the engine's own bookkeeping.
- draft_rate r: the share of steps at which the drafter proposed anything
  (prompt lookup finds no match at some steps; model drafters always draft).
  Leviathan's model assumes r = 1.
- predicted_speedup_v: the same model with the bare v(K) and the measured r,
  (r E(a, K) + 1 - r) / (r (K c + v(K)) + 1 - r), E(a, K) = (1 - a^(K+1)) / (1 - a);
  efficiency_v = decode_speedup / predicted_speedup_v: what is left of the gap
  once the hardware's verify cost and the drafter's misses are counted, i.e.
  the engine's own overhead and timing noise (1.0: a perfect engine).
- token trees (``DrafterSpec.tree_budget`` N > 0, ``lab.tree``): the row's K is
  the tree's depth; its verify pass reads N + 1 tokens, so bare_verify_cost is
  v at N (timed with the chains' K); mean_acceptance_length is 1 + the mean
  accepted depth; the chain model's predictions (fitted_acceptance,
  predicted_speedup*, efficiency*) do not apply and are NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd

from lab import device_queue
from lab.config import DecodeConfig
from lab.drafters import DRAFTER_NAMES, make_drafter
from lab.decode import decode
from lab.metrics import SpecDecodingStats
from lab.hardware import model_precision
from lab.load import LoadReport, measure_load, worst
from lab.models import encode_prompt
from lab.studies.passes import time_passes
from lab.theory import acceptance_from_mean_length, expected_speedup, expected_tokens_per_step
from lab.trace import Finished, Step

BASELINE = "target alone"


@dataclass(frozen=True)
class DrafterSpec:
    """One drafter to compare.

    name: a drafter name from ``lab.drafters.DRAFTER_NAMES`` (not "none": the
        target alone always runs as the baseline).
    draft: the draft model (preset name or folder), required for "draft-model".
    exit_layer: layer-skip's exit layer (None: a quarter of the target's layers).
    min_n, max_n: prompt lookup's n-gram sizes.
    draft_vocab: draft-model / eagle: score only the target's N most frequent
        tokens (``lab.vocab``); None: the full vocabulary.
    vocab_bridge: draft-model: "none" (a draft of the target's tokenizer),
        "text" (a draft with another tokenizer, bridged exactly through text) or
        "ids" (the trap: its ids sent as they are); ``lab.drafters.bridge``.
    tree_budget: draft a token tree of at most N nodes (1..64; ``lab.tree``) of depth K; 0: a chain.

    Raises ValueError on an unknown name or bridge, or a missing draft model.
    """

    name: str
    draft: str | None = None
    exit_layer: int | None = None
    min_n: int = 1
    max_n: int = 3
    draft_vocab: int | None = None
    vocab_bridge: str = "none"
    tree_budget: int = 0

    def __post_init__(self) -> None:
        from lab.drafters.bridge import check_vocab_bridge
        from lab.tree import check_tree_budget

        check_vocab_bridge(self.vocab_bridge)
        check_tree_budget(self.tree_budget)
        if self.vocab_bridge != "none" and self.name != "draft-model":
            raise ValueError(f"a vocabulary bridge requires the draft-model drafter; got {self.name!r}")
        if self.name not in DRAFTER_NAMES or self.name == "none":
            allowed = ", ".join(n for n in DRAFTER_NAMES if n != "none")
            raise ValueError(f"a compared drafter requires one of {allowed}; got {self.name!r}")
        if self.name == "draft-model" and not self.draft:
            raise ValueError("draft-model requires a draft model name; got none")

    @property
    def label(self) -> str:
        base = self._chain_label
        return f"{base[:-1]}, tree {self.tree_budget})" if base.endswith(")") and self.tree_budget else (
            f"{base} (tree {self.tree_budget})" if self.tree_budget else base)

    @property
    def _chain_label(self) -> str:
        vocab = f", vocab {self.draft_vocab // 1024}k" if self.draft_vocab and self.draft_vocab >= 1024 else (
            f", vocab {self.draft_vocab}" if self.draft_vocab else "")
        if self.name == "draft-model":
            bridge = {"text": ", text bridge", "ids": ", ids trap"}.get(self.vocab_bridge, "")
            return f"draft-model ({self.draft}{vocab}{bridge})"
        if self.name == "eagle":
            return f"eagle ({vocab[2:]})" if vocab else "eagle"
        if self.name == "layer-skip":
            return f"layer-skip (exit {self.exit_layer})" if self.exit_layer else "layer-skip"
        if self.name == "prompt-lookup":
            return f"prompt-lookup (n {self.min_n}-{self.max_n})"
        return self.name


@dataclass
class RunRecord:
    """One decode of one prompt: the target alone (drafter == BASELINE, k == 0) or a drafter at K."""

    prompt_index: int
    drafter: str
    k: int
    token_ids: list[int]
    text: str
    metrics: dict[str, Any]
    draft_ms: list[float] = field(default_factory=list)  # per step
    verify_ms: list[float] = field(default_factory=list)  # per step
    speedup: float = math.nan
    decode_speedup: float = math.nan
    cost_ratio: float = math.nan
    identical_to_target: bool | None = None
    cancelled: bool = False
    load: dict | None = None  # lab.load.LoadReport.as_dict() of this run (None: files from before it existed)
    bridge_ms: list[float] = field(default_factory=list)  # per drafting step: a vocabulary bridge's tokenizer work,
    # already inside draft_ms (so inside c); empty without a bridge


@dataclass
class Comparison:
    """All runs of a comparison, with the settings that produced them."""

    settings: dict[str, Any]
    prompts: list[str]
    runs: list[RunRecord] = field(default_factory=list)

    def runs_frame(self) -> pd.DataFrame:
        """One row per run (baselines included): the per-prompt breakdown."""
        rows = []
        for r in self.runs:
            m = r.metrics
            rows.append(
                {
                    "prompt": r.prompt_index,
                    "drafter": r.drafter,
                    "k": r.k,
                    "output_tokens": m["num_output_tokens"],
                    "acceptance_rate": m["acceptance_rate"],
                    "mean_acceptance_length": m["mean_acceptance_length"],
                    "tokens_per_s": m["tokens_per_s"],
                    "speedup": r.speedup,
                    "decode_speedup": r.decode_speedup,
                    "cost_ratio": r.cost_ratio,
                    "identical_to_target": r.identical_to_target,
                    "wall_s": m["wall_s"],
                }
            )
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """One row per (drafter, K), pooled over prompts; see the module docstring."""
        baselines = {r.prompt_index: r for r in self.runs if r.drafter == BASELINE and not r.cancelled}
        rows = []
        trees = {spec["label"]: spec.get("tree_budget", 0) for spec in self.settings.get("drafters", [])}
        groups: dict[tuple[str, int], list[RunRecord]] = {}
        for r in self.runs:
            if r.drafter != BASELINE and not r.cancelled and r.prompt_index in baselines:
                groups.setdefault((r.drafter, r.k), []).append(r)
        for (drafter, k), runs in groups.items():
            base = [baselines[r.prompt_index] for r in runs]
            pooled = _pool([r.metrics for r in runs])
            base_pooled = _pool([b.metrics for b in base])
            speedup = _ratio(pooled["tokens_per_s"], base_pooled["tokens_per_s"])
            decode_speedup = _ratio(pooled["decode_tokens_per_s"], base_pooled["decode_tokens_per_s"])
            cost_ratio = _ratio(pooled["draft_s_per_draft_token"], base_pooled["verify_s_per_step"])
            verify_cost = _ratio(pooled["verify_s_per_step"], base_pooled["verify_s_per_step"])
            tree = trees.get(drafter, 0)
            alpha = math.nan if tree else _fitted_acceptance(pooled["mean_acceptance_length"], k)
            predicted = expected_speedup(alpha, k, cost_ratio) if not (math.isnan(alpha) or not cost_ratio >= 0) else math.nan
            draft_rate = _per(pooled["num_drafts"], pooled["target_forward_passes"])
            bare_v = float(self.settings.get("verify_cost", {}).get(str(tree or k), math.nan))
            predicted_v = _predicted_with_verify_cost(alpha, k, cost_ratio, bare_v, draft_rate)
            identical = [r.identical_to_target for r in runs if r.identical_to_target is not None]
            rows.append(
                {
                    "drafter": drafter,
                    "k": k,
                    "tree_budget": tree,
                    "mean_tree_size": _per(sum(r.metrics.get("num_tree_nodes", 0) for r in runs),
                                           sum(r.metrics.get("num_tree_drafts", 0) for r in runs)),
                    "prompts": len(runs),
                    "acceptance_rate": pooled["acceptance_rate"],
                    "mean_acceptance_length": pooled["mean_acceptance_length"],
                    "per_position_acceptance": pooled["per_position_acceptance_rate"],
                    "tokens_per_s": pooled["tokens_per_s"],
                    "target_tokens_per_s": base_pooled["tokens_per_s"],
                    "speedup": speedup,
                    "decode_speedup": decode_speedup,
                    "cost_ratio": cost_ratio,
                    "fitted_acceptance": alpha,
                    "predicted_speedup": predicted,
                    "efficiency": _ratio(decode_speedup, predicted),
                    "tokens_per_pass": _per(pooled["num_output_tokens"], pooled["target_forward_passes"]),
                    "verify_cost_ratio": verify_cost,
                    "bare_verify_cost": bare_v,
                    "draft_rate": draft_rate,
                    "predicted_speedup_v": predicted_v,
                    "efficiency_v": _ratio(decode_speedup, predicted_v),
                    "identical_to_target": (sum(identical) / len(identical)) if identical else math.nan,
                }
            )
        return pd.DataFrame(rows)

    def to_json(self) -> str:
        """Everything, reloadable with ``Comparison.from_json``."""
        return json.dumps({"settings": self.settings, "prompts": self.prompts, "runs": [asdict(r) for r in self.runs]})

    @staticmethod
    def from_json(text: str) -> "Comparison":
        """Load a comparison saved by ``to_json``, checked against its schema first (``lab.results_files``).

        Raises ``lab.results_files.ResultsFileError`` (a ValueError) naming the first wrong field.
        """
        from lab.results_files import parse_results

        data = parse_results(text, "comparison")
        return Comparison(data["settings"], list(data["prompts"]), [RunRecord(**r) for r in data["runs"]])

    def to_csv(self) -> str:
        """The per-run table as CSV text; its ``prompt_index`` counts from 0, as in the JSON (the app shows 1-based)."""
        return self.runs_frame().rename(columns={"prompt": "prompt_index"}).to_csv(index=False)


def run_comparison(
    target,
    prompts: list[str],
    drafters: list[DrafterSpec],
    ks: list[int],
    config: DecodeConfig,
    load_draft: Callable[[str], Any] | None = None,
    chat_template: bool = True,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    measure_verify: bool = True,
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> Comparison:
    """Run every drafter at every K on every prompt, plus the target alone per prompt.

    target: ``lab.models.LoadedModel``. prompts: raw texts (chat template applied
    unless chat_template is False). config: shared settings; its k is replaced
    by each K. load_draft: turns a draft name into a LoadedModel (needed for
    "draft-model"). progress(fraction, message) after each run; should_cancel()
    is polled between steps, and a cancelled comparison keeps the runs finished
    so far. measure_verify: first time bare verify passes at every K
    (``measure_verify_cost``, a second or two) for the efficiency_v column.
    on_part: called when a prompt's runs have all finished (the target alone
    and every drafter at every K) with {"prompt_index", "prompt", "runs": [the
    runs as dicts]}, so a results store keeps each finished prompt at once.

    Raises ValueError on empty prompts, no K or bad K, a bridge under sampling,
    and ``lab.models.ModelError`` on a draft whose tokenizer differs from the
    target's without a vocabulary bridge.
    """
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError("No prompts to compare: paste at least one prompt or pick a prompt set.")
    if not ks:
        raise ValueError("No K values: pick at least one K.")
    configs = {k: replace(config, k=k) for k in ks}  # validates every K
    from lab.drafters.bridge import check_bridge_sampling

    for spec in drafters:
        check_bridge_sampling(spec.vocab_bridge, config.temperature)
    drafts = {}
    for spec in drafters:
        if spec.name == "draft-model" and spec.draft not in drafts:
            if load_draft is None:
                raise ValueError("draft-model requires a load_draft function to load the draft model")
            drafts[spec.draft] = load_draft(spec.draft)
    heads = {}
    if any(spec.name == "eagle" for spec in drafters):  # load the head once, not per run
        from lab.drafters.eagle import find_head, load_head

        heads["eagle"], _ = load_head(find_head(target.name), device=next(target.model.parameters()).device)
    encoded = [encode_prompt(target, p, chat_template) for p in prompts]
    comparison = Comparison(
        settings={
            "target": target.name,
            "dtype": str(getattr(target, "dtype", "")),
            "target_precision": model_precision(target),
            "draft_precisions": {name: model_precision(draft) for name, draft in drafts.items()},
            "device": str(getattr(target, "device", "")),
            "max_new_tokens": config.max_new_tokens,
            "engine_mode": config.engine_mode,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "seed": config.seed,
            "chat_template": chat_template,
            "drafters": [asdict(s) | {"label": s.label} for s in drafters],
            "ks": list(ks),
        },
        prompts=prompts,
    )
    with device_queue.hold(device_queue.device_of(target), "compare"):  # nested in the caller's hold, if any
        if measure_verify:
            widths = sorted(set(ks) | {s.tree_budget for s in drafters if s.tree_budget})  # v(N) for trees too
            context = min(max(len(ids) for ids in encoded), _context_limit(target) - max(widths) - 1)
            _report(progress, 0, 1, "timing bare verify passes")
            costs = measure_verify_cost(target, widths, context_tokens=max(context, 1))
            comparison.settings["verify_cost"] = {str(k): v for k, v in costs.items()}
        return _run_interleaved(comparison, target, encoded, drafters, ks, config, configs, drafts, heads, progress,
                                should_cancel, on_part)


def _run_interleaved(comparison, target, encoded, drafters, ks, config, configs, drafts, heads, progress,
                     should_cancel, on_part) -> Comparison:
    """Every prompt's runs in ``interleaved_arms`` order, appended to ``comparison.runs`` as they finish."""
    prompts = comparison.prompts
    total = len(prompts) * (1 + len(drafters) * len(ks))
    cancel = should_cancel or (lambda: False)
    greedy = config.temperature == 0
    reports: list[LoadReport] = []

    def one_run(index, prompt_ids, arm) -> RunRecord:
        if arm is None:
            return _one_run(target, prompt_ids, None, config, index, BASELINE, 0, cancel, reports)
        spec, k = arm
        drafter = make_drafter(
            spec.name, target, drafts.get(spec.draft), min_n=spec.min_n, max_n=spec.max_n, exit_layer=spec.exit_layer,
            draft_vocab=spec.draft_vocab, head=heads.get(spec.name), vocab_bridge=spec.vocab_bridge,
        )
        arm_config = replace(configs[k], tree_budget=spec.tree_budget)
        return _one_run(target, prompt_ids, drafter, arm_config, index, spec.label, k, cancel, reports)

    try:
        for index, prompt_ids in enumerate(encoded):
            baseline, waiting = None, []  # waiting: this prompt's runs that ran before its baseline
            for arm in interleaved_arms(index, drafters, ks):
                record = one_run(index, prompt_ids, arm)
                comparison.runs.append(record)
                if arm is None:
                    baseline = record
                    for earlier in ([] if record.cancelled else waiting):
                        _compare_with_baseline(earlier, baseline, greedy)
                elif baseline is not None:
                    _compare_with_baseline(record, baseline, greedy)
                else:
                    waiting.append(record)
                what = BASELINE if arm is None else f"{arm[0].label}, K={arm[1]}"
                _report(progress, len(comparison.runs), total, f"prompt {index + 1}/{len(prompts)}: {what}")
                if record.cancelled:
                    return comparison
            if on_part is not None:
                on_part({"prompt_index": index, "prompt": prompts[index],
                         "runs": [asdict(r) for r in comparison.runs if r.prompt_index == index]})
    finally:
        report = worst(reports)
        comparison.settings["load"] = None if report is None else report.as_dict()
    return comparison


def interleaved_arms(index: int, drafters: list[DrafterSpec], ks: list[int]) -> list[tuple[DrafterSpec, int] | None]:
    """The order of prompt ``index``'s runs: None is the target alone, (spec, K) a drafter at K.

    Even prompts: the target alone, then every drafter x K; odd prompts: the
    same reversed, so each arm runs early on one prompt and late on the next.
    """
    arms: list[tuple[DrafterSpec, int] | None] = [None] + [(spec, k) for spec in drafters for k in ks]
    return arms[::-1] if index % 2 else arms


def measure_verify_cost(
    target,
    ks: list[int],
    context_tokens: int = 128,
    repeats: int = 7,
) -> dict[int, float]:
    """Time of one bare verify forward pass over K+1 tokens, in plain decode steps (1 token).

    target: ``lab.models.LoadedModel`` (batch 1). ks: the K values; K=0 is the
    plain step itself. The cache holds ``context_tokens`` random tokens; each
    timing is the median of ``repeats`` passes after one warm-up, with the cache
    cropped back between passes (``lab.studies.passes.time_passes``, the lab's one
    pass timer). No sampling, acceptance or bookkeeping: this is what the hardware
    charges, to set beside the in-loop verify_cost_ratio.

    Returns {K: v}, v = median time(K+1 tokens) / median time(1 token).
    Raises ValueError if a K is negative or context_tokens + K + 1 exceeds the
    context window.
    """
    limit = _context_limit(target)
    if any(k < 0 for k in ks):
        raise ValueError(f"K requires K >= 0; got {ks}")
    if context_tokens < 1 or context_tokens + max(ks, default=0) + 1 > limit:
        raise ValueError(f"context_tokens + K + 1 must fit the context window ({limit}); got {context_tokens} and K up to {max(ks)}")
    ms = time_passes(target.model, sorted({1, *(k + 1 for k in ks)}), context_tokens, repeats)
    return {k: ms[k + 1] / ms[1] if k else 1.0 for k in ks}  # K=0 is the step itself


def _context_limit(target) -> int:
    return getattr(target.model.config, "max_position_embeddings", None) or 1 << 30


def _one_run(target, prompt_ids, drafter, config, index, label, k, cancel, reports: list[LoadReport]) -> RunRecord:
    """One decode, under ``lab.load``'s meter (its report appended to ``reports`` and kept on the record)."""
    with measure_load() as meter:
        record = _decode_run(target, prompt_ids, drafter, config, index, label, k, cancel)
    reports.append(meter.report)
    record.load = meter.report.as_dict()
    return record


def _decode_run(target, prompt_ids, drafter, config, index, label, k, cancel) -> RunRecord:
    stats = SpecDecodingStats()
    draft_ms, verify_ms = [], []
    events = decode(target, prompt_ids, drafter, config)
    for event in events:
        stats.observe(event)
        if isinstance(event, Step):
            draft_ms.append(event.draft_ms)
            verify_ms.append(event.verify_ms)
            if cancel():
                events.close()
                return RunRecord(index, label, k, [], "", stats.as_dict(), draft_ms, verify_ms, cancelled=True)
        elif isinstance(event, Finished):
            record = RunRecord(index, label, k, list(event.token_ids), event.text, stats.as_dict(), draft_ms, verify_ms)
            record.bridge_ms = list(getattr(drafter, "bridge_ms", []))
            return record
    raise RuntimeError("decode ended without a Finished event")


def _compare_with_baseline(record: RunRecord, baseline: RunRecord, greedy: bool) -> None:
    m, b = record.metrics, baseline.metrics
    record.speedup = _ratio(m["tokens_per_s"], b["tokens_per_s"])
    record.decode_speedup = _ratio(_decode_rate(m), _decode_rate(b))
    record.cost_ratio = _ratio(_per(m["draft_s"], m["num_draft_tokens"]), _per(b["verify_s"], b["target_forward_passes"]))
    record.identical_to_target = record.token_ids == baseline.token_ids if greedy else None


def _pool(metrics: list[dict]) -> dict[str, Any]:
    """Pool counters over runs (sums first, then ratios)."""
    total = {key: sum(m[key] for m in metrics) for key in (
        "num_drafts", "num_draft_tokens", "num_accepted_tokens", "target_forward_passes",
        "num_output_tokens", "prefill_s", "draft_s", "verify_s", "wall_s",
    )}
    width = max((len(m["accepted_per_position"]) for m in metrics), default=0)
    per_position = [sum(m["accepted_per_position"][i] for m in metrics if i < len(m["accepted_per_position"])) for i in range(width)]
    return {
        "acceptance_rate": _per(total["num_accepted_tokens"], total["num_draft_tokens"]),
        "mean_acceptance_length": 1 + _per(total["num_accepted_tokens"], total["num_drafts"]),
        "per_position_acceptance_rate": [_per(n, total["num_drafts"]) for n in per_position],
        "tokens_per_s": _per(total["num_output_tokens"], total["wall_s"]),
        "decode_tokens_per_s": _per(total["num_output_tokens"], total["wall_s"] - total["prefill_s"]),
        "draft_s_per_draft_token": _per(total["draft_s"], total["num_draft_tokens"]),
        "verify_s_per_step": _per(total["verify_s"], total["target_forward_passes"]),
        "num_output_tokens": total["num_output_tokens"],
        "num_drafts": total["num_drafts"],
        "target_forward_passes": total["target_forward_passes"],
    }


def _fitted_acceptance(mean_acceptance_length: float, k: int) -> float:
    """The acceptance rate whose E(a, K) is the mean acceptance length; NaN when nothing was measured or the
    length lies outside [1, K+1] (only a hand-edited results file has that)."""
    if math.isnan(mean_acceptance_length) or not 1.0 <= mean_acceptance_length <= k + 1 + 1e-9:
        return math.nan
    return acceptance_from_mean_length(mean_acceptance_length, k)


def _predicted_with_verify_cost(alpha: float, k: int, c: float, v: float, r: float) -> float:
    """(r E(a, K) + 1 - r) / (r (K c + v) + 1 - r): Leviathan's speedup with a verify pass of v steps, drafting at a
    share r of steps; NaN when an input is missing or the cost is not positive."""
    if any(math.isnan(x) for x in (alpha, c, v, r)):
        return math.nan
    tokens = r * expected_tokens_per_step(alpha, k) + (1.0 - r)
    cost = r * (k * c + v) + (1.0 - r)
    return tokens / cost if cost > 0 else math.nan


def _decode_rate(m: dict) -> float:
    return _per(m["num_output_tokens"], m["wall_s"] - m["prefill_s"])


def _per(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def _report(progress, done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(done / total, message)
