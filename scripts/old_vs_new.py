"""Per-step time of the decode loop, old code against new, side by side in one process (issue "One engine").

The old code is a checkout of the last commit before the one-engine change (two loops:
``lab.engine.decode`` at B = 1, ``lab.batch.decode_batch`` at B > 1); the new code is this
tree (one loop, ``lab.decode``). Both are imported into this process (the old one first,
its modules then set aside), the models are loaded once and shared, and the arms are
interleaved repeat by repeat, so drift on a shared machine hits both.

    git worktree add /tmp/lab-old 593ea97
    python scripts/old_vs_new.py --old /tmp/lab-old --pair smollm2 --repeats 3
    python scripts/old_vs_new.py --old /tmp/lab-old --pair qwen --repeats 2

Prints, per batch size and arm, the median over repeats of the mean per-step time
(draft + verify, ms), tokens/s, and new/old ratios; greedy, eager, bf16 by default.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

NEW_ROOT = Path(__file__).resolve().parent.parent


def import_lab(root: Path) -> dict:
    """Import the lab at ``root`` and return the functions this script calls; set its modules aside."""
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("lab")
        if (root / "lab" / "decode.py").exists():
            decode = importlib.import_module("lab.decode")
            api = {"run": decode.run, "run_batch": decode.run_batch}
        else:
            api = {"run": importlib.import_module("lab.engine").run,
                   "run_batch": importlib.import_module("lab.batch").run_batch}
        sweep = "lab.studies.batch_sweep" if (root / "lab" / "studies").exists() else "lab.sweep"
        api["run_sweep"] = importlib.import_module(sweep).run_sweep
        drafters = importlib.import_module("lab.drafters")
        api["make_drafter"] = drafters.make_drafter
        api["DecodeConfig"] = importlib.import_module("lab.config").DecodeConfig
    finally:
        sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == "lab" or m.startswith("lab.")]:
        del sys.modules[name]  # the functions keep their own module globals
    return api


def per_step(result, batch: bool) -> tuple[float, float, int]:
    """(mean draft + verify ms per step, output tokens / s of the decode loop, steps)."""
    steps = result.steps
    step_ms = sum(s.draft_ms + s.verify_ms for s in steps) / len(steps)
    tokens = result.num_output_tokens if batch else len(result.token_ids)
    loop_s = sum(s.draft_ms + s.verify_ms for s in steps) / 1e3
    return step_ms, tokens / loop_s, len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the old code")
    parser.add_argument("--pair", choices=["smollm2", "qwen"], default="smollm2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", default="spec_bench:mix:8")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: the Batch sweep's speedups (latency and throughput, on over off) per batch "
                             "size, whole sweeps in the order old, new, new, old, ...")
    args = parser.parse_args()

    old = import_lab(args.old.resolve())
    new = import_lab(NEW_ROOT)
    sys.path.insert(0, str(NEW_ROOT))
    import lab  # noqa: F401  (the new one, for loading)
    from lab.models import encode_prompt, load_model
    from lab.prompts import load_prompt_sets

    if args.pair == "smollm2":
        target, draft, drafter_name = load_model("smollm2-135m", dtype=args.dtype), None, "prompt-lookup"
    else:
        target = load_model("qwen2.5-coder-1.5b", dtype=args.dtype)
        draft, drafter_name = load_model("qwen2.5-coder-0.5b", dtype=args.dtype), "draft-model"
    prompts = [encode_prompt(target, p.text) for p in load_prompt_sets([args.prompts])]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} target {target.name} {args.dtype}, drafter {drafter_name}, K={args.k}, "
          f"{args.max_new_tokens} new tokens, {len(prompts)} prompts, eager, greedy", flush=True)

    arms = {"old": old, "new": new}
    if args.sweep:
        sweeps(arms, target, draft, drafter_name, prompts, args)
        return
    results: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    for repeat in range(args.repeats):
        for batch_size in args.batch_sizes:
            for arm, api in (arms.items() if repeat % 2 == 0 else reversed(list(arms.items()))):
                config = api["DecodeConfig"](k=args.k, max_new_tokens=args.max_new_tokens, engine_mode="eager")
                measured = []
                for first in range(0, len(prompts), batch_size):
                    chunk = prompts[first: first + batch_size]
                    drafter = api["make_drafter"](drafter_name, target, draft)
                    if batch_size == 1:
                        measured.append(per_step(api["run"](target, chunk[0], drafter, config), batch=False))
                    else:
                        measured.append(per_step(api["run_batch"](target, chunk, drafter, config), batch=True))
                steps = sum(m[2] for m in measured)
                step_ms = sum(m[0] * m[2] for m in measured) / steps
                tokens_per_s = statistics.fmean(m[1] for m in measured)
                results.setdefault((arm, batch_size), []).append((step_ms, tokens_per_s, steps))
                print(f"  repeat {repeat + 1} B={batch_size} {arm}: {step_ms:7.1f} ms/step, "
                      f"{tokens_per_s:6.1f} tokens/s, {steps} steps", flush=True)

    print("\nbatch  arm   ms/step (median)  tokens/s (median)")
    for batch_size in args.batch_sizes:
        row = {}
        for arm in arms:
            runs = results[(arm, batch_size)]
            row[arm] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"{batch_size:5d}  {arm:4s}  {row[arm][0]:16.1f}  {row[arm][1]:17.1f}")
        print(f"{batch_size:5d}  new/old ms per step: {row['new'][0] / row['old'][0]:.3f}")


def sweeps(arms: dict, target, draft, drafter_name: str, prompts, args) -> None:
    """Whole batch sweeps (off and on at config.k; calibration and auto as each version does), ABBA order."""
    found: dict[str, list] = {"old": [], "new": []}
    for repeat in range(args.repeats):
        order = ["old", "new"] if repeat % 2 == 0 else ["new", "old"]
        for arm in order:
            api = arms[arm]
            config = api["DecodeConfig"](k=args.k, max_new_tokens=args.max_new_tokens, engine_mode="eager")
            drafter = api["make_drafter"](drafter_name, target, draft)
            start = time.perf_counter()
            sweep = api["run_sweep"](target, prompts, drafter, config, args.batch_sizes, draft=draft)
            rows = {r.batch_size: (r.latency_speedup, r.throughput_speedup) for r in sweep.results}
            found[arm].append(rows)
            print(f"  repeat {repeat + 1} {arm}: " + "  ".join(f"B={b} latency {lat:.2f}x tput {tput:.2f}x"
                                                            for b, (lat, tput) in rows.items())
                  + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    print("\nbatch  arm   latency speedup (median)  throughput speedup (median)")
    for b in args.batch_sizes:
        for arm in arms:
            print(f"{b:5d}  {arm:4s}  {statistics.median(r[b][0] for r in found[arm]):24.2f}  "
                  f"{statistics.median(r[b][1] for r in found[arm]):27.2f}")


if __name__ == "__main__":
    main()
