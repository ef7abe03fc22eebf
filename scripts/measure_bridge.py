"""Measure the vocabulary bridge: four drafters for the Qwen 1.5B target, side by side in one comparison.

On the held-out Spec-Bench prompts (``lab.studies.train_head.HELD_OUT_SOURCE``),
``lab.studies.compare.run_comparison`` runs, interleaved with the target alone:

- SmolLM2-135M through the text bridge (another tokenizer, bridged exactly);
- the Qwen2.5-Coder-0.5B draft (the same tokenizer);
- prompt lookup;
- SmolLM2-135M through the ids trap (its ids sent as they are).

For each: acceptance rate (accepted / drafted) and per position in the target's
tokens, mean acceptance length, c (draft time per drafted token over the
target's step, the bridge's tokenizer work included) and, apart, the bridge's
own ms per drafting step, speedup (end to end) and decode speedup, and whether
greedy output equalled the target alone.

    .venv/bin/python scripts/measure_bridge.py                       # the full 20 prompts, K 4, 64 tokens
    .venv/bin/python scripts/measure_bridge.py --limit 2 --max-new-tokens 24   # a quick check that it works
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lab  # noqa: E402,F401  (first: it sets OpenMP's wait policy before torch loads)
from lab.config import DecodeConfig  # noqa: E402
from lab.models import load_model  # noqa: E402
from lab.prompts import load_prompt_sets  # noqa: E402
from lab.studies.compare import DrafterSpec, run_comparison  # noqa: E402
from lab.studies.train_head import HELD_OUT_SOURCE  # noqa: E402

TARGET = "qwen2.5-coder-1.5b"
ARMS = [
    DrafterSpec("draft-model", draft="smollm2-135m", vocab_bridge="text"),
    DrafterSpec("draft-model", draft="qwen2.5-coder-0.5b"),
    DrafterSpec("prompt-lookup"),
    DrafterSpec("draft-model", draft="smollm2-135m", vocab_bridge="ids"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=20, help="held-out prompts to use (default 20, all of them)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="token budget per run (default 64)")
    parser.add_argument("--ks", type=int, nargs="+", default=[4], help="K values (default 4)")
    parser.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"), help="default: the lab's")
    parser.add_argument("--out", type=Path, help="also write the comparison's JSON (loadable on the Compare page)")
    args = parser.parse_args(argv)

    prompts = [p.text for p in load_prompt_sets([HELD_OUT_SOURCE])][: args.limit]
    target = load_model(TARGET, dtype=args.dtype)
    drafts = {}

    def load_draft(name: str):
        if name not in drafts:
            drafts[name] = load_model(name, dtype=args.dtype)
        return drafts[name]

    config = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    comparison = run_comparison(target, prompts, ARMS, args.ks, config, load_draft=load_draft,
                                progress=lambda fraction, message: print(f"[{fraction:4.0%}] {message}", file=sys.stderr))
    if args.out is not None:
        args.out.write_text(comparison.to_json())
    summary = comparison.summary()
    bridge_ms = {}
    for run in comparison.runs:
        if run.bridge_ms:
            bridge_ms.setdefault((run.drafter, run.k), []).extend(run.bridge_ms)
    draft_ms = {}
    for run in comparison.runs:
        draft_ms.setdefault((run.drafter, run.k), []).extend(run.draft_ms)

    print(f"{TARGET} target, {len(prompts)} held-out prompts ({HELD_OUT_SOURCE}), up to {args.max_new_tokens} tokens, "
          f"greedy, {comparison.settings['target_precision']} on {comparison.settings['device']}; load: "
          f"{(comparison.settings.get('load') or {}).get('reason', 'n/a')}")
    header = (f"{'drafter':44} {'K':>2} {'accept':>7} {'mean len':>8} {'c':>6} {'bridge ms/step':>14} "
              f"{'share of draft':>14} {'speedup':>8} {'decode':>7} {'identical':>9}  per-position acceptance")
    print(header)
    for row in summary.to_dict("records"):
        arm = (row["drafter"], row["k"])
        bridge = bridge_ms.get(arm, [])
        per_step = sum(bridge) / len(bridge) if bridge else math.nan
        share = sum(bridge) / sum(draft_ms[arm]) if bridge and sum(draft_ms[arm]) else math.nan
        positions = " ".join(f"{x:.2f}" for x in row["per_position_acceptance"])
        print(f"{row['drafter']:44} {row['k']:>2} {row['acceptance_rate']:7.3f} {row['mean_acceptance_length']:8.2f} "
              f"{row['cost_ratio']:6.3f} {_or_dash(per_step, '14.2f')} {_or_dash(share, '14.1%')} {row['speedup']:7.2f}x "
              f"{row['decode_speedup']:6.2f}x {row['identical_to_target']:9.0%}  [{positions}]")
    print(json.dumps({"acceptance rate": "accepted / drafted (not Leviathan's per-token alpha)",
                      "mean len": "1 + accepted / drafts (counts the target's own token)",
                      "c": "draft time per drafted token / the target alone's time per step, bridge included"}))
    return 0


def _or_dash(value: float, spec: str) -> str:
    """A number in ``spec``, or a dash of the same width where there is none (no bridge)."""
    width = int(spec.split(".")[0])
    return f"{'—':>{width}}" if math.isnan(value) else format(value, spec)


if __name__ == "__main__":
    raise SystemExit(main())
