"""``python -m lab moe-cost``: the MoE trap in numbers, v(K) of a MoE target against its dense source."""

from __future__ import annotations

import argparse
import json
import sys

from lab.cli.common import EXIT_OK, ProgressLine, UsageError


def add_moe_cost(commands) -> None:
    """Register ``python -m lab moe-cost``."""
    cost = commands.add_parser(
        "moe-cost", help="v(K) of a MoE target against its dense source, and experts touched",
        description="Time the verify cost v(K) (a pass over K+1 tokens, in one-token steps) of a Mixture-of-Experts "
                    "target against its dense source, and count the distinct experts each layer reads per pass: "
                    "the MoE trap, where speculation that pays on a dense target loses on its MoE twin at batch 1.")
    cost.add_argument("--target", default="qwen2.5-coder-1.5b-moe",
                      help="a MoE preset or a local transformers MoE folder (default qwen2.5-coder-1.5b-moe)")
    cost.add_argument("--dense", default=None,
                      help="the dense model to compare (default: the MoE preset's dense source; required for a folder)")
    cost.add_argument("--active-dense", default=None,
                      help="also time a dense model of about the MoE's active size (e.g. qwen2.5-coder-0.5b)")
    cost.add_argument("--k", default="0,1,2,4,8", help="comma-separated Ks, reported in this order (default 0,1,2,4,8)")
    cost.add_argument("--batch-size", type=int, default=1, help="rows per pass (default 1)")
    cost.add_argument("--context", type=int, default=128, help="cached context tokens before each pass (default 128)")
    cost.add_argument("--repeats", type=int, default=3, help="timed passes per width and round (default 3)")
    cost.add_argument("--rounds", type=int, default=2, help="rounds alternating the models (default 2)")
    cost.add_argument("--fidelity", default=None, metavar="PROMPTS",
                      help="also measure the MoE's fidelity to the dense model on these prompts (e.g. spec_bench:mix:20)")
    cost.add_argument("--new-tokens", type=int, default=32, help="dense greedy tokens per fidelity prompt (default 32)")
    cost.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    cost.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="compute dtype (default bf16)")
    cost.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    cost.set_defaults(handler=_cmd_moe_cost)


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UsageError(f"--k requires comma-separated integers >= 0, e.g. 0,1,2,4,8; got {text!r}") from None
    if not ks or min(ks) < 0:
        raise UsageError(f"--k requires comma-separated integers >= 0, e.g. 0,1,2,4,8; got {text!r}")
    return ks


def _cmd_moe_cost(args: argparse.Namespace) -> int:
    from transformers.utils import logging

    from lab.models import PRESETS, encode_prompt, load_model
    from lab.prompts import load_prompts
    from lab.routing import moe_shape
    from lab.studies.moe import fidelity, moe_cost

    ks = _ks(args.k)
    if args.batch_size < 1 or args.repeats < 1 or args.rounds < 1 or args.context < 1:
        raise UsageError("--batch-size, --repeats, --rounds and --context require integers >= 1")
    preset = PRESETS.get(args.target)
    dense_name = args.dense or (preset.moe.source if preset is not None and preset.moe is not None else None)
    if dense_name is None:
        raise UsageError(f"--dense is required for {args.target!r}: name the dense model to compare it with")
    logging.disable_progress_bar()
    progress = ProgressLine(sys.stderr)
    moe = load_model(args.target, device=args.device, dtype=args.dtype, progress=progress)
    if moe_shape(moe.model.config) is None:
        raise UsageError(f"--target requires a MoE model; {args.target!r} is dense (try qwen2.5-coder-1.5b-moe)")
    dense = load_model(dense_name, device=args.device, dtype=args.dtype, progress=progress)
    active = load_model(args.active_dense, device=args.device, dtype=args.dtype, progress=progress) \
        if args.active_dense else None
    progress.done()
    result = moe_cost(moe, dense, ks, active, args.batch_size, args.context, args.repeats, args.rounds).as_dict()
    if args.fidelity:
        prompts = [encode_prompt(dense, prompt.text) for prompt in load_prompts(args.fidelity)]
        result["fidelity"] = fidelity(moe, dense, prompts, args.new_tokens, ks).as_dict()
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    print(_table(result))
    return EXIT_OK


def _table(result: dict) -> str:
    moe, dense = result["moe"], result["dense"]
    rows = [f"MoE {moe['name']} ({moe['num_experts']} experts, top {moe['top_k']}; "
            f"experts backend {result['settings']['experts_implementation']}) vs dense {dense['name']}, "
            f"batch {result['settings']['batch_size']}",
            f"{'K':>3} {'v MoE':>7} {'v dense':>8} {'experts touched':>16} {'uniform':>8}"]
    for i, k in enumerate(moe["ks"]):
        rows.append(f"{k:>3} {moe['v'][i]:>7.2f} {dense['v'][i]:>8.2f} {moe['experts_touched'][i]:>16.2f} "
                    f"{moe['uniform_experts_touched'][i]:>8.2f}")
    rows.append(f"one-token step: MoE {moe['target_step_ms']:.1f} ms, dense {dense['target_step_ms']:.1f} ms")
    if "fidelity" in result:
        fid = result["fidelity"]
        rows.append(f"fidelity: top-1 agreement {fid['top1_agreement']:.1%}, "
                    f"mean greedy match {fid['mean_match_length']:.1f} of {fid['new_tokens']} tokens")
    return "\n".join(rows)
