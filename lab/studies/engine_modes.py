"""Old engine and defaults against new ones, side by side on the same prompts (issue #12's measurement).

An *arm* is one way to run speculation: a precision, an engine mode
(``lab.kv``) and a K. Arms that share precision and engine mode share the
target-alone baseline, which runs through the same engine. Prompt by prompt,
every group runs its baseline and then each of its arms, so a drift in the
machine's speed hits every arm alike. Each group's runs pool into a
``lab.studies.compare.Comparison``, whose summary gives acceptance, speedup, the draft
cost c, the bare verify cost v(K), Leviathan's prediction from the measured a
and c and the efficiency against it (see ``lab.studies.compare``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from lab.studies.compare import BASELINE, Comparison, DrafterSpec, _compare_with_baseline, _one_run, measure_verify_cost
from lab.config import DecodeConfig
from lab.drafters import make_drafter
from lab.hardware import model_precision
from lab.models import encode_prompt, load_model

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Arm:
    """One way to run speculation. label: shown in tables; precision: "bf16" | "fp32" | "fp16";
    engine_mode: "eager" | "static" | "compiled"; k: num_speculative_tokens (1..16)."""

    label: str
    precision: str
    engine_mode: str
    k: int

    def __post_init__(self) -> None:
        DecodeConfig(k=self.k, engine_mode=self.engine_mode)  # validates K and the mode


def run_engine_bench(
    target_name: str,
    spec: DrafterSpec,
    prompts: Sequence[str],
    arms: Sequence[Arm],
    max_new_tokens: int = 32,
    device: str = "auto",
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Run every arm on every prompt beside its own target-alone baseline; one summary row per arm.

    target_name, spec.draft: preset names or folders. prompts: raw texts (chat
    template applied). Returns the ``Comparison.summary`` columns plus label,
    precision and engine_mode. Raises ValueError for no prompts or no arms.
    """
    prompts = [p for p in prompts if p.strip()]
    if not prompts or not arms:
        raise ValueError(f"engine bench requires prompts and arms; got {len(prompts)} prompts, {len(arms)} arms")
    report = progress or (lambda fraction, message: None)
    groups: dict[tuple[str, str], list[Arm]] = {}
    for arm in arms:
        groups.setdefault((arm.precision, arm.engine_mode), []).append(arm)
    models: dict[str, tuple[Any, Any]] = {}
    for precision in dict.fromkeys(arm.precision for arm in arms):
        report(0.0, f"loading {target_name} in {precision}")
        target = load_model(target_name, device=device, dtype=precision)
        draft = load_model(spec.draft, device=device, dtype=precision) if spec.name == "draft-model" else None
        models[precision] = (target, draft)
    comparisons: dict[tuple[str, str], Comparison] = {}
    encoded: dict[str, list[list[int]]] = {}
    for (precision, mode), group in groups.items():
        target = models[precision][0]
        encoded.setdefault(precision, [encode_prompt(target, p) for p in prompts])
        ks = sorted({arm.k for arm in group})
        context = max(len(ids) for ids in encoded[precision])
        report(0.0, f"timing bare verify passes ({precision})")
        verify = measure_verify_cost(target, ks, context_tokens=context)
        comparisons[(precision, mode)] = Comparison(
            {"target": target.name, "target_precision": model_precision(target), "engine_mode": mode,
             "max_new_tokens": max_new_tokens, "verify_cost": {str(k): v for k, v in verify.items()}},
            list(prompts))
    total = len(prompts) * sum(1 + len(group) for group in groups.values())
    done = 0
    never = lambda: False  # noqa: E731
    for index in range(len(prompts)):
        for (precision, mode), group in groups.items():
            target, draft = models[precision]
            ids = encoded[precision][index]
            config = DecodeConfig(max_new_tokens=max_new_tokens, engine_mode=mode)
            baseline = _one_run(target, ids, None, config, index, BASELINE, 0, never)
            comparisons[(precision, mode)].runs.append(baseline)
            for arm in group:
                drafter = make_drafter(spec.name, target, draft, min_n=spec.min_n, max_n=spec.max_n,
                                       exit_layer=spec.exit_layer)
                record = _one_run(target, ids, drafter, replace(config, k=arm.k), index, arm.label, arm.k, never)
                _compare_with_baseline(record, baseline, greedy=True)
                comparisons[(precision, mode)].runs.append(record)
            done += 1 + len(group)
            report(done / total, f"prompt {index + 1}/{len(prompts)}: {precision}, {mode}")
    rows = []
    for (precision, mode), comparison in comparisons.items():
        summary = comparison.summary()
        for arm in groups[(precision, mode)]:
            row = summary[summary["drafter"] == arm.label].iloc[0].to_dict()
            rows.append({"label": arm.label, "precision": precision, "engine_mode": mode, **row})
    return pd.DataFrame(rows)


COLUMNS = ["label", "precision", "engine_mode", "k", "prompts", "acceptance_rate", "mean_acceptance_length",
           "target_tokens_per_s", "tokens_per_s", "speedup", "decode_speedup", "cost_ratio", "bare_verify_cost",
           "predicted_speedup", "efficiency", "predicted_speedup_v", "efficiency_v", "identical_to_target"]


def format_engine_bench(frame: pd.DataFrame) -> str:
    """The summary as a fixed-width table (the columns of ``COLUMNS``)."""
    return frame[COLUMNS].to_string(index=False, float_format=lambda x: f"{x:.3f}")
