"""Runs kept from the command line and the studies: each finished part of a sweep or comparison as it finishes,
``python -m lab history`` (JSON fields, filters, export, delete) and ``--no-save``."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_llama, tiny_tokenizer
from lab.cli import main
from lab.config import DecodeConfig
from lab.drafters import PromptLookupDrafter
from lab.store import ResultsStore
from lab.studies.batch_sweep import run_sweep
from lab.studies.compare import DrafterSpec, run_comparison

PROMPTS = [[8, 8, 8, 8, 8], [5, 9, 12, 5, 9, 30, 7], [3]]
MACHINE = {"cpu": "test cpu", "device": "cpu"}


@pytest.fixture
def own_store(tmp_path, monkeypatch) -> ResultsStore:
    """An empty store of this test's own, where the CLI saves (LAB_RESULTS_DB)."""
    path = tmp_path / "results.sqlite3"
    monkeypatch.setenv("LAB_RESULTS_DB", str(path))
    return ResultsStore(path)


def test_the_sweep_hands_over_each_batch_size_the_moment_it_finishes(tiny_target):
    seen = []

    def on_part(part: dict) -> None:
        seen.append(part)
        json.dumps(part)  # JSON-ready, as the store keeps it

    sweep = run_sweep(tiny_target, PROMPTS, PromptLookupDrafter(), DecodeConfig(k=3, max_new_tokens=6), (1, 2),
                      calibration=False, warmup=False, on_part=on_part)
    assert [part["batch_size"] for part in seen] == [1, 2]
    assert seen == [r.as_dict() for r in sweep.results]

    cut = []
    polls = []
    run_sweep(tiny_target, PROMPTS, PromptLookupDrafter(), DecodeConfig(k=3, max_new_tokens=6), (1, 2),
              calibration=False, warmup=False, on_part=cut.append,
              should_cancel=lambda: bool(polls.append(1)) or len(cut) == 1)
    assert [part["batch_size"] for part in cut] == [1]  # the unfinished batch size is never handed over


def test_the_comparison_hands_over_each_prompt_when_its_runs_finish(tiny_target):
    parts = []
    comparison = run_comparison(tiny_target, ["t5 t6 t5 t6", "t8 t9"], [DrafterSpec("prompt-lookup")], [2, 3],
                                DecodeConfig(max_new_tokens=6), chat_template=False, measure_verify=False,
                                on_part=parts.append)
    assert [p["prompt_index"] for p in parts] == [0, 1] and parts[1]["prompt"] == "t8 t9"
    assert [(r["drafter"], r["k"]) for r in parts[0]["runs"]] == [("target alone", 0), ("prompt-lookup (n 1-3)", 2),
                                                                  ("prompt-lookup (n 1-3)", 3)]
    assert sum(len(p["runs"]) for p in parts) == len(comparison.runs)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_history") / "target"
    tiny_llama(seed=0, layers=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def generate(folder: str, *extra: str) -> list[str]:
    return ["generate", "--target", folder, "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "6",
            "--prompt", "t5 t6 t7 t5 t6", "--drafter", "prompt-lookup", "--k", "3", "--json", *extra]


def test_generate_saves_its_run_and_says_where_unless_no_save(tiny_folder, own_store, capsys):
    assert main(generate(tiny_folder, "--compare-baseline")) == 0
    err = capsys.readouterr().err
    (run,) = own_store.list_runs()
    assert f"saved run {run.id} (generate) to {own_store.path}" in err
    assert run.models["target"] == tiny_folder and run.settings["k"] == 3
    assert {"acceptance_rate", "mean_acceptance_length", "tokens_per_s", "speedup"} <= run.figures.keys()
    assert own_store.get_run(run.id).payload["settings"]["drafter"] == "prompt-lookup"

    assert main(generate(tiny_folder, "--no-save")) == 0
    assert "saved run" not in capsys.readouterr().err
    assert len(own_store.list_runs()) == 1


def test_history_json_lists_runs_newest_first_with_their_fields(own_store, capsys):
    first = own_store.save_run("generate", settings={"k": 2}, figures={"speedup": 1.1}, target="a", machine=MACHINE)
    second = own_store.save_run("bench", settings={"k": 4}, figures={"latency_speedup": 0.9}, target="b", draft="a",
                                machine=MACHINE, status="partial")
    own_store.save_run("batch-size", parent_id=second, figures={"batch_size": 1}, target="b", machine=MACHINE)

    assert main(["history", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in runs] == [second, first]  # parts left out unless --parts
    for run in runs:
        assert {"id", "kind", "created_at", "settings", "figures", "status", "models", "machine_key"} <= run.keys()
    assert runs[0]["figures"] == {"latency_speedup": 0.9} and runs[1]["settings"] == {"k": 2}

    assert main(["history", "--json", "--kind", "generate"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [first]
    assert main(["history", "--json", "--model", "a", "--limit", "1"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [second]
    assert main(["history", "--json", "--parts"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3

    assert main(["history"]) == 0
    table = capsys.readouterr().out
    assert "bench" in table and "b + a" in table and "lat x 0.9" in table


def test_history_exports_and_deletes(own_store, tmp_path, capsys):
    kept = own_store.save_run("live", figures={"speedup": 1.5}, target="a", machine=MACHINE, payload={"x": 1})
    gone = own_store.save_run("bench", target="a", machine=MACHINE)
    own_store.save_run("batch-size", parent_id=gone, target="a", machine=MACHINE)

    assert main(["history", "--export", "csv", str(tmp_path / "runs.csv")]) == 0
    assert (tmp_path / "runs.csv").read_text().splitlines()[0].startswith("id,kind,created_at")
    assert main(["history", "--export", "json", str(tmp_path / "runs.json")]) == 0
    assert json.loads((tmp_path / "runs.json").read_text())[1]["payload"] == {"x": 1}

    assert main(["history", "--delete", str(gone)]) == 0
    assert f"deleted run {gone} and its 1 parts" in capsys.readouterr().err
    assert [r.id for r in own_store.list_runs()] == [kept]
    assert main(["history", "--delete", "999"]) == 2
    assert "no stored run has id 999" in capsys.readouterr().err
    assert main(["history", "--export", "xml", "f"]) == 2


def test_history_on_a_corrupt_store_says_what_to_do(tmp_path, monkeypatch, capsys):
    path = tmp_path / "broken.sqlite3"
    path.write_bytes(b"not sqlite at all " * 200)
    monkeypatch.setenv("LAB_RESULTS_DB", str(path))
    assert main(["history"]) == 2
    assert "Move it aside" in capsys.readouterr().err
