"""``python -m lab history``: the runs kept in the results store (``lab.store``), filtered, exported or deleted."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from lab.cli.common import EXIT_OK, UsageError

# the figures a table shows, in this order, when a run has them
TABLE_FIGURES = ("speedup", "latency_speedup", "throughput_speedup", "acceptance_rate", "mean_acceptance_length",
                 "tokens_per_s", "predicted_speedup", "crossover_batch_size", "crossover_concurrency")
SHORT = {"speedup": "speedup", "latency_speedup": "lat x", "throughput_speedup": "tput x", "acceptance_rate": "acc",
         "mean_acceptance_length": "mal", "tokens_per_s": "tok/s", "predicted_speedup": "pred x",
         "crossover_batch_size": "cross B", "crossover_concurrency": "cross C"}


def add_history(commands) -> None:
    """Register ``python -m lab history``."""
    history = commands.add_parser("history", help="the runs kept in the results store: list, export, delete")
    history.add_argument("--kind", nargs="+", help="only these kinds (live, compare, batch, bench, generate, ...)")
    history.add_argument("--model", help="only runs whose target or draft is this model")
    history.add_argument("--since-days", type=float, default=None, metavar="DAYS", help="only runs of the last DAYS days")
    history.add_argument("--limit", type=int, default=None, help="at most this many runs, the newest")
    history.add_argument("--parts", action="store_true",
                         help="list the parts of long runs too (a sweep's batch sizes, a comparison's prompts)")
    history.add_argument("--json", action="store_true", help="print the runs as JSON (a list, newest first)")
    history.add_argument("--export", nargs=2, metavar=("FORMAT", "FILE"), help="write the listed runs to FILE as csv or json")
    history.add_argument("--delete", type=int, nargs="+", metavar="ID", help="delete these runs (and their parts)")
    history.add_argument("--db", type=Path, default=None, help="the store file (default: $LAB_RESULTS_DB, else "
                         "results.sqlite3 in the lab's cache folder)")
    history.set_defaults(handler=_cmd_history)


def _cmd_history(args: argparse.Namespace) -> int:
    import sys

    from lab.store import ResultsStore, StoreError, export_runs

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit requires a positive integer; got {args.limit}")
    if args.export and args.export[0] not in ("csv", "json"):
        raise UsageError(f"--export requires csv or json as its format; got {args.export[0]!r}")
    try:
        store = ResultsStore(args.db)
    except StoreError as error:
        raise UsageError(str(error)) from None
    if args.delete:
        for run_id in args.delete:
            try:
                count = store.delete_run(run_id)
            except KeyError:
                raise UsageError(f"--delete: no stored run has id {run_id} (see `python -m lab history`)") from None
            print(f"deleted run {run_id}" + (f" and its {count - 1} parts" if count > 1 else ""), file=sys.stderr)
        return EXIT_OK
    since = None if args.since_days is None else datetime.now(timezone.utc) - timedelta(days=args.since_days)
    runs = store.list_runs(args.kind, args.model, since, args.limit, top_level=not args.parts,
                           payload=bool(args.export and args.export[0] == "json"))
    if args.export:
        path = Path(args.export[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(export_runs(runs, args.export[0]))
        print(f"wrote {len(runs)} runs to {path}", file=sys.stderr)
        return EXIT_OK
    if args.json:
        print(json.dumps([run.as_dict() for run in runs], indent=1))
    else:
        print(format_history(runs, store.path))
    return EXIT_OK


def format_history(runs, path) -> str:
    """A table of runs, one line each: id, when (UTC), kind, status, models, headline figures."""
    if not runs:
        return f"no runs kept yet in {path}"
    lines = [f"{len(runs)} runs in {path}, newest first",
             f"{'id':>5}  {'when (UTC)':<16}  {'kind':<14} {'status':<9} {'models':<36} figures"]
    for run in runs:
        models = run.models.get("target") or "-"
        if run.models.get("draft"):
            models += f" + {run.models['draft']}"
        figures = "  ".join(f"{SHORT[name]} {_fmt(run.figures[name])}" for name in TABLE_FIGURES
                            if run.figures.get(name) is not None)
        lines.append(f"{run.id:>5}  {run.created_at[:16].replace('T', ' '):<16}  {run.kind:<14} {run.status:<9} "
                     f"{models[:36]:<36} {figures}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
