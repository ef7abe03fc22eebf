"""``python -m lab generate``: decode one prompt, streaming coloured tokens, or print one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from lab.config import K_MAX, DecodeConfig
from lab.drafters import DRAFTER_NAMES
from lab.cli.common import (
    EXIT_OK,
    ProgressLine,
    UsageError,
    add_constraint_arguments,
    add_drafter_arguments,
    add_engine_argument,
    add_model_arguments,
    add_save_argument,
    add_tree_argument,
    check_drafter_arguments,
    checked_tokenizer,
    constraint_spec,
    finish_saved,
    holding_device,
    load_models,
    run_saver,
)


# ANSI styles of the token classes (``lab.trace``); the target's own tokens at undrafted steps stay plain.
STYLES = {
    "accepted": "\033[32m",  # green
    "corrected": "\033[33m",  # yellow
    "bonus": "\033[36m",  # cyan
    "rejected": "\033[2;9;31m",  # dim, struck through, red
    "target": "",
}
RESET = "\033[0m"


def add_generate(commands) -> None:
    """Register ``python -m lab generate``."""
    generate = commands.add_parser("generate", help="decode one prompt, speculatively or with the target alone")
    add_model_arguments(generate)
    add_drafter_arguments(generate, choices=DRAFTER_NAMES, default="none", bridge=True)
    generate.add_argument("--k", type=_k_or_auto, default=4,
                          help=f"tokens drafted per step, 1..{K_MAX} (default 4), or 'auto': the K this machine's "
                          "calibration predicts fastest (measured once, then cached; see `calibrate`)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="token budget (default 128)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    generate.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep; 1.0 keeps all")
    generate.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    generate.add_argument("--raw", action="store_true", help="encode the prompt as is, without the chat template")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="a text file holding the prompt")
    generate.add_argument("--compare-baseline", action="store_true",
                          help="also run the target alone: speedup and whether the output is identical")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of coloured text")
    generate.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                          help="colour tokens by class (default: when stdout is a terminal)")
    add_constraint_arguments(generate)
    add_engine_argument(generate)
    add_tree_argument(generate)
    add_save_argument(generate)
    generate.set_defaults(handler=_cmd_generate)


def _k_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"requires an integer 1..{K_MAX} or 'auto'; got {text!r}") from None


def _auto_from_calibration(args: argparse.Namespace, progress) -> str | None:
    """Resolve ``--dtype auto`` and ``--k auto`` from this machine's calibration; returns a note saying how.

    --k auto measures the pair once if needed (cached). --dtype auto uses a
    cached calibration of the pair when there is one, else the bf16/fp32 probe.
    """
    from lab.studies.calibrate import cached_calibration, calibrate

    drafter = {"draft-model": "draft-model", "prompt-lookup": "prompt-lookup"}.get(args.drafter)
    wants_k = getattr(args, "k", None) == "auto"
    if wants_k and drafter is None:
        raise UsageError(f"--k auto requires --drafter draft-model or prompt-lookup (calibrated); got {args.drafter}")
    auto_dtype = args.dtype in (None, "auto") and args.target_quant is None and args.draft_quant is None
    if drafter is None or not (wants_k or auto_dtype):
        return None
    draft = args.draft if drafter == "draft-model" else None
    if wants_k:
        calibration = calibrate(args.target, draft, drafter, args.device or "auto", progress=progress)
        progress.done()
    else:
        calibration = cached_calibration(args.target, draft, drafter, args.device or "auto")
    if calibration is None:
        return None
    if auto_dtype:
        args.dtype = calibration.precision
    if wants_k:
        args.k = calibration.k
    return (f"auto: {calibration.precision}{f', K={calibration.k}' if wants_k else ''} from this machine's "
            f"calibration (predicted {calibration.predicted_speedup:.2f}x at acceptance {calibration.acceptance:.0%}; "
            "`python -m lab calibrate` shows why)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from lab.drafters import make_drafter
    from lab.decode import decode, run
    from lab.metrics import SpecDecodingStats
    from lab.models import encode_prompt
    from lab.trace import Finished, Step

    # 1. Check everything that needs no weights.
    check_drafter_arguments(args)
    text = _read_prompt(args)
    progress = ProgressLine(sys.stderr)
    checked_k = 4 if args.k == "auto" else args.k  # validated now; auto is resolved below, after the cheap checks
    DecodeConfig(k=checked_k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, tree_budget=args.tree_budget)
    spec = constraint_spec(args)
    note = _auto_from_calibration(args, progress)
    if note is not None:
        print(note, file=sys.stderr)
    config = DecodeConfig(
        k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        grammar_mode="naive" if args.naive_grammar else "exact", engine_mode=args.engine,
        tree_budget=args.tree_budget,
    )
    tokenizer = checked_tokenizer(args, progress)
    prompt_ids = encode_prompt(tokenizer, text, chat_template=not args.raw)

    # 2. Load, build the drafter, decode.
    target, draft = load_models(args, progress)
    drafter = make_drafter(args.drafter, target, draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer,
                           draft_vocab=args.draft_vocab, vocab_bridge=args.vocab_bridge)
    constraint = None
    if spec is not None:
        from lab.grammar import Constraint

        constraint = Constraint.for_model(spec, target)
    stats, steps = SpecDecodingStats(), []
    printer = None if args.json else TokenPrinter(target.tokenizer, sys.stdout, _use_color(args.color, sys.stdout))
    finished, baseline, meter = None, None, None
    # a speedup is measured only with the device to itself (lab.device_queue) and the machine's load watched
    with holding_device(target.device, "generate --compare-baseline") if args.compare_baseline else nullcontext() as meter:
        for event in decode(target, prompt_ids, drafter, config, constraint=constraint):
            stats.observe(event)
            if isinstance(event, Step):
                steps.append(event)
                if printer is not None:
                    printer.step(event)
            elif isinstance(event, Finished):
                finished = event
        if printer is not None:
            printer.finish()

        if args.compare_baseline:
            if not args.json:
                print("running the target alone for comparison...", file=sys.stderr)
            baseline = run(target, prompt_ids, None, replace(config, grammar_mode="exact"), constraint=constraint)

    settings = {
        "target": target.name,
        "drafter": args.drafter,
        "draft": draft.name if draft is not None else None,
        "draft_vocab": args.draft_vocab if args.drafter in ("draft-model", "eagle") else None,
        "k": config.k,
        "tree_budget": config.tree_budget,
        "engine_mode": config.engine_mode,
        "min_n": args.min_n if args.drafter == "prompt-lookup" else None,
        "max_n": args.max_n if args.drafter == "prompt-lookup" else None,
        "exit_layer": getattr(drafter, "exit_layer", args.exit_layer) if args.drafter == "layer-skip" else None,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_k": config.top_k,
        "top_p": config.top_p,
        "seed": config.seed,
        "raw": args.raw,
        "dtype": str(target.dtype).removeprefix("torch."),
        "device": str(target.device),
        "num_prompt_tokens": len(prompt_ids),
        "target_precision": target.precision,
        "draft_precision": draft.precision if draft is not None else None,
        "constraint": None if spec is None else {"kind": spec.kind, "source": spec.source, "mode": config.grammar_mode},
    }
    if meter is not None:
        settings["load"] = meter.report.as_dict()
    report = generate_report(finished, stats, steps, settings, baseline)
    if constraint is not None:
        report["constraint_valid"] = constraint.is_valid(finished.text)
    _save(args, report, target, draft)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_summary(finished, stats, settings, baseline, color=printer.color))
        if constraint is not None:
            valid = constraint.is_valid(finished.text)
            note = "" if valid or finished.reason != "max_new_tokens" else " (a valid prefix, cut by the token budget: raise --max-new-tokens)"
            print(f"   constraint ({spec.kind}, {config.grammar_mode}): output {'valid' if valid else 'NOT valid'}{note}")
    return EXIT_OK


def _save(args: argparse.Namespace, report: dict, target, draft) -> None:
    """Keep the run in the results store (its figures, and the ``--json`` report as payload) unless --no-save."""
    from lab.figures import from_stats

    figures = from_stats(report["metrics"])
    if "speedup" in report:
        figures |= {"speedup": report["speedup"], "target_tokens_per_s": report["baseline"]["tokens_per_s"]}
    saver = run_saver(args, "generate", target=target.name, draft=draft.name if draft is not None else None,
                      device=target.device, settings=report["settings"])
    finish_saved(saver, figures, payload=report)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:  # read, not is_file(): a pipe such as <(command) or /dev/stdin is a fine prompt file
            text = args.prompt_file.read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError) as error:
            problem = "is a folder" if isinstance(error, IsADirectoryError) else "does not exist"
            raise UsageError(f"prompt file {str(args.prompt_file)!r} {problem}: give the path of a text file") from error
    else:
        text = args.prompt
    if not text or not text.strip():
        raise UsageError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE with some text")
    return text


def generate_report(finished, stats, steps, settings: dict, baseline=None) -> dict:
    """The JSON object of ``generate --json`` (see the module docstring of ``lab.cli``)."""
    report = {
        "text": finished.text,
        "token_ids": list(finished.token_ids),
        "reason": finished.reason,
        "metrics": stats.as_dict(),
        "steps": [
            {
                "index": step.index,
                "drafted": list(step.drafted),
                "accepted": list(step.accepted_tokens),
                "tree_parents": None if step.tree is None else step.tree.parents.tolist(),
                "tree_path": list(step.tree_path),
                "rejected": list(step.rejected),
                "emitted": list(step.emitted),
                "final_kind": step.final_kind,
                "draft_ms": step.draft_ms,
                "verify_ms": step.verify_ms,
            }
            for step in steps
        ],
        "settings": settings,
    }
    if baseline is not None:
        report["baseline"] = {
            "text": baseline.text,
            "token_ids": baseline.token_ids,
            "wall_s": baseline.stats.wall_s,
            "tokens_per_s": _clean(baseline.stats.tokens_per_s),
        }
        report["speedup"] = _speedup(stats.tokens_per_s, baseline.stats.tokens_per_s)
        report["identical_to_baseline"] = list(finished.token_ids) == list(baseline.token_ids)
    return report


def format_summary(finished, stats, settings: dict, baseline=None, color: bool = False) -> str:
    """The human summary printed after the streamed tokens."""
    lines = [
        "",
        f"-- {stats.num_output_tokens} tokens in {stats.wall_s:.2f} s ({stats.tokens_per_s:.2f} tokens/s), "
        f"stopped by {finished.reason}; {stats.target_forward_passes} target passes, "
        f"prompt {settings['num_prompt_tokens']} tokens",
    ]
    if settings["drafter"] != "none":
        name = settings["drafter"] + (f" (top {settings['draft_vocab']:,} tokens)" if settings.get("draft_vocab") else "")
        if stats.num_drafts:
            per_position = " ".join(f"{rate:.2f}" for rate in stats.per_position_acceptance_rate)
            lines.append(
                f"   {name} K={settings['k']}: {stats.num_drafts} drafts, {stats.num_draft_tokens} drafted, "
                f"{stats.num_accepted_tokens} accepted; acceptance rate {stats.acceptance_rate:.1%}, "
                f"mean acceptance length {stats.mean_acceptance_length:.2f}; per position {per_position}"
            )
            if stats.num_tree_drafts:
                lines.append(f"   token trees: budget {settings['tree_budget']} nodes, mean tree size "
                             f"{stats.mean_tree_size:.1f} nodes, mean accepted depth {stats.mean_acceptance_length - 1:.2f}")
        else:
            lines.append(f"   {name} K={settings['k']}: nothing was drafted")
        if color:
            legend = " ".join(_paint(name if name != "rejected" else "[rejected]", name, True)
                              for name in ("accepted", "corrected", "bonus", "rejected"))
            lines.append(f"   legend: {legend} target")
    if baseline is not None:
        identical = list(finished.token_ids) == list(baseline.token_ids)
        speedup = _speedup(stats.tokens_per_s, baseline.stats.tokens_per_s)
        lines.append(
            f"   target alone: {baseline.stats.tokens_per_s:.2f} tokens/s -> speedup "
            f"{'n/a' if speedup is None else f'{speedup:.2f}x'}; output identical: {'yes' if identical else 'no'}"
            + ("" if identical else " (expected when sampling: equal in distribution, not token for token)"
               if settings["temperature"] != 0 else "" if settings["dtype"] == "float32" else
               f" ({settings['dtype']} rounds a {settings['k'] + 1}-token verify pass differently from a one-token pass, "
               "so a near-tie can flip a greedy token; rerun with --dtype fp32 for the token-exact check)")
        )
    return "\n".join(lines)


class TokenPrinter:
    """Streams committed tokens as they come, coloured by class (see ``STYLES``).

    Without colour it writes the plain committed text only (good for pipes);
    with colour, a rejected draft token is shown struck through in brackets
    before the target's correction.
    """

    def __init__(self, tokenizer, out: TextIO, color: bool) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.color = color
        self.ids: list[int] = []
        self.printed = ""

    def step(self, step) -> None:
        num_accepted = min(step.num_accepted, len(step.emitted))
        for token in step.emitted[:num_accepted]:
            self._emit(token, "accepted")
        if self.color and step.rejected:
            rejected = self.tokenizer.decode(list(step.rejected))  # special tokens shown: a rejected <eos> is news
            self.out.write(_paint(f"[{rejected}]", "rejected", True))
        for token in step.emitted[num_accepted:]:
            self._emit(token, step.final_kind)
        self.out.flush()

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()

    def _emit(self, token: int, kind: str) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        new, self.printed = text[len(self.printed) :], text
        self.out.write(_paint(new, kind, self.color))


def _paint(text: str, kind: str, color: bool) -> str:
    style = STYLES.get(kind, "")
    return f"{style}{text}{RESET}" if color and style and text else text


def _use_color(choice: str, out: TextIO) -> bool:
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(out, "isatty", lambda: False)())


def _speedup(tokens_per_s: float, baseline_tokens_per_s: float) -> float | None:
    value = tokens_per_s / baseline_tokens_per_s if baseline_tokens_per_s and baseline_tokens_per_s > 0 else None
    return _clean(value)


def _clean(x: float | None) -> float | None:
    return None if x is None or x != x else x
