"""Precision and quantisation: where outputs part, what each model costs in memory, and the precision study.

Loading in a precision is ``lab.models.load_model(name, precision=...)``; this
module reads what the loaded models and the trace events say.

Exactness is relative to the target *as loaded*: greedy speculative output
equals the same (quantised) target decoding alone. Quantising the target
changes that reference itself, so the study also counts how often the
quantised target alone writes something other than the ``reference_precision``
target alone (bf16: the precision the prepared weights are stored in), and
:func:`part_ways` shows where.

Two numerical notes that explain the figures:

- bitsandbytes' LLM.int8 moves every input column holding an outlier
  (|x| >= 6) to fp16, and with several rows in one pass (a verify pass over
  K+1 tokens) a column is moved for all rows when any row has an outlier. So a
  token's int8 result depends on the other tokens in its pass, more than bf16
  rounding does: near-ties flip more often between speculative and plain
  decoding (counted as ``identical_to_target``).
- The bitsandbytes CPU 4-bit kernel computes in bf16 whatever the compute dtype.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from lab.studies.compare import BASELINE, Comparison, DrafterSpec, RunRecord, run_comparison
from lab.config import DecodeConfig
from lab.models import LoadedModel, Progress, kv_cache_bytes, load_model

REFERENCE_PRECISION = "bf16"
"""The precision the prepared presets are stored in: loading them so loses nothing, so it is the reference."""

MODEL_REF_SEPARATOR = "@"


# ---------------------------------------------------------------- where two outputs part


def first_divergence(output_ids: Sequence[int], reference_ids: Sequence[int]) -> int | None:
    """Index of the first token where two outputs differ (a prefix ends there too); None when identical."""
    for index, (a, b) in enumerate(zip(output_ids, reference_ids)):
        if a != b:
            return index
    if len(output_ids) != len(reference_ids):
        return min(len(output_ids), len(reference_ids))
    return None


@dataclass(frozen=True)
class Parting:
    """Where an output parts from a reference output.

    index: the first differing token (0-based); num_common: tokens both share (== index).
    common_text: the text of those shared tokens.
    output_next, reference_next: the next few tokens' text of each, from the parting on.
    """

    index: int
    common_text: str
    output_next: str
    reference_next: str

    @property
    def num_common(self) -> int:
        return self.index


def part_ways(tokenizer, output_ids: Sequence[int], reference_ids: Sequence[int], next_tokens: int = 8) -> Parting | None:
    """Where ``output_ids`` parts from ``reference_ids`` (None when identical), as text for people."""
    index = first_divergence(output_ids, reference_ids)
    if index is None:
        return None

    def text(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False)

    return Parting(
        index=index,
        common_text=text(output_ids[:index]),
        output_next=text(output_ids[index : index + next_tokens]),
        reference_next=text(reference_ids[index : index + next_tokens]),
    )


# ---------------------------------------------------------------- memory of a run


@dataclass(frozen=True)
class MemoryUse:
    """What one model costs in a run.

    role: "target" or "draft". name: the model (or what drafts, for layer-skip).
    precision: its weights' precision. weight_bytes: its own weights (0 for
    layer-skip: the target's layers are shared). kv_cache_bytes: its KV cache
    at the end of the run. load_s: seconds its loading took (None: not loaded separately).
    """

    role: str
    name: str
    precision: str
    weight_bytes: int
    kv_cache_bytes: int
    load_s: float | None

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


def run_memory(
    target: LoadedModel,
    drafter: Any = None,
    draft: LoadedModel | None = None,
    target_cache_tokens: int = 0,
    draft_cache_tokens: int | None = None,
) -> list[MemoryUse]:
    """Memory of a run's models: the target, and the draft when the drafter is a model.

    drafter: the run's drafter (None, prompt lookup: no row; layer-skip: a row
        with no weights of its own and a KV cache for its layers only).
    draft: the draft model (for "draft-model").
    target_cache_tokens, draft_cache_tokens: tokens in each KV cache at the end
        (``Step.target_cache_len`` / ``Step.draft_cache_len`` of the last step).
    """
    rows = [
        MemoryUse("target", target.name, target.precision, target.weight_bytes,
                  kv_cache_bytes(target.model, target_cache_tokens), target.load_s)
    ]
    head = getattr(drafter, "head", None)
    if head is not None:  # an EAGLE head: its own small weights and KV cache; the target's embeddings and LM head
        rows.append(MemoryUse("draft", "EAGLE head (reads the target's hidden states)", "fp32", head.num_bytes(),
                              kv_cache_bytes(head.decoder, draft_cache_tokens or 0), None))
        return rows
    draft_model = getattr(drafter, "model", None)
    if draft_model is None:
        return rows
    inner = getattr(draft_model, "model", None)
    if draft is not None and inner is not None and inner is getattr(draft.model, "model", None):
        draft_model = draft.model  # a trimmed-vocabulary view of the draft (lab.vocab): the same weights
    draft_kv = kv_cache_bytes(draft_model, draft_cache_tokens or 0)
    if draft is not None and draft_model is draft.model:
        rows.append(MemoryUse("draft", draft.name, draft.precision, draft.weight_bytes, draft_kv, draft.load_s))
    else:  # an early-exit view of the target: its layers are the target's
        exit_layer = getattr(drafter, "exit_layer", None)
        name = f"{getattr(drafter, 'name', 'draft')} (first {exit_layer} layers of the target)"
        rows.append(MemoryUse("draft", name, target.precision, 0, draft_kv, None))
    return rows


# ---------------------------------------------------------------- the precision study


def model_ref(name: str, precision: str) -> str:
    """``"qwen2.5-coder-0.5b@int8"``: a model in a precision, as one string (a ``DrafterSpec.draft``)."""
    return f"{name}{MODEL_REF_SEPARATOR}{precision}"


def parse_model_ref(ref: str, default_precision: str = REFERENCE_PRECISION) -> tuple[str, str]:
    """``"name@precision"`` -> (name, precision); a bare name gets ``default_precision``."""
    name, separator, precision = ref.rpartition(MODEL_REF_SEPARATOR)
    return (name, precision) if separator else (ref, default_precision)


@dataclass
class ModelInfo:
    """A model as the study loaded it."""

    name: str
    precision: str
    num_parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    load_s: float


@dataclass
class PrecisionStudy:
    """Runs of one target at several precisions, each with its drafters, on the same prompts.

    comparisons: one ``lab.studies.compare.Comparison`` per target precision (its
    baseline is that target alone). models: every loaded model by its ref
    ("name@precision"). Per prompt, every target precision ran one after the
    other, so machine noise hits them alike.
    """

    settings: dict[str, Any]
    prompts: list[str]
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)

    @property
    def reference_precision(self) -> str:
        return self.settings["reference_precision"]

    def baselines(self, precision: str) -> dict[int, RunRecord]:
        """The target alone at ``precision``, by prompt index."""
        return {r.prompt_index: r for r in self.comparisons[precision].runs if r.drafter == BASELINE and not r.cancelled}

    def reference_divergence(self, precision: str) -> dict[str, float]:
        """How the target alone at ``precision`` compares with the reference precision's, over shared prompts.

        differs_from_reference: fraction of prompts whose outputs differ.
        median_parting_token: median first differing token among those (NaN when none differ).
        target_speed_vs_reference: pooled tokens/s over the reference's (same prompts, run side by side).
        """
        mine, reference = self.baselines(precision), self.baselines(self.reference_precision)
        shared = sorted(set(mine) & set(reference))
        partings = [first_divergence(mine[i].token_ids, reference[i].token_ids) for i in shared]
        differing = sorted(p for p in partings if p is not None)
        tokens = sum(mine[i].metrics["num_output_tokens"] for i in shared)
        seconds = sum(mine[i].metrics["wall_s"] for i in shared)
        ref_tokens = sum(reference[i].metrics["num_output_tokens"] for i in shared)
        ref_seconds = sum(reference[i].metrics["wall_s"] for i in shared)
        speed = (tokens / seconds) / (ref_tokens / ref_seconds) if seconds and ref_seconds and ref_tokens else math.nan
        return {
            "differs_from_reference": len(differing) / len(shared) if shared else math.nan,
            "median_parting_token": float(differing[len(differing) // 2]) if differing else math.nan,
            "target_speed_vs_reference": speed,
        }

    def summary(self) -> pd.DataFrame:
        """One row per (target precision, drafter): acceptance, speed, memory, exactness, divergence.

        Columns: target_precision, drafter, draft_precision, k, prompts,
        acceptance_rate, mean_acceptance_length, tokens_per_s,
        target_tokens_per_s (that target alone), speedup (over that target
        alone, end to end), decode_speedup (prefill excluded), cost_ratio (draft
        time per drafted token over that target's time per step), identical_to_target (fraction of prompts where the
        speculative output equals that target alone's), target_weight_mib,
        draft_weight_mib (0: no model of its own), total_weight_mib,
        differs_from_reference, median_parting_token, target_speed_vs_reference
        (see :meth:`reference_divergence`).
        """
        target_name = self.settings["target"]
        rows = []
        for precision, comparison in self.comparisons.items():
            target = self.models[model_ref(target_name, precision)]
            divergence = self.reference_divergence(precision)
            drafts = {spec["label"]: spec.get("draft") for spec in comparison.settings["drafters"]}
            for row in comparison.summary().to_dict("records"):
                draft_ref = drafts.get(row["drafter"])
                draft = self.models.get(draft_ref) if draft_ref else None
                draft_mib = draft.weight_bytes / 2**20 if draft is not None else 0.0
                rows.append(
                    {
                        "target_precision": precision,
                        "drafter": row["drafter"],
                        "draft_precision": draft.precision if draft is not None else (precision if "layer-skip" in row["drafter"] else ""),
                        "k": row["k"],
                        "prompts": row["prompts"],
                        "acceptance_rate": row["acceptance_rate"],
                        "mean_acceptance_length": row["mean_acceptance_length"],
                        "tokens_per_s": row["tokens_per_s"],
                        "target_tokens_per_s": row["target_tokens_per_s"],
                        "speedup": row["speedup"],
                        "decode_speedup": row["decode_speedup"],
                        "cost_ratio": row["cost_ratio"],
                        "identical_to_target": row["identical_to_target"],
                        "target_weight_mib": target.weight_bytes / 2**20,
                        "draft_weight_mib": draft_mib,
                        "total_weight_mib": target.weight_bytes / 2**20 + draft_mib,
                        **divergence,
                    }
                )
        return pd.DataFrame(rows)

    def to_json(self) -> str:
        """Everything (settings, prompts, every run, the models and the summary), as JSON text."""
        return json.dumps(
            {
                "settings": self.settings,
                "prompts": self.prompts,
                "models": {ref: asdict(info) for ref, info in self.models.items()},
                "comparisons": {p: json.loads(c.to_json()) for p, c in self.comparisons.items()},
                "summary": json.loads(self.summary().to_json(orient="records")),
            },
            indent=1,
        )

    @staticmethod
    def from_json(text: str) -> "PrecisionStudy":
        """Load a study saved by ``to_json``. Raises ValueError on a file that is not one."""
        try:
            data = json.loads(text)
            return PrecisionStudy(
                settings=data["settings"],
                prompts=list(data["prompts"]),
                comparisons={p: Comparison.from_json(json.dumps(c)) for p, c in data["comparisons"].items()},
                models={ref: ModelInfo(**info) for ref, info in data["models"].items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"This is not a precision study saved by the lab ({error}).") from error


def run_precision_study(
    target: str,
    drafters: Mapping[str, Sequence[DrafterSpec]],
    prompts: Sequence[str],
    config: DecodeConfig,
    *,
    reference_precision: str = REFERENCE_PRECISION,
    device: str | None = None,
    chat_template: bool = True,
    load: Callable[[str, str], LoadedModel] | None = None,
    progress: Progress | None = None,
    after_prompt: Callable[[PrecisionStudy], None] | None = None,
) -> PrecisionStudy:
    """Run ``target`` at each precision with its drafters on every prompt, against that target alone.

    target: a preset name or model folder.
    drafters: target precision -> the drafters to run with it (may be empty:
        the target alone still runs). A draft model's precision rides in its
        name: ``DrafterSpec("draft-model", draft=model_ref("qwen2.5-coder-0.5b", "int8"))``.
    prompts: raw texts; config: greedy or sampled settings shared by all runs.
    reference_precision: the target precision the others' outputs are held
        against (run as the target alone if it is not among ``drafters``).
    load: ``load(name, precision) -> LoadedModel`` (default ``lab.models.load_model``
        on ``device``); each model is loaded once.
    progress: ``progress(fraction, message)`` after each prompt and precision.
    after_prompt: ``after_prompt(study)`` once each prompt has run at every
        precision (e.g. to save partial results of a long study).

    For each prompt, every target precision runs in turn (the target alone,
    then its drafters; see ``lab.studies.compare.run_comparison``).

    Raises ValueError for no prompts or no precisions, and whatever loading raises.
    """
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError("a precision study requires at least one prompt; got none")
    if not drafters:
        raise ValueError("a precision study requires at least one target precision; got none")

    def default_load(name: str, precision: str) -> LoadedModel:
        return load_model(name, device=device, precision=precision)

    load = load or default_load
    precisions = list(drafters)
    if reference_precision not in precisions:
        precisions.append(reference_precision)
    loaded: dict[str, LoadedModel] = {}
    study = PrecisionStudy(
        settings={
            "target": target,
            "target_precisions": precisions,
            "reference_precision": reference_precision,
            "max_new_tokens": config.max_new_tokens,
            "k": config.k,
            "temperature": config.temperature,
            "seed": config.seed,
            "chat_template": chat_template,
            "drafters": {p: [asdict(s) | {"label": s.label} for s in drafters.get(p, ())] for p in precisions},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        prompts=list(prompts),
    )

    def get(ref: str) -> LoadedModel:
        if ref not in loaded:
            name, precision = parse_model_ref(ref)
            model = load(name, precision)
            loaded[ref] = model
            study.models[ref] = ModelInfo(model.name, model.precision, model.num_parameters, model.weight_bytes,
                                          kv_cache_bytes(model.model, 1), model.load_s)
        return loaded[ref]

    targets = {p: get(model_ref(target, p)) for p in precisions}
    total = len(prompts) * len(precisions)
    for index, prompt in enumerate(prompts):
        for position, precision in enumerate(precisions):
            part = run_comparison(targets[precision], [prompt], list(drafters.get(precision, ())), [config.k], config,
                                  load_draft=get, chat_template=chat_template)
            for run in part.runs:
                run.prompt_index = index
            if precision not in study.comparisons:
                part.prompts = list(prompts)
                study.comparisons[precision] = part
            else:
                study.comparisons[precision].runs += part.runs
            if progress is not None:
                done = index * len(precisions) + position + 1
                progress(done / total, f"prompt {index + 1}/{len(prompts)}: target {precision}")
        if after_prompt is not None:
            after_prompt(study)
    return study
