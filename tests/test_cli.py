"""The command line: generate's JSON shape and human output on a tiny model folder; bad input exits 2."""

from __future__ import annotations

import io
import json

import pytest

from conftest import tiny_llama, tiny_tokenizer
from lab.cli import STYLES, TokenPrinter, main
from lab.trace import Step

PROMPT = "t5 t6 t7 t5 t6 t7 t5"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Folders holding a tiny random target (3 layers) and draft (1 layer) with the same word-level tokenizer."""
    root = tmp_path_factory.mktemp("tiny_cli")
    folders = {}
    for name, seed, layers in (("target", 0, 3), ("draft", 1, 1)):
        folder = root / name
        tiny_llama(seed=seed, layers=layers).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def generate(tiny_dirs, *extra: str) -> list[str]:
    return ["generate", "--target", tiny_dirs["target"], "--dtype", "fp32", "--device", "cpu",
            "--max-new-tokens", "10", "--prompt", PROMPT, *extra]


DRAFTER_ARGS = {
    "none": ["--drafter", "none"],
    "prompt-lookup": ["--drafter", "prompt-lookup", "--min-n", "1", "--max-n", "2"],
    "layer-skip": ["--drafter", "layer-skip", "--exit-layer", "1"],
    "draft-model": ["--drafter", "draft-model", "--draft", "DRAFT"],
}


@pytest.mark.parametrize("drafter", list(DRAFTER_ARGS))
def test_generate_json_shape(tiny_dirs, capsys, drafter):
    args = [a.replace("DRAFT", tiny_dirs["draft"]) for a in DRAFTER_ARGS[drafter]]
    assert main(generate(tiny_dirs, *args, "--k", "3", "--json", "--compare-baseline")) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["settings"]["drafter"] == drafter
    assert report["settings"]["k"] == 3 and report["settings"]["dtype"] == "float32"
    metrics = report["metrics"]
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "per_position_acceptance_rate",
                 "acceptance_rate", "mean_acceptance_length", "target_forward_passes", "wall_s", "tokens_per_s"):
        assert name in metrics, name
    steps = report["steps"]
    assert len(steps) == metrics["target_forward_passes"]
    # The steps' emitted tokens are the output; accepted tokens are a prefix of each draft.
    assert [t for step in steps for t in step["emitted"]] == report["token_ids"]
    assert all(step["drafted"][: len(step["accepted"])] == step["accepted"] for step in steps)
    assert all(len(step["drafted"]) <= 3 for step in steps)
    # Greedy speculative output equals the target alone.
    assert report["identical_to_baseline"] is True
    assert report["baseline"]["token_ids"] == report["token_ids"]
    assert report["baseline"]["text"] == report["text"]
    assert report["speedup"] > 0


def test_generate_human_output_colours_tokens_on_request(tiny_dirs, capsys):
    # The target drafting for itself: every draft is accepted, so accepted (green) and bonus tokens appear.
    argv = generate(tiny_dirs, "--drafter", "draft-model", "--draft", tiny_dirs["target"], "--k", "2", "--color", "always")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert STYLES["accepted"] in out and STYLES["bonus"] in out
    assert "acceptance rate 100.0%" in out and "mean acceptance length 3.00" in out


def test_generate_human_output_is_plain_without_a_terminal(tiny_dirs, capsys):
    assert main(generate(tiny_dirs, "--drafter", "prompt-lookup", "--compare-baseline")) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out
    assert "tokens/s" in out and "output identical: yes" in out


def test_token_printer_shows_rejected_drafts_struck_through():
    out = io.StringIO()
    printer = TokenPrinter(tiny_tokenizer(), out, color=True)
    # Drafted t5 t6 t7; t5 accepted, t6 rejected, the target's t9 in its place.
    printer.step(Step(0, (5, 6, 7), 1, (5, 9), "corrected", 0.0, 0.0, 3))
    assert out.getvalue() == (
        f"{STYLES['accepted']}t5\033[0m{STYLES['rejected']}[t6]\033[0m{STYLES['corrected']} t9\033[0m"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", "t5", "--k", "0"], "K (num_speculative_tokens) requires an integer in 1..16; got 0"),
        (["--prompt", "t5", "--k", "17"], "requires an integer in 1..16; got 17"),
        (["--prompt", "t5", "--max-new-tokens", "0"], "max_new_tokens requires"),
        (["--prompt", "t5", "--temperature", "-1"], "temperature requires"),
        (["--prompt", "t5", "--drafter", "draft-model"], "--drafter draft-model requires --draft"),
        (["--prompt", "t5", "--draft", "x"], "--draft is only used with --drafter draft-model"),
        (["--prompt", "t5", "--drafter", "prompt-lookup", "--min-n", "3", "--max-n", "2"], "1 <= --min-n <= --max-n"),
        (["--prompt-file", "/no/such/prompt.txt"], "prompt file '/no/such/prompt.txt' does not exist"),
        (["--prompt-file", "/"], "prompt file '/' is a folder"),
        (["--prompt", "t5", "--drafter", "medusa"], "invalid choice: 'medusa'"),
        ([], "one of the arguments --prompt --prompt-file is required"),
    ],
)
def test_bad_generate_input_exits_2_with_one_line(tiny_dirs, capsys, argv, message):
    assert main(["generate", "--target", tiny_dirs["target"], *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_unknown_model_exits_2_listing_presets(capsys):
    assert main(["generate", "--target", "gpt-9", "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'gpt-9'" in err and "smollm2-135m" in err and err.count("\n") == 1


def test_layer_skip_exit_out_of_range_exits_2(tiny_dirs, capsys):
    assert main(generate(tiny_dirs, "--drafter", "layer-skip", "--exit-layer", "3")) == 2
    assert "exit layer in 1..2" in capsys.readouterr().err


def test_draft_with_another_tokenizer_is_refused_before_decoding(tiny_dirs, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_llama(seed=2, layers=1).save_pretrained(other)
    tiny_tokenizer(prefix="w").save_pretrained(other)  # same size, other words: ids mean other text
    assert main(generate(tiny_dirs, "--drafter", "draft-model", "--draft", str(other))) == 2
    assert "not the target's" in capsys.readouterr().err


@pytest.mark.real_model
def test_smollm2_target_with_qwen_draft_is_refused_naming_both_tokenizers(capsys):
    from lab.models import is_prepared

    if not (is_prepared("smollm2-135m") and is_prepared("qwen2.5-coder-0.5b")):
        pytest.skip("needs smollm2-135m and qwen2.5-coder-0.5b prepared (python -m lab prepare)")
    argv = ["generate", "--target", "smollm2-135m", "--drafter", "draft-model", "--draft", "qwen2.5-coder-0.5b",
            "--prompt", "hello"]
    assert main(argv) == 2  # refused from the tokenizers alone: no weights are loaded
    err = capsys.readouterr().err
    assert "smollm2-135m" in err and "qwen2.5-coder-0.5b" in err and "tokenizer" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "gpt-9"], "Unknown model 'gpt-9'"),
        (["bench"], "--target"),
        ([], "a command is required"),
        (["peer", "--target", "x", "--drafter", "none"], "invalid choice: 'none'"),
        (["peer", "--target", "x", "--drafter", "prompt-lookup", "--prompts", "no_such_set"], "prompt set requires"),
    ],
)
def test_other_commands_refuse_bad_input(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_models_lists_every_preset(capsys):
    from lab.models import PRESETS

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_help_exits_0(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--compare-baseline" in capsys.readouterr().out


def test_moe_cost_help_says_what_it_does(capsys):
    assert main(["moe-cost", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Mixture-of-Experts" in out.split("options:")[0] and "--active-dense" in out


@pytest.mark.parametrize("command", ["train-head", "token-freq"])
def test_commands_without_a_draft_model_do_not_offer_draft_quant(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--target-quant" in out and "--draft-quant" not in out


def test_peer_on_a_tiny_model_prints_the_table_and_writes_json(tiny_dirs, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": PROMPT}) + "\n" + json.dumps({"id": 2, "prompt": "t9 t3 t12"}) + "\n")
    out_file = tmp_path / "peer.json"
    argv = ["peer", "--target", tiny_dirs["target"], "--drafter", "draft-model", "--draft", tiny_dirs["draft"],
            "--dtype", "fp32", "--k", "2", "--max-new-tokens", "6", "--prompts", str(prompts), "--no-warmup",
            "--out", str(out_file)]
    assert main(argv) == 0
    assert "ours/HF assist" in capsys.readouterr().out
    data = json.loads(out_file.read_text())
    assert data["summaries"][0]["speculative_identical_to_baseline"] == 2


def test_bench_json_holds_every_batch_size(tiny_dirs, capsys):
    argv = ["bench", "--target", tiny_dirs["target"], "--dtype", "fp32", "--device", "cpu", "--drafter", "prompt-lookup",
            "--k", "3", "--batch-sizes", "1,2", "--max-new-tokens", "6", "--prompts", "summarization:2", "--raw", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in result["results"]] == [1, 2]
    for row in result["results"]:
        for mode in ("off", "on"):
            assert row[mode]["tokens_per_s"] > 0
            assert row[mode]["latency_p50_s"] > 0


def test_compare_writes_a_reloadable_results_file(tiny_dirs, tmp_path, capsys):
    from lab.studies.compare import Comparison

    out = tmp_path / "compare.json"
    argv = ["compare", "--target", tiny_dirs["target"], "--dtype", "fp32", "--device", "cpu",
            "--drafters", "prompt-lookup", "layer-skip", "--exit-layer", "1", "--ks", "2", "4",
            "--max-new-tokens", "6", "--prompts", "summarization:2", "--raw", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "prompt-lookup (n 1-3)" in table and "layer-skip (exit 1)" in table
    comparison = Comparison.from_json(out.read_text())
    assert len(comparison.runs) == 2 * (1 + 2 * 2)
    assert (comparison.summary().identical_to_target == 1.0).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--naive-grammar"], "--naive-grammar requires a constraint"),
        (["--json-schema", "no_such_schema.json"], "schema file 'no_such_schema.json' does not exist"),
        (["--target-quant", "int3"], "invalid choice: 'int3'"),
    ],
)
def test_generate_refuses_bad_constraint_and_precision_flags(tiny_dirs, capsys, extra, message):
    assert main(generate(tiny_dirs, "--drafter", "none", *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-sizes", "0,2"], "--batch-sizes requires integers >= 1"),
        (["--batch-sizes", "a"], "--batch-sizes requires comma-separated integers"),
        (["--any-json", "--naive-grammar"], "bench requires the exact grammar mode; got --naive-grammar"),
    ],
)
def test_bench_refuses_bad_input(tiny_dirs, capsys, extra, message):
    argv = ["bench", "--target", tiny_dirs["target"], "--drafter", "prompt-lookup", "--prompts", "summarization:2", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_with_a_json_schema_is_valid_and_identical_to_the_target_alone(tmp_path, capsys):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                                  "required": ["name", "age"]}))
    argv = ["generate", "--target", "smollm2-135m", "--dtype", "fp32", "--drafter", "prompt-lookup", "--k", "4",
            "--max-new-tokens", "40", "--json-schema", str(schema), "--json", "--compare-baseline",
            "--prompt", "Extract the person as JSON with name and age: Maria Lopez is 34 years old."]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["constraint_valid"] is True
    assert report["identical_to_baseline"] is True
    assert json.loads(report["text"])["age"] == 34


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    """Calibrations go to a fresh cache folder (they are cached per machine and pair)."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))


def test_calibrate_prints_what_it_measured_and_chose(tiny_dirs, capsys, own_cache):
    argv = ["calibrate", "--target", tiny_dirs["target"], "--draft", tiny_dirs["draft"], "--device", "cpu",
            "--ks", "1", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "bf16: target step" in text and "fp32: target step" in text and "fastest speculation is" in text
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["precision"] in ("bf16", "fp32") and data["k"] in (1, 3) and data["drafter"] == "draft-model"
    assert {t["precision"] for t in data["timings"]} == {"bf16", "fp32"}


def test_generate_k_auto_and_dtype_auto_follow_the_calibration(tiny_dirs, capsys, own_cache):
    argv = ["generate", "--target", tiny_dirs["target"], "--device", "cpu", "--max-new-tokens", "8", "--prompt", PROMPT,
            "--drafter", "draft-model", "--draft", tiny_dirs["draft"], "--k", "auto", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    # The calibration that --k auto made is cached: `calibrate` reads it back.
    assert main(["calibrate", "--target", tiny_dirs["target"], "--draft", tiny_dirs["draft"], "--device", "cpu",
                 "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert report["settings"]["k"] == chosen["k"]
    assert report["settings"]["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[chosen["precision"]]
    assert "from this machine's calibration" in captured.err


@pytest.mark.parametrize("engine", ["static", "compiled"])
def test_generate_engine_modes_are_identical_to_the_target_alone(tiny_dirs, capsys, engine):
    args = ["--drafter", "draft-model", "--draft", tiny_dirs["draft"], "--k", "3", "--engine", engine]
    assert main(generate(tiny_dirs, *args, "--json", "--compare-baseline")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["engine_mode"] == engine and report["identical_to_baseline"] is True


def test_k_auto_needs_a_calibrated_drafter(tiny_dirs, capsys):
    assert main(generate(tiny_dirs, "--drafter", "layer-skip", "--k", "auto")) == 2
    assert "--k auto requires --drafter draft-model or prompt-lookup" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "message"), [("2,x", "eagle3, final or comma-separated layer indices; got '2,x'"),
                                               ("0,9", "indices in 0 .. 2 (the target's layers); got '0,9'")])
def test_train_head_refuses_bad_feature_layers(tiny_dirs, capsys, spec, message):
    model = ["--target", tiny_dirs["target"], "--dtype", "fp32", "--device", "cpu"]
    assert main(["train-head", *model, "--feature-layers", spec, "--minutes", "0.01"]) == 2
    assert message in capsys.readouterr().err


def test_train_head_token_freq_and_generate_with_the_trained_head(tiny_dirs, tmp_path, monkeypatch, capsys):
    """train-head saves a head (and the frequency table) in the model cache; generate then drafts with it, trimmed."""
    from lab.drafters.eagle import head_dir, load_head

    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    questions = tmp_path / "question.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [f"t{i % 40 + 3} t{i % 7 + 3} t5"]})
                                   for i, c in enumerate(["qa", "rag", "translation"] * 12)))
    monkeypatch.setenv("LAB_SPEC_BENCH", str(questions))
    model = ["--target", tiny_dirs["target"], "--dtype", "fp32", "--device", "cpu"]
    assert main(["train-head", *model, "--num-prompts", "6", "--max-new-tokens", "8", "--minutes", "0.05",
                 "--intermediate-size", "16", "--eval-prompts", "1"]) == 0
    out = capsys.readouterr().out
    assert "held-out acceptance per position (K=5, 1 Spec-Bench prompts)" in out and "saved" in out
    head, meta = load_head(head_dir(tiny_dirs["target"]))
    assert meta["prompts"] == 6 and meta["heldout"]["k"] == 5 and head.config.intermediate_size == 16
    assert head.config.feature_layers == (0, 1, 2)  # eagle3 on a 3-layer target: low, middle and high are all three

    assert main(["token-freq", *model, "--num-prompts", "4", "--max-new-tokens", "6"]) == 0
    assert "top  1,024 tokens cover 100.0%" in capsys.readouterr().out
    from lab.vocab import frequency_path, load_frequencies

    # The table counts the target's choice at every position (prompts too), not only its 4 x 6 answer tokens.
    assert int(load_frequencies(frequency_path(tiny_dirs["target"])).sum()) >= 4 * (3 + 6)

    assert main(generate(tiny_dirs, "--drafter", "eagle", "--draft-vocab", "8", "--k", "3", "--json", "--compare-baseline")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["drafter"] == "eagle" and report["settings"]["draft_vocab"] == 8
    assert report["metrics"]["num_drafts"] > 0
    assert report["baseline"]["token_ids"] == report["token_ids"]
    assert main(generate(tiny_dirs, "--drafter", "eagle", "--draft-vocab", "8", "--k", "3")) == 0
    assert "eagle (top 8 tokens) K=3:" in capsys.readouterr().out  # the text report names the trimmed vocabulary
