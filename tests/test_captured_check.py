"""scripts/captured_check.py (the GPU check of the captured engine) runs end to end on tiny models on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "captured_check.py"


def test_captured_check_reports_passes_bars_and_exact_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("captured_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "captured.json"
    result = module.main(["--tiny", "--device", "cpu", "--backend", "eager", "--dtype", "fp32", "--repeats", "1",
                          "--new-tokens", "8", "--prompts", "1", "--batch-sizes", "1", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["batch_size"], r["mode"]) for r in result["passes"]] == [(1, "eager"), (1, "compiled"), (2, "eager"),
                                                                       (2, "compiled")]
    assert all(r["target_step_ms"] > 0 and r["c"] > 0 for r in result["passes"])
    runs = {(r["batch_size"], r["mode"], r["run"]): r for r in result["end_to_end"]}
    assert set(runs) == {(b, m, r) for b in (1, 2) for m in ("eager", "compiled")
                         for r in ("target alone", "random draft", "target as its own draft")}
    for batch_size in (1, 2):
        assert runs[(batch_size, "eager", "target as its own draft")]["acceptance_rate"] == 1.0
        assert runs[(batch_size, "compiled", "target as its own draft")]["acceptance_rate"] == 1.0
    assert all(r["identical_to_target_alone"] for r in result["end_to_end"])  # fp32 greedy: exact in both engines, B = 1 and 2
    assert set(result["bars"]) == {"draft_step_speedup_b1", "captured_c_b1", "draft_step_3x", "c_below_half"}
