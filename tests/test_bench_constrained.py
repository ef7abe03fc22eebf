"""``python -m lab bench`` and the sweep under a constraint, and the precisions a sweep records (tiny models)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_llama
from lab.cli import main
from lab.config import DecodeConfig
from lab.drafters import PromptLookupDrafter
from lab.grammar import ConstraintSpec
from lab.models import is_prepared, load_model
from lab.studies.batch_sweep import format_sweep, run_sweep, run_sweep_by_name

pytestmark = pytest.mark.skipif(not is_prepared("smollm2-135m"), reason="needs SmolLM2's tokenizer (prepared preset)")

DATE = r"\d{4}-\d{2}-\d{2}"
PROMPTS = ["Date: 2024-01-31. Today is", "When?", "Give a date like 1999-12-31 or 2000-01-01."]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Folders of a tiny random target (3 layers) and draft (1 layer) over SmolLM2's tokenizer, and a prompt file."""
    from lab.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("tiny_bench_constrained")
    folders = {}
    for name, seed, layers in (("target", 0, 3), ("draft", 1, 1)):
        folder = root / name
        tiny_llama(seed=seed, vocab_size=len(tokenizer), layers=layers).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": text}) + "\n" for i, text in enumerate(PROMPTS)))
    folders["prompts"] = str(prompts)
    return folders


def bench(tiny_dirs, *extra: str) -> list[str]:
    return ["bench", "--target", tiny_dirs["target"], "--dtype", "fp32", "--device", "cpu", "--k", "3",
            "--batch-sizes", "1,2", "--max-new-tokens", "12", "--prompts", tiny_dirs["prompts"], "--raw", *extra]


def test_bench_under_a_regex_is_exact_valid_and_says_what_was_measured(tiny_dirs, capsys):
    argv = bench(tiny_dirs, "--drafter", "draft-model", "--draft", tiny_dirs["draft"], "--regex", DATE, "--json")
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    settings = result["settings"]
    assert settings["constraint"] == {"kind": "regex", "source": DATE, "mode": "exact"}
    assert settings["precision"] == "fp32" and settings["draft_precision"] == "fp32"
    assert [r["batch_size"] for r in result["results"]] == [1, 2]
    assert [r["num_requests"] for r in result["results"]] == [3, 4]  # 3 prompts, cycled to whole batches
    for row in result["results"]:
        # fp32 greedy: neither speculation nor batching changes an output, and every date is complete (11 tokens).
        assert row["outputs_differ_on_vs_off"] == 0
        for mode in ("off", "on"):
            assert row[mode]["outputs_valid"] == row["num_requests"]
            assert row[mode]["outputs_differ_from_batch_1"] == 0
        assert row["on"]["stats"]["num_draft_tokens"] > 0


def test_bench_table_names_the_constraint(tiny_dirs, capsys):
    argv = bench(tiny_dirs, "--drafter", "layer-skip", "--exit-layer", "1", "--any-json")
    assert main(argv) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "layer-skip, K=3: batch-size sweep (fp32, draft fp32, cpu, eager engine, constrained to any_json)"


@pytest.mark.parametrize("engine", ["static", "compiled"])
def test_bench_runs_the_sweep_in_the_static_and_compiled_engines_exactly(tiny_dirs, capsys, engine):
    """--engine reaches every run of the sweep and its calibration; fp32 greedy outputs stay the target alone's."""
    argv = bench(tiny_dirs, "--drafter", "draft-model", "--draft", tiny_dirs["draft"], "--engine", engine, "--json",
                 "--no-peer")
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["engine"] == engine
    for row in result["results"]:
        assert row["outputs_differ_on_vs_off"] == 0
        assert row["on"]["outputs_differ_from_batch_1"] == 0
        assert row["on"]["stats"]["num_draft_tokens"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--regex", DATE, "--naive-grammar"], "bench requires the exact grammar mode; got --naive-grammar"),
        (["--naive-grammar"], "bench requires the exact grammar mode; got --naive-grammar"),
        (["--regex", "[a-"], "The regular expression does not compile"),
        (["--json-schema", "no_such_schema.json"], "schema file 'no_such_schema.json' does not exist"),
    ],
)
def test_bench_refuses_bad_constraints(tiny_dirs, capsys, extra, message):
    assert main(bench(tiny_dirs, "--drafter", "prompt-lookup", *extra)) == 2
    assert message in capsys.readouterr().err


def test_sweep_by_name_compiles_a_spec_and_records_it(tiny_dirs, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = tmp_path / "sweep.json"
    sweep = run_sweep_by_name(tiny_dirs["target"], "prompt-lookup", [tiny_dirs["prompts"]], (2,), k=2,
                              max_new_tokens=16, dtype="fp32", device="cpu", chat_template=False,
                              constraint=ConstraintSpec("json_schema", json.dumps(schema)), out=out)
    data = json.loads(out.read_text())
    assert data["settings"]["constraint"] == {"kind": "json_schema", "source": json.dumps(schema), "mode": "exact"}
    assert data["settings"]["precision"] == "fp32" and data["settings"]["draft_precision"] is None
    (result,) = sweep.results
    assert result.on.outputs == result.off.outputs
    # Every output is {"ok": true} or {"ok": false}; the request count is rounded up to whole batches of 2.
    assert result.on.outputs_valid == result.off.outputs_valid == result.num_requests == 4


def test_unconstrained_sweep_records_precisions_and_no_constraint(tiny_dirs):
    target = load_model(tiny_dirs["target"], dtype="fp32", device="cpu")
    prompts = [target.tokenizer.encode(text) for text in PROMPTS]
    sweep = run_sweep(target, prompts, PromptLookupDrafter(), DecodeConfig(k=2, max_new_tokens=4), (1,),
                      calibration=False, warmup=False)
    assert sweep.settings["precision"] == "fp32" and sweep.settings["draft_precision"] is None
    assert sweep.settings["constraint"] is None
    assert sweep.results[0].on.outputs_valid is None and sweep.as_dict()["results"][0]["on"]["outputs_valid"] is None
    assert format_sweep(sweep).splitlines()[0] == "prompt-lookup, K=2: batch-size sweep (fp32, cpu, eager engine)"


def test_sweep_refuses_a_naive_grammar_mode(tiny_dirs):
    target = load_model(tiny_dirs["target"], dtype="fp32", device="cpu")
    config = DecodeConfig(k=2, max_new_tokens=4, grammar_mode="naive")
    with pytest.raises(ValueError, match="requires grammar_mode 'exact'; got 'naive'"):
        run_sweep(target, [[5, 6]], PromptLookupDrafter(), config, (1,), constraint=ConstraintSpec("regex", DATE))


def test_bench_runs_transformers_assisted_generation_at_batch_1_as_the_peer(tiny_dirs, capsys):
    argv = bench(tiny_dirs, "--drafter", "prompt-lookup", "--json")
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    peer = result["peer_batch_1"]
    assert peer["k"] == 3 and peer["num_prompts"] == len(PROMPTS)
    assert peer["settings"]["hf_assistant_settings"] == "prompt_lookup_num_tokens=K, max_matching_ngram_size=3"
    for key in ("ours_speculative_tokens_per_s", "hf_assisted_tokens_per_s", "hf_greedy_tokens_per_s"):
        assert peer[key] > 0
    assert peer["ratio_ours_vs_hf_assisted"] == pytest.approx(
        peer["ours_speculative_tokens_per_s"] / peer["hf_assisted_tokens_per_s"]
    )
    # fp32 greedy: ours, transformers' greedy and transformers' assisted generation all agree.
    assert peer["speculative_identical_to_baseline"] == len(PROMPTS)
    assert peer["hf_assisted_identical_to_hf_greedy"] == len(PROMPTS)
    assert main([*argv[:-1]]) == 0  # the table says it too
    assert "peer at batch 1, 3 prompts, K=3: ours " in capsys.readouterr().out


def test_bench_says_why_the_peer_did_not_run(tiny_dirs, capsys):
    assert main(bench(tiny_dirs, "--drafter", "prompt-lookup", "--regex", DATE, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["peer_batch_1"] == {
        "skipped": "transformers' assisted generation is not run under a grammar here"
    }
    assert main(bench(tiny_dirs, "--drafter", "prompt-lookup", "--no-peer", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["peer_batch_1"] is None
