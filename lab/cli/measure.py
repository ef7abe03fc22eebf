"""``python -m lab calibrate | peer | bench | compare | engine-bench``: the measuring studies (``lab.studies``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from lab.config import DecodeConfig
from lab.drafters import DRAFTER_NAMES
from lab.cli.common import (
    EXIT_OK,
    ProgressLine,
    UsageError,
    add_constraint_arguments,
    add_drafter_arguments,
    add_engine_argument,
    add_vocab_bridge_argument,
    add_model_arguments,
    add_save_argument,
    add_tree_argument,
    check_drafter_arguments,
    finish_saved,
    checked_tokenizer,
    constraint_spec,
    holding_device,
    load_models,
    log_line,
    run_saver,
)


def add_calibrate(commands) -> None:
    """Register ``python -m lab calibrate``."""
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
    add_save_argument(calibrate)
    calibrate.set_defaults(handler=_cmd_calibrate)


def add_peer(commands) -> None:
    """Register ``python -m lab peer``."""
    peer = commands.add_parser("peer", help="compare with transformers' assisted generation, side by side")
    add_model_arguments(peer)
    from lab.studies.peer import PEER_DRAFTERS

    add_drafter_arguments(peer, choices=PEER_DRAFTERS, default=None)
    peer.add_argument("--k", type=int, nargs="+", default=[4], help="one or more K (default 4)")
    peer.add_argument("--max-new-tokens", type=int, default=64, help="token budget per run (default 64)")
    peer.add_argument("--prompts", nargs="+", default=["spec_bench:summarization:10", "spec_bench:mix:10"],
                      help="prompt sets: spec_bench[:CATEGORY|:mix][:N], a preset name, or a .jsonl path "
                      "(default: spec_bench:summarization:10 spec_bench:mix:10)")
    peer.add_argument("--raw", action="store_true", help="encode prompts without the chat template")
    peer.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    peer.add_argument("--json", action="store_true", help="print the full JSON report instead of the table")
    peer.add_argument("--out", type=Path, help="also write the JSON report to this file (rewritten after each prompt)")
    add_save_argument(peer)
    peer.set_defaults(handler=_cmd_peer)


def add_bench(commands) -> None:
    """Register ``python -m lab bench``."""
    bench = commands.add_parser("bench", help="batch-size sweep: latency and throughput with speculation off, on and auto")
    add_model_arguments(bench)
    add_drafter_arguments(bench, [n for n in DRAFTER_NAMES if n != "none"], None, bridge=True)
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
    add_constraint_arguments(bench)
    add_engine_argument(bench)
    add_tree_argument(bench)
    add_save_argument(bench)
    bench.set_defaults(handler=_cmd_bench)


def add_compare(commands) -> None:
    """Register ``python -m lab compare``."""
    compare = commands.add_parser("compare", help="every drafter at every K on the same prompts, against the target alone")
    add_model_arguments(compare)
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
    add_vocab_bridge_argument(compare)
    add_engine_argument(compare)
    add_tree_argument(compare, many=True)
    add_save_argument(compare)
    compare.set_defaults(handler=_cmd_compare)


def add_engine_bench(commands) -> None:
    """Register ``python -m lab engine-bench``."""
    engine = commands.add_parser("engine-bench", help="engine modes, precisions and K side by side (old vs new defaults)")
    engine.add_argument("--target", required=True, help="a preset name or a model folder")
    add_drafter_arguments(engine, ["draft-model", "prompt-lookup"], None)
    engine.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    engine.add_argument("--arm", dest="arms", action="append", required=True, metavar="LABEL:PRECISION:ENGINE:K",
                        help="one arm, e.g. old:bf16:eager:4; PRECISION and K may be 'calibrated' (this "
                        "machine's calibration of the pair); repeat for more arms")
    engine.add_argument("--max-new-tokens", type=int, default=32, help="token budget per run (default 32)")
    engine.add_argument("--prompts", nargs="+", default=["spec_bench:mix:20"],
                        help="prompt sets, as for peer (default: spec_bench:mix:20)")
    engine.add_argument("--out", type=Path, help="also write the summary as JSON")
    add_save_argument(engine)
    engine.set_defaults(handler=_cmd_engine_bench)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from lab.studies.calibrate import DEFAULT_KS, calibrate

    from lab.hardware import resolve_device

    progress = ProgressLine(sys.stderr, always=True)
    with holding_device(resolve_device(args.device or "auto"), "calibrate"):
        calibration = calibrate(args.target, args.draft, device=args.device or "auto", precisions=args.precisions,
                                ks=args.ks or DEFAULT_KS, acceptance=args.acceptance, refresh=args.refresh,
                                progress=progress)
    progress.done()
    from lab.figures import from_calibration

    data = calibration.as_dict()
    saver = run_saver(args, "calibrate", target=args.target, draft=args.draft, machine=data["machine"],
                      settings={"target": args.target, "draft": args.draft, "drafter": calibration.drafter,
                                "precisions": args.precisions, "acceptance": calibration.acceptance})
    finish_saved(saver, from_calibration(data), payload=data)
    print(json.dumps(data) if args.json else calibration.explain().replace("**", ""))
    return EXIT_OK


def _cmd_engine_bench(args: argparse.Namespace) -> int:
    from lab.studies.calibrate import calibrate
    from lab.studies.compare import DrafterSpec
    from lab.studies.engine_modes import Arm, format_engine_bench, run_engine_bench
    from lab.prompts import load_prompt_sets

    check_drafter_arguments(args)
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
                                    args.device or "auto", progress=log_line)
            print(calibration.explain().replace("**", ""), file=sys.stderr)
        precision = calibration.precision if precision == "calibrated" else precision
        try:
            arms.append(Arm(label, precision, mode, calibration.k if k == "calibrated" else int(k)))
        except ValueError as error:
            raise UsageError(f"--arm {text!r}: {error}") from None
    spec = DrafterSpec(args.drafter, args.draft, min_n=args.min_n, max_n=args.max_n)
    frame = run_engine_bench(args.target, spec, [p.text for p in prompts], arms, args.max_new_tokens,
                             args.device or "auto", progress=log_line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(frame.to_json(orient="records", indent=1))
    rows = json.loads(frame.to_json(orient="records"))
    saver = run_saver(args, "engine-bench", target=args.target, draft=args.draft,
                      device="cuda" if (args.device or "auto") in ("auto", "cuda") and _has_cuda() else "cpu",
                      settings={"target": args.target, "drafter": args.drafter, "draft": args.draft, "arms": args.arms,
                                "max_new_tokens": args.max_new_tokens, "prompts": args.prompts})
    finish_saved(saver, _arm_figures(rows), payload=rows)
    print(format_engine_bench(frame))
    return EXIT_OK


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _arm_figures(rows: list[dict]) -> dict:
    """Engine-bench figures: the fastest arm's speedup and tokens/s, and its label."""
    from lab.figures import from_summary_rows

    figures = from_summary_rows(rows)
    best = max(rows, key=lambda r: r.get("speedup") or 0.0, default={})
    return figures | {"best_arm": best.get("label")}


def _cmd_peer(args: argparse.Namespace) -> int:
    from lab.studies.peer import DrafterSpec, run_peer_comparison
    from lab.prompts import load_prompt_sets

    check_drafter_arguments(args)
    for k in args.k:
        DecodeConfig(k=k, max_new_tokens=args.max_new_tokens)
    prompts = load_prompt_sets(args.prompts)
    if not prompts:
        raise UsageError(f"the prompt sets {' '.join(args.prompts)} hold no prompts: choose others")
    if args.out is not None and not args.out.parent.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
    progress = ProgressLine(sys.stderr, always=True)
    checked_tokenizer(args, progress)
    target, draft = load_models(args, progress)
    spec = DrafterSpec(args.drafter, draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer)
    save = None if args.out is None else (lambda partial: args.out.write_text(json.dumps(partial.as_dict(), indent=1) + "\n"))
    report = run_peer_comparison(target, spec, prompts, args.k, args.max_new_tokens, chat_template=not args.raw,
                                 warmup=not args.no_warmup, progress=log_line, on_prompt=save)
    data = report.as_dict()
    if args.out is not None:
        print(f"wrote {args.out}", file=sys.stderr)
    summary = report.summary(args.k[0])
    saver = run_saver(args, "peer", target=target.name, draft=draft.name if draft is not None else None,
                      device=target.device, settings=data.get("settings"))
    finish_saved(saver, {name: value for name, value in summary.items() if isinstance(value, (int, float, str))},
                 payload=data)
    print(json.dumps(data) if args.json else report.format_table())
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from lab.drafters import make_drafter
    from lab.models import encode_prompt
    from lab.prompts import load_prompt_sets
    from lab.grammar import Constraint
    from lab.studies.batch_sweep import format_sweep, run_sweep

    check_drafter_arguments(args)
    if args.naive_grammar:
        raise UsageError(
            "bench requires the exact grammar mode; got --naive-grammar, a single-request teaching switch "
            "(show it with `generate --naive-grammar`)"
        )
    spec = constraint_spec(args)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes requires comma-separated integers, e.g. 1,2,4,8; got {args.batch_sizes!r}") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"--batch-sizes requires integers >= 1; got {args.batch_sizes!r}")
    config = DecodeConfig(k=args.k, max_new_tokens=args.max_new_tokens, engine_mode=args.engine,
                          tree_budget=args.tree_budget)
    if config.tree_budget and batch_sizes != [1]:
        raise UsageError(f"bench --tree-budget requires --batch-sizes 1 (token trees run at batch size 1); "
                         f"got {args.batch_sizes}")
    prompts = load_prompt_sets(args.prompts)[: args.n]
    if not prompts:
        raise UsageError(f"the prompt sets {' '.join(args.prompts)} hold no prompts: choose others")
    progress = ProgressLine(sys.stderr, always=True)
    checked_tokenizer(args, progress)
    target, draft = load_models(args, progress)
    drafter = make_drafter(args.drafter, target, draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer,
                           vocab_bridge=args.vocab_bridge)
    constraint = None if spec is None else Constraint.for_model(spec, target)
    ids = [encode_prompt(target, p.text, chat_template=not args.raw) for p in prompts]
    from lab import figures

    saver = run_saver(args, "bench", target=target.name, draft=draft.name if draft is not None else None,
                      device=target.device, settings={"drafter": args.drafter, "k": args.k, "batch_sizes": batch_sizes,
                                                      "max_new_tokens": args.max_new_tokens, "prompts": args.prompts})
    saver.begin()
    with holding_device(target.device, "bench") as meter:
        sweep = run_sweep(target, ids, drafter, config, batch_sizes, progress=log_line,
                          draft=draft, constraint=constraint,
                          on_part=lambda part: saver.part("batch-size", figures.from_batch_size(part), payload=part))
        sweep.peer = _bench_peer(args, target, draft, prompts, spec)
    sweep.settings["load"] = meter.report.as_dict()
    data = sweep.as_dict()
    finish_saved(saver, figures.from_sweep(data), payload=data, settings=data["settings"] | {"prompts": args.prompts},
                 status="cancelled" if data["settings"].get("status") == "cancelled" else "complete")
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
    if args.vocab_bridge != "none":
        return {"skipped": f"the lab's peer comparison runs same-vocabulary drafts only; got --vocab-bridge {args.vocab_bridge}"}
    peer = DrafterSpec(args.drafter, draft=draft, min_n=args.min_n, max_n=args.max_n, exit_layer=args.exit_layer)
    report = run_peer_comparison(target, peer, prompts, k=args.k, max_new_tokens=args.max_new_tokens,
                                 chat_template=not args.raw, progress=log_line)
    return report.summary(args.k) | {"settings": report.settings}


def _cmd_compare(args: argparse.Namespace) -> int:
    from lab.studies.compare import DrafterSpec, run_comparison
    from lab.models import check_same_tokenizer, load_model, load_tokenizer
    from lab.prompts import load_prompt_sets

    if "draft-model" in args.drafters and not args.draft:
        raise UsageError("--drafters draft-model requires --draft NAME (e.g. --draft qwen2.5-coder-0.5b)")
    from lab.drafters import TREE_DRAFTERS
    from lab.tree import check_tree_budget

    for budget in args.tree_budget:
        check_tree_budget(budget)
    if any(args.tree_budget) and not any(name in TREE_DRAFTERS for name in args.drafters):
        raise UsageError(f"--tree-budget above 0 requires a drafter that drafts trees ({', '.join(TREE_DRAFTERS)}); "
                         f"got {' '.join(args.drafters)}")
    specs = [
        DrafterSpec(name, draft=args.draft if name == "draft-model" else None,
                    exit_layer=args.exit_layer if name == "layer-skip" else None,
                    vocab_bridge=args.vocab_bridge if name == "draft-model" else "none", tree_budget=budget)
        for name in args.drafters for budget in dict.fromkeys(args.tree_budget)
        if budget == 0 or (name in TREE_DRAFTERS and (name != "draft-model" or args.vocab_bridge == "none"))
    ]
    if args.vocab_bridge != "none" and args.draft_vocab:
        raise UsageError(f"--draft-vocab requires --vocab-bridge none (it lists the target's ids); got {args.vocab_bridge}")
    if args.draft_vocab:
        specs += [
            DrafterSpec(name, draft=args.draft if name == "draft-model" else None, draft_vocab=args.draft_vocab)
            for name in args.drafters if name in ("draft-model", "eagle")
        ]
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, engine_mode=args.engine)
    if any(args.tree_budget) and config.engine_mode not in ("auto", "eager"):
        raise UsageError(f"--tree-budget above 0 requires --engine eager (or auto on a CPU); got {args.engine}")
    for k in args.ks:
        replace(config, k=k)  # refuse a bad K before loading anything
    prompts = [p.text for p in load_prompt_sets(args.prompts)]
    progress = ProgressLine(sys.stderr, always=True)
    if args.draft and args.vocab_bridge == "none":
        check_same_tokenizer(load_tokenizer(args.target, progress), load_tokenizer(args.draft, progress))
    target = load_model(args.target, device=args.device, dtype=args.dtype, progress=progress, precision=args.target_quant)
    load_draft = lambda name: load_model(name, device=args.device, dtype=args.dtype, progress=progress,  # noqa: E731
                                         precision=args.draft_quant)
    progress.done()
    from lab import figures

    saver = run_saver(args, "compare", target=target.name, draft=args.draft, device=target.device,
                      settings={"drafters": args.drafters, "ks": args.ks, "max_new_tokens": args.max_new_tokens,
                                "prompts": args.prompts})
    saver.begin()
    with holding_device(target.device, "compare"):  # each run's own load report lands in the comparison
        comparison = run_comparison(
            target, prompts, specs, args.ks, config, load_draft=load_draft, chat_template=not args.raw,
            progress=log_line,
            on_part=lambda part: saver.part("compare-prompt", figures.from_compare_runs(part["runs"]), payload=part))
    finish_saved(saver, figures.from_summary_rows(comparison.summary().to_dict("records")),
                 payload=json.loads(comparison.to_json()), settings=comparison.settings)
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
