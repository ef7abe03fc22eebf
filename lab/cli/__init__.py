"""The command line: ``python -m lab generate | prepare | models | calibrate | peer | compare | bench |
engine-bench | serve-bench | token-freq | train-head | workload | history``.

One module per command group: ``generate``, ``presets`` (prepare, models),
``measure`` (calibrate, peer, bench, compare, engine-bench), ``serve``
(serve-bench), ``heads`` (token-freq, train-head), ``workload`` (the traffic
simulator) and ``history`` (the kept runs); what they share lives in
``common``. Every command that measures keeps its run in the results store
(``lab.store``) unless ``--no-save``. Each subcommand is registered by an ``add_<name>(commands)`` of its
module, with its handler ``_cmd_<name>(args) -> int``; ``build_parser`` calls
them in order and ``main(argv) -> int`` parses and dispatches, so tests call it
directly. Bad input (an empty prompt, K out of range, an unknown model, a draft
whose tokenizer is not the target's, a missing file) ends with one line on
stderr saying what to do, and exit code 2; nothing is decoded first.

Examples::

    python -m lab models
    python -m lab prepare smollm2-135m
    python -m lab generate --target smollm2-135m --drafter prompt-lookup --k 4 \
        --max-new-tokens 64 --prompt "Repeat after me: the quick brown fox" --compare-baseline
    python -m lab generate --target qwen2.5-coder-1.5b --drafter draft-model \
        --draft qwen2.5-coder-0.5b --k 4 --prompt-file question.txt --json
    python -m lab peer --target qwen2.5-coder-1.5b --drafter draft-model \
        --draft qwen2.5-coder-0.5b --k 4 6 --prompts spec_bench:summarization:10 spec_bench:mix:10
    python -m lab generate --target smollm2-135m --drafter prompt-lookup --json-schema schema.json         --prompt "Extract the person as JSON: Maria Lopez, 34, lives in Valencia."
    python -m lab compare --target smollm2-135m --drafters prompt-lookup layer-skip --ks 2 4 6 8         --prompts spec_bench:summarization:8 spec_bench:qa:8 --out results/compare.json
    python -m lab bench --target smollm2-135m --drafter prompt-lookup --k 4 --batch-sizes 1,2,4,8,16         --prompts spec_bench:summarization:8 spec_bench:qa:8 --max-new-tokens 48 --json
    python -m lab bench --target smollm2-135m --drafter layer-skip --k 3 --batch-sizes 1,4         --prompts json_extraction --json-schema schema.json
    python -m lab generate --target smollm2-135m --target-quant nf4 --drafter layer-skip --prompt "Hi"
    python -m lab calibrate --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b
    python -m lab generate --target qwen2.5-coder-1.5b --drafter draft-model --draft qwen2.5-coder-0.5b \
        --k auto --prompt "Write a haiku about caches"
    python -m lab serve-bench --on http://127.0.0.1:8080 --off http://127.0.0.1:8081 --api chat \
        --concurrency 1,2,4,8,16 --prompts spec_bench:mix:8 --max-tokens 32 --json
    python -m lab token-freq --target qwen2.5-coder-1.5b --num-prompts 96
    python -m lab train-head --target smollm2-135m --minutes 15
    python -m lab compare --target qwen2.5-coder-1.5b --drafters draft-model eagle --draft qwen2.5-coder-0.5b \
        --draft-vocab 16384 --ks 4 --prompts spec_bench:mix:20
    python -m lab history --kind bench compare --limit 10
    python -m lab history --json --export csv runs.csv
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lab.cli import generate, heads, history, measure, moe, presets, serve, workload
from lab.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ProgressLine,
    UsageError,
    _is_input_error,
    _is_memory_error,
    _memory_message,
    _one_line,
    _Parser,
)
from lab.cli.generate import STYLES, TokenPrinter, format_summary, generate_report

__all__ = ["STYLES", "ProgressLine", "TokenPrinter", "UsageError", "build_parser", "format_summary",
           "generate_report", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(
                "a command is required: generate, calibrate, prepare, models, peer, compare, bench, engine-bench, "
                "serve-bench, token-freq, train-head, workload, history or moe-cost (see `python -m lab --help`)"
            )
        return args.handler(args)
    except SystemExit as done:  # --help / --version
        return done.code if isinstance(done.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as error:
        print(f"error: {_memory_message(error)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 - only input errors are turned into exit 2
        if _is_memory_error(error):
            print(f"error: {_memory_message(error)}", file=sys.stderr)
            return EXIT_FAILED
        if not _is_input_error(error):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> _Parser:
    """The parser of ``python -m lab``: one subcommand per command module, in the order ``--help`` lists them."""
    parser = _Parser(prog="python -m lab", description="Speculative Decoding Lab: decode, prepare models, measure.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_generate(commands)
    measure.add_calibrate(commands)
    presets.add_prepare(commands)
    presets.add_models(commands)
    measure.add_peer(commands)
    measure.add_bench(commands)
    measure.add_compare(commands)
    measure.add_engine_bench(commands)
    serve.add_serve_bench(commands)
    heads.add_token_freq(commands)
    heads.add_train_head(commands)
    history.add_history(commands)
    workload.add_workload(commands)
    moe.add_moe_cost(commands)
    return parser
