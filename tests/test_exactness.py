"""Exactness as one table: every drafter, engine mode, batch size, draft vocabulary and constraint, in fp32,
token for token equal to the target alone decoding greedily without any cache.

One row per cell of drafter (prompt lookup, draft model, layer skip, EAGLE head) x draft vocabulary (full or
trimmed, only where a drafter has one: the draft model and the EAGLE head) x engine mode (eager, static,
compiled through dynamo's eager backend) x batch size (1, or 3 ragged prompts) x constraint (none, a JSON
schema). The reference below is small on purpose: no KV cache, no lab engine; under the constraint the same
xgrammar grammar masks the logits at every token before the argmax.

Every model is a tiny random one over SmolLM2's real tokenizer (xgrammar needs real token strings), so all
rows share one code path. The EAGLE head cannot run in the compiled engine (it reads the target through
forward hooks, which a captured pass does not run): that cell asserts the engine's refusal.
"""

from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xgr

from lab.config import DecodeConfig
from lab.drafters import EagleHead, EagleHeadConfig, make_drafter
from lab.drafters.eagle import eagle3_layers
from lab.grammar import Constraint, ConstraintSpec

# The engine under test, imported in this one place (the two loops are merging into lab.decode, same names).
from lab.decode import run, run_batch

K = 3
NEW_TOKENS = 16
# Bounded fields only, so the random target completes the object (and emits EOS) within the budget.
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
}
# Ragged on purpose: long, middle, one token. The JSON echoes let prompt lookup draft, unconstrained and under the
# schema; the last row has no n-gram to match and, for the EAGLE head, no target feature before its first step.
TEXT_PROMPTS = [
    '{"id": 7, "ok": true} {"id": 42, "ok": false} {"id": 7, "ok": true} {"',
    "one two three, one two three, one two",
    "{",
]
# The engine refuses the EAGLE head in the compiled mode, by name.
EAGLE_COMPILED_REFUSAL = "eagle drafter reads the target's hidden states through forward hooks.*pick the eager or static"
MODES = {
    "eager": dict(engine_mode="eager"),
    "static": dict(engine_mode="static"),
    "compiled": dict(engine_mode="compiled", compile_backend="eager"),  # dynamo's capture, run without inductor
}
DRAFTERS = [  # (make_drafter name, its draft vocabularies: None where it has none of its own to trim)
    ("prompt-lookup", [None]),
    ("draft-model", ["full", "trimmed"]),
    ("layer-skip", [None]),
    ("eagle", ["full", "trimmed"]),
]


def matrix():
    """The table's rows, named drafter[-vocab]-mode-B<size>-constraint (e.g. eagle-trimmed-static-B3-json)."""
    for drafter, vocabs in DRAFTERS:
        for vocab in vocabs:
            for mode in MODES:
                for batch_size in (1, 3):
                    for constraint in ("none", "json"):
                        name = "-".join([drafter] + ([vocab] if vocab else []) + [mode, f"B{batch_size}", constraint])
                        yield pytest.param(drafter, vocab, mode, batch_size, constraint, id=name)


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: tuple[int, ...],
                     constraint: Constraint | None) -> list[int]:
    """The target alone, greedy: re-reads the whole sequence for every token (no cache at all).

    Under a constraint a fresh xgrammar matcher of the same compiled grammar masks the logits before each argmax
    and then takes the token. Stops after an EOS token or max_new_tokens tokens.
    """
    matcher = None if constraint is None else xgr.GrammarMatcher(constraint.compiled)
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1:].float()  # [1, V]
            if matcher is not None:
                bitmask = xgr.allocate_token_bitmask(1, constraint.vocab_size)
                matcher.fill_next_token_bitmask(bitmask)
                xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
            token = int(logits.argmax())
            assert matcher is None or matcher.accept_token(token)
            ids.append(token)
            out.append(token)
            if token in eos:
                break
    return out


@pytest.fixture(scope="module")
def models(smol_tiny_models):
    return smol_tiny_models


@pytest.fixture(scope="module")
def prompts(smol_tokenizer) -> list[list[int]]:
    encoded = [smol_tokenizer.encode(text, add_special_tokens=False) for text in TEXT_PROMPTS]
    assert len({len(p) for p in encoded}) == len(encoded) and min(map(len, encoded)) == 1, "ragged, down to 1 token"
    return encoded


@pytest.fixture(scope="module")
def head(models) -> EagleHead:
    """A random EAGLE-3 style head over the low, middle and high layers of the tiny target."""
    target, _ = models
    layers = eagle3_layers(len(target.model.model.layers))
    torch.manual_seed(0)
    config = EagleHeadConfig.for_target(target.model, intermediate_size=16, target="tiny", feature_layers=layers)
    return EagleHead(config).eval().requires_grad_(False).to(target.model.device)


@pytest.fixture(scope="module")
def subset(models) -> torch.Tensor:
    """[N] the trimmed draft vocabulary: every even token id and EOS, so the target emits some tokens outside it."""
    target, _ = models
    vocab = target.model.config.vocab_size
    return torch.tensor(sorted(set(range(0, vocab, 2)) | set(target.eos_token_ids)), dtype=torch.long)


@pytest.fixture(scope="module")
def constraints(models) -> dict[str, Constraint | None]:
    target, _ = models
    return {"none": None, "json": Constraint.for_model(ConstraintSpec("json_schema", json.dumps(SCHEMA)), target)}


@pytest.fixture(scope="module")
def references(models, prompts, constraints) -> dict[tuple[int, str], list[int]]:
    """(prompt index, constraint) -> the reference output (every row of the table shares these)."""
    target, _ = models
    return {
        (i, name): reference_greedy(target.model, prompt, NEW_TOKENS, target.eos_token_ids, constraint)
        for i, prompt in enumerate(prompts)
        for name, constraint in constraints.items()
    }


@pytest.mark.parametrize("drafter_name, vocab, mode, batch_size, constraint_name", list(matrix()))
def test_speculative_greedy_equals_reference(models, prompts, head, subset, constraints, references,
                                              drafter_name, vocab, mode, batch_size, constraint_name):
    target, draft = models
    constraint = constraints[constraint_name]
    drafter = make_drafter(drafter_name, target, draft, exit_layer=1, head=head,
                           vocab_subset=subset if vocab == "trimmed" else None)
    config = DecodeConfig(k=K, max_new_tokens=NEW_TOKENS, **MODES[mode])
    rows = range(batch_size)  # B = 1: the first (longest) prompt alone

    if drafter_name == "eagle" and mode == "compiled":
        with pytest.raises(ValueError, match=EAGLE_COMPILED_REFUSAL):
            if batch_size == 1:
                run(target, prompts[0], drafter, config, constraint=constraint)
            else:
                run_batch(target, [prompts[i] for i in rows], drafter, config, constraint=constraint)
        return

    if batch_size == 1:
        result = run(target, prompts[0], drafter, config, constraint=constraint)
        outputs, stats = [result], result.stats
    else:
        batched = run_batch(target, [prompts[i] for i in rows], drafter, config, constraint=constraint)
        outputs, stats = batched.rows, batched.pooled_stats()

    for i, output in zip(rows, outputs):
        expected = references[(i, constraint_name)]
        assert output.token_ids == expected, f"row {i}"
        assert output.reason == ("eos" if expected[-1] in target.eos_token_ids else "max_new_tokens"), f"row {i}"

    # A row that never drafts, or whose drafts are all kept, would test nothing of the rollback.
    assert stats.num_draft_tokens > stats.num_accepted_tokens, "some drafted tokens are rejected"
    if constraint is not None:
        # The schema forces tokens ('{"', 'id', '":', ...): every drafter drafting under it gets some accepted.
        assert stats.num_accepted_tokens > 0, "some drafted tokens are accepted"
    if vocab == "trimmed":
        drafted = {t for output in outputs for step in output.steps for t in step.drafted}
        emitted = {t for output in outputs for t in output.token_ids}
        allowed = set(subset.tolist())
        assert drafted <= allowed, "a trimmed drafter proposes only tokens of its subset"
        assert emitted - allowed, "the target emits tokens outside the subset itself"


def moe_matrix():
    """Rows for a Mixture-of-Experts target (tiny random Qwen2-MoE, the pinned grouped_mm experts backend): every drafter and
    engine mode at batch 1 and 3, unconstrained (the constraint is target-agnostic), named moe-drafter-mode-B<size>."""
    for drafter, _ in DRAFTERS:
        for mode in MODES:
            for batch_size in (1, 3):
                yield pytest.param(drafter, mode, batch_size, id=f"moe-{drafter}-{mode}-B{batch_size}")


@pytest.fixture(scope="module")
def moe_references(smol_tiny_moe, prompts) -> list[list[int]]:
    return [reference_greedy(smol_tiny_moe.model, prompt, NEW_TOKENS, smol_tiny_moe.eos_token_ids, None)
            for prompt in prompts]


@pytest.mark.parametrize("drafter_name, mode, batch_size", list(moe_matrix()))
def test_moe_target_speculative_greedy_equals_reference(smol_tiny_moe, models, prompts, moe_references,
                                                         drafter_name, mode, batch_size):
    target, draft = smol_tiny_moe, models[1]
    head = None
    if drafter_name == "eagle":
        torch.manual_seed(0)
        layers = eagle3_layers(len(target.model.model.layers))
        config = EagleHeadConfig.for_target(target.model, intermediate_size=16, target="tiny-moe",
                                            feature_layers=layers)
        head = EagleHead(config).eval().requires_grad_(False).to(target.model.device)
    drafter = make_drafter(drafter_name, target, draft, exit_layer=1, head=head)
    config = DecodeConfig(k=K, max_new_tokens=NEW_TOKENS, **MODES[mode])
    rows = range(batch_size)
    if drafter_name == "eagle" and mode == "compiled":
        with pytest.raises(ValueError, match=EAGLE_COMPILED_REFUSAL):
            run_batch(target, [prompts[i] for i in rows], drafter, config)
        return
    batched = run_batch(target, [prompts[i] for i in rows], drafter, config)
    for i, output in zip(rows, batched.rows):
        assert output.token_ids == moe_references[i], f"row {i}"
    stats = batched.pooled_stats()
    assert stats.num_draft_tokens > stats.num_accepted_tokens, "some drafted tokens are rejected"
