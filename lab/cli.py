"""The command line: ``python -m lab generate | prepare | models | calibrate | peer | compare | bench |
engine-bench | serve-bench | token-freq | train-head``.

Every subcommand is one function ``_cmd_<name>(args) -> int`` registered in
``build_parser``; ``main(argv) -> int`` parses and dispatches, so tests call it
directly. Bad input (an empty prompt, K out of range, an unknown model, a draft
whose tokenizer is not the target's, a missing file) ends with one line on
stderr saying what to do, and exit code 2; nothing is decoded first.

Examples::

    python -m lab models
    python -m lab prepare smollm2-135m
    python -m lab generate --target smollm2-135m --drafter prompt-lookup --k 4 \\
        --max-new-tokens 64 --prompt "Repeat after me: the quick brown fox" --compare-baseline
    python -m lab generate --target qwen2.5-coder-1.5b --drafter draft-model \\
        --draft qwen2.5-coder-0.5b --k 4 --prompt-file question.txt --json
    python -m lab peer --target qwen2.5-coder-1.5b --drafter draft-model \\
        --draft qwen2.5-coder-0.5b --k 4 6 --prompts spec_bench:summarization:10 spec_bench:mix:10
    python -m lab generate --target smollm2-135m --drafter prompt-lookup --json-schema schema.json \
        --prompt "Extract the person as JSON: Maria Lopez, 34, lives in Valencia."
    python -m lab compare --target smollm2-135m --drafters prompt-lookup layer-skip --ks 2 4 6 8 \
        --prompts spec_bench:summarization:8 spec_bench:qa:8 --out results/compare.json
    python -m lab bench --target smollm2-135m --drafter prompt-lookup --k 4 --batch-sizes 1,2,4,8,16 \
        --prompts spec_bench:summarization:8 spec_bench:qa:8 --max-new-tokens 48 --json
    python -m lab bench --target smollm2-135m --drafter layer-skip --k 3 --batch-sizes 1,4 \
        --prompts json_extraction --json-schema schema.json
    python -m lab generate --target smollm2-135m --target-quant nf4 --drafter layer-skip --prompt "Hi"
    python -m lab calibrate --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b
    python -m lab generate --target qwen2.5-coder-1.5b --drafter draft-model --draft qwen2.5-coder-0.5b \\
        --k auto --prompt "Write a haiku about caches"
    python -m lab serve-bench --on http://127.0.0.1:8080 --off http://127.0.0.1:8081 --api chat \\
        --concurrency 1,2,4,8,16 --prompts spec_bench:mix:8 --max-tokens 32 --json
    python -m lab token-freq --target qwen2.5-coder-1.5b --num-prompts 96
    python -m lab train-head --target smollm2-135m --minutes 15
    python -m lab compare --target qwen2.5-coder-1.5b --drafters draft-model eagle --draft qwen2.5-coder-0.5b \\
        --draft-vocab 16384 --ks 4 --prompts spec_bench:mix:20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from lab.config import K_MAX, DecodeConfig
from lab.drafters import DRAFTER_NAMES

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

# ANSI styles of the token classes (``lab.trace``); the target's own tokens at undrafted steps stay plain.
STYLES = {
    "accepted": "\033[32m",  # green
    "corrected": "\033[33m",  # yellow
    "bonus": "\033[36m",  # cyan
    "rejected": "\033[2;9;31m",  # dim, struck through, red
    "target": "",
}
RESET = "\033[0m"


class UsageError(Exception):
    """Bad input; the message says what to do. ``main`` prints it on one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ``UsageError`` (one line, exit 2) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("python -m lab").strip()
        raise UsageError(f"{message} (see `{' '.join(['python -m lab', command, '--help']).replace('  ', ' ')}`)")


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(
                "a command is required: generate, calibrate, prepare, models, peer, compare, bench, engine-bench, "
                "serve-bench, token-freq or train-head (see `python -m lab --help`)"
            )
        return args.handler(args)
    except SystemExit as done:  # --help / --version
        return done.code if isinstance(done.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - only input errors are turned into exit 2
        if not _is_input_error(error):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE


def _is_input_error(error: Exception) -> bool:
    from lab.models import ModelError
    from lab.serving.client import ServeError

    return isinstance(error, (UsageError, ValueError, ModelError, FileNotFoundError, ServeError))


def _one_line(error: Exception) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lab", description="Speculative Decoding Lab: decode, prepare models, measure.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    generate = commands.add_parser("generate", help="decode one prompt, speculatively or with the target alone")
    _add_model_arguments(generate)
    _add_drafter_arguments(generate, choices=DRAFTER_NAMES, default="none")
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
    _add_constraint_arguments(generate)
    _add_engine_argument(generate)
    generate.set_defaults(handler=_cmd_generate)

    calibrate = commands.add_parser("calibrate", help="time the passes here; pick precision and K by the cost model")
    calibrate.add_argument("--target", required=True, help="a preset name or a model folder")
    calibrate.add_argument("--draft", help="the draft model (a preset or a folder); without it: prompt lookup, c = 0")
    calibrate.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    calibrate.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp32", "fp16"),
                           help="float precisions to compare (default bf16 fp32)")
    calibrate.add_argument("--ks", type=int, nargs="+", default=None, help="K values to consider (default 1 2 3 4 6 8)")
    calibrate.add_argument("--acceptance", type=float, default=None,
                           help="per-token acceptance rate a the choice assumes (default: a prior for the drafter, "
                           "0.8 for a draft model, 0.4 for prompt lookup)")
    calibrate.add_argument("--refresh", action="store_true", help="time again even if this machine has a calibration")
    calibrate.add_argument("--json", action="store_true", help="print the calibration as JSON")
    calibrate.set_defaults(handler=_cmd_calibrate)

    prepare = commands.add_parser("prepare", help="prepare model presets once (assemble, check, convert to bf16)")
    prepare.add_argument("names", nargs="*", metavar="NAME", help="presets to prepare (default: all)")
    prepare.set_defaults(handler=_cmd_prepare)

    models = commands.add_parser("models", help="list the model presets and whether they are prepared")
    models.set_defaults(handler=_cmd_models)

    peer = commands.add_parser("peer", help="compare with transformers' assisted generation, side by side")
    _add_model_arguments(peer)
    from lab.studies.peer import PEER_DRAFTERS

    _add_drafter_arguments(peer, choices=PEER_DRAFTERS, default=None)
    peer.add_argument("--k", type=int, nargs="+", default=[4], help="one or more K (default 4)")
    peer.add_argument("--max-new-tokens", type=int, default=64, help="token budget per run (default 64)")
    peer.add_argument("--prompts", nargs="+", default=["spec_bench:summarization:10", "spec_bench:mix:10"],
                      help="prompt sets: spec_bench[:CATEGORY|:mix][:N], a preset name, or a .jsonl path "
                      "(default: spec_bench:summarization:10 spec_bench:mix:10)")
    peer.add_argument("--raw", action="store_true", help="encode prompts without the chat template")
    peer.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    peer.add_argument("--json", action="store_true", help="print the full JSON report instead of the table")
    peer.add_argument("--out", type=Path, help="also write the JSON report to this file (rewritten after each prompt)")
    peer.set_defaults(handler=_cmd_peer)

    bench = commands.add_parser("bench", help="batch-size sweep: latency and throughput with speculation off, on and auto")
    _add_model_arguments(bench)
    _add_drafter_arguments(bench, [n for n in DRAFTER_NAMES if n != "none"], None)
    bench.add_argument("--k", type=int, default=4, help="K of the 'on' mode (default 4)")
    bench.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated batch sizes (default 1,2,4,8,16)")
    bench.add_argument("--max-new-tokens", type=int, default=64, help="token budget per request (default 64)")
    bench.add_argument("--prompts", nargs="+", default=["spec_bench:mix:16"],
                       help="prompt sets: spec_bench[:CATEGORY|:mix][:N], a preset name (e.g. summarization, "
                       "open_qa: shipped in assets/prompts), or a .jsonl path (default: spec_bench:mix:16, which "
                       "needs the Spec-Bench file: see README)")
    bench.add_argument("--n", type=int, default=None, help="use the first N prompts of the sets")
    bench.add_argument("--raw", action="store_true", help="encode prompts without the chat template")
    bench.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    bench.add_argument("--out", type=Path, help="also write the JSON result to this file")
    bench.add_argument("--no-peer", action="store_true",
                       help="skip transformers' assisted generation at batch 1 on the same models and prompts "
                       "(run by default, after the sweep, as the peer)")
    _add_constraint_arguments(bench)
    bench.set_defaults(handler=_cmd_bench)

    compare = commands.add_parser("compare", help="every drafter at every K on the same prompts, against the target alone")
    _add_model_arguments(compare)
    compare.add_argument("--drafters", nargs="+", required=True, choices=[n for n in DRAFTER_NAMES if n != "none"])
    compare.add_argument("--draft", help="draft model for draft-model (a preset or a folder)")
    compare.add_argument("--exit-layer", type=int, default=None, help="layer-skip exit (default: a quarter of the layers)")
    compare.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6, 8], help="K values (default 2 4 6 8)")
    compare.add_argument("--max-new-tokens", type=int, default=48, help="token budget per run (default 48)")
    compare.add_argument("--prompts", nargs="+", default=["spec_bench:mix:8"],
                         help="prompt sets, as for peer (default: spec_bench:mix:8, which needs the Spec-Bench file)")
    compare.add_argument("--raw", action="store_true", help="encode prompts without the chat template")
    compare.add_argument("--json", action="store_true", help="print the JSON results instead of the table")
    compare.add_argument("--out", type=Path, help="also write the JSON results (loadable in the app's Compare page)")
    compare.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                         help="also compare the draft model / EAGLE head trimmed to the N most frequent tokens")
    _add_engine_argument(compare)
    compare.set_defaults(handler=_cmd_compare)

    engine = commands.add_parser("engine-bench", help="engine modes, precisions and K side by side (old vs new defaults)")
    engine.add_argument("--target", required=True, help="a preset name or a model folder")
    _add_drafter_arguments(engine, ["draft-model", "prompt-lookup"], None)
    engine.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    engine.add_argument("--arm", dest="arms", action="append", required=True, metavar="LABEL:PRECISION:ENGINE:K",
                        help="one arm, e.g. old:bf16:eager:4; PRECISION and K may be 'calibrated' (this "
                        "machine's calibration of the pair); repeat for more arms")
    engine.add_argument("--max-new-tokens", type=int, default=32, help="token budget per run (default 32)")
    engine.add_argument("--prompts", nargs="+", default=["spec_bench:mix:20"],
                        help="prompt sets, as for peer (default: spec_bench:mix:20)")
    engine.add_argument("--out", type=Path, help="also write the summary as JSON")
    engine.set_defaults(handler=_cmd_engine_bench)

    serve = commands.add_parser("serve-bench", help="load a real serving engine (vLLM, SGLang, llama.cpp) at rising "
                                "concurrency, speculation on and off")
    serve.add_argument("--on", metavar="URL", help="the endpoint with speculation on, e.g. http://127.0.0.1:8080")
    serve.add_argument("--off", metavar="URL", help="the same model with speculation off (omit to measure one endpoint)")
    serve.add_argument("--model", help="model name to send (default: the first one each server lists at /v1/models)")
    serve.add_argument("--api", choices=("completions", "chat"), default="completions",
                       help="/v1/completions with the raw prompt, or /v1/chat/completions (default completions)")
    serve.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels (default 1,2,4,8,16)")
    serve.add_argument("--prompts", nargs="+", default=["spec_bench:mix:8"],
                       help="prompt sets, as for bench (default: spec_bench:mix:8, which needs the Spec-Bench file)")
    serve.add_argument("--n", type=int, default=None, help="use the first N prompts of the sets")
    serve.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    serve.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    serve.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: ask for all max tokens)")
    serve.add_argument("--rounds", type=int, default=2, help="requests per concurrent worker per level (default 2)")
    serve.add_argument("--max-level-s", type=float, default=300.0, help="no request starts later than this into a level (default 300)")
    serve.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout (default 120)")
    serve.add_argument("--lab-target", help="also run the lab's own engine on the same prompts with this target (a preset)")
    serve.add_argument("--lab-draft", help="... and this draft model (a preset), for the side-by-side comparison")
    serve.add_argument("--lab-k", type=int, default=4, help="K for the lab's own engine (default 4; match --draft-max)")
    serve.add_argument("--llama-target", metavar="PRESET",
                       help="instead of --on/--off: start two llama-servers on 127.0.0.1 serving this preset's GGUF, "
                       "one drafted by --llama-draft (on) and one alone (off); needs scripts/build_llama_server.sh")
    serve.add_argument("--llama-draft", metavar="PRESET", help="the draft preset of the 'on' llama-server")
    serve.add_argument("--llama-k", type=int, default=4, help="tokens drafted per step by llama-server (default 4)")
    serve.add_argument("--llama-parallel", type=int, default=None,
                       help="llama-server slots (default: the largest concurrency level)")
    serve.add_argument("--llama-threads", type=int, default=2, help="llama-server CPU threads (default 2)")
    serve.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    serve.add_argument("--out", type=Path, help="also write the JSON result (with per-request records) to this file")
    serve.add_argument("--csv", type=Path, help="also write one CSV row per endpoint and level to this file")
    serve.set_defaults(handler=_cmd_serve_bench)

    freq = commands.add_parser("token-freq", help="count the tokens the target generates: the table a trimmed draft vocabulary uses")
    _add_model_arguments(freq, draft=False)
    freq.add_argument("--num-prompts", type=int, default=96, help="training prompts to answer (default 96)")
    freq.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (default 96)")
    freq.add_argument("--max-prompt-tokens", type=int, default=384, help="keep the last N tokens of a long prompt (default 384)")
    freq.add_argument("--batch-size", type=int, default=16, help="answers generated together (default 16)")
    freq.set_defaults(handler=_cmd_token_freq)

    head = commands.add_parser("train-head", help="train an EAGLE-style head on the target's own answers and save it")
    _add_model_arguments(head, draft=False)
    head.add_argument("--minutes", type=float, default=12.0,
                      help="time budget of the optimisation loop (default 12: with answering the prompts, within 30 minutes on 2 CPU cores)")
    head.add_argument("--num-prompts", type=int, default=480,
                      help="training prompts to answer, spread over the presets and Spec-Bench, never the held-out ones (default 480)")
    head.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    head.add_argument("--max-prompt-tokens", type=int, default=384, help="keep the last N tokens of a long prompt (default 384)")
    head.add_argument("--batch-size", type=int, default=16, help="answers generated together (default 16)")
    head.add_argument("--epochs", type=int, default=40, help="passes over the data at most (default 40)")
    head.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (default 3e-3)")
    head.add_argument("--unroll", type=int, default=3, help="training-time-test steps on the head's own predictions (default 3)")
    head.add_argument("--batch-tokens", type=int, default=512,
                      help="padded tokens per optimiser step (default 512: with this little data, more steps beat bigger batches)")
    head.add_argument("--intermediate-size", type=int, default=1024, help="the head's MLP width (default 1024)")
    head.add_argument("--feature-layers", default="eagle3",
                      help="what the head reads: eagle3 (three target layers, low/middle/high, fused: EAGLE-3), "
                           "final (the final norm's output: EAGLE-1) or comma-separated layer indices (default eagle3)")
    head.add_argument("--labels", default="soft", choices=("soft", "argmax"),
                      help="what the head learns: the target's whole distribution (soft, EAGLE's loss) or its argmax only "
                           "(default soft)")
    head.add_argument("--eval-prompts", type=int, default=4, help="held-out Spec-Bench prompts decoded after training (default 4)")
    head.add_argument("--out", type=Path, default=None, help="folder to save to (default: the model cache)")
    head.set_defaults(handler=_cmd_train_head)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser, draft: bool = True) -> None:
    """--target, --device, --dtype, --target-quant and (when the command can load a draft model) --draft-quant."""
    from lab.hardware import PRECISIONS

    parser.add_argument("--target", required=True, help="a preset name (see `python -m lab models`) or a model folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                        help="compute dtype of both models (default auto: a cached calibration's choice, else bf16 where "
                             "a timing probe finds this machine runs it fast, else fp32); fp32 is the exactness reference")
    parser.add_argument("--target-quant", default=None, choices=PRECISIONS,
                        help="the target's weight precision (int8/nf4/fp4 through bitsandbytes; default: --dtype)")
    if draft:
        parser.add_argument("--draft-quant", default=None, choices=PRECISIONS,
                            help="the draft model's weight precision (default: --dtype)")


def _add_engine_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", default="auto", choices=("auto", "eager", "static", "compiled"),
                        help="how passes run: eager (growing cache), static (fixed cache, fixed-width passes), "
                        "compiled (static + torch.compile, CUDA graphs on a GPU); auto: compiled on CUDA, else eager")


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


def _add_constraint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json-schema", type=Path, metavar="FILE", help="constrain the output to this JSON schema")
    group.add_argument("--regex", metavar="PATTERN", help="constrain the output to match this regular expression")
    group.add_argument("--any-json", action="store_true", help="constrain the output to any JSON value")
    parser.add_argument("--naive-grammar", action="store_true",
                        help="TEACHING ONLY: the broken way (drafts and verification unmasked, no rollback)")


def _constraint_spec(args: argparse.Namespace):
    """The ConstraintSpec the flags ask for, or None."""
    from lab.grammar import ConstraintSpec

    if getattr(args, "json_schema", None) is not None:
        if not args.json_schema.is_file():
            raise UsageError(f"schema file {str(args.json_schema)!r} does not exist: give the path of a JSON schema file")
        return ConstraintSpec("json_schema", args.json_schema.read_text(encoding="utf-8"))
    if getattr(args, "regex", None) is not None:
        return ConstraintSpec("regex", args.regex)
    if getattr(args, "any_json", False):
        return ConstraintSpec("any_json")
    if getattr(args, "naive_grammar", False):
        raise UsageError("--naive-grammar requires a constraint: --json-schema FILE, --regex PATTERN or --any-json")
    return None


def _add_drafter_arguments(parser: argparse.ArgumentParser, choices: Sequence[str], default: str | None) -> None:
    parser.add_argument("--drafter", choices=choices, default=default, required=default is None,
                        help=f"draft source (default {default})" if default else "draft source")
    parser.add_argument("--draft", help="draft model for --drafter draft-model (a preset or a folder)")
    parser.add_argument("--exit-layer", type=int, default=None, help="layer-skip exit (default: a quarter of the layers)")
    parser.add_argument("--min-n", type=int, default=1, help="prompt lookup: smallest n-gram (default 1)")
    parser.add_argument("--max-n", type=int, default=3, help="prompt lookup: largest n-gram (default 3)")
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                        help="draft-model / eagle: score only the target's N most frequent tokens (`token-freq` first)")


# ---------------------------------------------------------------- generate


def _cmd_generate(args: argparse.Namespace) -> int:
    from lab.drafters import make_drafter
    from lab.engine import decode, run
    from lab.metrics import SpecDecodingStats
    from lab.models import encode_prompt
    from lab.trace import Finished, Step

    # 1. Check everything that needs no weights.
    _check_drafter_arguments(args)
    text = _read_prompt(args)
    progress = ProgressLine(sys.stderr)
    checked_k = 4 if args.k == "auto" else args.k  # validated now; auto is resolved below, after the cheap checks
    DecodeConfig(k=checked_k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    spec = _constraint_spec(args)
    note = _auto_from_calibration(args, progress)
    if note is not None:
        print(note, file=sys.stderr)
    config = DecodeConfig(
        k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        grammar_mode="naive" if args.naive_grammar else "exact", engine_mode=args.engine,
    )
    tokenizer = _checked_tokenizer(args, progress)
    prompt_ids = encode_prompt(tokenizer, text, chat_template=not args.raw)

    # 2. Load, build the drafter, decode.
    target, draft = _load_models(args, progress)
    drafter = make_drafter(args.drafter, target, draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer,
                           draft_vocab=args.draft_vocab)
    constraint = None
    if spec is not None:
        from lab.grammar import Constraint

        constraint = Constraint.for_model(spec, target)
    stats, steps = SpecDecodingStats(), []
    printer = None if args.json else TokenPrinter(target.tokenizer, sys.stdout, _use_color(args.color, sys.stdout))
    finished = None
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

    baseline = None
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
    if args.json:
        report = generate_report(finished, stats, steps, settings, baseline)
        if constraint is not None:
            report["constraint_valid"] = constraint.is_valid(finished.text)
        print(json.dumps(report))
    else:
        print(format_summary(finished, stats, settings, baseline, color=printer.color))
        if constraint is not None:
            valid = constraint.is_valid(finished.text)
            note = "" if valid or finished.reason != "max_new_tokens" else " (a valid prefix, cut by the token budget: raise --max-new-tokens)"
            print(f"   constraint ({spec.kind}, {config.grammar_mode}): output {'valid' if valid else 'NOT valid'}{note}")
    return EXIT_OK


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
                "accepted": list(step.drafted[: step.num_accepted]),
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


# ---------------------------------------------------------------- prepare, models


def _cmd_prepare(args: argparse.Namespace) -> int:
    from lab.models import get_preset, prepare_all

    for name in args.names:
        get_preset(name)  # an unknown name fails before any work
    progress = ProgressLine(sys.stderr, always=True)
    started = time.perf_counter()
    folders = prepare_all(args.names or None, progress)
    progress.done()
    for folder in folders:
        print(f"prepared {folder.name}: {folder}")
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    from lab.models import PRESETS, ModelError, cache_dir, is_prepared, package_file

    rows = [("preset", "model", "size", "prepared", "packages")]
    for preset in PRESETS.values():
        try:
            for part in preset.parts:
                package_file(preset, part)
            packages = "installed"
        except ModelError:
            packages = f"not installed: {preset.pip_command}"
        prepared = is_prepared(preset)
        if prepared and packages != "installed":
            packages += " (only needed to prepare again: the prepared copy is enough to run)"
        rows.append((preset.name, preset.title, f"{preset.size_bytes / 2**20:,.0f} MiB",
                     "yes" if prepared else "no", packages))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\nprepared copies live in {cache_dir()}; prepare with `python -m lab prepare [NAME...]`")
    return EXIT_OK


# ---------------------------------------------------------------- calibrate


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from lab.studies.calibrate import DEFAULT_KS, calibrate

    progress = ProgressLine(sys.stderr, always=True)
    calibration = calibrate(args.target, args.draft, device=args.device or "auto", precisions=args.precisions,
                            ks=args.ks or DEFAULT_KS, acceptance=args.acceptance, refresh=args.refresh,
                            progress=progress)
    progress.done()
    print(json.dumps(calibration.as_dict()) if args.json else calibration.explain().replace("**", ""))
    return EXIT_OK


def _cmd_engine_bench(args: argparse.Namespace) -> int:
    from lab.studies.calibrate import calibrate
    from lab.studies.compare import DrafterSpec
    from lab.studies.engine_modes import Arm, format_engine_bench, run_engine_bench
    from lab.prompts import load_prompt_sets

    _check_drafter_arguments(args)
    prompts = load_prompt_sets(args.prompts)
    if not prompts:
        raise UsageError(f"the prompt sets {' '.join(args.prompts)} hold no prompts: choose others")
    calibration = None
    arms = []
    for text in args.arms:
        parts = text.split(":")
        if len(parts) != 4:
            raise UsageError(f"--arm requires LABEL:PRECISION:ENGINE:K, e.g. old:bf16:eager:4; got {text!r}")
        label, precision, mode, k = parts
        if "calibrated" in (precision, k) and calibration is None:
            calibration = calibrate(args.target, args.draft if args.drafter == "draft-model" else None, args.drafter,
                                    args.device or "auto", progress=_log_line)
            print(calibration.explain().replace("**", ""), file=sys.stderr)
        precision = calibration.precision if precision == "calibrated" else precision
        try:
            arms.append(Arm(label, precision, mode, calibration.k if k == "calibrated" else int(k)))
        except ValueError as error:
            raise UsageError(f"--arm {text!r}: {error}") from None
    spec = DrafterSpec(args.drafter, args.draft, min_n=args.min_n, max_n=args.max_n)
    frame = run_engine_bench(args.target, spec, [p.text for p in prompts], arms, args.max_new_tokens,
                             args.device or "auto", progress=_log_line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(frame.to_json(orient="records", indent=1))
    print(format_engine_bench(frame))
    return EXIT_OK


# ---------------------------------------------------------------- peer, bench


def _cmd_peer(args: argparse.Namespace) -> int:
    from lab.studies.peer import DrafterSpec, run_peer_comparison
    from lab.prompts import load_prompt_sets

    _check_drafter_arguments(args)
    for k in args.k:
        DecodeConfig(k=k, max_new_tokens=args.max_new_tokens)
    prompts = load_prompt_sets(args.prompts)
    if not prompts:
        raise UsageError(f"the prompt sets {' '.join(args.prompts)} hold no prompts: choose others")
    if args.out is not None and not args.out.parent.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
    progress = ProgressLine(sys.stderr, always=True)
    _checked_tokenizer(args, progress)
    target, draft = _load_models(args, progress)
    spec = DrafterSpec(args.drafter, draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer)
    save = None if args.out is None else (lambda partial: args.out.write_text(json.dumps(partial.as_dict(), indent=1) + "\n"))
    report = run_peer_comparison(target, spec, prompts, args.k, args.max_new_tokens, chat_template=not args.raw,
                                 warmup=not args.no_warmup, progress=_log_line, on_prompt=save)
    data = report.as_dict()
    if args.out is not None:
        print(f"wrote {args.out}", file=sys.stderr)
    print(json.dumps(data) if args.json else report.format_table())
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from lab.batch import make_batch_drafter
    from lab.models import encode_prompt
    from lab.prompts import load_prompt_sets
    from lab.grammar import Constraint
    from lab.studies.batch_sweep import format_sweep, run_sweep

    _check_drafter_arguments(args)
    if args.naive_grammar:
        raise UsageError(
            "bench requires the exact grammar mode; got --naive-grammar, a single-request teaching switch "
            "(show it with `generate --naive-grammar`)"
        )
    spec = _constraint_spec(args)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes requires comma-separated integers, e.g. 1,2,4,8; got {args.batch_sizes!r}") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"--batch-sizes requires integers >= 1; got {args.batch_sizes!r}")
    config = DecodeConfig(k=args.k, max_new_tokens=args.max_new_tokens)
    prompts = load_prompt_sets(args.prompts)[: args.n]
    if not prompts:
        raise UsageError(f"the prompt sets {' '.join(args.prompts)} hold no prompts: choose others")
    progress = ProgressLine(sys.stderr, always=True)
    _checked_tokenizer(args, progress)
    target, draft = _load_models(args, progress)
    drafter = make_batch_drafter(args.drafter, target, draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer)
    constraint = None if spec is None else Constraint.for_model(spec, target)
    ids = [encode_prompt(target, p.text, chat_template=not args.raw) for p in prompts]
    sweep = run_sweep(target, ids, drafter, config, batch_sizes, progress=_log_line,
                      draft=draft, constraint=constraint)
    sweep.peer = _bench_peer(args, target, draft, prompts, spec)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sweep.to_json(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    print(sweep.to_json() if args.json else format_sweep(sweep))
    return EXIT_OK


def _bench_peer(args: argparse.Namespace, target, draft, prompts, spec) -> dict | None:
    """transformers' assisted generation at batch 1 on the bench's models and prompts (``lab.studies.peer``), or why not."""
    from lab.studies.peer import PEER_DRAFTERS, DrafterSpec, run_peer_comparison

    if args.no_peer:
        return None
    if args.drafter not in PEER_DRAFTERS:
        return {"skipped": f"drafter {args.drafter} has no counterpart in transformers"}
    if spec is not None:
        return {"skipped": "transformers' assisted generation is not run under a grammar here"}
    peer = DrafterSpec(args.drafter, draft=draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer)
    report = run_peer_comparison(target, peer, prompts, k=args.k, max_new_tokens=args.max_new_tokens,
                                 chat_template=not args.raw, progress=_log_line)
    return report.summary(args.k) | {"settings": report.settings}


def _cmd_compare(args: argparse.Namespace) -> int:
    from lab.studies.compare import DrafterSpec, run_comparison
    from lab.models import check_same_tokenizer, load_model, load_tokenizer
    from lab.prompts import load_prompt_sets

    if "draft-model" in args.drafters and not args.draft:
        raise UsageError("--drafters draft-model requires --draft NAME (e.g. --draft qwen2.5-coder-0.5b)")
    specs = [
        DrafterSpec(name, draft=args.draft if name == "draft-model" else None,
                    exit_layer=args.exit_layer if name == "layer-skip" else None)
        for name in args.drafters
    ]
    if args.draft_vocab:
        specs += [
            DrafterSpec(name, draft=args.draft if name == "draft-model" else None, draft_vocab=args.draft_vocab)
            for name in args.drafters if name in ("draft-model", "eagle")
        ]
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, engine_mode=args.engine)
    for k in args.ks:
        replace(config, k=k)  # refuse a bad K before loading anything
    prompts = [p.text for p in load_prompt_sets(args.prompts)]
    progress = ProgressLine(sys.stderr, always=True)
    if args.draft:
        check_same_tokenizer(load_tokenizer(args.target, progress), load_tokenizer(args.draft, progress))
    target = load_model(args.target, device=args.device, dtype=args.dtype, progress=progress, precision=args.target_quant)
    load_draft = lambda name: load_model(name, device=args.device, dtype=args.dtype, progress=progress,  # noqa: E731
                                         precision=args.draft_quant)
    progress.done()
    comparison = run_comparison(target, prompts, specs, args.ks, config, load_draft=load_draft,
                                chat_template=not args.raw, progress=_log_line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(comparison.to_json())
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        print(comparison.to_json())
    else:
        summary = comparison.summary().drop(columns=["per_position_acceptance"])
        print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return EXIT_OK


def _cmd_serve_bench(args: argparse.Namespace) -> int:
    from lab.prompts import load_prompt_sets
    from lab.studies.serve_bench import format_serve_bench, run_lab_reference, run_serve_bench
    from lab.serving.client import Endpoint, RequestSettings

    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--concurrency requires comma-separated integers, e.g. 1,2,4,8; got {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise UsageError(f"--concurrency requires integers >= 1; got {args.concurrency!r}")
    if bool(args.lab_target) != bool(args.lab_draft):
        raise UsageError("the lab comparison requires both --lab-target and --lab-draft (e.g. qwen2.5-coder-1.5b "
                         "and qwen2.5-coder-0.5b)")
    launch = args.llama_target is not None
    if launch == bool(args.on) or (launch and args.off):
        raise UsageError("serve-bench requires either --on URL [--off URL] or --llama-target PRESET --llama-draft PRESET")
    if launch and not args.llama_draft:
        raise UsageError("--llama-target requires --llama-draft PRESET (e.g. qwen2.5-coder-0.5b)")
    if args.lab_target and not (args.off or launch):
        raise UsageError("the lab comparison requires --off URL too (the engine's speedup needs speculation off)")
    settings = RequestSettings(max_tokens=args.max_tokens, temperature=args.temperature,
                               ignore_eos=not args.no_ignore_eos, timeout_s=args.timeout_s)
    prompts = load_prompt_sets(args.prompts)[: args.n]
    if not prompts:
        raise UsageError(f"the prompt sets {' '.join(args.prompts)} hold no prompts: choose others")
    with contextlib.ExitStack() as servers:
        if launch:
            on_url, off_url = _start_llama_servers(args, max(levels), servers)
        else:
            on_url, off_url = args.on, args.off
        endpoints = [Endpoint(on_url, args.model, args.api, "on")]
        if off_url:
            endpoints.append(Endpoint(off_url, args.model, args.api, "off"))
        bench = run_serve_bench(endpoints, prompts, levels, settings, rounds=args.rounds,
                                max_level_s=args.max_level_s, progress=_log_line)
        if launch:
            bench.settings["llama_server"] = {"target": args.llama_target, "draft": args.llama_draft,
                                              "k": args.llama_k, "parallel": args.llama_parallel or max(levels),
                                              "threads": args.llama_threads, "llama_cpp_python": _llama_version()}
    if args.lab_target:
        bench.lab = run_lab_reference(args.lab_target, args.lab_draft, prompts, args.lab_k, args.max_tokens,
                                      chat_template=args.api == "chat", progress=_log_line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(bench.to_json())
        print(f"wrote {args.out}", file=sys.stderr)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(bench.to_csv())
        print(f"wrote {args.csv}", file=sys.stderr)
    print(bench.to_json(requests=False) if args.json else format_serve_bench(bench))
    return EXIT_OK


def _start_llama_servers(args: argparse.Namespace, max_level: int, stack: contextlib.ExitStack) -> tuple[str, str]:
    """Start llama-server twice on 127.0.0.1 (target + draft: on; target alone: off); stopped when ``stack`` closes."""
    from lab.serving.llama_server import LlamaServer, gguf_path

    target, draft = gguf_path(args.llama_target), gguf_path(args.llama_draft)
    parallel = args.llama_parallel or max_level
    urls = []
    for label, draft_file in (("on", draft), ("off", None)):
        _log_line(0.0, f"starting llama-server ({label}): {target.name}" + (f" drafted by {draft.name}" if draft_file else ""))
        server = LlamaServer(target, draft_file, draft_max=args.llama_k, parallel=parallel,
                             threads=args.llama_threads, alias=args.llama_target)
        stack.enter_context(server)
        urls.append(server.url)
    return urls[0], urls[1]


def _llama_version() -> str:
    from lab.serving.llama_server import LLAMA_CPP_PYTHON_VERSION

    return LLAMA_CPP_PYTHON_VERSION


# ---------------------------------------------------------------- shared steps


def _check_drafter_arguments(args: argparse.Namespace) -> None:
    if args.drafter == "draft-model" and not args.draft:
        raise UsageError("--drafter draft-model requires --draft NAME (e.g. --draft qwen2.5-coder-0.5b)")
    if args.draft and args.drafter != "draft-model":
        raise UsageError(f"--draft is only used with --drafter draft-model; got --drafter {args.drafter}")
    if args.drafter == "prompt-lookup" and not 1 <= args.min_n <= args.max_n:
        raise UsageError(f"prompt lookup requires 1 <= --min-n <= --max-n; got {args.min_n} and {args.max_n}")
    if args.exit_layer is not None and args.drafter != "layer-skip":
        raise UsageError(f"--exit-layer is only used with --drafter layer-skip; got --drafter {args.drafter}")


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


def _checked_tokenizer(args: argparse.Namespace, progress):
    """The target's tokenizer; with a draft model, refuse a draft whose tokenizer differs (before loading weights)."""
    from lab.models import check_same_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(args.target, progress)
    if args.drafter == "draft-model":
        check_same_tokenizer(tokenizer, load_tokenizer(args.draft, progress))
    progress.done()
    return tokenizer


def _load_models(args: argparse.Namespace, progress):
    from transformers.utils import logging

    from lab.models import load_model

    logging.disable_progress_bar()  # our own progress line says what is loading
    target = load_model(args.target, device=args.device, dtype=args.dtype, progress=progress,
                        precision=getattr(args, "target_quant", None))
    draft = None
    if args.drafter == "draft-model":
        draft = load_model(args.draft, device=args.device, dtype=args.dtype, progress=progress,
                           precision=getattr(args, "draft_quant", None))
    progress.done()
    return target, draft


class ProgressLine:
    """A ``progress(fraction, message)`` sink on a stream.

    On a terminal it rewrites one line; otherwise it writes a line when the
    message's stage or the tenth changes, only when ``always`` (quiet otherwise,
    e.g. loading a prepared model in a script).
    """

    def __init__(self, out: TextIO, always: bool = False) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.always = always
        self.last_key: tuple | None = None
        self.open_line = False

    def __call__(self, fraction: float, message: str) -> None:
        line = f"{fraction:4.0%} {message}"
        if self.tty:
            self.out.write("\r\033[K" + line)
            self.open_line = True
        elif self.always:
            key = (int(fraction * 10), message.split(" ", 1)[0])
            if key != self.last_key:
                self.out.write(line + "\n")
            self.last_key = key
        self.out.flush()

    def done(self) -> None:
        if self.open_line:
            self.out.write("\n")
            self.open_line = False
        self.out.flush()


def _log_line(fraction: float, message: str) -> None:
    """A ``progress`` sink writing every message on its own stderr line (long runs, logs)."""
    print(f"{time.strftime('%H:%M:%S')} {fraction:4.0%} {message}", file=sys.stderr, flush=True)


def _speedup(tokens_per_s: float, baseline_tokens_per_s: float) -> float | None:
    value = tokens_per_s / baseline_tokens_per_s if baseline_tokens_per_s and baseline_tokens_per_s > 0 else None
    return _clean(value)


def _clean(x: float | None) -> float | None:
    return None if x is None or x != x else x


# ---------------------------------------------------------------- token-freq and train-head


def _training_prompts(target, count: int, max_tokens: int = 768) -> list[list[int]]:
    """Encoded training prompts, shortest first (batches pad less): the lab's preset sets, then Spec-Bench,
    never the held-out measurement prompts; each cut to its last ``max_tokens`` tokens."""
    from lab.models import encode_prompt
    from lab.prompts import load_prompt_sets, load_prompts
    from lab.studies.train_head import HELD_OUT_SOURCE, TRAIN_SOURCES

    held_out = {p.id for p in load_prompts(HELD_OUT_SOURCE)}
    prompts = [p for p in load_prompt_sets(TRAIN_SOURCES) if p.id not in held_out]
    # Spread over sources and categories: every n-th prompt.
    step = max(1, len(prompts) // max(1, count))
    chosen = prompts[::step][:count]
    return sorted((encode_prompt(target, p.text, True)[-max_tokens:] for p in chosen), key=len)


def _cmd_token_freq(args: argparse.Namespace) -> int:
    from lab.models import load_model
    from lab.studies.token_frequencies import count_tokens
    from lab.vocab import frequency_path, save_frequencies

    progress = ProgressLine(sys.stderr, always=True)
    target = load_model(args.target, device=args.device, dtype=args.dtype, progress=progress, precision=args.target_quant)
    progress.done()
    prompts = _training_prompts(target, args.num_prompts, args.max_prompt_tokens)
    start = time.perf_counter()
    from lab.studies.train_head import collect_samples

    # The target's own next-token choice at every position: over its answers and over the prompts it read.
    samples = collect_samples(target, prompts, args.max_new_tokens, args.batch_size,
                              progress=lambda done, total: progress(done / total, f"answering {done}/{total}"))
    progress.done()
    counts = count_tokens([s.labels.tolist() for s in samples], target.vocab_size)
    path = save_frequencies(counts, frequency_path(target.name),
                            {"target": target.name, "prompts": len(prompts), "tokens": int(counts.sum()),
                             "generate_s": round(time.perf_counter() - start, 1)})
    seen = int((counts > 0).sum())
    print(f"{int(counts.sum()):,} next-token choices of the target, {seen:,} distinct of {target.vocab_size:,}; saved {path}")
    for n in (1024, 4096, 8192, 16384, 32768):
        share = float(counts.sort(descending=True).values[:n].sum()) / max(1, int(counts.sum()))
        print(f"  top {n:>6,} tokens cover {share:6.1%} of the target's choices")
    return EXIT_OK


def _feature_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """--feature-layers: eagle3, final, or comma-separated indices. Raises ValueError with what is accepted."""
    from lab.drafters.eagle import eagle3_layers

    if spec == "eagle3":
        return eagle3_layers(num_layers)
    if spec == "final":
        return ()
    try:
        layers = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise ValueError(f"--feature-layers requires eagle3, final or comma-separated layer indices; got {spec!r}") from None
    if not all(0 <= i < num_layers for i in layers):
        raise ValueError(f"--feature-layers requires indices in 0 .. {num_layers - 1} (the target's layers); got {spec!r}")
    return layers


def _cmd_train_head(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lab.drafters.eagle import head_dir, save_head
    from lab.models import encode_prompt, load_model
    from lab.prompts import load_prompts
    from lab.studies.train_head import HELD_OUT_SOURCE, TrainConfig, collect_samples, heldout_acceptance, train_head
    from lab.studies.token_frequencies import count_tokens
    from lab.vocab import frequency_path, load_frequencies, save_frequencies

    progress = ProgressLine(sys.stderr, always=True)
    target = load_model(args.target, device=args.device, dtype=args.dtype, progress=progress, precision=args.target_quant)
    progress.done()
    layers = _feature_layers(args.feature_layers, target.model.config.get_text_config().num_hidden_layers)
    config = TrainConfig(max_train_s=args.minutes * 60, epochs=args.epochs, lr=args.lr, unroll=args.unroll,
                         batch_tokens=args.batch_tokens, intermediate_size=args.intermediate_size, feature_layers=layers,
                         soft_labels=args.labels == "soft")
    prompts = _training_prompts(target, args.num_prompts, args.max_prompt_tokens)
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="target answers", unit="prompt", file=sys.stderr) as bar:
        samples = collect_samples(target, prompts, args.max_new_tokens, args.batch_size,
                                  progress=lambda done, total: bar.update(done - bar.n), feature_layers=layers)
    collect_s = time.perf_counter() - start
    # The target's own next-token choices at every position (its answers, and its argmax over the prompts)
    # are a frequency table's data too: kept unless the cached table counts more tokens.
    counts = count_tokens([s.labels.tolist() for s in samples], target.vocab_size)
    table = frequency_path(target.name)
    if not table.exists() or int(load_frequencies(table).sum()) < int(counts.sum()):
        save_frequencies(counts, table, {"target": target.name, "prompts": len(prompts), "tokens": int(counts.sum())})
    # The bar runs over the time budget (which ends training first unless the data is tiny), not over the
    # epochs' step count: a step-count bar showed an ETA of 80 minutes for a 12-minute run.
    budget_s = max(1, round(args.minutes * 60))
    started = time.perf_counter()
    with tqdm(desc=f"training (budget {args.minutes:g} min)", total=budget_s, unit="s", file=sys.stderr,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s{postfix}") as bar:
        def show(step, total, loss):
            bar.update(min(budget_s, time.perf_counter() - started) - bar.n)
            bar.set_postfix_str(f"step {step}, loss {loss:.3f}")

        head, report = train_head(target, samples, config, progress=show, target_name=target.name)
    report.collect_s = collect_s
    meta = {"target": target.name, "train_s": round(report.train_s, 1), "collect_s": round(collect_s, 1),
            "steps": report.steps, "epochs": round(report.epochs, 2), "tokens": report.num_tokens,
            "prompts": len(prompts), "final_loss": round(sum(report.losses[-10:]) / len(report.losses[-10:]), 4),
            "stopped_by": report.stopped_by, "config": {k: v for k, v in vars(config).items()}}
    held_out = [encode_prompt(target, p.text, True) for p in load_prompts(HELD_OUT_SOURCE)][: args.eval_prompts]
    if held_out:
        stats = heldout_acceptance(target, head, held_out, k=5, max_new_tokens=64)
        meta["heldout"] = {"prompts": len(held_out), "k": 5, "per_position": stats.per_position_acceptance_rate,
                           "mean_acceptance_length": stats.mean_acceptance_length}
    folder = save_head(head, args.out or head_dir(target.name), meta)
    size_mb = (folder / "head.safetensors").stat().st_size / 1e6
    print(f"trained {report.steps} steps ({report.epochs:.1f} epochs, stopped by {report.stopped_by}) in "
          f"{report.train_s:.0f} s after {collect_s:.0f} s collecting {report.num_tokens:,} tokens; "
          f"loss {report.losses[0]:.3f} -> {meta['final_loss']:.3f}")
    if held_out:
        rates = " ".join(f"{r:.2f}" for r in meta["heldout"]["per_position"])
        print(f"held-out acceptance per position (K=5, {len(held_out)} Spec-Bench prompts): {rates}; "
              f"mean acceptance length {meta['heldout']['mean_acceptance_length']:.2f}")
    print(f"saved {folder} ({size_mb:.1f} MB)")
    return EXIT_OK
