"""The MoE target: MoEfication's construction, the router hooks that count experts, and the bad-input messages.

The speculative exactness of a MoE target lives in the exactness table (tests/test_exactness.py, rows moe-*).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import tiny_moe
from lab.models import ModelError, load_model
from lab.models.moefy import balanced_kmeans, moefy
from lab.routing import EXPERTS_IMPLEMENTATION
from lab.routing import ExpertCounter, experts_modules, moe_shape, uniform_experts_touched, window_touched


@pytest.fixture(scope="module")
def dense() -> Qwen2ForCausalLM:
    """A tiny random dense Qwen2 (fp32) with an FFN of 128 neurons, to split into 8 experts of 16."""
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval().requires_grad_(False)


CALIBRATION = [[(7 * i + 3 * j) % 300 for j in range(40)] for i in range(4)]


def test_moefy_with_all_experts_reproduces_the_dense_model(dense):
    # k = E: every neuron runs, each expert with weight k * (1/k) -> the dense FFN, to the router's 1e-4 spread.
    moe, stats = moefy(dense, CALIBRATION, num_experts=8, top_k=8)
    ids = torch.tensor([[5, 17, 250, 3, 99, 42, 42, 7]])
    dense_logits, moe_logits = dense(ids).logits, moe(ids).logits
    assert type(moe).__name__ == "Qwen2MoeForCausalLM" and moe.config._experts_implementation == EXPERTS_IMPLEMENTATION
    torch.testing.assert_close(moe_logits, dense_logits, rtol=0, atol=2e-4 * dense_logits.abs().max().item())
    assert stats["routed_mass"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_moefy_top_k_routes_by_input_and_keeps_most_mass(dense):
    moe, stats = moefy(dense, CALIBRATION, num_experts=8, top_k=2)
    with ExpertCounter(moe, keep_indices=True) as counter:
        moe(torch.tensor([list(range(0, 200, 5))]))
    chosen = counter.token_experts[0][0]  # [40, 2]
    assert chosen.shape == (40, 2) and len({tuple(sorted(row.tolist())) for row in chosen}) > 1, "input-dependent"
    # The router picks experts holding more than the 2/8 of the activation mass a random pick would.
    assert all(routed > 0.25 for routed in stats["routed_mass"])
    assert all(routed <= oracle + 1e-6 for routed, oracle in zip(stats["routed_mass"], stats["oracle_mass"]))


def test_balanced_kmeans_gives_equal_clusters_that_follow_the_data():
    # Two well separated groups of 6 rows each, 2 clusters: each cluster is one group.
    torch.manual_seed(0)
    features = torch.cat([torch.randn(6, 5) * 0.01 + torch.tensor([1.0, 0, 0, 0, 0]),
                          torch.randn(6, 5) * 0.01 + torch.tensor([0, 0, 0, 0, 1.0])])
    labels = balanced_kmeans(features, 2)
    assert torch.bincount(labels).tolist() == [6, 6]
    assert len(set(labels[:6].tolist())) == 1 and len(set(labels[6:].tolist())) == 1
    with pytest.raises(ValueError, match="multiple of the clusters"):
        balanced_kmeans(features, 5)


@pytest.mark.parametrize("tokens, expected", [(0, 0.0), (1, 2.0), (2, 8 * (1 - 0.75**2)), (100, 8.0)])
def test_uniform_experts_touched(tokens, expected):
    # E = 8, k = 2: one token touches k; many tokens approach E.
    assert uniform_experts_touched(8, 2, tokens) == pytest.approx(expected, abs=1e-9)


def test_expert_counter_counts_the_distinct_experts_of_each_pass():
    model = tiny_moe(seed=2, layers=3)
    assert moe_shape(model.config).num_experts == 8 and moe_shape(model.config).top_k == 2
    ids = torch.tensor([[3, 9, 14, 22, 30, 41]])
    with ExpertCounter(model, keep_indices=True) as counter:
        model(ids)
    assert [layer for layer, _, _ in counter.records] == [0, 1, 2]
    for layer, tokens, distinct in counter.records:
        indices = counter.token_experts[layer][0]
        assert tokens == 6 and distinct == len(set(indices.flatten().tolist())) and 2 <= distinct <= 8
    # A window of one token touches exactly k experts; windows of all tokens equal the pass's count.
    assert window_touched([counter.token_experts[layer][0] for layer in range(3)], 1) == 2.0
    assert window_touched([counter.token_experts[layer][0] for layer in range(3)], 6) == counter.mean_touched(6)


def test_expert_counter_refuses_a_dense_model(dense):
    with pytest.raises(ModelError, match="dense model"):
        with ExpertCounter(dense):
            pass


def test_a_moe_whose_router_cannot_be_hooked_gets_a_clear_message():
    model = tiny_moe(seed=2, layers=1)
    for layer in model.model.layers:  # stand-in for an architecture outside transformers' experts interface
        layer.mlp = torch.nn.Identity()
    with pytest.raises(ModelError, match="cannot hook its router"):
        experts_modules(model)


def test_an_architecture_transformers_lacks_gets_a_clear_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicate_moe", "num_experts": 8}))
    with pytest.raises(ModelError, match="model_type='frobnicate_moe'.*does not know"):
        load_model(tmp_path)


def test_a_local_moe_folder_loads_with_the_pinned_experts_backend(tmp_path, smol_tokenizer):
    model = tiny_moe(seed=3, vocab_size=len(smol_tokenizer), layers=1)
    model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="fp32")
    assert loaded.model.config._experts_implementation == EXPERTS_IMPLEMENTATION == "grouped_mm"
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("argv, message", [
    (["moe-cost", "--k", "1,x"], "--k requires comma-separated integers"),
    (["moe-cost", "--k", "-1"], "--k requires comma-separated integers"),
    (["moe-cost", "--target", "/no/such/moe", "--k", "1"], "--dense is required"),
])
def test_moe_cost_refuses_bad_input(capsys, argv, message):
    from lab.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_moe_cost_measures_a_tiny_moe_against_a_dense_model(dense):
    from types import SimpleNamespace

    from lab.studies.moe import moe_cost

    moe, _ = moefy(dense, CALIBRATION, num_experts=8, top_k=2)
    result = moe_cost(SimpleNamespace(name="moe", model=moe), SimpleNamespace(name="dense", model=dense), [0, 1, 4],
                      context_tokens=8, repeats=1, rounds=1).as_dict()
    assert result["moe"]["v"][0] == result["dense"]["v"][0] == 1.0  # K = 0 is the one-token step itself
    assert result["moe"]["experts_touched"][0] == 2.0  # one token: exactly k experts in every layer
    assert 2.0 <= result["moe"]["experts_touched"][1] <= 4.0 and result["moe"]["experts_touched"][2] <= 8.0
    assert result["moe"]["active_parameters"] < result["moe"]["total_parameters"]
    assert result["settings"]["experts_implementation"] == "grouped_mm"
