"""``python -m lab token-freq | train-head``: the target's token frequencies and a trained EAGLE-style head."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lab.cli.common import EXIT_OK, ProgressLine, add_model_arguments


def add_token_freq(commands) -> None:
    """Register ``python -m lab token-freq``."""
    freq = commands.add_parser("token-freq", help="count the tokens the target generates: the table a trimmed draft vocabulary uses")
    add_model_arguments(freq, draft=False)
    freq.add_argument("--num-prompts", type=int, default=96, help="training prompts to answer (default 96)")
    freq.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (default 96)")
    freq.add_argument("--max-prompt-tokens", type=int, default=384, help="keep the last N tokens of a long prompt (default 384)")
    freq.add_argument("--batch-size", type=int, default=16, help="answers generated together (default 16)")
    freq.set_defaults(handler=_cmd_token_freq)


def add_train_head(commands) -> None:
    """Register ``python -m lab train-head``."""
    head = commands.add_parser("train-head", help="train an EAGLE-style head on the target's own answers and save it")
    add_model_arguments(head, draft=False)
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
