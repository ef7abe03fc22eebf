"""What the commands share: usage errors (one line, exit 2), argument groups, loading steps, progress sinks."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input; the message says what to do. ``main`` prints it on one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ``UsageError`` (one line, exit 2) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("python -m lab").strip()
        raise UsageError(f"{message} (see `{' '.join(['python -m lab', command, '--help']).replace('  ', ' ')}`)")


def _is_input_error(error: Exception) -> bool:
    from lab.models import ModelError
    from lab.serving.client import ServeError

    return isinstance(error, (UsageError, ValueError, ModelError, FileNotFoundError, ServeError))


def _is_memory_error(error: BaseException) -> bool:
    """Out of memory on the host (MemoryError) or on the accelerator (``torch.OutOfMemoryError``)."""
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError))


def _memory_message(error: BaseException) -> str:
    return (f"out of memory ({type(error).__name__}): ask for fewer new tokens, a smaller batch or a smaller model "
            "(or a quantised one: --target-quant nf4), or free the device, then run again")


def _one_line(error: Exception) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


# ---------------------------------------------------------------- arguments shared by commands


def add_model_arguments(parser: argparse.ArgumentParser, draft: bool = True) -> None:
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


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    """--engine: how passes run (``lab.kv``'s eager, static, compiled, or auto)."""
    parser.add_argument("--engine", default="auto", choices=("auto", "eager", "static", "compiled"),
                        help="how passes run: eager (growing cache), static (fixed cache, fixed-width passes), "
                        "compiled (static + torch.compile, CUDA graphs on a GPU); auto: compiled on CUDA, else eager")


def add_tree_argument(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """--tree-budget N (nodes per verify pass; 0 = a chain), or with many several N side by side (``lab.tree``)."""
    if many:
        parser.add_argument("--tree-budget", type=int, nargs="+", default=[0], metavar="N",
                            help="token tree budgets to compare, nodes per verify pass (1..64; 0 = a chain, the "
                            "default); each drafter that drafts trees runs at each, K being the tree's depth")
    else:
        parser.add_argument("--tree-budget", type=int, default=0, metavar="N",
                            help="draft a token tree of up to N nodes (1..64) per verify pass, K deep; 0 = a chain "
                            "(default). Batch size 1, eager engine; prompt-lookup, draft-model, layer-skip or eagle")


def add_constraint_arguments(parser: argparse.ArgumentParser) -> None:
    """--json-schema | --regex | --any-json (one of them), and the teaching switch --naive-grammar."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json-schema", type=Path, metavar="FILE", help="constrain the output to this JSON schema")
    group.add_argument("--regex", metavar="PATTERN", help="constrain the output to match this regular expression")
    group.add_argument("--any-json", action="store_true", help="constrain the output to any JSON value")
    parser.add_argument("--naive-grammar", action="store_true",
                        help="TEACHING ONLY: the broken way (drafts and verification unmasked, no rollback)")


def constraint_spec(args: argparse.Namespace):
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


def add_drafter_arguments(parser: argparse.ArgumentParser, choices: Sequence[str], default: str | None,
                          bridge: bool = False) -> None:
    """--drafter (from ``choices``), --draft, --exit-layer, --min-n, --max-n, --draft-vocab and (bridge) --vocab-bridge."""
    parser.add_argument("--drafter", choices=choices, default=default, required=default is None,
                        help=f"draft source (default {default})" if default else "draft source")
    parser.add_argument("--draft", help="draft model for --drafter draft-model (a preset or a folder)")
    parser.add_argument("--exit-layer", type=int, default=None, help="layer-skip exit (default: a quarter of the layers)")
    parser.add_argument("--min-n", type=int, default=1, help="prompt lookup: smallest n-gram (default 1)")
    parser.add_argument("--max-n", type=int, default=3, help="prompt lookup: largest n-gram (default 3)")
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                        help="draft-model / eagle: score only the target's N most frequent tokens (`token-freq` first)")
    if bridge:
        add_vocab_bridge_argument(parser)


def add_vocab_bridge_argument(parser: argparse.ArgumentParser) -> None:
    """--vocab-bridge none|ids|text (``lab.drafters.bridge``)."""
    from lab.drafters.bridge import VOCAB_BRIDGES

    parser.add_argument("--vocab-bridge", choices=VOCAB_BRIDGES, default="none",
                        help="a draft model with another tokenizer than the target's: none refuses it (default); "
                             "text bridges it exactly through text (greedy only); ids sends its token ids as they are, "
                             "the trap a misconfigured system falls into (acceptance collapses)")


# ---------------------------------------------------------------- shared steps


def check_drafter_arguments(args: argparse.Namespace) -> None:
    """Refuse drafter flags that do not fit the drafter (a usage error, before anything loads)."""
    if args.drafter == "draft-model" and not args.draft:
        raise UsageError("--drafter draft-model requires --draft NAME (e.g. --draft qwen2.5-coder-0.5b)")
    if args.draft and args.drafter != "draft-model":
        raise UsageError(f"--draft is only used with --drafter draft-model; got --drafter {args.drafter}")
    if args.drafter == "prompt-lookup" and not 1 <= args.min_n <= args.max_n:
        raise UsageError(f"prompt lookup requires 1 <= --min-n <= --max-n; got {args.min_n} and {args.max_n}")
    if args.exit_layer is not None and args.drafter != "layer-skip":
        raise UsageError(f"--exit-layer is only used with --drafter layer-skip; got --drafter {args.drafter}")
    bridge = getattr(args, "vocab_bridge", "none")
    if bridge != "none":
        from lab.drafters.bridge import check_bridge_sampling

        if args.drafter != "draft-model":
            raise UsageError(f"--vocab-bridge {bridge} requires --drafter draft-model; got --drafter {args.drafter}")
        if getattr(args, "draft_vocab", None) is not None:
            raise UsageError(f"--draft-vocab requires --vocab-bridge none (it lists the target's ids); got {bridge}")
        try:
            check_bridge_sampling(bridge, getattr(args, "temperature", 0.0))
        except ValueError as error:
            raise UsageError(str(error)) from None


def checked_tokenizer(args: argparse.Namespace, progress):
    """The target's tokenizer; with a draft model and no vocabulary bridge, refuse a draft whose tokenizer differs
    (before loading weights)."""
    from lab.models import check_same_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(args.target, progress)
    if args.drafter == "draft-model" and getattr(args, "vocab_bridge", "none") == "none":
        check_same_tokenizer(tokenizer, load_tokenizer(args.draft, progress))
    progress.done()
    return tokenizer


def load_models(args: argparse.Namespace, progress):
    """The target and (for --drafter draft-model) the draft, loaded as the flags say; returns (target, draft or None)."""
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


def log_line(fraction: float, message: str) -> None:
    """A ``progress`` sink writing every message on its own stderr line (long runs, logs)."""
    print(f"{time.strftime('%H:%M:%S')} {fraction:4.0%} {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- keeping runs (lab.store)


def add_save_argument(parser: argparse.ArgumentParser) -> None:
    """--no-save: do not keep this run in the results store (``python -m lab history`` lists what is kept)."""
    parser.add_argument("--no-save", action="store_true",
                        help="do not keep this run in the results store ($LAB_RESULTS_DB, else results.sqlite3 in "
                             "the lab's cache folder; see `python -m lab history`)")


def run_saver(args: argparse.Namespace, kind: str, *, target: str | None = None, draft: str | None = None,
              device: str = "cpu", settings: dict | None = None, machine: dict | None = None):
    """A ``lab.store.RunSaver`` for this command's run: keeps nothing under --no-save; a store that cannot be
    opened or written prints one warning on stderr and the command goes on."""
    from lab.store import ResultsStore, RunSaver, StoreError

    def warn(message: str) -> None:
        print(f"warning: this run is not saved: {_one_line(Exception(message))}", file=sys.stderr)

    store = None
    if not getattr(args, "no_save", False):
        try:
            store = ResultsStore()
        except StoreError as error:
            warn(str(error))
    return RunSaver(store, kind, target=target, draft=draft, device=str(device), settings=settings, on_error=warn,
                    machine=machine)


def finish_saved(saver, figures: dict, payload=None, status: str = "complete", settings: dict | None = None) -> None:
    """``saver.finish(...)``, then one stderr line saying where the run was kept (nothing under --no-save)."""
    run_id = saver.finish(figures, payload, status=status, settings=settings)
    if run_id is not None:
        parts = f" with {len(saver.part_ids)} parts" if saver.part_ids else ""
        print(f"saved run {run_id} ({saver.kind}{parts}) to {saver.store.path}", file=sys.stderr)
# ---------------------------------------------------------------- timed work: one at a time, load noticed


@contextmanager
def holding_device(device, command: str, out: TextIO | None = None, watch_load: bool = True):
    """Hold ``device`` in ``lab.device_queue`` for a measuring command and watch the machine's load (``lab.load``).

    While another of the lab's timed runs holds the device (the app, another
    command), it says on ``out`` (default stderr) whom it waits for and waits.
    Yields the ``lab.load.LoadMeter`` (None without ``watch_load``: a command
    whose own servers are other processes would read them as outside load);
    after the block, a run taken under load from outside the lab says so on
    ``out`` (its report is ``meter.report``).
    """
    from lab import device_queue
    from lab.load import measure_load

    out = out or sys.stderr
    with device_queue.hold(device, f"python -m lab {command}", on_wait=device_queue.cli_waiting_printer(out)):
        if not watch_load:
            yield None
            return
        with measure_load() as meter:
            yield meter
    if meter.report.loaded:
        print(f"warning: {meter.report.warning()}", file=out)
