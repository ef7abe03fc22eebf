"""MoEfication: a dense Qwen2 model's FFNs split into experts, saved as a transformers Qwen2-MoE.

Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of
Experts" (Findings of ACL 2022, arXiv 2110.01786). For each layer:

1. run calibration prompts through the dense model and record, per token, the
   FFN input ``x`` [N, H] (after the post-attention RMSNorm) and the magnitude
   of the intermediate activation ``|silu(gate(x)) * up(x)|`` [N, I];
2. cluster the I intermediate neurons into E experts of I/E neurons each by
   balanced k-means on their co-activation pattern (each neuron's column of
   magnitudes over the N tokens, unit-normalised: the paper's "co-activation
   graph" split, done with k-means so that it runs in seconds on a CPU);
3. fit the router from the cluster statistics: a least-squares linear map from
   ``x`` to each expert's activation mass ``sum_{i in e} |h_i|`` (the paper's
   learned router predicts the same quantity with an MLP).

The FFN of one token is then the sum of its top-k experts' outputs, *unscaled*
(MoEfication's definition). Qwen2-MoE multiplies each selected expert's output
by its routing weight: with ``norm_topk_prob=True`` the weight is
``p_i / sum_{j in top-k} p_j`` with ``p = softmax(logits)``. The builder scales
the router so that logits over the calibration tokens have a standard
deviation of ``ROUTER_LOGIT_STD`` (1e-4): the softmax then keeps the order of
the predicted masses (the top-k choice is unchanged, softmax is monotone) while
every weight is ``1/k`` to within about 1e-4, and each expert's ``down_proj``
is multiplied by ``k``. Result: selected experts combine with weight 1 (to
1e-4 relative in fp32, exactly 1 in bf16, where ``1/k`` ± 1e-4 rounds to ``1/k``),
and with ``k = E`` the MoE reproduces the dense FFN (tested).

The shared expert of Qwen2-MoE is switched off with size 0. This is a
constructed MoE with real, input-dependent routing, not a trained one: its
fidelity to the dense model is measured, not assumed (``lab.studies.moe``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lab.models.presets import MARKER_FILE, ModelError, ModelPreset, Progress, _stage, get_preset, prepared_dir
from lab.routing import EXPERTS_IMPLEMENTATION

ROUTER_LOGIT_STD = 1e-4
"""Standard deviation of the built router's logits over the calibration tokens (see the module docstring)."""
CALIBRATION_TOKENS = 2048
KMEANS_ITERATIONS = 12


def calibration_prompt_ids(tokenizer: Any, tokens: int = CALIBRATION_TOKENS) -> list[list[int]]:
    """Token ids of Spec-Bench prompts that are NOT the 20 held-out ones (``spec_bench:mix:20``), ~``tokens`` in all.

    Prompts are taken spread over all categories (``spec_bench:mix``), each cut to 512 tokens.
    """
    from lab.prompts import load_prompts

    held_out = [prompt.id for prompt in load_prompts("spec_bench:mix:20")]
    chosen, total = [], 0
    for prompt in load_prompts("spec_bench:mix", exclude=held_out)[::7]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], tokenize=False,
                                                 add_generation_prompt=True)  # as lab.models.encode_prompt
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"][:512]
        chosen.append(ids)
        total += len(ids)
        if total >= tokens:
            break
    return chosen


@torch.no_grad()
def collect_ffn_activations(
    model: Any, prompts_ids: Sequence[Sequence[int]], progress: Progress | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the FFN inputs and intermediate activation magnitudes over the calibration prompts.

    Args:
        model: a dense transformers causal LM whose layers hold ``mlp.gate_proj``, ``up_proj``, ``act_fn``.
        prompts_ids: token ids of each prompt (one forward pass each, batch 1).

    Returns:
        ``(inputs, magnitudes)``: per layer ``inputs[l]`` [N, H] float32 and ``magnitudes[l]`` [N, I]
        float32 (``|act(gate(x)) * up(x)|``), N the total number of prompt tokens.
    """
    layers = model.model.layers
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    magnitudes: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook_for(index: int):
        def hook(mlp, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            inputs[index].append(x.float())
            magnitudes[index].append((mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().float())
        return hook

    handles = [layer.mlp.register_forward_hook(hook_for(index)) for index, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for done, ids in enumerate(prompts_ids):
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
            if progress is not None:
                progress((done + 1) / len(prompts_ids), f"calibration pass {done + 1}/{len(prompts_ids)}")
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(rows) for rows in inputs], [torch.cat(rows) for rows in magnitudes]


def balanced_kmeans(features: torch.Tensor, num_clusters: int, iterations: int = KMEANS_ITERATIONS,
                    seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``features`` [I, D] into ``num_clusters`` clusters of exactly I / num_clusters rows.

    Spherical k-means (cosine similarity to unit centroids); each assignment step is
    balanced greedily: (row, cluster) pairs in order of decreasing similarity, a row
    taking the first cluster with room left.

    Returns:
        Cluster index of each row, int64 [I].

    Raises:
        ValueError: I is not a multiple of ``num_clusters``.
    """
    rows = features.shape[0]
    if rows % num_clusters:
        raise ValueError(f"balanced k-means requires the row count to be a multiple of the clusters; "
                         f"got {rows} rows and {num_clusters} clusters")
    capacity = rows // num_clusters
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(rows, generator=generator)[:num_clusters]]
    labels = torch.zeros(rows, dtype=torch.long)
    for _ in range(iterations):
        similarity = unit @ centroids.T  # [I, E]
        labels = _balanced_assignment(similarity, capacity)
        centroids = torch.nn.functional.normalize(
            torch.zeros_like(centroids).index_add_(0, labels, unit), dim=1)
    return labels


def _balanced_assignment(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment: best (row, cluster) pairs first, each cluster holding ``capacity`` rows."""
    rows, clusters = similarity.shape
    order = torch.argsort(similarity.flatten(), descending=True).tolist()
    labels = [-1] * rows
    room = [capacity] * clusters
    left = rows
    for flat in order:
        row, cluster = divmod(flat, clusters)
        if labels[row] < 0 and room[cluster]:
            labels[row] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.long)


def fit_router(inputs: torch.Tensor, expert_mass: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares router: W [E, H] with ``inputs @ W.T ~ expert_mass`` (ridge-regularised, centred target).

    Args:
        inputs: FFN inputs [N, H], float32.
        expert_mass: each expert's activation mass per token [N, E], float32.
    """
    x = inputs.double()
    y = (expert_mass - expert_mass.mean(dim=0)).double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ y).T.float()


def moe_config(dense_config: Any, num_experts: int, top_k: int) -> Any:
    """The ``Qwen2MoeConfig`` twin of a dense ``Qwen2Config``: same attention, FFN split into ``num_experts``.

    Raises:
        ValueError: the dense model is not Qwen2, or its intermediate size is not a multiple of ``num_experts``,
            or ``top_k`` is not in 1..num_experts.
    """
    from transformers import Qwen2MoeConfig

    if dense_config.model_type != "qwen2":
        raise ValueError(f"MoEfication here requires a dense Qwen2 model; got model_type {dense_config.model_type!r}")
    if dense_config.intermediate_size % num_experts:
        raise ValueError(f"MoEfication requires the intermediate size ({dense_config.intermediate_size}) "
                         f"to be a multiple of the expert count; got {num_experts} experts")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k requires 1..{num_experts}; got {top_k}")
    copied = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")
    config = Qwen2MoeConfig(
        **{name: getattr(dense_config, name) for name in copied},
        use_sliding_window=False, qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_experts=num_experts, num_experts_per_tok=top_k,
        moe_intermediate_size=dense_config.intermediate_size // num_experts,
        shared_expert_intermediate_size=0, norm_topk_prob=True,
    )
    config.architectures = ["Qwen2MoeForCausalLM"]
    return config


@torch.no_grad()
def moefy(dense: Any, prompts_ids: Sequence[Sequence[int]], num_experts: int = 16, top_k: int = 4,
          progress: Progress | None = None, seed: int = 0) -> tuple[Any, dict]:
    """Build the Qwen2-MoE twin of a dense Qwen2 causal LM (MoEfication, see the module docstring).

    Args:
        dense: a transformers ``Qwen2ForCausalLM`` (any dtype; left unchanged).
        prompts_ids: calibration prompts as token ids (not the held-out evaluation prompts).
        num_experts: E, experts per layer; the intermediate size must be a multiple of it.
        top_k: k, experts each token routes to.

    Returns:
        ``(model, stats)``: a ``Qwen2MoeForCausalLM`` in ``dense``'s dtype, eval mode, experts backend
        pinned to ``EXPERTS_IMPLEMENTATION``; ``stats`` per layer: the share of activation mass the
        router's top-k experts hold on the calibration tokens (``routed_mass``) and the best possible
        top-k share (``oracle_mass``).

    Raises:
        ValueError: see :func:`moe_config`.
    """
    from transformers import Qwen2MoeForCausalLM

    config = moe_config(dense.config, num_experts, top_k)
    inputs, magnitudes = collect_ffn_activations(dense, prompts_ids, _stage(progress, 0.0, 0.5))
    dtype = next(dense.parameters()).dtype
    config._experts_implementation = EXPERTS_IMPLEMENTATION
    with _skip_random_init():
        moe = Qwen2MoeForCausalLM(config).to(dtype)
    moe_state = moe.state_dict()
    dense_state = dense.state_dict()
    for name, tensor in dense_state.items():
        if ".mlp." not in name:
            moe_state[name].copy_(tensor)
    stats: dict[str, list[float]] = {"routed_mass": [], "oracle_mass": []}
    report = _stage(progress, 0.5, 1.0)
    expert_size = config.moe_intermediate_size
    for index, layer in enumerate(dense.model.layers):
        labels = balanced_kmeans(magnitudes[index].T, num_experts, seed=seed + index)
        order = torch.argsort(labels, stable=True)  # neurons of expert 0, then expert 1, ...
        mass = torch.zeros(magnitudes[index].shape[0], num_experts).index_add_(1, labels, magnitudes[index])
        router = fit_router(inputs[index], mass)
        logits = inputs[index] @ router.T
        router *= ROUTER_LOGIT_STD / logits.std().clamp_min(1e-30)
        chosen = torch.topk(logits, top_k, dim=-1).indices
        stats["routed_mass"].append(float(mass.gather(1, chosen).sum() / mass.sum()))
        stats["oracle_mass"].append(float(mass.topk(top_k, dim=-1).values.sum() / mass.sum()))
        mlp = layer.mlp
        gate = mlp.gate_proj.weight[order].reshape(num_experts, expert_size, -1)
        up = mlp.up_proj.weight[order].reshape(num_experts, expert_size, -1)
        down = mlp.down_proj.weight[:, order].reshape(-1, num_experts, expert_size).permute(1, 0, 2)
        prefix = f"model.layers.{index}.mlp."
        moe_state[prefix + "gate.weight"].copy_(router)
        moe_state[prefix + "experts.gate_up_proj"].copy_(torch.cat([gate, up], dim=1))
        moe_state[prefix + "experts.down_proj"].copy_(down.float() * top_k)  # weight 1/k each -> 1 (docstring)
        moe_state[prefix + "shared_expert_gate.weight"].zero_()
        report((index + 1) / len(dense.model.layers), f"experts of layer {index + 1}/{len(dense.model.layers)}")
    moe.eval()
    moe.requires_grad_(False)
    moe.generation_config = dense.generation_config
    return moe, stats


def _skip_random_init():
    """transformers' ``no_init_weights``: the weights are all copied in, so skip their random init."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def build_moe_preset(preset: ModelPreset, progress: Progress | None = None) -> Path:
    """Build a MoE preset's folder from its prepared dense source (``preset.moe``); see :func:`moefy`.

    Called by ``lab.models.prepare.prepare`` under its lock. Writes the safetensors copy, the
    tokenizer and the marker (last) into ``prepared_dir(preset)``. About 3 minutes and 8 GB of RAM
    for Qwen2.5-Coder-1.5B on a 2-core CPU.

    Raises:
        ModelError: the preset has no MoE recipe.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = preset.moe
    if recipe is None:
        raise ModelError(f"{preset.name!r} is not a MoE preset (it has no MoE recipe)")
    source = get_preset(recipe.source)
    started_s = time.perf_counter()
    report = _stage(progress, 0.0, 1.0)
    report(0.0, f"loading {source.name} to MoEfy it")
    folder = prepared_dir(source)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    dense.eval()
    prompts = calibration_prompt_ids(tokenizer, recipe.calibration_tokens)
    moe, stats = moefy(dense, prompts, recipe.num_experts, recipe.top_k, _stage(progress, 0.05, 0.9))
    del dense
    out = prepared_dir(preset)
    report(0.9, f"saving {preset.name}")
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "preset": preset.name,
        "gguf_sha256": preset.sha256,
        "moefied_from": source.name,
        "num_experts": recipe.num_experts,
        "top_k": recipe.top_k,
        "calibration_tokens": sum(len(ids) for ids in prompts),
        "experts_implementation": EXPERTS_IMPLEMENTATION,
        "routed_mass_mean": sum(stats["routed_mass"]) / len(stats["routed_mass"]),
        "oracle_mass_mean": sum(stats["oracle_mass"]) / len(stats["oracle_mass"]),
        "routed_mass": stats["routed_mass"],
        "prepare_s": round(time.perf_counter() - started_s, 1),
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    report(1.0, f"{preset.name} is prepared")
    return out
