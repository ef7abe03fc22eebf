"""The lab's own engine on a serve bench's prompts: the reference a serving engine's speedup is set beside.

``python -m lab serve-bench --lab-target T --lab-draft D`` runs it after the
servers (``lab.studies.serve_bench``): the same prompts through ``lab.decode``,
greedy, batch 1, target alone and with the draft model, so the engine's
speedup and acceptance at concurrency 1 (``serve_bench.engine_reference``) can
be read against the lab's.
"""

from __future__ import annotations

from collections.abc import Sequence

from lab.prompts import Prompt
from lab.studies.serve_bench import Progress, _clean, _ratio


def run_lab_reference(
    target: str,
    draft: str,
    prompts: Sequence[Prompt],
    k: int,
    max_new_tokens: int,
    chat_template: bool = True,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """The lab's own decoder on the same prompts, target alone and with the draft model at K, greedy, batch 1.

    target / draft: presets or model folders (``lab.models.load_model``).
    Returns tokens_per_s for each (pooled: all tokens / all seconds), their
    ratio as speedup, and acceptance (vLLM's conventions, ``lab.metrics``):
    acceptance_rate (fraction), mean_acceptance_length, per_position_acceptance.
    Each prompt runs once untimed first (warm-up), then off and on alternately.

    Raises ``lab.models.ModelError`` for a model that cannot be loaded or a
    draft whose tokenizer differs from the target's.
    """
    from lab.config import DecodeConfig
    from lab.drafters import make_drafter
    from lab.decode import run
    from lab.metrics import SpecDecodingStats
    from lab.hardware import model_precision
    from lab.models import check_same_tokenizer, encode_prompt, load_model

    report = progress or (lambda fraction, message: None)
    report(0.0, f"loading {target} and {draft}")
    target_model = load_model(target, dtype=dtype)
    draft_model = load_model(draft, dtype=dtype)
    check_same_tokenizer(target_model, draft_model)
    config = DecodeConfig(k=k, max_new_tokens=max_new_tokens)
    drafter = make_drafter("draft-model", target_model, draft=draft_model)
    ids = [encode_prompt(target_model, p.text, chat_template) for p in prompts]
    run(target_model, ids[0], drafter, DecodeConfig(k=k, max_new_tokens=4))  # warm-up
    off, on = SpecDecodingStats(), SpecDecodingStats()
    same = 0
    for i, prompt_ids in enumerate(ids):
        order = [(off, None), (on, drafter)] if i % 2 == 0 else [(on, drafter), (off, None)]
        outputs = {}
        for stats, source in order:
            result = run(target_model, prompt_ids, source, config)
            stats.merge(result.stats)
            outputs[source is None] = result.token_ids
        same += outputs[True] == outputs[False]
        report((i + 1) / len(ids), f"lab engine: prompt {i + 1}/{len(ids)}")
    return _clean({
        "target": target, "draft": draft, "k": k, "max_new_tokens": max_new_tokens,
        "precision": model_precision(target_model), "prompts": len(ids),
        "tokens_per_s_off": off.tokens_per_s, "tokens_per_s_on": on.tokens_per_s,
        "speedup": _ratio(on.tokens_per_s, off.tokens_per_s),
        "acceptance_rate": on.acceptance_rate, "mean_acceptance_length": on.mean_acceptance_length,
        "per_position_acceptance": on.per_position_acceptance_rate,
        "outputs_identical": same,
    })
