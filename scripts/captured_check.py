"""Eager against captured steps on this device: per-pass ms, c and v(K), and end-to-end tokens/s by batch size.

    python scripts/captured_check.py --target FOLDER --draft FOLDER --device cuda --k 4 \\
        --batch-sizes 1 4 16 --budget-s 300 --out captured.json
    python scripts/captured_check.py --tiny --device cpu --backend eager   # the script itself, in seconds

FOLDER holds a Hugging Face config (a prepared preset: ``lab.models.prepared_dir``);
only the architecture is read and the weights are random (weights cannot travel to
a lent GPU): timings are the architecture's, acceptance is not. End to end, at each
batch size through the one decode loop (``lab.decode.run_batch``), the target runs alone, with the random draft of the other architecture (acceptance
near 0), and as its own draft (acceptance 100 %: the upper bound of what drafting
can return), each in the eager and the compiled engine (``lab.kv``).
Bars (issue #12): the captured draft step at least 3x faster than the eager one at
batch 1; with the Qwen pair's architectures, c below 0.5 when captured.
The compiled passes are compiled in the first, untimed round; a pass that would
start after --budget-s is skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lab  # noqa: F401,E402  (first: OpenMP's wait policy)
import torch  # noqa: E402

from lab.studies.passes import time_passes  # noqa: E402
from lab.config import DecodeConfig  # noqa: E402
from lab.drafters import DraftModelDrafter  # noqa: E402
from lab.decode import run_batch  # noqa: E402
from lab.hardware import resolve_device  # noqa: E402

MODES = ("eager", "compiled")


def tiny_pair(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(layers, hidden, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)

    return make(4, 64, 0), make(1, 32, 1)


def measure_passes(target, draft, k, batch_sizes, repeats, backend, deadline) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    for batch_size in batch_sizes:
        for mode in MODES:
            if time.perf_counter() > deadline:
                skipped.append(f"B={batch_size} {mode}")
                continue
            target_ms = time_passes(target, [1, k + 1], repeats=repeats, mode=mode, batch_size=batch_size, backend=backend)
            draft_ms = time_passes(draft, [1], repeats=repeats, mode=mode, batch_size=batch_size, backend=backend)[1]
            rows.append({"batch_size": batch_size, "mode": mode, "target_step_ms": target_ms[1],
                         "verify_ms": target_ms[k + 1], "draft_step_ms": draft_ms,
                         "c": draft_ms / target_ms[1], "v": target_ms[k + 1] / target_ms[1]})
            print(f"B={batch_size:>3} {mode:>8}: step {target_ms[1]:8.2f} ms  verify(K={k}) {target_ms[k + 1]:8.2f} ms  "
                  f"draft {draft_ms:8.2f} ms  c={rows[-1]['c']:.2f}  v={rows[-1]['v']:.2f}", flush=True)
    return rows, skipped


def end_to_end(target, draft, k, new_tokens, backend, prompts, batch_sizes) -> list[dict]:
    """Tokens/s of the one decode loop per (batch size, engine mode, draft), greedy; outputs checked identical."""
    lm = SimpleNamespace(model=target, tokenizer=None, eos_token_ids=())
    rows = []
    for batch_size in batch_sizes:
        batch = [prompts[i % len(prompts)] for i in range(batch_size)]
        for mode in MODES:
            for label, drafter_model in (("target alone", None), ("random draft", draft), ("target as its own draft", target)):
                config = DecodeConfig(k=k, max_new_tokens=new_tokens, engine_mode=mode, compile_backend=backend)
                for warm in (True, False):  # the first run compiles (this bucket's graphs); only the second is timed
                    drafter = None if drafter_model is None else DraftModelDrafter(drafter_model)
                    start = time.perf_counter()
                    result = run_batch(lm, batch, drafter, config)
                    wall_s = time.perf_counter() - start
                stats = result.pooled_stats()
                drafted = stats.num_draft_tokens
                rows.append({"batch_size": batch_size, "mode": mode, "run": label,
                             "tokens_per_s": result.num_output_tokens / wall_s,
                             "acceptance_rate": stats.num_accepted_tokens / drafted if drafted else None,
                             "steps": len(result.steps), "outputs": result.token_ids})
                print(f"B={batch_size:>3} {mode:>8} {label:>24}: {rows[-1]['tokens_per_s']:8.1f} tokens/s  "
                      f"acceptance {'-' if not drafted else f'{stats.num_accepted_tokens / drafted:.0%}'}", flush=True)
    alone = {(r["batch_size"], r["mode"]): r["outputs"] for r in rows if r["run"] == "target alone"}
    for r in rows:  # greedy: every run must emit the target alone's tokens, in both engines
        r["identical_to_target_alone"] = r.pop("outputs") == alone[(r["batch_size"], "eager")]
    by = {(r["batch_size"], r["mode"], r["run"]): r["tokens_per_s"] for r in rows}
    for batch_size in batch_sizes:
        ratios = "  ".join(f"{label}: {by[(batch_size, 'compiled', label)] / by[(batch_size, 'eager', label)]:.2f}x"
                           for label in ("target alone", "random draft", "target as its own draft"))
        print(f"B={batch_size:>3} captured / eager tokens/s  {ratios}", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llamas instead of the folders' architectures")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0, help="no new pass timing starts after this")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.tiny:
        target, draft = tiny_pair(device, dtype)
    else:
        from lab.studies.costs import random_model

        target, draft = random_model(args.target, device, dtype), random_model(args.draft, device, dtype)
    deadline = time.perf_counter() + args.budget_s
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} {args.dtype}, "
          f"backend {args.backend}, K={args.k}", flush=True)
    rows, skipped = measure_passes(target, draft, args.k, args.batch_sizes, args.repeats, args.backend, deadline)
    generator = torch.Generator().manual_seed(0)
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    prompts = [torch.randint(vocab, (64 + 16 * i,), generator=generator).tolist() for i in range(args.prompts)]
    e2e = end_to_end(target, draft, args.k, args.new_tokens, args.backend, prompts, args.batch_sizes)
    by = {(r["batch_size"], r["mode"]): r for r in rows}
    bars = {}
    if (1, "eager") in by and (1, "compiled") in by:
        eager, captured = by[(1, "eager")], by[(1, "compiled")]
        bars = {"draft_step_speedup_b1": eager["draft_step_ms"] / captured["draft_step_ms"],
                "captured_c_b1": captured["c"]}
        bars["draft_step_3x"] = bars["draft_step_speedup_b1"] >= 3.0
        bars["c_below_half"] = bars["captured_c_b1"] < 0.5
        print(f"bars: captured draft step {bars['draft_step_speedup_b1']:.2f}x the eager one (want >= 3); "
              f"captured c = {bars['captured_c_b1']:.2f} (want < 0.5)", flush=True)
    if skipped:
        print("skipped (budget): " + ", ".join(skipped), flush=True)
    result = {"device": str(device), "dtype": args.dtype, "backend": args.backend, "k": args.k, "passes": rows,
              "skipped": skipped, "end_to_end": e2e, "bars": bars,
              "target": args.target or "tiny", "draft": args.draft or "tiny"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
