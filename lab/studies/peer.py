"""Benchmarks that compare decoders side by side in one run.

Peer comparison (``run_peer_comparison``): our speculative decoder against
transformers' own assisted generation, on the same models, prompts and K.
For every prompt it runs, in an order rotated from prompt to prompt so that
noise from a shared CPU hits every method alike:

- ``ours_baseline``: our loop with the target alone (``lab.decode.run``, no drafter);
- ``ours_speculative``: our loop with the drafter, once per K;
- ``hf_greedy``: ``model.generate(do_sample=False)``;
- ``hf_assisted``: ``model.generate(do_sample=False, ...)`` with transformers'
  candidate generator doing the same drafting, once per K:
  ``assistant_model=draft`` (draft-model), ``prompt_lookup_num_tokens=K``
  (prompt-lookup) or ``assistant_early_exit=N`` (layer-skip).

transformers reads the assistant's settings from the *assistant's*
``generation_config`` (``AssistedCandidateGenerator.__init__``), so we set there
``num_assistant_tokens=K``, ``num_assistant_tokens_schedule="constant"`` and
``assistant_confidence_threshold=0.0`` (its default 0.4 stops a draft early when
the assistant is unsure, which would not be a constant K), and restore them after.

Each call is timed with ``time.perf_counter`` around it, prefill included;
tokens/s = new tokens / wall seconds. Figures over a prompt set are pooled
(total tokens / total seconds); per-prompt ratios also give a median. Greedy
outputs are compared token for token: ours speculative vs ours alone, ours alone
vs transformers' greedy, transformers' assisted vs its greedy. Mismatches are
reported (with the first differing position), never hidden: in bf16 a verify
pass over K+1 tokens can round differently from a one-token pass, so a near-tie
can flip.

Target and draft forward passes are counted with a hook on the last decoder
layer each pass must run through (an early exit never reaches the target's last
layer), so "tokens per target pass" compares the two decoders' drafting quality
apart from their overheads.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lab.config import DecodeConfig
from lab.drafters import make_drafter, num_layers
from lab.decode import run
from lab.metrics import SpecDecodingStats
from lab.models import encode_prompt
from lab.prompts import Prompt

PEER_DRAFTERS = ("draft-model", "prompt-lookup", "layer-skip")
OURS_BASELINE, OURS_SPECULATIVE, HF_GREEDY, HF_ASSISTED = "ours_baseline", "ours_speculative", "hf_greedy", "hf_assisted"
WARMUP_PROMPT_TOKENS = 32
WARMUP_NEW_TOKENS = 4

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------- what is compared


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter by name with what it needs, buildable for our engine and for transformers.

    name: one of ``PEER_DRAFTERS``.
    draft: the draft model (``lab.models.LoadedModel``), for draft-model only.
    min_n, max_n: prompt lookup's n-gram sizes (transformers takes only the
        largest, ``max_matching_ngram_size``, and tries down to 1).
    exit_layer: layer-skip's exit; None picks a quarter of the target's layers.

    Raises ValueError for an unknown name or a draft-model without a draft.
    """

    name: str
    draft: Any = None
    min_n: int = 1
    max_n: int = 3
    exit_layer: int | None = None

    def __post_init__(self) -> None:
        if self.name not in PEER_DRAFTERS:
            raise ValueError(f"peer comparison requires a drafter in {', '.join(PEER_DRAFTERS)}; got {self.name!r}")
        if self.name == "draft-model" and self.draft is None:
            raise ValueError("draft-model requires a draft model (e.g. --draft qwen2.5-coder-0.5b); got none")

    def resolved_exit_layer(self, target) -> int:
        return self.exit_layer if self.exit_layer is not None else max(1, num_layers(target.model) // 4)

    def build(self, target):
        """Our drafter (``lab.drafters``) for this spec."""
        exit_layer = self.resolved_exit_layer(target) if self.name == "layer-skip" else None
        return make_drafter(self.name, target, self.draft, min_n=self.min_n, max_n=self.max_n, exit_layer=exit_layer)

    def describe(self, target) -> str:
        if self.name == "draft-model":
            return f"draft-model {getattr(self.draft, 'name', 'draft')}"
        if self.name == "prompt-lookup":
            return f"prompt-lookup n={self.min_n}..{self.max_n}"
        return f"layer-skip exit {self.resolved_exit_layer(target)}"

    @contextlib.contextmanager
    def hf_assisted(self, target, k: int) -> Iterator[dict]:
        """The keyword arguments of transformers' assisted ``generate`` for K, with the assistant set to a constant K."""
        if self.name == "prompt-lookup":
            yield {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": self.max_n}
            return
        if self.name == "draft-model":
            assistant, kwargs = self.draft.model, {"assistant_model": self.draft.model}
        else:  # layer-skip: transformers' early exit drafts with the target itself
            assistant, kwargs = target.model, {"assistant_early_exit": self.resolved_exit_layer(target)}
        constant_k = {"num_assistant_tokens": k, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0}
        config = assistant.generation_config
        saved = {name: getattr(config, name, None) for name in constant_k}
        try:
            for name, value in constant_k.items():
                setattr(config, name, value)
            yield kwargs
        finally:
            for name, value in saved.items():
                setattr(config, name, value)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class TimedRun:
    """One generation of one prompt by one method.

    method: ``ours_baseline``, ``ours_speculative``, ``hf_greedy`` or ``hf_assisted``.
    k: the draft length (None for the two target-alone methods).
    token_ids: the new tokens (EOS included when it ended the run).
    wall_s: seconds around the call, prefill included.
    target_passes, draft_passes: forward passes counted (None when not countable).
    """

    method: str
    k: int | None
    token_ids: tuple[int, ...]
    wall_s: float
    target_passes: int | None = None
    draft_passes: int | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.wall_s if self.wall_s > 0 else math.nan

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "k": self.k,
            "num_new_tokens": self.num_new_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": _clean(self.tokens_per_s),
            "target_passes": self.target_passes,
            "draft_passes": self.draft_passes,
            "token_ids": list(self.token_ids),
        }


@dataclass
class PromptResult:
    """Every method's run on one prompt; ``stats`` holds our runs' statistics keyed by K (0: target alone)."""

    prompt: Prompt
    num_prompt_tokens: int
    runs: list[TimedRun] = field(default_factory=list)
    stats: dict[int, SpecDecodingStats] = field(default_factory=dict)

    def get(self, method: str, k: int | None = None) -> TimedRun:
        for timed in self.runs:
            if timed.method == method and timed.k == k:
                return timed
        raise KeyError(f"no {method} run with k={k} for {self.prompt.id}")

    def checks(self, k: int) -> dict[str, int | None]:
        """First differing position of each exactness pair (None: identical)."""
        baseline, greedy = self.get(OURS_BASELINE).token_ids, self.get(HF_GREEDY).token_ids
        return {
            "speculative_vs_baseline": first_difference(self.get(OURS_SPECULATIVE, k).token_ids, baseline),
            "baseline_vs_hf_greedy": first_difference(baseline, greedy),
            "hf_assisted_vs_hf_greedy": first_difference(self.get(HF_ASSISTED, k).token_ids, greedy),
        }

    def as_dict(self, ks: Sequence[int]) -> dict:
        return {
            "id": self.prompt.id,
            "category": self.prompt.category,
            "num_prompt_tokens": self.num_prompt_tokens,
            "runs": [timed.as_dict() for timed in self.runs],
            "ours_stats": {str(k): stats.as_dict() for k, stats in self.stats.items()},
            "checks": {str(k): self.checks(k) for k in ks},
        }


@dataclass
class PeerReport:
    """A finished peer comparison: settings, per-prompt results, and per-K summaries."""

    settings: dict
    ks: tuple[int, ...]
    prompts: list[PromptResult]

    def summary(self, k: int) -> dict:
        """The figures for one K, pooled over prompts (see the module docstring)."""
        runs = lambda method, kk=None: [p.get(method, kk) for p in self.prompts]  # noqa: E731
        baseline, speculative = runs(OURS_BASELINE), runs(OURS_SPECULATIVE, k)
        greedy, assisted = runs(HF_GREEDY), runs(HF_ASSISTED, k)
        stats, baseline_stats = SpecDecodingStats(), SpecDecodingStats()
        for p in self.prompts:
            stats.merge(p.stats[k])
            baseline_stats.merge(p.stats[0])
        checks = [(p.prompt.id, p.checks(k)) for p in self.prompts]
        identical = lambda name: sum(c[name] is None for _, c in checks)  # noqa: E731
        return {
            "k": k,
            "num_prompts": len(self.prompts),
            "acceptance_rate": _clean(stats.acceptance_rate),
            "mean_acceptance_length": _clean(stats.mean_acceptance_length),
            "per_position_acceptance_rate": stats.per_position_acceptance_rate,
            "ours_baseline_tokens_per_s": _pooled(baseline),
            "ours_speculative_tokens_per_s": _pooled(speculative),
            "speedup": _ratio(_pooled(speculative), _pooled(baseline)),
            "speedup_median": _median_ratio(speculative, baseline),
            "hf_greedy_tokens_per_s": _pooled(greedy),
            "hf_assisted_tokens_per_s": _pooled(assisted),
            "hf_speedup": _ratio(_pooled(assisted), _pooled(greedy)),
            "ratio_ours_vs_hf_assisted": _ratio(_pooled(speculative), _pooled(assisted)),
            "ratio_ours_vs_hf_assisted_median": _median_ratio(speculative, assisted),
            "ratio_ours_baseline_vs_hf_greedy": _ratio(_pooled(baseline), _pooled(greedy)),
            "ours_tokens_per_target_pass": _per_pass(speculative),
            "hf_tokens_per_target_pass": _per_pass(assisted),
            "ours_draft_passes": _sum_passes(speculative, "draft_passes"),
            "hf_draft_passes": _sum_passes(assisted, "draft_passes"),
            "ours_baseline_prefill_fraction": _ratio(baseline_stats.prefill_s, baseline_stats.wall_s),
            "speculative_identical_to_baseline": identical("speculative_vs_baseline"),
            "baseline_identical_to_hf_greedy": identical("baseline_vs_hf_greedy"),
            "hf_assisted_identical_to_hf_greedy": identical("hf_assisted_vs_hf_greedy"),
            "mismatches": [
                {"prompt": pid, "pair": name, "first_difference_at": at}
                for pid, c in checks
                for name, at in c.items()
                if at is not None
            ],
        }

    def as_dict(self) -> dict:
        return {
            "settings": self.settings,
            "summaries": [self.summary(k) for k in self.ks],
            "prompts": [p.as_dict(self.ks) for p in self.prompts],
        }

    def format_table(self) -> str:
        """A plain-text table, one row per K, then any mismatches."""
        s = self.settings
        header = (
            f"{s['target']} + {s['drafter']}, {s['dtype']}, greedy, {len(self.prompts)} prompts, "
            f"max_new_tokens={s['max_new_tokens']}, torch threads={s['torch_threads']}"
        )
        columns = ("K", "acc.rate", "mean acc.len", "ours alone", "ours spec", "speedup", "HF greedy",
                   "HF assisted", "HF speedup", "ours/HF assist", "ours/HF greedy", "tok/pass ours|HF", "identical")
        rows = []
        for k in self.ks:
            m = self.summary(k)
            n = m["num_prompts"]
            rows.append((
                str(k),
                _fmt(m["acceptance_rate"], "{:.1%}"),
                _fmt(m["mean_acceptance_length"], "{:.2f}"),
                _fmt(m["ours_baseline_tokens_per_s"], "{:.2f} t/s"),
                _fmt(m["ours_speculative_tokens_per_s"], "{:.2f} t/s"),
                _fmt(m["speedup"], "{:.2f}x"),
                _fmt(m["hf_greedy_tokens_per_s"], "{:.2f} t/s"),
                _fmt(m["hf_assisted_tokens_per_s"], "{:.2f} t/s"),
                _fmt(m["hf_speedup"], "{:.2f}x"),
                _fmt(m["ratio_ours_vs_hf_assisted"], "{:.2f}x"),
                _fmt(m["ratio_ours_baseline_vs_hf_greedy"], "{:.2f}x"),
                f"{_fmt(m['ours_tokens_per_target_pass'], '{:.2f}')}|{_fmt(m['hf_tokens_per_target_pass'], '{:.2f}')}",
                f"{m['speculative_identical_to_baseline']}/{n} {m['baseline_identical_to_hf_greedy']}/{n} "
                f"{m['hf_assisted_identical_to_hf_greedy']}/{n}",
            ))
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        line = lambda cells: "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))  # noqa: E731
        out = [header, line(columns), line(["-" * w for w in widths]), *map(line, rows)]
        out.append("identical: ours spec = ours alone / ours alone = HF greedy / HF assisted = HF greedy (greedy tokens)")
        for k in self.ks:
            for miss in self.summary(k)["mismatches"]:
                out.append(f"  K={k} mismatch {miss['pair']} on {miss['prompt']} from token {miss['first_difference_at']}")
        return "\n".join(out)


# ---------------------------------------------------------------- the comparison


def run_peer_comparison(
    target,
    drafter: DrafterSpec,
    prompts: Sequence[Prompt],
    k: int | Sequence[int] = 4,
    max_new_tokens: int = 64,
    *,
    chat_template: bool = True,
    warmup: bool = True,
    progress: Progress | None = None,
    on_prompt: Callable[[PeerReport], None] | None = None,
) -> PeerReport:
    """Run ours and transformers' decoders, greedy, on every prompt, interleaved (see module docstring).

    target: ``lab.models.LoadedModel`` (model, tokenizer, eos_token_ids, name, dtype, device).
    drafter: what drafts, for both decoders.
    prompts: the prompt set (``lab.prompts``).
    k: one K or several; the target-alone runs are shared between them.
    max_new_tokens: the budget of every run.
    warmup: first run every method once on a short prompt, untimed.
    progress: ``progress(fraction, message)`` after each run.
    on_prompt: called with the report so far after each prompt (e.g. to save
        partial results of a long run).

    Raises ValueError on an empty prompt set or a bad K / budget (``DecodeConfig``).
    """
    ks = (k,) if isinstance(k, int) else tuple(k)
    if not prompts:
        raise ValueError("peer comparison requires at least one prompt; got none")
    if not ks:
        raise ValueError("peer comparison requires at least one K; got none")
    for kk in ks:
        DecodeConfig(k=kk, max_new_tokens=max_new_tokens)  # validates K and the budget before any work
    drafters = {kk: drafter.build(target) for kk in ks}
    encoded = [encode_prompt(target, prompt.text, chat_template=chat_template) for prompt in prompts]
    counters = _PassCounters(target, drafter)

    def methods_for(prompt_ids: list[int], budget: int) -> list[tuple[str, int | None, Callable[[], TimedRun]]]:
        base = DecodeConfig(k=ks[0], max_new_tokens=budget)
        out = [
            (OURS_BASELINE, None, lambda: _time_ours(target, prompt_ids, None, base, OURS_BASELINE, None, counters)),
            (HF_GREEDY, None, lambda: _time_hf(target, prompt_ids, budget, HF_GREEDY, None, contextlib.nullcontext({}), counters)),
        ]
        for kk in ks:
            config = DecodeConfig(k=kk, max_new_tokens=budget)
            out.append((OURS_SPECULATIVE, kk, lambda kk=kk, c=config: _time_ours(
                target, prompt_ids, drafters[kk], c, OURS_SPECULATIVE, kk, counters)))
            out.append((HF_ASSISTED, kk, lambda kk=kk: _time_hf(
                target, prompt_ids, budget, HF_ASSISTED, kk, drafter.hf_assisted(target, kk), counters)))
        return out

    settings = {
        "target": target.name,
        "drafter": drafter.describe(target),
        "drafter_name": drafter.name,
        "draft": getattr(drafter.draft, "name", None),
        "ks": list(ks),
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "dtype": str(getattr(target, "dtype", next(target.model.parameters()).dtype)).removeprefix("torch."),
        "device": str(getattr(target, "device", next(target.model.parameters()).device)),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "chat_template": chat_template,
        "load_average_1min": {"start": _load_average(), "end": None},
        "prompt_ids": [prompt.id for prompt in prompts],
        "hf_assistant_settings": "num_assistant_tokens=K, num_assistant_tokens_schedule='constant', "
        "assistant_confidence_threshold=0.0" if drafter.name != "prompt-lookup"
        else f"prompt_lookup_num_tokens=K, max_matching_ngram_size={drafter.max_n}",
    }
    report = PeerReport(settings, ks, [])
    report_progress = progress or (lambda fraction, message: None)
    with _quiet_transformers():
        if warmup:
            report_progress(0.0, "warming up every method on a short prompt")
            short = encoded[0][:WARMUP_PROMPT_TOKENS]
            for _, _, call in methods_for(short, WARMUP_NEW_TOKENS):
                call()
        num_methods = 2 + 2 * len(ks)
        for index, (prompt, prompt_ids) in enumerate(zip(prompts, encoded)):
            result = PromptResult(prompt, len(prompt_ids))
            methods = methods_for(prompt_ids, max_new_tokens)
            rotation = index % len(methods)  # rotate the order so no method always runs first or last
            for done, (method, kk, call) in enumerate(methods[rotation:] + methods[:rotation]):
                timed, stats = call()
                result.runs.append(timed)
                if stats is not None:
                    result.stats[0 if kk is None else kk] = stats
                label = method if kk is None else f"{method} K={kk}"
                report_progress(
                    (index * num_methods + done + 1) / (len(prompts) * num_methods),
                    f"[{index + 1}/{len(prompts)}] {prompt.id} {label}: {timed.num_new_tokens} tokens "
                    f"in {timed.wall_s:.1f} s ({timed.tokens_per_s:.2f} tok/s)",
                )
            report.prompts.append(result)
            settings["load_average_1min"]["end"] = _load_average()
            if on_prompt is not None:
                on_prompt(report)
    return report


# ---------------------------------------------------------------- timing one run


def _time_ours(target, prompt_ids, drafter, config, method, k, counters) -> tuple[TimedRun, SpecDecodingStats]:
    with counters.counting() as counted:
        started = time.perf_counter()
        result = run(target, prompt_ids, drafter, config)
        wall_s = time.perf_counter() - started
    return TimedRun(method, k, tuple(result.token_ids), wall_s, *counted()), result.stats


def _time_hf(target, prompt_ids, max_new_tokens, method, k, settings, counters) -> tuple[TimedRun, None]:
    model = target.model
    device = next(model.parameters()).device
    eos = list(target.eos_token_ids)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, P]
    with settings as extra, counters.counting() as counted, torch.inference_mode():
        started = time.perf_counter()
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else None,
            **extra,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - started
    new_tokens = tuple(output[0, len(prompt_ids) :].tolist())  # [N]
    return TimedRun(method, k, new_tokens, wall_s, *counted()), None


class _PassCounters:
    """Counts target and draft forward passes with hooks on the last layer each must run through."""

    def __init__(self, target, drafter: DrafterSpec) -> None:
        self.target_layer = _last_layer(target.model)
        self.draft_layer = None
        self.subtract_target = False
        if drafter.name == "draft-model":
            self.draft_layer = _last_layer(drafter.draft.model)
        elif drafter.name == "layer-skip":
            layers = getattr(getattr(target.model, "model", None), "layers", None)
            if layers is not None:
                self.draft_layer = layers[drafter.resolved_exit_layer(target) - 1]
                self.subtract_target = True  # full passes also run through the exit layer

    @contextlib.contextmanager
    def counting(self) -> Iterator[Callable[[], tuple[int | None, int | None]]]:
        calls = {"target": 0, "draft": 0}
        hooks = []
        for name, layer in (("target", self.target_layer), ("draft", self.draft_layer)):
            if layer is not None:
                hooks.append(layer.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)))
        try:
            yield lambda: (
                calls["target"] if self.target_layer is not None else None,
                None if self.draft_layer is None else calls["draft"] - (calls["target"] if self.subtract_target else 0),
            )
        finally:
            for hook in hooks:
                hook.remove()


def _last_layer(model) -> torch.nn.Module | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers[-1] if layers is not None and len(layers) else None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' generation warnings (they would drown the progress lines); restore after."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _load_average() -> float | None:
    """The 1-minute load average (how busy the shared CPU was), None where the OS does not say."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------- small pure helpers


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where two token sequences differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _pooled(runs: Sequence[TimedRun]) -> float | None:
    wall_s = sum(r.wall_s for r in runs)
    return sum(r.num_new_tokens for r in runs) / wall_s if wall_s > 0 else None


def _per_pass(runs: Sequence[TimedRun]) -> float | None:
    if any(r.target_passes is None for r in runs):
        return None
    passes = sum(r.target_passes for r in runs)
    return sum(r.num_new_tokens for r in runs) / passes if passes else None


def _sum_passes(runs: Sequence[TimedRun], name: str) -> int | None:
    values = [getattr(r, name) for r in runs]
    return None if any(v is None for v in values) else sum(values)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _median_ratio(a: Sequence[TimedRun], b: Sequence[TimedRun]) -> float | None:
    ratios = [x.tokens_per_s / y.tokens_per_s for x, y in zip(a, b) if y.tokens_per_s > 0 and x.wall_s > 0]
    return statistics.median(ratios) if ratios else None


def _clean(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _fmt(x: float | None, pattern: str) -> str:
    return "n/a" if x is None else pattern.format(x)
