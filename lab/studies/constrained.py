"""What a JSON schema does to speculative decoding: acceptance, speed and validity, side by side.

For every extraction item (``assets/extraction.jsonl``: a prompt and its JSON
schema) and in two settings,

- ``constrained``: the item's schema (``lab.grammar``, exact mode), and
- ``free``: no constraint,

the study runs, greedy, the target alone and each drafter at K. The runs of one
prompt follow each other in an order rotated from prompt to prompt, so noise on
a shared CPU hits every method and setting alike.

Per run: acceptance rate and mean acceptance length (``lab.metrics``
conventions), tokens/s (new tokens / wall seconds, prefill included), speedup
over the target alone in the same setting on the same prompt, whether the
output is valid for the item's schema (a finished JSON text that ``jsonschema``
accepts, ``Constraint.is_valid``; a free output wrapped in a Markdown fence is
not), where a fresh matcher first refuses it (``first_invalid_token``), whether
it completed (EOS), how many proposed tokens the grammar cut (prompt lookup),
and whether it is token for token the target alone's output in the same setting.

Pooled per (method, setting): counters are summed over prompts first, then
turned into ratios (tokens/s = total tokens / total seconds; speedup = pooled
tokens/s over the target alone's pooled tokens/s); the median of per-prompt
speedups is given too. Constraints are compiled once per distinct schema,
before any timed run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lab.studies.peer import DrafterSpec
from lab.config import DecodeConfig
from lab.decode import run
from lab.grammar import Constraint, ConstraintSpec, first_invalid_token
from lab.metrics import SpecDecodingStats
from lab.models import encode_prompt
from lab.prompts import REPO_ROOT

EXTRACTION_PATH = REPO_ROOT / "assets" / "extraction.jsonl"
Setting = Literal["constrained", "free"]
SETTINGS: tuple[Setting, ...] = ("constrained", "free")
TARGET_ALONE = "target alone"
WARMUP_NEW_TOKENS = 4

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------- the items


@dataclass(frozen=True)
class ExtractionItem:
    """One extraction task: a prompt and the JSON schema its answer must follow."""

    id: str
    prompt: str
    schema: dict

    @property
    def spec(self) -> ConstraintSpec:
        return ConstraintSpec("json_schema", json.dumps(self.schema))


def load_extraction_items(path: str | os.PathLike = EXTRACTION_PATH, count: int | None = None) -> list[ExtractionItem]:
    """The items of a JSONL file of ``{"id", "prompt", "schema"}`` objects (the first ``count`` if given).

    Raises ValueError on a line that is not such an object, naming the line.
    """
    items = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                item = ExtractionItem(str(record.get("id", number)), record["prompt"], record["schema"])
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(
                    f"{path}:{number}: an extraction line requires a JSON object with 'prompt' and 'schema'; "
                    f"got {line.strip()[:80]!r} ({error})"
                ) from error
            if not isinstance(item.prompt, str) or not item.prompt.strip() or not isinstance(item.schema, dict):
                raise ValueError(f"{path}:{number}: an extraction line requires a non-empty prompt and a schema object")
            items.append(item)
    return items if count is None else items[:count]


# ---------------------------------------------------------------- results


@dataclass
class StudyRun:
    """One greedy decode of one item by one method in one setting.

    method: ``TARGET_ALONE`` or a drafter's description.
    reason: why it stopped (``lab.trace.StopReason``).
    valid: the output is a finished text valid for the item's schema.
    first_invalid: index of the first token a fresh matcher refuses (None: every token allowed).
    num_cut_tokens: proposed tokens the grammar dropped before verification.
    speedup: tokens/s over the target alone's in the same setting on the same item (None for the target alone).
    identical_to_target: same tokens as the target alone in the same setting (None for the target alone).
    """

    item_id: str
    setting: Setting
    method: str
    token_ids: tuple[int, ...]
    text: str
    reason: str
    stats: SpecDecodingStats
    valid: bool
    first_invalid: int | None
    num_cut_tokens: int = 0
    speedup: float | None = None
    identical_to_target: bool | None = None

    def as_dict(self) -> dict:
        return {
            "item": self.item_id,
            "setting": self.setting,
            "method": self.method,
            "reason": self.reason,
            "valid": self.valid,
            "first_invalid_token": self.first_invalid,
            "num_cut_tokens": self.num_cut_tokens,
            "speedup": _clean(self.speedup),
            "identical_to_target": self.identical_to_target,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "stats": self.stats.as_dict(),
        }


@dataclass
class ConstrainedStudy:
    """A finished study: its settings, the drafters compared (``methods``, the target alone aside) and every run."""

    settings: dict
    methods: list[str]
    runs: list[StudyRun] = field(default_factory=list)

    def get(self, item_id: str, setting: str, method: str) -> StudyRun:
        for r in self.runs:
            if (r.item_id, r.setting, r.method) == (item_id, setting, method):
                return r
        raise KeyError(f"no {method} run in the {setting} setting for {item_id}")

    def summary(self) -> list[dict]:
        """One row per (method, setting), target alone first, pooled over items (see the module docstring)."""
        rows = []
        for method in [TARGET_ALONE, *self.methods]:
            for setting in SETTINGS:
                runs = [r for r in self.runs if r.method == method and r.setting == setting]
                if not runs:
                    continue
                baseline = [self.get(r.item_id, setting, TARGET_ALONE) for r in runs]
                stats, base_stats = _merged(runs), _merged(baseline)
                speedups = [r.speedup for r in runs if r.speedup is not None and not math.isnan(r.speedup)]
                identical = [r.identical_to_target for r in runs if r.identical_to_target is not None]
                rows.append({
                    "method": method,
                    "setting": setting,
                    "prompts": len(runs),
                    "output_tokens": stats.num_output_tokens,
                    "acceptance_rate": _clean(stats.acceptance_rate),
                    "mean_acceptance_length": _clean(stats.mean_acceptance_length),
                    "per_position_acceptance_rate": stats.per_position_acceptance_rate,
                    "tokens_per_s": _clean(stats.tokens_per_s),
                    "target_tokens_per_s": _clean(base_stats.tokens_per_s),
                    "speedup": None if method == TARGET_ALONE
                    else _clean(_ratio(stats.tokens_per_s, base_stats.tokens_per_s)),
                    "speedup_median": statistics.median(speedups) if speedups else None,
                    "valid": sum(r.valid for r in runs),
                    "complete": sum(r.reason == "eos" for r in runs),
                    "identical_to_target": sum(identical) if identical else None,
                    "num_cut_tokens": sum(r.num_cut_tokens for r in runs),
                })
        return rows

    def as_dict(self) -> dict:
        return {"settings": self.settings, "summary": self.summary(), "runs": [r.as_dict() for r in self.runs]}

    def format_table(self) -> str:
        """A plain-text table: per method, the constrained row above the free one."""
        s = self.settings
        header = (f"{s['target']}, {s['dtype']}, greedy, K={s['k']}, {s['items_done']} extraction prompts, "
                  f"max_new_tokens={s['max_new_tokens']}, torch threads={s['torch_threads']}")
        columns = ("method", "setting", "acc.rate", "mean acc.len", "tok/s", "target tok/s", "speedup", "median",
                   "valid", "complete", "identical", "cut")
        rows = []
        for m in self.summary():
            n = m["prompts"]
            rows.append((
                m["method"], m["setting"],
                _fmt(m["acceptance_rate"], "{:.1%}"), _fmt(m["mean_acceptance_length"], "{:.2f}"),
                _fmt(m["tokens_per_s"], "{:.2f}"), _fmt(m["target_tokens_per_s"], "{:.2f}"),
                _fmt(m["speedup"], "{:.2f}x"), _fmt(m["speedup_median"], "{:.2f}x"),
                f"{m['valid']}/{n}", f"{m['complete']}/{n}",
                "—" if m["identical_to_target"] is None else f"{m['identical_to_target']}/{n}",
                str(m["num_cut_tokens"]),
            ))
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        line = lambda cells: "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))  # noqa: E731
        notes = [
            "valid: finished output accepted by the item's JSON schema; complete: ended with EOS;",
            "identical: same tokens as the target alone in the same setting; cut: proposed tokens the grammar dropped.",
        ]
        return "\n".join([header, line(columns), line(["-" * w for w in widths]), *map(line, rows), *notes])


# ---------------------------------------------------------------- the study


def run_constrained_study(
    target,
    drafters: DrafterSpec | Sequence[DrafterSpec],
    items: Sequence[ExtractionItem],
    k: int = 4,
    max_new_tokens: int = 64,
    *,
    chat_template: bool = True,
    warmup: bool = True,
    progress: Progress | None = None,
    on_item: Callable[[ConstrainedStudy], None] | None = None,
) -> ConstrainedStudy:
    """Run the target alone and every drafter, with each item's schema and without, greedy (see module docstring).

    target: ``lab.models.LoadedModel``. drafters: what drafts (``lab.studies.peer.DrafterSpec``).
    items: extraction items (``load_extraction_items``). k, max_new_tokens: every run's K and budget.
    warmup: first run every method once on a short prompt, untimed.
    progress: ``progress(fraction, message)`` after each run.
    on_item: called with the study so far after each item (e.g. to save it: a
        long study on a busy machine keeps what it has measured).

    Raises ValueError on no items, no drafters or a bad K / budget, and
    ``lab.grammar.GrammarError`` on a schema that does not compile.
    """
    specs = [drafters] if isinstance(drafters, DrafterSpec) else list(drafters)
    if not items:
        raise ValueError("the constrained study requires at least one extraction item; got none")
    if not specs:
        raise ValueError("the constrained study requires at least one drafter; got none")
    config = DecodeConfig(k=k, max_new_tokens=max_new_tokens)  # validates K and the budget before any work
    constraints: dict[ConstraintSpec, Constraint] = {}
    for item in items:
        if item.spec not in constraints:
            constraints[item.spec] = Constraint.for_model(item.spec, target)
    methods = [(TARGET_ALONE, None)] + [(spec.describe(target), spec.build(target)) for spec in specs]
    encoded = [encode_prompt(target, item.prompt, chat_template=chat_template) for item in items]
    report = progress or (lambda fraction, message: None)

    if warmup:
        report(0.0, "warming up every method on a short prompt")
        short = DecodeConfig(k=k, max_new_tokens=WARMUP_NEW_TOKENS)
        for _, drafter in methods:
            for setting in SETTINGS:
                constraint = constraints[items[0].spec] if setting == "constrained" else None
                run(target, encoded[0], drafter, short, constraint=constraint)

    settings = _settings(target, specs, items, k, max_new_tokens, chat_template)
    study = ConstrainedStudy(settings, [method for method, _ in methods[1:]])
    plan = [(setting, method, drafter) for setting in SETTINGS for method, drafter in methods]
    total = len(items) * len(plan)
    for index, (item, prompt_ids) in enumerate(zip(items, encoded)):
        constraint = constraints[item.spec]
        rotation = index % len(plan)  # no method or setting always runs first or last
        done_runs = []
        for done, (setting, method, drafter) in enumerate(plan[rotation:] + plan[:rotation]):
            result = run(target, prompt_ids, drafter, config,
                         constraint=constraint if setting == "constrained" else None)
            done_runs.append(StudyRun(
                item.id, setting, method, tuple(result.token_ids), result.text, result.reason, result.stats,
                valid=constraint.is_valid(result.text),
                first_invalid=first_invalid_token(constraint, result.token_ids),
                num_cut_tokens=sum(len(step.cut_by_grammar) for step in result.steps),
            ))
            report(
                (index * len(plan) + done + 1) / total,
                f"[{index + 1}/{len(items)}] {item.id} {setting} {method}: {result.stats.num_output_tokens} tokens "
                f"in {result.stats.wall_s:.1f} s ({result.stats.tokens_per_s:.2f} tok/s), "
                f"acceptance {_fmt(_clean(result.stats.acceptance_rate), '{:.0%}')}, valid {done_runs[-1].valid}",
            )
        _compare_with_target_alone(done_runs)
        study.runs += done_runs
        study.settings["items_done"] = index + 1
        study.settings["load_average_1min"]["end"] = _load_average()
        if on_item is not None:
            on_item(study)
    return study


def _compare_with_target_alone(runs: list[StudyRun]) -> None:
    """Fill speedup and identical_to_target of one item's speculative runs from its target-alone runs."""
    baselines = {r.setting: r for r in runs if r.method == TARGET_ALONE}
    for r in runs:
        if r.method == TARGET_ALONE:
            continue
        base = baselines[r.setting]
        r.speedup = _ratio(r.stats.tokens_per_s, base.stats.tokens_per_s)
        r.identical_to_target = r.token_ids == base.token_ids


def _settings(target, specs, items, k, max_new_tokens, chat_template) -> dict:
    model = target.model
    return {
        "target": getattr(target, "name", "target"),
        "drafters": [spec.describe(target) for spec in specs],
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "grammar_mode": "exact",
        "dtype": str(getattr(target, "dtype", next(model.parameters()).dtype)).removeprefix("torch."),
        "device": str(getattr(target, "device", next(model.parameters()).device)),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "chat_template": chat_template,
        "item_ids": [item.id for item in items],
        "items_done": 0,
        "load_average_1min": {"start": _load_average(), "end": None},
    }


# ---------------------------------------------------------------- helpers


def _merged(runs: Sequence[StudyRun]) -> SpecDecodingStats:
    total = SpecDecodingStats()
    for r in runs:
        total.merge(r.stats)
    return total


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def _clean(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
