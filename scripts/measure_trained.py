"""Measure trained drafters on the held-out Spec-Bench prompts (README, "Measured").

Runs ``lab.studies.compare.run_comparison`` (greedy, the target alone on every prompt as the
baseline) for the chosen drafters on ``lab.studies.train_head.HELD_OUT_SOURCE`` and prints,
pooled and per Spec-Bench category: acceptance per position, mean acceptance length,
c (draft time per drafted token over a target step) and speedup over the target alone.

    python scripts/measure_trained.py --target smollm2-135m --drafters eagle prompt-lookup --out results/smol.json
    python scripts/measure_trained.py --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \\
        --drafters draft-model eagle --draft-vocabs 8192 16384 32768 --out results/qwen.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lab  # noqa: E402,F401
from lab.studies.compare import Comparison, DrafterSpec, run_comparison  # noqa: E402
from lab.config import DecodeConfig  # noqa: E402
from lab.models import load_model  # noqa: E402
from lab.prompts import load_prompts  # noqa: E402
from lab.studies.train_head import HELD_OUT_SOURCE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--drafters", nargs="+", required=True)
    parser.add_argument("--draft-vocabs", nargs="*", type=int, default=[], help="trimmed variants of draft-model / eagle")
    parser.add_argument("--trim-only", nargs="*", default=["draft-model"], help="which drafters get the trimmed variants")
    parser.add_argument("--ks", nargs="+", type=int, default=[4])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", default=HELD_OUT_SOURCE)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    prompts = load_prompts(args.prompts)[: args.limit]
    specs = [DrafterSpec(n, draft=args.draft if n == "draft-model" else None) for n in args.drafters]
    specs += [DrafterSpec(n, draft=args.draft if n == "draft-model" else None, draft_vocab=v)
              for v in args.draft_vocabs for n in args.drafters if n in args.trim_only]
    target = load_model(args.target)
    comparison = run_comparison(
        target, [p.text for p in prompts], specs, args.ks, DecodeConfig(max_new_tokens=args.max_new_tokens),
        load_draft=lambda name: load_model(name),
        progress=lambda f, m: print(f"{f:4.0%} {m}", file=sys.stderr, flush=True),
    )
    comparison.settings["categories"] = [p.category for p in prompts]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(comparison.to_json())
    report(comparison, [p.category for p in prompts])


def report(comparison: Comparison, categories: list[str]) -> None:
    columns = ["drafter", "k", "acceptance_rate", "mean_acceptance_length", "cost_ratio", "speedup", "decode_speedup",
               "identical_to_target"]
    summary = comparison.summary()
    print("\nall prompts:")
    print(summary[columns].round(3).to_string(index=False))
    for row in summary.itertuples():
        print(f"  {row.drafter:>32} K={row.k}: per position {[round(r, 2) for r in row.per_position_acceptance]}")
    for category in dict.fromkeys(categories):
        keep = {i for i, c in enumerate(categories) if c == category}
        part = Comparison(comparison.settings, comparison.prompts, [r for r in comparison.runs if r.prompt_index in keep])
        table = part.summary()
        print(f"\n{category} ({len(keep)} prompts):")
        print(table[["drafter", "k", "mean_acceptance_length", "speedup"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
