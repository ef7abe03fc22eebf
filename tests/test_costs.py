"""lab.studies.costs: c(B) and v(K, B) measured by batch size, and the speedup they predict."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from lab.studies.costs import CostRow, CostTable, measure_costs, random_model
from lab.theory import acceptance_from_mean_length, expected_speedup


def test_measure_costs_times_every_batch_size(tiny_target, tiny_draft):
    prompts = [[5, 9, 12, 5, 9], [3, 4, 5]]
    table = measure_costs(tiny_target, tiny_draft.model, prompts, [1, 3], k=2, repeats=2)
    assert [r.batch_size for r in table.rows] == [1, 3]
    for row in table.rows:
        assert row.target_step_ms > 0 and row.verify_ms > 0 and row.draft_ms_per_token > 0
        assert row.c == pytest.approx(row.draft_ms_per_token / row.target_step_ms)
        assert row.v == pytest.approx(row.verify_ms / row.target_step_ms)
    assert table.settings["prompt_tokens"] == [5, 3] and table.settings["repeats"] == 2


def test_predicted_speedup_is_leviathans_formula_with_each_rows_c_and_v():
    table = CostTable(4, [CostRow(1, 10.0, 11.0, 2.0), CostRow(16, 20.0, 60.0, 4.0)])
    # a=0.8, K=4: 3.3616 tokens per pass (mean acceptance length).
    predicted = table.predicted_speedup(3.3616)
    alpha = acceptance_from_mean_length(3.3616, 4)
    assert alpha == pytest.approx(0.8, abs=1e-6)
    assert predicted[0] == pytest.approx(3.3616 / (4 * 0.2 + 1.1), rel=1e-5)  # 1.77x
    assert predicted[1] == pytest.approx(3.3616 / (4 * 0.2 + 3.0), rel=1e-5)  # 0.88x: the batch ate the gain
    assert predicted == [pytest.approx(expected_speedup(alpha, 4, r.c, r.v)) for r in table.rows]
    rows = table.as_dict(3.3616)["rows"]
    assert [r["predicted_speedup"] for r in rows] == pytest.approx(predicted)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        table.predicted_speedup(6.0)


def test_bad_inputs_are_refused(tiny_target, tiny_draft):
    with pytest.raises(ValueError, match="non-empty prompt"):
        measure_costs(tiny_target, tiny_draft.model, [], [1], k=2)
    with pytest.raises(ValueError, match="K >= 1"):
        measure_costs(tiny_target, tiny_draft.model, [[1, 2]], [1], k=0)
    with pytest.raises(ValueError, match="batch sizes >= 1"):
        measure_costs(tiny_target, tiny_draft.model, [[1, 2]], [0], k=2)


def test_random_model_has_the_configs_architecture(tmp_path):
    tiny_llama(seed=0, layers=3).config.save_pretrained(tmp_path)
    model = random_model(str(tmp_path), "cpu", torch.float32)
    assert len(model.model.layers) == 3 and model.config.vocab_size == 48
    assert next(model.parameters()).dtype == torch.float32 and not model.training
