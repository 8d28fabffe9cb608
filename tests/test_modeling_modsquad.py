"""Mod-Squad model: config, the MoE layers and the routing against an independent per-expert implementation of the
authors' computation (`modsquad_reference.py`), the routing losses against numpy, the task embedding, the routing
report, transformers conventions (hidden states, input embeddings, checkpointing), usage statistics, per-task
extraction and its exactness, the parameter count of the reference layout, and the MI loss separating tasks' experts."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_labels
from modsquad_reference import (
    ALL_TASKS,
    ReferenceArchitecture,
    build_modsquad,
    reference_dense_attention,
    reference_gates,
    reference_moe_attention,
    reference_moe_mlp,
    reference_shapes,
    tiny_modsquad_config,
)
from transformers import AutoConfig, AutoModel

from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction, ModSquadModel
from modeling_taskexpert.dense_losses import dense_task_losses
from modeling_taskexpert.modeling_modsquad import (
    DenseExpertDispatch,
    ExpertDispatch,
    ModSquadMoEAttention,
    ModSquadMoEMLP,
    cv_squared_loss,
    mutual_information_loss,
    switch_loss,
    z_loss,
)

REPO = Path(__file__).resolve().parents[1]
build = build_modsquad


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
def test_layouts_and_hub_configs():
    twice = tiny_modsquad_config()
    assert twice.moe_attention_layers == [0, 2] and twice.moe_mlp_layers == [1, 3]
    assert twice.moe_layer_kinds == [(0, "attention"), (1, "mlp"), (2, "attention"), (3, "mlp")]
    assert twice.num_experts_per_layer == [6, 5, 6, 5]
    assert twice.layer_names == ["block 0 attention", "block 1 mlp", "block 2 attention", "block 3 mlp"]
    assert twice.candidate_names[1] == [f"expert {i}" for i in range(5)]
    every = tiny_modsquad_config(moe_layout="every")
    assert every.moe_attention_layers == every.moe_mlp_layers == [0, 1, 2, 3]
    assert tiny_modsquad_config().mlp_expert_hidden_size == 64 // 2  # intermediate_size // mlp_top_k
    assert tiny_modsquad_config().dense_attention_head_dim == 16  # attention_head_dim, as in the reference
    defaults = ModSquadConfig()
    assert (defaults.use_task_embedding, defaults.renormalize_gates, defaults.routing_epsilon) == (True, False, 1e-4)
    assert (defaults.noisy_gating, defaults.attention_expert_bias, defaults.aux_loss_min_tasks) == (False, False, 3)
    assert (defaults.cv_loss_weight, defaults.switch_loss_weight, defaults.z_loss_weight) == (0.0, 0.0, 0.0)

    tiny = ModSquadConfig.from_json_file(REPO / "hub_configs/models/modsquad-tiny.json")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.patch_size, tiny.image_size) == (64, 4, 8, 128)
    assert tiny.task_id2label["semseg"][20] == "tvmonitor"  # PASCAL defaults
    vitb = ModSquadConfig.from_json_file(REPO / "hub_configs/models/modsquad-vitb.json")
    assert vitb.num_experts_per_layer == [24, 16] * 6
    assert (vitb.attention_top_k, vitb.mlp_top_k, vitb.attention_head_dim, vitb.dense_attention_head_dim) == (
        12,
        4,
        128,
        128,
    )
    assert vitb.use_task_embedding and not vitb.renormalize_gates


def test_config_json_round_trip(tmp_path):
    config = tiny_modsquad_config(
        kept_experts=[[0, 2, 5], [1, 3], [0, 1, 2, 3, 4, 5], [0, 4]], depth_activation="softplus"
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ModSquadConfig)
    expected = {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"} == expected
    assert loaded.task_id2label["semseg"] == {0: "floor", 1: "wall", 2: "box"}
    assert loaded.num_experts_per_layer == [3, 2, 6, 2] and loaded.candidate_names[0] == [
        "expert 0",
        "expert 2",
        "expert 5",
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tasks": ["semseg", "colour"]}, "'colour' is not one of the preset tasks"),
        ({"attention_top_k": 7}, "`attention_top_k` (7) exceeds `num_attention_experts` (6)"),
        ({"mlp_top_k": 0}, "`mlp_top_k` must be a positive integer"),
        ({"moe_mlp_layers": [1, 4]}, "`moe_mlp_layers` entry 4 is out of range"),
        ({"moe_attention_layers": [], "moe_mlp_layers": []}, "Mod-Squad needs an MoE layer"),
        ({"kept_experts": [[0, 1]]}, "`kept_experts` must list the experts of each of the 4 MoE layers, got 1"),
        (
            {"kept_experts": [[0, 1], [1], [0, 1], [0, 1]]},
            "MoE mlp of block 1` must be at least 2 (its top-k) increasing",
        ),
        (
            {"kept_experts": [[0, 6], [0, 1], [0, 1], [0, 1]]},
            "MoE attention of block 0` entry 6 is out of range: expected 0..5",
        ),
        ({"kept_experts": [[0, "1"], [0, 1], [0, 1], [0, 1]]}, "entry '1' (str) is not one"),
        ({"kept_experts": [[1, 0], [0, 1], [0, 1], [0, 1]]}, "increasing expert ids in 0..5, got [1, 0]"),
        ({"moe_layout": "sometimes"}, "`moe_layout` must be one of"),
        ({"image_size": 36}, "`image_size` (36) must be a multiple of `patch_size` (8)"),
        ({"mutual_information_loss_weight": -1.0}, "`mutual_information_loss_weight` must be in [0.0, inf), got -1.0"),
        ({"z_loss_weight": "0.1"}, "`z_loss_weight` must be a finite number, got '0.1' (str)"),
        ({"routing_epsilon": -1e-4}, "`routing_epsilon` must be in [0.0, inf)"),
        ({"noisy_gating": "yes"}, "`noisy_gating` must be true or false, got 'yes' (str)"),
        ({"use_task_embedding": 1}, "`use_task_embedding` must be true or false, got 1 (int)"),
        (
            {"mutual_information_estimator": "kl"},
            "`mutual_information_estimator` must be one of ('reference', 'exact'), got 'kl' (str)",
        ),
        ({"aux_loss_min_tasks": 0}, "`aux_loss_min_tasks` must be a positive integer"),
        ({"dense_attention_head_dim": 0}, "`dense_attention_head_dim` must be a positive integer"),
        ({"task_id2label": {"semseg": {0: "a"}}}, "Segmentation task 'semseg' needs at least 2 classes"),
        ({"num_channels": 4}, "`num_channels` must be 3"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_modsquad_config(**overrides)


def test_configs_written_by_earlier_versions_load_their_behaviour(tmp_path):
    """Earlier versions always wrote `load_balance_loss_weight` and `experts_per_layer`: such a config keeps computing
    what it computed then; what cannot be kept is refused with the way out."""
    fields = tiny_modsquad_config().to_dict()
    for name in ("use_task_embedding", "renormalize_gates", "routing_epsilon", "attention_expert_bias", "noisy_gating",
                 "kept_experts", "mutual_information_estimator", "cv_loss_weight", "switch_loss_weight", "z_loss_weight",
                 "aux_loss_min_tasks", "dense_attention_head_dim"):  # fmt: skip
        fields.pop(name)
    earlier = ModSquadConfig(
        **{**fields, "hidden_size": 48, "load_balance_loss_weight": 0.0, "experts_per_layer": None}
    )
    assert (earlier.use_task_embedding, earlier.renormalize_gates, earlier.routing_epsilon) == (False, True, 0.0)
    assert (earlier.attention_expert_bias, earlier.mutual_information_estimator, earlier.aux_loss_min_tasks) == (
        True,
        "exact",
        1,
    )
    assert earlier.dense_attention_head_dim == 48 // 2 and not hasattr(earlier, "load_balance_loss_weight")
    with pytest.raises(ValueError, match="`load_balance_loss_weight` .* Use `switch_loss_weight`"):
        ModSquadConfig(**{**fields, "load_balance_loss_weight": 0.01, "experts_per_layer": None})
    with pytest.raises(ValueError, match="extracted by an earlier version .* Extract it again"):
        ModSquadConfig(**{**fields, "load_balance_loss_weight": 0.0, "experts_per_layer": [6, 5, 6, 5]})


# ---------------------------------------------------------------------------------------------------------------------
# Layers against the independent per-expert reference
# ---------------------------------------------------------------------------------------------------------------------
def test_dispatch_combine_is_the_gate_weighted_sum():
    index = torch.tensor([[0, 2], [2, 1], [0, 1]])
    gates = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    dispatch = ExpertDispatch(index, num_experts=3)
    assert dispatch.capacity == 2
    expert_outputs = torch.tensor([[10.0], [20.0], [30.0]])  # expert e outputs its constant for every slot
    grouped = dispatch.dispatch(torch.zeros(3, 1)) + expert_outputs[:, None]
    expected = torch.tensor([[0.7 * 10 + 0.3 * 30], [0.5 * 30 + 0.5 * 20], [0.9 * 10 + 0.1 * 20]])
    torch.testing.assert_close(dispatch.combine(grouped, gates), expected)


@pytest.mark.parametrize("layer_name", ["attention", "mlp"])
def test_dense_dispatch_gives_the_sparse_layers_outputs(layer_name, monkeypatch):
    """The static dispatch used under graph export: same experts, same outputs as the grouped computation."""
    model = build(tiny_modsquad_config(attention_expert_bias=True))
    kind = ModSquadMoEAttention if layer_name == "attention" else ModSquadMoEMLP
    layer = next(module for _, module in model.modsquad.moe_layers if isinstance(module, kind))
    for name in layer.expert_parameters:
        torch.nn.init.normal_(getattr(layer, name), std=0.2)
    task_index = torch.tensor([1, 4])
    hidden = torch.randn(2 * 3, 17, 32, generator=torch.Generator().manual_seed(0))
    sparse, sparse_terms, sparse_report = layer(hidden, task_index)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    dense, dense_terms, dense_report = layer(hidden, task_index)
    torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_terms, sparse_terms)
    assert torch.equal(dense_report.counts, sparse_report.counts)
    index = torch.tensor([[0, 2], [2, 1], [0, 1]])
    dense_dispatch = DenseExpertDispatch(index, num_experts=3)
    expert_outputs = torch.tensor([[10.0], [20.0], [30.0]])
    grouped = dense_dispatch.dispatch(torch.zeros(3, 1)) + expert_outputs[:, None]  # (E, N, 1)
    gates = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    expected = torch.tensor([[0.7 * 10 + 0.3 * 30], [0.5 * 30 + 0.5 * 20], [0.9 * 10 + 0.1 * 20]])
    torch.testing.assert_close(dense_dispatch.combine(grouped, gates), expected)


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_mlp_matches_the_per_expert_reference(renormalize):
    model = build(tiny_modsquad_config(renormalize_gates=renormalize))
    layer = model.modsquad.blocks[1].mlp
    torch.nn.init.normal_(layer.fc1_bias)
    torch.nn.init.normal_(layer.fc2_bias)
    task_index = torch.tensor([0, 5])
    hidden = torch.randn(2 * 3, 17, 32)  # two tasks x three images, task-major
    output, terms, report = layer(hidden, task_index)
    for t, task in enumerate(task_index.tolist()):
        x = hidden[3 * t : 3 * (t + 1)]
        expected = reference_moe_mlp(
            x, layer.fc1_weight, layer.fc1_bias, layer.fc2_weight, layer.fc2_bias, layer.router_weight[task].T, 2,
            renormalize=renormalize,
        )  # fmt: skip
        torch.testing.assert_close(output[3 * t : 3 * (t + 1)], expected, rtol=1e-5, atol=1e-5)
        assert report.counts[t].sum() == 3 * 17 * layer.top_k
    assert terms.shape == (4,)


@pytest.mark.parametrize("expert_bias", [False, True])
def test_moe_attention_matches_the_per_expert_reference(expert_bias):
    model = build(tiny_modsquad_config(attention_expert_bias=expert_bias))
    layer = model.modsquad.blocks[0].attention
    assert (layer.query_bias is not None) == expert_bias and (layer.output_bias is not None) == expert_bias
    assert layer.query_weight.shape == (6, 32, 16) and layer.output_weight.shape == (6, 16, 32)
    assert layer.key_value.weight.shape == (32, 32) and layer.key_value.bias is not None  # Linear(C, 2 hd) with bias
    if expert_bias:
        torch.nn.init.normal_(layer.query_bias)
        torch.nn.init.normal_(layer.output_bias)
    x = torch.randn(2, 9, 32)
    output, _, report = layer(x, torch.tensor([2]))
    expected = reference_moe_attention(
        x, layer.query_weight, layer.output_weight, layer.router_weight[2].T, layer.key_value.weight, layer.key_value.bias,
        2, query_b=layer.query_bias, output_b=layer.output_bias,
    )  # fmt: skip
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    _, reference = reference_gates(x.reshape(-1, 32), layer.router_weight[2].T, 2)
    torch.testing.assert_close(report.gates[0], reference)


def test_dense_attention_uses_the_head_width_of_the_experts():
    model = build(tiny_modsquad_config(attention_head_dim=24))
    layer = model.modsquad.blocks[1].attention  # odd block: dense attention
    assert layer.qkv.weight.shape == (3 * 2 * 24, 32) and layer.proj.weight.shape == (32, 2 * 24)
    x = torch.randn(2, 9, 32)
    expected = reference_dense_attention(
        x, layer.qkv.weight, layer.qkv.bias, layer.proj.weight, layer.proj.bias, heads=2
    )
    torch.testing.assert_close(layer(x, torch.tensor([0]))[0], expected, rtol=1e-5, atol=1e-5)
    usual = build(tiny_modsquad_config(attention_head_dim=24, dense_attention_head_dim=16)).modsquad.blocks[1].attention
    assert usual.qkv.weight.shape == (3 * 32, 32)  # the usual ViT width C / heads


def test_gates_are_the_top_k_probabilities_not_renormalised():
    """At initialisation (zero routers) every probability is 1/E + 1e-4: 12 of 24 attention experts get 0.5 in total,
    4 of 16 MLP experts 0.25 (plus the epsilons), as in the reference."""
    config = tiny_modsquad_config(num_attention_experts=24, attention_top_k=12, num_mlp_experts=16, mlp_top_k=4)
    model = ModSquadForDensePrediction(config).eval()
    with torch.no_grad():
        gates = model(torch.randn(1, 3, 32, 32), tasks=["depth"], output_gates=True).gates
    attention, mlp = gates[0]["depth"], gates[1]["depth"]
    assert attention.shape == (1, 4, 4, 24) and mlp.shape == (1, 4, 4, 16)
    assert ((attention > 0).sum(-1) == 12).all() and ((mlp > 0).sum(-1) == 4).all()
    torch.testing.assert_close(attention.sum(-1), torch.full((1, 4, 4), 12 * (1 / 24 + 1e-4)))
    torch.testing.assert_close(mlp.sum(-1), torch.full((1, 4, 4), 4 * (1 / 16 + 1e-4)))
    renormalised = ModSquadForDensePrediction(tiny_modsquad_config(renormalize_gates=True))
    with torch.no_grad():
        gates = build(renormalised.config)(torch.randn(1, 3, 32, 32), output_gates=True).gates
    torch.testing.assert_close(gates[2]["edge"].sum(-1), torch.ones(1, 4, 4))


def test_noisy_gating_adds_learned_noise_in_eval_too():
    config = tiny_modsquad_config(noisy_gating=True)
    model = build(config)
    layer = model.modsquad.blocks[1].mlp
    assert layer.router_weight.shape == (6, 32, 10)  # 2E: clean logits, then the noise scale
    hidden = torch.randn(1, 9, 32)
    torch.manual_seed(7)
    _, _, _, report = layer.route(hidden, torch.tensor([3]))
    logits = hidden[0] @ layer.router_weight[3]
    clean, raw_scale = logits[:, :5], logits[:, 5:]
    torch.manual_seed(7)
    noisy = clean + torch.randn(clean.shape) * (torch.nn.functional.softplus(raw_scale) + 0.01)
    top, index = (noisy.softmax(-1) + 1e-4).topk(2, dim=-1)
    torch.testing.assert_close(report.gates[0], torch.zeros(9, 5).scatter(-1, index, top))
    with torch.no_grad():
        first, second = model(torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1), tasks=["depth"]).logits["depth"]
    assert (first - second).abs().max() > 0  # the same image twice, routed with different noise


# ---------------------------------------------------------------------------------------------------------------------
# Routing losses against numpy
# ---------------------------------------------------------------------------------------------------------------------
TABLE = np.array([[4.0, 1.0, 0.0, 3.0], [0.5, 2.0, 6.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_mutual_information_loss_against_numpy_with_the_reference_epsilons():
    num_tokens = 13
    joint = TABLE / (num_tokens + 1e-4)
    p_task = joint.sum(1, keepdims=True) + 1e-4
    p_expert = joint.sum(0, keepdims=True) + 1e-4
    expected = -(joint * np.log(joint / p_task / p_expert + 1e-4)).sum()
    value = mutual_information_loss(torch.tensor(TABLE, dtype=torch.float32), num_tokens)
    assert value.item() == pytest.approx(expected, rel=1e-5)

    def exact(table):
        joint = table / table.sum()
        p_task, p_expert = joint.sum(1), joint.sum(0)
        return -sum(joint[t, e] * np.log(joint[t, e] / (p_task[t] * p_expert[e]))
                    for t in range(joint.shape[0]) for e in range(joint.shape[1]) if joint[t, e] > 0)  # fmt: skip

    assert mutual_information_loss(torch.tensor(TABLE), 13, "exact").item() == pytest.approx(exact(TABLE), rel=1e-6)
    # Independent routing has no information; disjoint even routing has log(T).
    assert mutual_information_loss(torch.ones(3, 5), 15, "exact").item() == pytest.approx(0.0, abs=1e-6)
    assert mutual_information_loss(torch.eye(3) * 7, 21, "exact").item() == pytest.approx(-math.log(3), rel=1e-6)
    mass = torch.tensor(TABLE, dtype=torch.float32, requires_grad=True)
    (mutual_information_loss(mass, 13) + mutual_information_loss(mass, 13, "exact")).backward()
    assert torch.isfinite(mass.grad).all()
    with pytest.raises(ValueError, match="Unknown mutual-information estimator 'kl'"):
        mutual_information_loss(mass, 13, "kl")


def test_cv_switch_and_z_losses_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 5)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) + 1e-4
    top = np.argsort(-probabilities, axis=-1)[..., :2]
    gates = np.zeros_like(probabilities)
    np.put_along_axis(gates, top, np.take_along_axis(probabilities, top, -1), -1)

    importance = gates.reshape(-1, 5).sum(0)
    importance = importance / np.abs(importance).sum()
    expected_cv = importance.var(ddof=1) / (importance.mean() ** 2 + 1e-10)
    mass = probabilities.reshape(-1, 5).sum(0)
    frequency = (gates.reshape(-1, 5) > 0).sum(0)
    expected_switch = 5 * ((mass / mass.sum()) * (frequency / frequency.sum())).sum()
    expected_z = (np.log(np.exp(logits).sum(-1) + 1e-4) ** 2).mean()

    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    assert cv_squared_loss(as_tensor(gates)).item() == pytest.approx(expected_cv, rel=1e-5)
    assert switch_loss(as_tensor(probabilities), as_tensor(gates)).item() == pytest.approx(expected_switch, rel=1e-5)
    assert z_loss(as_tensor(logits)).item() == pytest.approx(expected_z, rel=1e-5)
    # Even routing: switch 1, cv 0; a single expert has no variation; large logits stay finite.
    assert switch_loss(torch.full((4, 3), 1 / 3), torch.eye(3)[[0, 1, 2, 0, 1, 2]]).item() == pytest.approx(1.0)
    assert cv_squared_loss(torch.ones(6, 1)).item() == 0.0
    assert z_loss(torch.full((2, 3), 1e4)).item() == pytest.approx((1e4 + math.log(3)) ** 2, rel=1e-6)
    assert z_loss(torch.full((2, 3), -1e4)).item() == pytest.approx(math.log(1e-4) ** 2, rel=1e-5)


def test_model_aux_losses_are_the_layer_terms_summed_and_join_the_loss(generator):
    config = tiny_modsquad_config(cv_loss_weight=0.1, switch_loss_weight=0.01, z_loss_weight=0.001)
    model = build(config)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in model.modsquad.moe_layers]  # fmt: skip
    pixel_values = torch.randn(2, 3, 32, 48)  # non-square: position embeddings are interpolated
    labels = make_labels(2, 32, 48, generator)
    out = model(pixel_values, labels=labels)
    for hook in hooks:
        hook.remove()
    expected = dict.fromkeys(("mutual_information", "cv", "switch", "z"), 0.0)
    for name, layer in model.modsquad.moe_layers:
        hidden = inputs[name].detach().reshape(6, -1, 32).numpy().astype(np.float64)
        logits = np.einsum("tmc,tce->tme", hidden, layer.router_weight.detach().numpy())
        probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) + 1e-4
        top = np.argsort(-probabilities, axis=-1)[..., : layer.top_k]
        gates = np.zeros_like(probabilities)
        np.put_along_axis(gates, top, np.take_along_axis(probabilities, top, -1), -1)
        joint = probabilities.sum(1) / (probabilities.shape[0] * probabilities.shape[1] + 1e-4)
        p_task, p_expert = joint.sum(1, keepdims=True) + 1e-4, joint.sum(0, keepdims=True) + 1e-4
        expected["mutual_information"] += -(joint * np.log(joint / p_task / p_expert + 1e-4)).sum()
        importance = gates.reshape(-1, layer.num_experts).sum(0)
        importance /= importance.sum()
        expected["cv"] += importance.var(ddof=1) / (importance.mean() ** 2 + 1e-10)
        mass, frequency = (
            probabilities.reshape(-1, layer.num_experts).sum(0),
            (gates.reshape(-1, layer.num_experts) > 0).sum(0),
        )
        expected["switch"] += layer.num_experts * ((mass / mass.sum()) * (frequency / frequency.sum())).sum()
        expected["z"] += (np.log(np.exp(logits).sum(-1) + 1e-4) ** 2).mean()
    for name, value in expected.items():
        assert out.aux_losses[name].item() == pytest.approx(value, rel=1e-4), name

    task_losses = dense_task_losses(out.logits, labels)
    for task in ALL_TASKS:
        torch.testing.assert_close(out.task_losses[task], task_losses[task])
    expected_aux = 0.005 * out.aux_losses["mutual_information"] + 0.1 * out.aux_losses["cv"] + \
        0.01 * out.aux_losses["switch"] + 0.001 * out.aux_losses["z"]  # fmt: skip
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, sum(config.loss_weights[t] * task_losses[t] for t in ALL_TASKS) + expected_aux)

    # With two tasks (fewer than aux_loss_min_tasks = 3) the auxiliary terms stay out of the loss, as in the reference.
    two = model(pixel_values, labels={t: labels[t] for t in ("semseg", "depth")}, tasks=["semseg", "depth"])
    assert two.aux_loss is None and two.aux_losses["mutual_information"].item() != 0.0
    torch.testing.assert_close(two.loss, config.loss_weights["semseg"] * two.task_losses["semseg"] +
                               config.loss_weights["depth"] * two.task_losses["depth"])  # fmt: skip
    always = build(tiny_modsquad_config(aux_loss_min_tasks=1))(
        pixel_values, labels={"depth": labels["depth"]}, tasks=["depth"]
    )
    torch.testing.assert_close(always.aux_loss, 0.005 * always.aux_losses["mutual_information"])


# ---------------------------------------------------------------------------------------------------------------------
# Task embedding, task stacking, hidden states
# ---------------------------------------------------------------------------------------------------------------------
def test_task_embedding_is_added_before_every_block():
    model = build()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.modsquad(pixel_values, tasks=["saliency", "depth"], output_hidden_states=True)
        hidden = out.hidden_states
        assert len(hidden) == 5 and hidden[0].shape == (2, 2, 17, 32)  # 2 images x 2 tasks, batch first
        # The blocks compute with the tasks stacked task-major in the batch (row s: image s % 2, task s // 2).
        rows = model.modsquad.task_embedding[0, [2, 5]].repeat_interleave(2, dim=0)[:, None]
        for i, block in enumerate(model.modsquad.blocks):
            task_major = hidden[i].transpose(0, 1).flatten(0, 1)
            expected, _, _ = block(task_major + rows, torch.tensor([2, 5]))
            torch.testing.assert_close(hidden[i + 1], expected.unflatten(0, (2, 2)).transpose(0, 1))
        features = model.modsquad.norm(hidden[-1])[:, :, 1:].transpose(2, 3).reshape(2, 2, 32, 4, 4)
        torch.testing.assert_close(out.task_features, features)


def test_the_task_embedding_makes_tasks_differ():
    """Two tasks with identical routers and heads differ only through their task embeddings."""
    for use_task_embedding in (True, False):
        model = build(
            tiny_modsquad_config(tasks=["saliency", "edge"], task_id2label={}, use_task_embedding=use_task_embedding)
        )
        with torch.no_grad():
            for _, layer in model.modsquad.moe_layers:
                layer.router_weight[1] = layer.router_weight[0]
            model.heads["edge"].load_state_dict(model.heads["saliency"].state_dict())
            logits = model(torch.randn(2, 3, 32, 32)).logits
        difference = (logits["saliency"] - logits["edge"]).abs().max()
        # Without the embedding the two tasks compute the same function on two rows of one stacked batch, equal up to
        # the kernels' rounding (some CPUs round two batch rows differently, ~1e-8 here).
        assert difference > 1e-3 if use_task_embedding else difference < 1e-6


def test_task_subset_and_per_sample_independence():
    model = build()
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(pixel_values)
        subset = model(pixel_values, tasks=["depth", "semseg"])
        single = model(pixel_values[1:2], tasks=["depth"])
    assert list(subset.logits) == ["semseg", "depth"]
    for task in ("semseg", "depth"):
        torch.testing.assert_close(subset.logits[task], full.logits[task], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single.logits["depth"], full.logits["depth"][1:2], rtol=1e-5, atol=1e-5)


def test_hidden_states_are_on_the_gradient_path_and_follow_the_config(generator):
    model = build().train()
    out = model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator), output_hidden_states=True)
    for state in out.hidden_states:
        state.retain_grad()
    out.loss.backward()
    assert all(state.grad is not None and state.grad.abs().sum() > 0 for state in out.hidden_states)

    config = tiny_modsquad_config(output_hidden_states=True, return_dict=False)
    model = build(config)
    with torch.no_grad():
        as_tuple = model(torch.randn(1, 3, 32, 32))
    assert isinstance(as_tuple, tuple) and len(as_tuple[-1]) == 5  # logits, aux_losses, hidden_states
    assert model(torch.randn(1, 3, 32, 32), return_dict=True, output_hidden_states=False).hidden_states is None
    # Without the task embedding, blocks before the first MoE layer run once for all tasks.
    late = build(tiny_modsquad_config(use_task_embedding=False, moe_attention_layers=[2], moe_mlp_layers=[3]))
    with torch.no_grad():
        shapes = [
            tuple(h.shape) for h in late.modsquad(torch.randn(2, 3, 32, 32), output_hidden_states=True).hidden_states
        ]
    assert shapes == [(2, 1, 17, 32)] * 3 + [(2, 6, 17, 32)] * 2


def test_routing_report_gates(generator):
    model = build()
    pixel_values = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(pixel_values, tasks=["semseg", "edge"], output_gates=True)
    assert len(out.gates) == len(model.config.layer_names) == 4
    for layer_gates, names in zip(out.gates, model.config.candidate_names):
        assert list(layer_gates) == ["semseg", "edge"]
        for gates in layer_gates.values():
            assert gates.shape == (2, 4, 6, len(names))
            assert ((gates > 0).sum(-1) == 2).all()  # top-2, zeros elsewhere
            assert (gates.sum(-1) < 1).all()  # not renormalised
    # The gates of the first layer are those of its router on the patch tokens (the class token left out).
    embedded = model.modsquad.embeddings(pixel_values) + model.modsquad.task_embedding[0, 0]
    tokens = model.modsquad.blocks[0].norm1(embedded)[:, 1:].reshape(-1, 32)
    _, expected = reference_gates(tokens, model.modsquad.blocks[0].attention.router_weight[0].T, 2)
    torch.testing.assert_close(out.gates[0]["semseg"].reshape(-1, 6), expected)
    assert model(pixel_values).gates is None


# ---------------------------------------------------------------------------------------------------------------------
# transformers conventions: input embeddings, checkpointing, autocast
# ---------------------------------------------------------------------------------------------------------------------
def test_input_embeddings_and_reentrant_checkpointing_with_frozen_parameters(generator):
    """The PEFT-style setup: frozen model, a few trainable parameters inside checkpointed blocks, reentrant
    checkpointing; `enable_input_require_grads()` makes the patch embedding's output require grad so it trains."""
    model = build().train()
    assert model.get_input_embeddings() is model.modsquad.embeddings.patch_embeddings
    model.requires_grad_(False)
    trainable = model.modsquad.blocks[2].attention.query_weight
    trainable.requires_grad_(True)
    model.enable_input_require_grads()
    model.activation_checkpointing_enable({"use_reentrant": True})
    model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator)).loss.backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_reentrant_checkpointing_gives_the_same_gradients_aux_terms_included(generator):
    pixel_values, labels = torch.randn(2, 3, 32, 32), make_labels(2, 32, 32, generator)
    config = tiny_modsquad_config(mutual_information_loss_weight=1.0, z_loss_weight=0.1, cv_loss_weight=0.1)
    gradients = []
    for checkpointing in (False, True):
        model = build(config).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": True})
        model(pixel_values, labels=labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_gradients_reach_routers_experts_task_embedding_and_heads(generator):
    model = build().train()
    model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator)).loss.backward()
    for name, parameter in model.named_parameters():
        if "heads." in name or name.endswith(("router_weight", "task_embedding")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    mlp = model.modsquad.blocks[1].mlp
    assert mlp.fc1_weight.grad.abs().sum(dim=(1, 2)).gt(0).sum() >= mlp.top_k


def test_zero_initialised_routers_get_gradient_from_the_task_loss(generator):
    torch.manual_seed(0)
    model = ModSquadForDensePrediction(tiny_modsquad_config()).train()
    assert all(layer.router_weight.abs().sum() == 0 for _, layer in model.modsquad.moe_layers)
    assert model.modsquad.task_embedding.std() > 0.5  # standard normal, as in the reference
    model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator)).loss.backward()
    assert model.modsquad.blocks[0].attention.router_weight.grad.abs().sum() > 0


def test_bf16_autocast_and_gradient_checkpointing(generator):
    model = build().train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.modsquad.blocks[2].attention.query_weight.grad is not None
    # The recomputation in backward does not count the batch twice.
    counts = model.expert_usage_statistics()["depth"]["counts"]
    assert (counts.sum(-1) == 2 * 17 * 2).all()


def test_bad_inputs_raise_clear_errors(generator):
    model = build()
    with pytest.raises(ValueError, match="not a positive multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="must have 3 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['colour'\]"):
        model(torch.randn(1, 3, 32, 32), tasks=["colour"])
    with pytest.raises(ValueError, match=r"labels\['depth'\] has shape"):
        model(torch.randn(1, 3, 32, 32), labels={"depth": torch.zeros(1, 16, 16)})


# ---------------------------------------------------------------------------------------------------------------------
# Parameter count of the reference layout
# ---------------------------------------------------------------------------------------------------------------------
def test_base_preset_has_the_reference_parameter_count():
    """At the base preset (C 768, 12 blocks, 12 heads, head width 128, 24 attention experts top-12, 16 MLP experts
    top-4, twice layout, 224 px, T tasks) the backbone has as many parameters as the authors' layout, counted from
    its key shapes without `task_heads.*` and `fc_norm.*` (the pooled-class-token norm of their classification
    tasks); docs/architecture.md derives the formula 200,345,856 + 185,088 T."""
    for tasks in (["semseg", "human_parts", "saliency", "normals", "edge"], ["depth"]):
        config = ModSquadConfig(
            tasks=tasks, task_id2label={t: {0: "a", 1: "b"} for t in tasks if t in ("semseg", "human_parts")}
        )
        with torch.device("meta"):
            model = ModSquadModel(config)
        ours = sum(p.numel() for p in model.parameters())
        shapes = reference_shapes(ReferenceArchitecture(num_tasks=len(tasks)))
        reference = sum(math.prod(shape) for key, shape in shapes.items() if not key.startswith("fc_norm."))
        assert ours == reference == 200_345_856 + 185_088 * len(tasks)


# ---------------------------------------------------------------------------------------------------------------------
# Usage statistics and extraction
# ---------------------------------------------------------------------------------------------------------------------
def test_usage_statistics_follow_training_mode_and_tracking():
    model = build()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values)  # eval: not tracked
    assert all(layer.expert_counts.sum() == 0 for _, layer in model.modsquad.moe_layers)
    with torch.no_grad(), model.track_expert_usage():
        first = model(pixel_values, tasks=["depth"], output_gates=True).gates
        model(pixel_values.flip(-1), tasks=["depth"])
    assert model.modsquad._force_usage_tracking is None  # restored on exit
    statistics = model.expert_usage_statistics()
    slots = 2 * (1 + 16) * 2  # images x tokens (class token included) x top-k
    assert (statistics["depth"]["counts"].sum(-1) == 2 * slots).all()
    assert statistics["semseg"]["counts"].sum() == 0  # only the requested task is counted
    for i, layer_gates in enumerate(first):  # patch tokens of the first batch <= all its selections
        patch_counts = (layer_gates["depth"] > 0).sum(dim=(0, 1, 2))
        assert (patch_counts <= statistics["depth"]["counts"][i, : patch_counts.numel()]).all()
    ema, share = statistics["depth"]["ema"], statistics["depth"]["share"]
    torch.testing.assert_close(share.sum(-1), torch.ones(4))
    assert (ema.sum(-1) - 1).abs().max() < 1e-5
    model.train()
    with torch.no_grad():
        model(pixel_values, tasks=["edge"])
    assert model.expert_usage_statistics()["edge"]["counts"].sum() > 0
    model.reset_expert_usage()
    assert all(layer.expert_counts.sum() == 0 for _, layer in model.modsquad.moe_layers)


def _parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("renormalize", [False, True])
def test_extracted_layers_give_bit_identical_gates_to_tokens_within_the_kept_experts(renormalize):
    """The exactness statement of `extract_task_model`, layer by layer: same input -> the extracted layer's router
    logits and softmax over all experts are the full layer's; tokens whose full top-k lies within the kept experts
    get bit-identical gates; the others get the best-ranked kept experts with their full-model probabilities."""
    model = build(
        tiny_modsquad_config(num_attention_experts=12, num_mlp_experts=12, renormalize_gates=renormalize),
        router_std=2.0,
    )
    calibration = torch.randn(1, 3, 16, 16)  # 5 tokens x top-2: at most 10 of the 12 experts are selected
    small = model.extract_task_model("depth", by="router", calibration_pixel_values=calibration)
    task = ALL_TASKS.index("depth")
    hidden = torch.randn(1, 40, 32)
    checked_within = checked_outside = 0
    for (_, full_layer), (_, small_layer), kept in zip(
        model.modsquad.moe_layers, small.modsquad.moe_layers, small.config.kept_experts
    ):
        assert small_layer.router_weight.shape == full_layer.router_weight[:1].shape  # the task's whole router
        with torch.no_grad():
            full_gates = full_layer.route(hidden, torch.tensor([task]))[3].gates[0]  # (40, 12)
            small_gates = small_layer.route(hidden, torch.tensor([0]))[3].gates[0]  # (40, kept)
        full_selected = full_gates > 0
        within = ~full_selected[:, [e for e in range(12) if e not in kept]].any(dim=1)
        assert torch.equal(small_gates[within], full_gates[within][:, kept])
        checked_within += int(within.sum())
        probabilities = ((hidden[0] @ full_layer.router_weight[task]).softmax(-1) + 1e-4)[:, kept]
        for token in (~within).nonzero().flatten().tolist():
            best = probabilities[token].topk(small_layer.top_k).indices
            assert set((small_gates[token] > 0).nonzero().flatten().tolist()) == set(best.tolist())
            if not renormalize:
                torch.testing.assert_close(small_gates[token][best], probabilities[token][best])
            checked_outside += 1
    assert checked_within > 0 and checked_outside > 0  # both cases occur on these random tokens


def test_extract_by_router_keeps_outputs_and_drops_parameters(tmp_path):
    model = build(tiny_modsquad_config(num_attention_experts=12, num_mlp_experts=12), router_std=2.0)
    pixel_values = torch.randn(1, 3, 16, 16)
    statistics_before = model.expert_usage_statistics()["depth"]["counts"].clone()
    small = model.extract_task_model("depth", by="router", calibration_pixel_values=pixel_values)
    assert torch.equal(model.expert_usage_statistics()["depth"]["counts"], statistics_before)  # left as they were
    assert small.config.tasks == ["depth"] and list(small.heads) == ["depth"]
    assert max(small.config.num_experts_per_layer) <= 10 and min(small.config.num_experts_per_layer) >= 2
    assert small.config.candidate_names[0] == [f"expert {i}" for i in small.config.kept_experts[0]]
    assert _parameter_count(small) < _parameter_count(model)
    torch.testing.assert_close(small.modsquad.task_embedding[0, 0], model.modsquad.task_embedding[0, 5])
    with torch.no_grad():
        expected = model(pixel_values, tasks=["depth"], output_gates=True)
        actual = small(pixel_values, output_gates=True)
    torch.testing.assert_close(actual.logits["depth"], expected.logits["depth"], rtol=1e-5, atol=1e-5)
    for full_gates, small_gates, kept in zip(expected.gates, actual.gates, small.config.kept_experts):
        torch.testing.assert_close(small_gates["depth"], full_gates["depth"][..., kept])  # same experts, same gates
    # Re-extracting keeps the original expert ids.
    again = small.extract_task_model("depth", by="router", calibration_pixel_values=pixel_values)
    assert again.config.kept_experts == small.config.kept_experts

    small.save_pretrained(tmp_path / "depth-only")
    saved = json.loads((tmp_path / "depth-only" / "config.json").read_text())
    assert saved["kept_experts"] == small.config.kept_experts
    assert saved["auto_map"]["AutoModel"] == "modeling_modsquad.ModSquadForDensePrediction"
    for code in ("configuration_modsquad.py", "modeling_modsquad.py", "configuration_common.py", "dense_heads.py",
                 "dense_losses.py", "dense_model_utils.py", "task_definitions.py", "pipeline_dense_multitask.py"):  # fmt: skip
        assert (tmp_path / "depth-only" / code).exists(), code
    assert not (tmp_path / "depth-only" / "convert_modsquad_original.py").exists()  # a tool, not remote code
    loaded = AutoModel.from_pretrained(tmp_path / "depth-only").eval()
    assert isinstance(loaded, ModSquadForDensePrediction)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits["depth"], expected.logits["depth"], rtol=1e-5, atol=1e-5)


def test_extract_by_usage_with_the_reference_threshold():
    model = build(tiny_modsquad_config(num_attention_experts=12, num_mlp_experts=10), router_std=2.0)
    pixel_values = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="No expert usage has been recorded for task 'edge'"):
        model.extract_task_model("edge")
    with torch.no_grad(), model.track_expert_usage():
        model(pixel_values)
    small = model.extract_task_model("edge")
    with torch.no_grad():
        torch.testing.assert_close(
            small(pixel_values).logits["edge"], model(pixel_values).logits["edge"], rtol=1e-5, atol=1e-5
        )
    counts = small.expert_usage_statistics()["edge"]["counts"]  # the usage statistics travel with the experts
    assert (counts[:, : min(small.config.num_experts_per_layer)] > 0).all()

    pruned = model.extract_task_model("edge", threshold=0.3)  # experts chosen by > 30 % of the task's tokens
    for i, (_, layer) in enumerate(model.modsquad.moe_layers):
        count = layer.expert_counts[ALL_TASKS.index("edge")].float()
        share = count / count.sum()
        assert pruned.config.num_experts_per_layer[i] == max(int((share > 0.3 / layer.top_k).sum()), layer.top_k)
        tokens = count.sum() / layer.top_k
        assert ((count / tokens > 0.3) == (share > 0.3 / layer.top_k)).all()  # the same rule, per token
    assert _parameter_count(pruned) < _parameter_count(small)

    with pytest.raises(ValueError, match="by='router' needs `calibration_pixel_values`"):
        model.extract_task_model("edge", by="router")
    with pytest.raises(ValueError, match="`by` must be 'usage' or 'router'"):
        model.extract_task_model("edge", by="magic")
    with pytest.raises(ValueError, match="Unknown task 'colour'"):
        model.extract_task_model("colour")
    with pytest.raises(ValueError, match=r"`threshold` must be in \[0, 1\)"):
        model.extract_task_model("edge", threshold=2)


@pytest.mark.slow
def test_mutual_information_loss_drives_task_expert_sets_apart():
    """A short run on tiny synthetic data whose task targets depend on different input channels: with the MI loss
    weighted up, each task's expert usage entropy falls far below its start; without it, it barely moves. (Without
    the task embedding, whose random rows dominate the tokens at initialisation and so already concentrate each
    task's routing: this test isolates the loss.)"""

    def usage_entropy(model, pixel_values):
        model.eval()
        with torch.no_grad():
            gates = model(pixel_values, output_gates=True).gates
        model.train()
        entropies = []
        for layer in gates:
            for task_gates in layer.values():
                usage = (task_gates > 0).float().sum(dim=(0, 1, 2))
                usage = usage / usage.sum()
                entropies.append(-(usage * usage.clamp_min(1e-12).log()).sum())
        return torch.stack(entropies).mean().item()

    def train(mi_weight):
        torch.manual_seed(0)
        config = tiny_modsquad_config(
            num_hidden_layers=2, moe_layout="every", tasks=["saliency", "edge", "depth"], task_id2label={},
            mutual_information_loss_weight=mi_weight, use_task_embedding=False,
        )  # fmt: skip
        model = ModSquadForDensePrediction(config).train()
        for _, layer in model.modsquad.moe_layers:  # break the tie of zero routers so all experts start in use
            torch.nn.init.normal_(layer.router_weight, std=0.02)
        pixel_values = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        labels = {
            "saliency": (pixel_values[:, 0] > 0).float(),
            "edge": (pixel_values[:, 1].abs() > 1).float(),
            "depth": pixel_values[:, 2].abs() * 2,
        }
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        before = usage_entropy(model, pixel_values)
        for _ in range(20):
            optimizer.zero_grad()
            model(pixel_values, labels=labels).loss.backward()
            optimizer.step()
        return before, usage_entropy(model, pixel_values)

    before, after = train(0.1)
    assert before > 0.9 * math.log(6)  # experts start evenly used
    assert after < 0.7 * before
    control_before, control_after = train(0.0)
    assert control_before == pytest.approx(before)
    assert control_after > after + 0.3


@pytest.mark.parametrize("noisy", [False, True])
def test_extraction_with_the_authors_kept_router_rows(noisy, tmp_path):
    """router="kept" keeps only the kept experts' router rows (the authors' pruning): the softmax runs over the kept
    experts, so the same experts are chosen as with the whole router, each gate divided by the kept experts' share of
    the full softmax; the choice is recorded in the config and survives a save."""
    model = build(
        tiny_modsquad_config(num_attention_experts=12, num_mlp_experts=12, noisy_gating=noisy), router_std=2.0
    )
    pixel_values = torch.randn(1, 3, 16, 16)
    full = model.extract_task_model("depth", by="router", calibration_pixel_values=pixel_values)
    kept = model.extract_task_model("depth", by="router", calibration_pixel_values=pixel_values, router="kept")
    assert kept.config.kept_router == "kept"
    assert noisy or kept.config.kept_experts == full.config.kept_experts  # noise: each calibration pass differs
    task = model.config.tasks.index("depth")
    for (_, source), (_, layer), ids in zip(
        model.modsquad.moe_layers, kept.modsquad.moe_layers, kept.config.kept_experts
    ):
        columns = torch.tensor(ids) if not noisy else torch.tensor(ids + [i + source.router_experts for i in ids])
        assert torch.equal(layer.router_weight[0], source.router_weight[task][:, columns])
        assert layer.router_experts == len(ids) and layer.expert_ids is None
    if not noisy:  # noise makes every pass different
        with torch.no_grad():
            by_full = full(pixel_values, output_gates=True).gates
            by_kept = kept(pixel_values, output_gates=True).gates
        for full_gates, kept_gates in zip(by_full, by_kept):
            assert torch.equal(full_gates["depth"] > 0, kept_gates["depth"] > 0)  # the same experts chosen
            chosen = full_gates["depth"] > 0
            assert (kept_gates["depth"][chosen] >= full_gates["depth"][chosen] - 1e-6).all()  # renormalised upwards
    kept.save_pretrained(tmp_path / "kept")
    reloaded = ModSquadForDensePrediction.from_pretrained(tmp_path / "kept")
    assert reloaded.config.kept_router == "kept"
    with pytest.raises(ValueError, match="`router` must be 'full' or 'kept'"):
        model.extract_task_model("depth", by="router", calibration_pixel_values=pixel_values, router="some")
