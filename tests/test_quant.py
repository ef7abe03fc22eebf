"""Tests of precisions and quantisation: lab.models' precision argument and memory helpers, lab.studies.precision.

Tiny random Llamas are saved as bf16 folders and loaded through
``load_model(folder, precision=...)`` exactly as a preset would be, so every
test quantises with bitsandbytes on the CPU in well under a second. The tiny
sizes are multiples of 64: bitsandbytes' 4-bit formats quantise in blocks of 64.
Their inner activations are kept below LLM.int8's outlier threshold (6), where
int8 is exact; ``test_int8_outlier_columns_make_a_token_depend_on_its_batch_mates``
shows what happens above it. Exactness tests compute in fp32 (``dtype="fp32"``),
as the lab's exactness tests of float models do: in bf16 a pass over K+1 tokens
rounds differently from a pass over one, which flips this tiny model's near-ties.
Tests marked ``real_model`` load SmolLM2 in int8 and nf4 and decode a few tokens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json

import pytest
import torch

from conftest import TEST_DEVICE, tiny_llama, tiny_tokenizer
from lab import hardware, models
from lab.studies.compare import DrafterSpec, run_comparison
from lab.config import DecodeConfig
from lab.drafters import make_drafter
from lab.kv import RaggedCache
from lab.decode import decode, run
from lab.hardware import PRECISIONS, host_float_precision, resolve_precision
from lab.models import (
    LoadedModel,
    ModelError,
    cache_bytes,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    load_model,
    weight_bytes,
)
from lab.studies.precision import PrecisionStudy, first_divergence, model_ref, parse_model_ref, part_ways, run_memory, run_precision_study
from lab.trace import Finished, Step

PROMPT = [3, 7, 9, 3, 7, 12, 5, 3, 7, 9]  # repeats "3 7" so prompt lookup drafts something
QUANTIZED = ("int8", "nf4", "fp4")
INT8_OUTLIER_THRESHOLD = 6.0  # bitsandbytes' default llm_int8_threshold


def tiny_model_without_outliers(seed: int, layers: int) -> torch.nn.Module:
    """``tiny_llama`` (hidden 64) with the value, gate and up projections scaled down, so no linear
    layer sees an input of magnitude >= 6 (LLM.int8's outliers); its logits stay peaked (no near-ties)."""
    model = tiny_llama(seed=seed, layers=layers, hidden=64)
    for layer in model.model.layers:
        for linear in (layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
            linear.weight.mul_(0.25)
    return model


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, str]:
    """Folders of a tiny target (3 layers) and draft (1 layer) saved in bf16, sharing one tokenizer."""
    folders = {}
    for role, seed, layers in (("target", 0, 3), ("draft", 1, 1)):
        folder = tmp_path_factory.mktemp(role)
        tiny_model_without_outliers(seed, layers).to(torch.bfloat16).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders[role] = str(folder)
    return folders


@pytest.fixture(scope="module")
def tiny_loaded(tiny_folders):
    """``loaded(role, precision, compute="bf16")``: the tiny target or draft, each loaded once."""
    cache: dict[tuple[str, str, str], LoadedModel] = {}

    def loaded(role: str, precision: str, compute: str = "bf16") -> LoadedModel:
        if (role, precision, compute) not in cache:
            dtype = compute if precision in QUANTIZED else None
            cache[role, precision, compute] = load_model(tiny_folders[role], device=TEST_DEVICE, dtype=dtype, precision=precision)
        return cache[role, precision, compute]

    return loaded


# ---------------------------------------------------------------- resolving a precision


@pytest.mark.parametrize(
    "asked, expected",
    [
        ("fp32", "fp32"),
        ("bf16", "bf16"),
        ("fp16", "fp16"),  # torch computes in fp16 on this CPU
        ("auto", host_float_precision("cpu")),  # as resolve_dtype: measured on this host
        (None, host_float_precision("cpu")),
        (torch.float32, "fp32"),
        ("int8", "int8"),
        ("nf4", "nf4"),
        ("fp4", "fp4"),
    ],
)
def test_resolve_precision(asked, expected):
    assert resolve_precision(asked, "cpu") == expected


@pytest.mark.parametrize("asked", ["int4", "float32", "q4_k_m", ""])
def test_unknown_precision_lists_the_accepted_ones(asked):
    with pytest.raises(ValueError, match="precision requires one of 'auto', 'fp32'.*'fp4'; got"):
        resolve_precision(asked, "cpu")


def test_a_dtype_the_device_cannot_compute_in_is_refused(monkeypatch):
    # Stands in for a GPU without fp16/bf16 kernels: the probe matmul fails.
    monkeypatch.setattr(hardware, "_computes_in", lambda dtype, device: dtype == torch.float32)
    with pytest.raises(ValueError, match="precision 'fp16' requires a device that computes in torch.float16"):
        resolve_precision("fp16", "cpu")


def test_quantised_precision_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelError, match=r"(?s)requires the bitsandbytes package.*pip install bitsandbytes==0.50.2"):
        load_model("smollm2-135m", device="cpu", precision="nf4")  # refused before any preparation or loading


def test_float_precision_contradicting_dtype_is_refused(tiny_folders):
    with pytest.raises(ValueError, match="precision 'bf16' and dtype 'fp32' disagree"):
        load_model(tiny_folders["target"], device="cpu", dtype="fp32", precision="bf16")


# ---------------------------------------------------------------- loading and memory


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantised_tiny_model_loads_with_bitsandbytes_layers(tiny_loaded, precision):
    loaded = tiny_loaded("target", precision)
    layer = type(loaded.model.model.layers[0].self_attn.q_proj).__name__
    assert loaded.precision == precision and loaded.is_quantized
    assert layer == ("Linear8bitLt" if precision == "int8" else "Linear4bit")
    assert loaded.dtype == torch.bfloat16  # compute dtype: embeddings, norms, LM head, activations
    assert type(loaded.model.lm_head).__name__ == "Linear"  # the LM head stays unquantised
    assert loaded.num_parameters == tiny_loaded("target", "bf16").num_parameters  # packed 4-bit counted as weights
    assert loaded.load_s > 0


def test_quantised_compute_dtype_follows_dtype(tiny_folders):
    loaded = load_model(tiny_folders["target"], device="cpu", dtype="fp32", precision="nf4")
    assert loaded.precision == "nf4" and loaded.dtype == torch.float32
    assert loaded.model.model.layers[0].mlp.up_proj.compute_dtype == torch.float32


def test_weight_memory_is_ordered_by_precision(tiny_loaded):
    sizes = {p: tiny_loaded("target", p).weight_bytes for p in ("nf4", "int8", "bf16", "fp32")}
    assert 0 < sizes["nf4"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    assert tiny_loaded("target", "fp4").weight_bytes == sizes["nf4"]  # same packing, another code book


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_weight_bytes_counts_quantisation_scales(tiny_loaded, precision):
    model = tiny_loaded("target", precision).model
    parameters_only = sum(p.numel() * p.element_size() for p in model.parameters())
    scales = 0
    for p in model.parameters():
        if getattr(p, "SCB", None) is not None:
            scales += p.SCB.numel() * 4  # int8: one fp32 scale per output row
        if getattr(p, "quant_state", None) is not None:
            scales += p.quant_state.absmax.numel() * 4  # 4-bit: one fp32 absmax per block of 64
    assert scales > 0
    assert weight_bytes(model) >= parameters_only + scales


def test_kv_cache_bytes_matches_a_real_cache(tiny_loaded):
    target = tiny_loaded("target", "nf4")
    ragged = RaggedCache(target.model, 1)
    events = list(decode(target, PROMPT, None, DecodeConfig(max_new_tokens=6), target_cache=ragged))
    cache = ragged.cache
    assert isinstance(events[-1], Finished)
    assert cache.get_seq_length() > 0
    assert cache_bytes(cache) == kv_cache_bytes(target.model, cache.get_seq_length())
    # 2 (K, V) x 3 layers x 2 KV heads x head size 16 x 2 bytes (bf16: only weights are quantised)
    assert kv_cache_bytes_per_token(target.model) == 2 * 3 * 2 * 16 * 2


# ---------------------------------------------------------------- exactness relative to the target as loaded


@pytest.mark.parametrize("precision", ["int8", "nf4", "fp4"])
@pytest.mark.parametrize("drafter_name", ["prompt-lookup", "layer-skip", "draft-model"])
def test_speculative_greedy_equals_the_same_quantised_target_alone(tiny_loaded, precision, drafter_name):
    target = tiny_loaded("target", precision, "fp32")
    draft = tiny_loaded("draft", precision, "fp32") if drafter_name == "draft-model" else None
    config = DecodeConfig(k=3, max_new_tokens=24)
    with largest_linear_input(target.model) as seen:
        alone = run(target, PROMPT, None, config)
        drafter = make_drafter(drafter_name, target, draft, exit_layer=1)
        speculative = run(target, PROMPT, drafter, config)
    assert seen["max"] < INT8_OUTLIER_THRESHOLD  # the precondition of int8's exactness (see the next test)
    assert speculative.stats.num_draft_tokens > 0  # the drafter did draft
    assert speculative.token_ids == alone.token_ids


def test_int8_outlier_columns_make_a_token_depend_on_its_batch_mates(tiny_loaded):
    # LLM.int8 computes every input column holding an |x| >= 6 in fp16, for all rows of the pass.
    # So one token's result changes when another token in the same pass (a verify pass over K+1
    # tokens) has an outlier: an int8 target alone (one token a pass) and the same target verifying
    # drafts can part at a near-tie. Without the decomposition (threshold 0) rows are independent.
    layer = tiny_loaded("target", "int8").model.model.layers[0].mlp.down_proj
    generator = torch.Generator().manual_seed(0)
    token = torch.randn(1, layer.in_features, generator=generator, dtype=torch.float32).to(TEST_DEVICE, torch.bfloat16)
    outlier_mate = token.clone()
    outlier_mate[0, :8] = 20.0
    threshold = layer.state.threshold
    try:
        alone, in_batch = layer(token)[0], layer(torch.cat([token, outlier_mate]))[0]
        assert threshold == INT8_OUTLIER_THRESHOLD and not torch.equal(alone, in_batch)
        layer.state.threshold = 0.0
        assert torch.equal(layer(token)[0], layer(torch.cat([token, outlier_mate]))[0])
    finally:
        layer.state.threshold = threshold


@contextlib.contextmanager
def largest_linear_input(model: torch.nn.Module):
    """Record the largest |input| any linear layer but the LM head sees, in ``seen["max"]``."""
    seen = {"max": 0.0}

    def record(module, inputs, output):
        seen["max"] = max(seen["max"], float(inputs[0].abs().max()))

    hooks = [
        module.register_forward_hook(record)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def test_layer_skip_on_a_quantised_target_shares_its_quantised_layers(tiny_loaded):
    target = tiny_loaded("target", "int8")
    drafter = make_drafter("layer-skip", target, exit_layer=2)
    assert drafter.model.model.layers[0] is target.model.model.layers[0]
    assert type(drafter.model.model.layers[1].mlp.down_proj).__name__ == "Linear8bitLt"
    assert weight_bytes(drafter.model) < target.weight_bytes  # a view of part of the target, nothing new


def test_a_quantised_draft_never_changes_the_output(tiny_loaded):
    target, draft = tiny_loaded("target", "fp32"), tiny_loaded("draft", "nf4")
    config = DecodeConfig(k=4, max_new_tokens=24)
    alone = run(target, PROMPT, None, config)
    assert run(target, PROMPT, make_drafter("draft-model", target, draft), config).token_ids == alone.token_ids


# ---------------------------------------------------------------- memory rows of a run


def last_step(target, drafter, config=DecodeConfig(k=3, max_new_tokens=12)) -> Step:
    return [e for e in decode(target, PROMPT, drafter, config) if isinstance(e, Step)][-1]


def test_run_memory_of_a_draft_model_counts_its_weights_and_cache(tiny_loaded):
    target, draft = tiny_loaded("target", "int8"), tiny_loaded("draft", "nf4")
    drafter = make_drafter("draft-model", target, draft)
    step = last_step(target, drafter)
    rows = run_memory(target, drafter, draft, step.target_cache_len, step.draft_cache_len)
    assert [(r.role, r.precision) for r in rows] == [("target", "int8"), ("draft", "nf4")]
    assert rows[0].weight_bytes == target.weight_bytes and rows[1].weight_bytes == draft.weight_bytes
    assert rows[0].kv_cache_bytes == kv_cache_bytes(target.model, step.target_cache_len) > 0
    assert rows[1].kv_cache_bytes == kv_cache_bytes(draft.model, step.draft_cache_len) > 0
    assert rows[1].load_s == draft.load_s


def test_run_memory_of_layer_skip_has_no_weights_of_its_own(tiny_loaded):
    target = tiny_loaded("target", "nf4")
    drafter = make_drafter("layer-skip", target, exit_layer=1)
    step = last_step(target, drafter)
    target_row, draft_row = run_memory(target, drafter, None, step.target_cache_len, step.draft_cache_len)
    assert draft_row.weight_bytes == 0 and draft_row.load_s is None
    assert "first 1 layers" in draft_row.name
    # one layer of three: a third of the target's KV per token
    assert kv_cache_bytes_per_token(drafter.model) * 3 == kv_cache_bytes_per_token(target.model)
    assert draft_row.kv_cache_bytes == kv_cache_bytes(drafter.model, step.draft_cache_len) > 0


def test_run_memory_of_prompt_lookup_is_the_target_only(tiny_loaded):
    target = tiny_loaded("target", "bf16")
    assert [r.role for r in run_memory(target, make_drafter("prompt-lookup", target), None, 20)] == ["target"]


# ---------------------------------------------------------------- where outputs part


@pytest.mark.parametrize(
    "output, reference, expected",
    [
        ([1, 2, 3], [1, 2, 3], None),  # identical
        ([1, 2, 3], [1, 5, 3], 1),  # a flipped token
        ([9, 2], [1, 2], 0),  # from the first token
        ([1, 2], [1, 2, 3], 2),  # a shorter output (stopped early) parts where it ends
        ([], [], None),
    ],
)
def test_first_divergence(output, reference, expected):
    assert first_divergence(output, reference) == expected


def test_part_ways_shows_the_shared_text_and_both_continuations():
    tokenizer = tiny_tokenizer()
    parting = part_ways(tokenizer, [3, 4, 5, 6], [3, 4, 9, 10], next_tokens=2)
    assert parting.index == parting.num_common == 2
    assert parting.common_text == "t3 t4"
    assert (parting.output_next, parting.reference_next) == ("t5 t6", "t9 t10")
    assert part_ways(tokenizer, [3, 4], [3, 4]) is None


@pytest.mark.parametrize(
    "ref, expected",
    [("qwen2.5-coder-0.5b@int8", ("qwen2.5-coder-0.5b", "int8")), ("smollm2-135m", ("smollm2-135m", "bf16"))],
)
def test_model_refs(ref, expected):
    assert parse_model_ref(ref) == expected
    assert model_ref(*expected) == (ref if "@" in ref else ref + "@bf16")


# ---------------------------------------------------------------- settings and the study


def test_comparison_settings_record_each_models_precision(tiny_loaded):
    target, draft = tiny_loaded("target", "nf4"), tiny_loaded("draft", "int8")
    comparison = run_comparison(target, ["t3 t7 t9 t3 t7"], [DrafterSpec("draft-model", draft="tiny-draft")], [2],
                                DecodeConfig(max_new_tokens=4), load_draft=lambda name: draft, chat_template=False)
    assert comparison.settings["target_precision"] == "nf4"
    assert comparison.settings["draft_precisions"] == {"tiny-draft": "int8"}


def test_precision_study_on_tiny_models(tiny_loaded):
    roles = {"tiny-target": "target", "tiny-draft": "draft"}
    drafters = {
        "fp32": [DrafterSpec("draft-model", draft=model_ref("tiny-draft", p)) for p in ("fp32", "nf4")],
        "int8": [DrafterSpec("layer-skip", exit_layer=1)],
        "nf4": [DrafterSpec("prompt-lookup")],
    }
    study = run_precision_study("tiny-target", drafters, ["t3 t7 t9 t3 t7 t12", "t5 t6 t5 t6 t5"],
                                DecodeConfig(k=3, max_new_tokens=10), reference_precision="fp32", chat_template=False,
                                load=lambda name, precision: tiny_loaded(roles[name], precision, "fp32"))
    summary = study.summary()
    assert len(summary) == 4 and set(summary.target_precision) == {"fp32", "int8", "nf4"}
    assert (summary.identical_to_target == 1.0).all()  # exact relative to each target as loaded
    assert (summary.prompts == 2).all()
    reference = summary[summary.target_precision == "fp32"]
    assert (reference.differs_from_reference == 0.0).all() and reference.median_parting_token.isna().all()
    assert (reference.target_speed_vs_reference == 1.0).all()
    assert list(reference.draft_precision) == ["fp32", "nf4"]
    assert reference.draft_weight_mib.iloc[1] < reference.draft_weight_mib.iloc[0]
    layer_skip = summary[summary.target_precision == "int8"].iloc[0]
    assert layer_skip.draft_weight_mib == 0.0 and layer_skip.draft_precision == "int8"  # shares the target's layers
    assert summary.total_weight_mib.gt(0).all()
    assert all(0.0 <= f <= 1.0 for f in summary.differs_from_reference)
    saved = json.loads(study.to_json())
    reloaded = PrecisionStudy.from_json(study.to_json()).summary()
    assert reloaded.equals(summary)
    assert set(saved["comparisons"]) == {"fp32", "int8", "nf4"}
    assert saved["models"]["tiny-target@nf4"]["precision"] == "nf4"
    assert saved["comparisons"]["int8"]["settings"]["target_precision"] == "int8"
    assert saved["comparisons"]["fp32"]["settings"]["draft_precisions"] == {"tiny-draft@fp32": "fp32", "tiny-draft@nf4": "nf4"}


def test_precision_study_refuses_nothing_to_run():
    with pytest.raises(ValueError, match="at least one prompt"):
        run_precision_study("x", {"bf16": []}, ["  "], DecodeConfig())
    with pytest.raises(ValueError, match="at least one target precision"):
        run_precision_study("x", {}, ["hello"], DecodeConfig())


# ---------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    """``smollm2(precision)``: SmolLM2 loaded once per precision."""
    loaded: dict[str, LoadedModel] = {}

    def get(precision: str) -> LoadedModel:
        if precision not in loaded:
            loaded[precision] = load_model("smollm2-135m", device="cpu", precision=precision)
        return loaded[precision]

    return get


@pytest.mark.real_model
@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_smollm2_quantised_decodes_and_speculation_equals_it_alone(smollm2, precision):
    target = smollm2(precision)
    prompt = models.encode_prompt(target, "Repeat exactly: the cat sat on the mat, the cat sat on the mat.")
    config = DecodeConfig(k=3, max_new_tokens=8)
    alone = run(target, prompt, None, config)
    assert len(alone.token_ids) > 0 and alone.text.strip()
    for name in ("prompt-lookup", "layer-skip"):
        speculative = run(target, prompt, make_drafter(name, target), config)
        assert speculative.token_ids == alone.token_ids, name


@pytest.mark.real_model
def test_smollm2_weight_memory_is_ordered(smollm2):
    sizes = {p: smollm2(p).weight_bytes for p in ("nf4", "int8", "bf16")}
    assert 0 < sizes["nf4"] < sizes["int8"] < sizes["bf16"]
    # bf16: 2 bytes per weight, tied embeddings counted once
    assert sizes["bf16"] == pytest.approx(2 * smollm2("bf16").num_parameters, rel=0.01)


def test_precisions_constant_lists_all_six():
    assert PRECISIONS == ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")
