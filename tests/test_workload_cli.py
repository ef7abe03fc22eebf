"""``python -m lab workload`` with a costs file and an acceptance file given, so no model loads."""

from __future__ import annotations

import json

import pytest

from lab.cli import main

COSTS = {"model": "smollm2-135m", "source": "test",
         "target_ms": {"1x1": 20, "1x5": 22, "1x9": 26, "16x1": 40, "16x5": 160, "16x9": 300},
         "draft_ms_per_token": {"1": 0.2, "16": 0.5}, "prefill_ms_per_token": 0.05}
ACCEPTANCE = {"model": "smollm2-135m", "categories": {"all": {"per_position": [0.6, 0.4, 0.25, 0.15]}}}


@pytest.fixture
def files(tmp_path):
    costs, acceptance = tmp_path / "costs.json", tmp_path / "acceptance.json"
    costs.write_text(json.dumps(COSTS))
    acceptance.write_text(json.dumps(ACCEPTANCE))
    return ["--costs", str(costs), "--acceptance", str(acceptance), "--requests", "60"]


def run(capsys, argv):
    code = main(["workload", "--target", "smollm2-135m", "--drafter", "prompt-lookup", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_concurrency_levels_print_off_best_and_a_decision(files, capsys):
    code, out, _ = run(capsys, ["--concurrency", "1,4,16", "--output-tokens", "32", "--json", *files])
    assert code == 0
    data = json.loads(out)
    assert [level["concurrency"] for level in data["levels"]] == [1, 4, 16]
    for level in data["levels"]:
        assert set(level["off"]) == {"latency_p50_s", "latency_p99_s", "tokens_per_s"}
        assert set(level["best"]) == {"policy", "k", "latency_p50_s", "latency_p99_s", "tokens_per_s"}
        assert level["best"]["latency_p50_s"] <= level["off"]["latency_p50_s"]
    assert data["levels"][0]["best"]["k"] > 0  # at batch 1 a verify pass is nearly free here
    assert data["decision"].endswith(".")
    assert "--speculative-config" in data["configs"]["vllm"]


def test_rate_and_trace_take_the_place_of_concurrency(files, capsys, tmp_path):
    code, out, _ = run(capsys, ["--rate", "2,8", "--json", *files])
    assert code == 0 and [level["rate"] for level in json.loads(out)["levels"]] == [2.0, 8.0]
    trace = tmp_path / "log.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens,category\n"
                     + "".join(f"{i * 0.5},{100 + i},{20 + i % 7},all\n" for i in range(30)))
    code, out, _ = run(capsys, ["--trace", str(trace), "--json", *files])
    assert code == 0 and json.loads(out)["levels"][0]["rate"] == pytest.approx(30 / 14.5)
    code, out, _ = run(capsys, ["--trace", str(trace), "--rate", "1,4", *files])
    assert code == 0 and "vllm:" in out  # the table


@pytest.mark.parametrize("argv, message", [
    (["--rate", "-1"], "--rate requires values > 0"),
    (["--concurrency", "a,b"], "--concurrency requires comma-separated integers"),
])
def test_bad_loads_exit_2(files, capsys, argv, message):
    code, _, err = run(capsys, [*argv, *files])
    assert code == 2 and message in err


def test_an_empty_trace_and_costs_of_another_model_exit_2(files, capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(capsys, ["--trace", str(empty), *files])
    assert code == 2 and "at least one request" in err
    code = main(["workload", "--target", "qwen2.5-coder-1.5b", *files])
    assert code == 2 and "measured on 'smollm2-135m'" in capsys.readouterr().err
