"""Measure c(B) and v(K, B) on this machine and predict the latency speedup by batch size.

    python scripts/device_costs.py --target FOLDER --draft FOLDER [--random-weights] \
        --k 4 --mean-acceptance-length 3.36 --batch-sizes 1 2 4 8 16 32 64 --out costs.json

FOLDER holds a Hugging Face model (a prepared preset: ``lab.models.prepared_dir``).
With --random-weights only its config.json is read and the weights are random:
the timings are the architecture's, the acceptance must come from a run with the
trained models (``python -m lab compare``). See ``lab.studies.costs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lab  # noqa: F401,E402  (first: OpenMP's wait policy)
import torch  # noqa: E402

from lab.studies.costs import measure_costs, random_model  # noqa: E402
from lab.hardware import resolve_device  # noqa: E402
from lab.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--mean-acceptance-length", type=float, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.random_weights:
        target, draft = SimpleNamespace(model=random_model(args.target, device)), random_model(args.draft, device)
    else:
        target = load_model(args.target, device=device)
        draft = load_model(args.draft, device=device).model
    generator = torch.Generator().manual_seed(0)
    vocab = min(target.model.config.vocab_size, draft.config.vocab_size)
    prompts = [torch.randint(vocab, (args.prompt_tokens + 7 * i,), generator=generator).tolist() for i in range(4)]
    table = measure_costs(target, draft, prompts, args.batch_sizes, args.k, repeats=args.repeats)
    table.settings.update(target=args.target, draft=args.draft, random_weights=args.random_weights)
    result = table.as_dict(args.mean_acceptance_length)
    print(f"{table.settings['device']}, {table.settings['dtype']}, K={args.k}, prompts of ~{args.prompt_tokens} tokens")
    print(f"{'B':>4} {'step ms':>8} {'verify ms':>9} {'draft ms/tok':>12} {'c':>6} {'v':>6} {'predicted':>9}")
    for row in result["rows"]:
        predicted = row.get("predicted_speedup")
        print(f"{row['batch_size']:>4} {row['target_step_ms']:>8.2f} {row['verify_ms']:>9.2f} "
              f"{row['draft_ms_per_token']:>12.2f} {row['c']:>6.2f} {row['v']:>6.2f} "
              f"{'' if predicted is None else f'{predicted:.2f}x':>9}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
