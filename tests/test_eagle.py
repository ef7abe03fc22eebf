"""The EAGLE-style head: exact output at batch 1 and in ragged batches, features aligned with the committed tokens,
a head cache that rolls back exactly, and a save/load round trip guarded by a checksum."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import TINY_VOCAB, TinyLM, reference_greedy, tiny_llama, tiny_tokenizer
from lab.decode import run_batch, run
from lab.config import DecodeConfig
from lab.drafters import EagleDrafter, EagleHead, EagleHeadConfig, make_drafter, as_batch_drafter
from lab.drafters.eagle import load_head, save_head

PROMPTS = [[5, 9, 12, 5, 9, 30, 7], [3], [11, 12, 13, 14, 11, 12, 13, 14, 11, 12], [40, 2], [21, 22, 23, 24, 25]]
SUBSET = torch.arange(0, TINY_VOCAB, 2)


FUSED = (0, 1)  # EAGLE-3 style: both layers of the tiny target, fused


def tiny_head(target_model, seed: int = 0, layers: tuple[int, ...] = ()) -> EagleHead:
    torch.manual_seed(seed)
    config = EagleHeadConfig.for_target(target_model, intermediate_size=16, target="tiny", feature_layers=layers)
    return EagleHead(config).eval().requires_grad_(False)


def fresh_features(model, token_ids: list[int], layers: tuple[int, ...] = ()) -> torch.Tensor:
    """[T, H] the target's final-norm output over token_ids, or [T, n·H] its layers' outputs, computed from scratch."""
    with torch.inference_mode():
        out = model.model(torch.tensor([token_ids], device=model.device), output_hidden_states=True)
    if not layers:
        return out.last_hidden_state[0].float()
    return torch.cat([out.hidden_states[i + 1][0] for i in layers], dim=-1).float()  # hidden_states[i + 1]: layer i's output


class CheckingEagle(EagleDrafter):
    """Asserts at every proposal that the recorded features are the target's own over committed[:-1]."""

    checked = 0

    def propose(self, contexts):
        drafts = super().propose(contexts)
        committed = contexts[0].token_ids.tolist()
        if len(committed) > 1:
            assert self.features.ids[0].tolist() == committed[:-1]
            expected = fresh_features(self.target_model, committed[:-1], self.head.config.feature_layers)
            torch.testing.assert_close(self.features.feats[0], expected, rtol=1e-4, atol=1e-4)
            # Exact rollback: the head's cache holds its real entries only, one per known feature.
            assert self.cache_lengths() == [len(committed) - 1]
        CheckingEagle.checked += 1
        return drafts


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("subset", [None, SUBSET], ids=["full", "trimmed"])
@pytest.mark.parametrize("layers", [(), FUSED], ids=["final-norm", "fused-layers"])
def test_eagle_greedy_equals_target_alone(tiny_target, prompt, k, subset, layers):
    reference = reference_greedy(tiny_target.model, prompt, 20)
    drafter = CheckingEagle(tiny_target.model, tiny_head(tiny_target.model, layers=layers), subset)
    result = run(tiny_target, prompt, drafter, DecodeConfig(k=k, max_new_tokens=20))
    assert result.token_ids == reference
    drafted = [t for s in result.steps for t in s.drafted]
    if len(prompt) > 1:
        assert drafted, "the head drafts from the first step when the prompt has 2+ tokens"
    if subset is not None:
        assert set(drafted) <= set(subset.tolist())


def test_one_token_prompt_drafts_nothing_at_first(tiny_target):
    """No target feature is known before the first verify pass: the first proposal is empty, later ones are not."""
    result = run(tiny_target, [3], EagleDrafter(tiny_target.model, tiny_head(tiny_target.model)), DecodeConfig(k=3, max_new_tokens=8))
    assert result.steps[0].drafted == ()
    assert all(len(s.drafted) for s in result.steps[1:-1])


def test_an_agreeing_head_is_fully_accepted(tiny_target):
    """A head whose prediction is the target's own next feature (cheated through the recorder) is always accepted,
    which shows that features, tokens and positions line up: the head at t reads f_t and x_{t+1} and predicts f_{t+1}."""
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 16)
    full = prompt + reference
    table = fresh_features(tiny_target.model, full)  # [T, H]

    class Peek(EagleHead):
        def forward(self, features, token_embeds, cache=None):
            # Which position is this? The cache holds one entry per earlier position.
            start = cache.get_seq_length() if cache is not None else 0
            out = super().forward(features, token_embeds, cache)
            idx = torch.arange(start + 1, start + 1 + features.shape[1]).clamp_max(len(full) - 1)
            return table[idx][None]

    head = Peek(EagleHeadConfig.for_target(tiny_target.model, intermediate_size=16)).eval()
    result = run(tiny_target, prompt, EagleDrafter(tiny_target.model, head), DecodeConfig(k=4, max_new_tokens=15))
    assert result.token_ids == reference[:15]
    assert result.stats.acceptance_rate == 1.0


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("subset", [None, SUBSET], ids=["full", "trimmed"])
@pytest.mark.parametrize("layers", [(), FUSED], ids=["final-norm", "fused-layers"])
def test_eagle_ragged_batch_equals_each_prompt_alone(tiny_target, batch_size, subset, layers):
    prompts = PROMPTS[:batch_size]
    # An EOS that only one row emits, so that row leaves the batch early (drop keeps features per row).
    references = [reference_greedy(tiny_target.model, p, 14) for p in prompts]
    eos = next((t for t in references[0][1:5] if all(t not in r for r in references[1:])), None)
    target = TinyLM(tiny_target.model, tiny_target.tokenizer, (eos,) if eos is not None else ())
    drafter = as_batch_drafter(EagleDrafter(tiny_target.model, tiny_head(tiny_target.model, layers=layers), subset))
    assert isinstance(drafter, EagleDrafter)  # batched itself: no adapter
    seen = []
    original = drafter.propose

    def checking(contexts):
        drafts = original(contexts)
        for b, ctx in enumerate(contexts):
            committed = ctx.token_ids.tolist()
            if len(committed) > 1:
                assert drafter.features.ids[b].tolist() == committed[:-1]
                expected = fresh_features(tiny_target.model, committed[:-1], layers)
                torch.testing.assert_close(drafter.features.feats[b], expected, rtol=1e-4, atol=1e-4)
                seen.append(b)
        return drafts

    drafter.propose = checking
    result = run_batch(target, prompts, drafter, DecodeConfig(k=4, max_new_tokens=14))
    for prompt, row, ref in zip(prompts, result.rows, references):
        cut = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert row.token_ids == cut
    assert seen
    if batch_size > 1 and eos is not None:
        assert result.batch_sizes[-1] < batch_size


def test_eagle_batch_rows_sample_as_alone(tiny_target):
    head = tiny_head(tiny_target.model)
    prompts = PROMPTS[:3]
    batched = run_batch(tiny_target, prompts, EagleDrafter(tiny_target.model, head), DecodeConfig(k=3, max_new_tokens=12, temperature=1.0, seed=5))
    for i, prompt in enumerate(prompts):
        alone = run(tiny_target, prompt, EagleDrafter(tiny_target.model, head), DecodeConfig(k=3, max_new_tokens=12, temperature=1.0, seed=5 + i))
        assert batched.rows[i].token_ids == alone.token_ids


@pytest.mark.parametrize(("subset", "layers"), [(None, ()), (torch.tensor([0, 2, 5]), ()), (torch.tensor([0, 2, 5]), FUSED)],
                         ids=["full", "trimmed", "trimmed-fused"])
def test_eagle_sampling_follows_target_distribution(subset, layers):
    """Temperature 1, K=2 on a vocabulary of 8: the first two emitted tokens ~ the target's own joint draws."""
    vocab = 8
    target = TinyLM(tiny_llama(seed=4, vocab_size=vocab), tiny_tokenizer(vocab))
    head = tiny_head(target.model, seed=3, layers=layers)
    prompt = [2, 5, 3]
    with torch.inference_mode():
        expected = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    samples = 1200
    counts = torch.zeros(vocab)
    drafter = EagleDrafter(target.model, head, subset)
    for seed in range(samples):
        result = run(target, prompt, drafter, DecodeConfig(k=2, max_new_tokens=3, temperature=1.0, seed=seed))
        counts[result.token_ids[0]] += 1
    tv = 0.5 * float((counts / samples - expected).abs().sum())
    assert tv < 0.07, f"total variation {tv:.3f}"
    if subset is not None:
        outside = [t for t in range(vocab) if t not in subset.tolist()]
        assert counts[outside].sum() > 0, "tokens the head cannot propose are still emitted"


@pytest.mark.parametrize("layers", [(), FUSED], ids=["final-norm", "fused-layers"])
def test_head_save_load_round_trip_and_checksum(tiny_target, tmp_path, layers):
    head = tiny_head(tiny_target.model, layers=layers)
    save_head(head, tmp_path / "h", {"train_s": 1.5}, dtype=torch.float32)
    loaded, meta = load_head(tmp_path / "h")
    assert meta == {"train_s": 1.5}
    assert loaded.config == head.config and loaded.config.feature_layers == layers
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    weights = tmp_path / "h" / "head.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_head(tmp_path / "h")
    with pytest.raises(FileNotFoundError, match="train-head"):
        load_head(tmp_path / "absent")


def test_a_head_saved_before_its_feature_norms_is_refused_with_the_command_to_retrain(tiny_target, tmp_path):
    from safetensors.torch import save_file

    head = tiny_head(tiny_target.model, layers=FUSED)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    old = {k: v for k, v in head.state_dict().items() if not k.startswith("feature_norms.")}  # the earlier layout
    save_file(old, str(tmp_path / "h" / "head.safetensors"))
    record = json.loads((tmp_path / "h" / "head.json").read_text())
    record["sha256"] = hashlib.sha256((tmp_path / "h" / "head.safetensors").read_bytes()).hexdigest()
    (tmp_path / "h" / "head.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="older version of the lab.*train-head"):
        load_head(tmp_path / "h")


def test_fused_features_are_normed_per_layer_before_the_fusion(tiny_target):
    """Raw decoder-layer outputs carry a few huge "massive activation" dims: each layer's part is RMS-normed, so
    scaling one layer's output (or one token's) leaves the fused input unchanged, and noise is relative to the norm."""
    head = tiny_head(tiny_target.model, layers=FUSED)
    with torch.no_grad():
        for norm in head.feature_norms:
            norm.weight.uniform_(0.5, 1.5)
    features = torch.randn(2, 5, 2 * head.config.hidden_size)
    scaled = features.clone()
    scaled[..., : head.config.hidden_size] *= 1000.0  # layer 0's output, a thousand times larger
    scaled[1, 2] *= 0.1  # one token's, ten times smaller
    torch.testing.assert_close(head.project(scaled), head.project(features), rtol=1e-3, atol=1e-3)
    torch.manual_seed(0)
    noisy = head.project(scaled, noise=0.05)
    change = (noisy - head.project(features)).abs().mean() / head.project(features).abs().mean()
    assert 0.005 < float(change) < 0.2  # a few percent: the noise does not scale with the 1000x layer


def test_make_drafter_eagle_and_width_check(tiny_target, tiny_draft):
    head = tiny_head(tiny_target.model)
    drafter = make_drafter("eagle", tiny_target, head=head, vocab_subset=SUBSET)
    assert isinstance(drafter, EagleDrafter) and drafter.name == "eagle"
    wide = TinyLM(tiny_llama(seed=2, hidden=64), tiny_tokenizer())
    with pytest.raises(ValueError, match="eagle requires a head trained for this target"):
        EagleDrafter(wide.model, head)


def test_hooks_are_removed_with_the_drafter(tiny_target):
    import gc

    gc.collect()  # drafters of earlier tests that wait in reference cycles drop their hooks now, not mid-test
    layers = tiny_target.model.model.layers
    before = len(tiny_target.model._forward_pre_hooks), [len(layer._forward_hooks) for layer in layers]
    drafter = EagleDrafter(tiny_target.model, tiny_head(tiny_target.model, layers=FUSED))
    run(tiny_target, PROMPTS[0], drafter, DecodeConfig(k=2, max_new_tokens=4))
    assert len(tiny_target.model._forward_pre_hooks) == before[0] + 1
    assert [len(layer._forward_hooks) for layer in layers] == [n + (i in FUSED) for i, n in enumerate(before[1])]
    del drafter
    gc.collect()
    assert (len(tiny_target.model._forward_pre_hooks), [len(layer._forward_hooks) for layer in layers]) == before


def test_the_shipped_smollm2_head_loads_and_fits_smollm2():
    """assets/heads/smollm2-135m: under 15 MB, checksum verified on load, SmolLM2's width and vocabulary."""
    from lab.prompts import REPO_ROOT

    folder = REPO_ROOT / "assets" / "heads" / "smollm2-135m"
    assert (folder / "head.safetensors").stat().st_size <= 15_000_000
    head, meta = load_head(folder)
    assert (head.config.hidden_size, head.config.vocab_size, head.config.target) == (576, 49152, "smollm2-135m")
    assert meta["train_s"] + meta["collect_s"] < 30 * 60  # trained within the 30 minutes on the 2-core CPU


@pytest.mark.parametrize("mode", ["static", "auto"])
@pytest.mark.parametrize("layers", [(), FUSED], ids=["final-norm", "fused-layers"])
def test_eagle_runs_exact_in_the_static_engine(tiny_target, mode, layers):
    """The head reads the target's passes through hooks: the static engine runs them; auto never compiles them away."""
    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 16)
    result = run(tiny_target, prompt, EagleDrafter(tiny_target.model, tiny_head(tiny_target.model, layers=layers)),
                 DecodeConfig(k=3, max_new_tokens=16, engine_mode=mode))
    assert result.token_ids == reference and result.stats.num_draft_tokens > 0


def test_eagle_refuses_the_compiled_engine_by_name(tiny_target):
    with pytest.raises(ValueError, match="pick the eager or static engine"):
        run(tiny_target, PROMPTS[0], EagleDrafter(tiny_target.model, tiny_head(tiny_target.model)),
            DecodeConfig(k=3, max_new_tokens=8, engine_mode="compiled", compile_backend="eager"))


def test_eagle3_layers_and_bad_feature_layers(tiny_target):
    from lab.drafters.eagle import eagle3_layers

    assert eagle3_layers(30) == (2, 15, 27) and eagle3_layers(28) == (2, 14, 25)  # SmolLM2-135M, Qwen2.5-1.5B
    assert eagle3_layers(2) == (0, 1)
    with pytest.raises(ValueError, match=r"feature layers require 0 .. 2 \(the target's layers\); got \[3\]"):
        EagleHeadConfig.for_target(tiny_target.model, 16, feature_layers=(0, 3))


def test_a_decode_resumed_on_other_threads_keeps_drafting_exactly(tiny_target):
    """Step-through resumes the paused decode on a new thread at every click: the recorder follows the proposal's
    thread, so the head keeps its features (it crashed on the third cycle when it recorded only the first thread)."""
    import threading

    from lab.trace import Finished, Step
    from lab.decode import decode

    prompt = PROMPTS[0]
    reference = reference_greedy(tiny_target.model, prompt, 16)
    drafter = CheckingEagle(tiny_target.model, tiny_head(tiny_target.model, layers=FUSED))
    events = decode(tiny_target, prompt, drafter, DecodeConfig(k=3, max_new_tokens=16))
    seen, errors = [], []

    def advance():
        try:
            seen.append(next(events))
        except Exception as error:  # noqa: BLE001 - reported below, not swallowed
            errors.append(error)

    while not errors and (not seen or not isinstance(seen[-1], Finished)):
        worker = threading.Thread(target=advance)
        worker.start()
        worker.join()
    assert not errors, errors
    steps = [e for e in seen if isinstance(e, Step)]
    assert len(steps) > 3 and all(s.drafted for s in steps[:-1])  # the head drafted at every cycle but the budget's last
    assert list(seen[-1].token_ids) == reference
