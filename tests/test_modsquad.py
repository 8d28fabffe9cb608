"""Mod-Squad model: config, batched sparse experts against independent computations, routing, the mutual-information
loss, usage statistics, per-task extraction and its save/reload, and the MI loss separating tasks' experts."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALL_TASKS, make_labels
from transformers import AutoConfig, AutoModel

from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction
from modeling_taskexpert.dense_losses import dense_task_losses
from modeling_taskexpert.modeling_modsquad import (
    ExpertDispatch,
    expert_linear,
    load_balance_loss,
    mutual_information_loss,
)
from modeling_taskexpert.testing_utils import expert_linear_loop

REPO = Path(__file__).resolve().parents[1]
LABELS = {"semseg": {0: "floor", 1: "wall", 2: "box"}, "human_parts": {0: "background", 1: "head", 2: "torso"}}


def tiny_modsquad_config(**overrides) -> ModSquadConfig:
    kwargs = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        num_attention_experts=6, attention_top_k=2, attention_head_dim=16, num_mlp_experts=5, mlp_top_k=2,
        tasks=ALL_TASKS, task_id2label=LABELS, head_hidden_size=16,
    )  # fmt: skip
    kwargs.update(overrides)
    return ModSquadConfig(**kwargs)


def build(config=None, seed=0, router_std=0.5):
    """A model in eval mode with random (non-zero) routers, so that routing depends on the input."""
    torch.manual_seed(seed)
    model = ModSquadForDensePrediction(config or tiny_modsquad_config()).eval()
    for _, layer in model.modsquad.moe_layers:
        torch.nn.init.normal_(layer.router_weight, std=router_std)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
def test_layouts_and_hub_configs():
    twice = tiny_modsquad_config()
    assert twice.moe_attention_layers == [0, 2] and twice.moe_mlp_layers == [1, 3]
    assert twice.moe_layer_kinds == [(0, "attention"), (1, "mlp"), (2, "attention"), (3, "mlp")]
    assert twice.num_experts_per_layer == [6, 5, 6, 5]
    every = tiny_modsquad_config(moe_layout="every")
    assert every.moe_attention_layers == every.moe_mlp_layers == [0, 1, 2, 3]
    assert tiny_modsquad_config().mlp_expert_hidden_size == 64 // 2  # intermediate_size // mlp_top_k

    tiny = ModSquadConfig.from_json_file(REPO / "hub_configs/models/modsquad-tiny.json")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.patch_size, tiny.image_size) == (64, 4, 8, 128)
    assert tiny.task_id2label["semseg"][20] == "tvmonitor"  # PASCAL defaults
    vitb = ModSquadConfig.from_json_file(REPO / "hub_configs/models/modsquad-vitb.json")
    assert vitb.num_experts_per_layer == [24, 16] * 6
    assert (vitb.attention_top_k, vitb.mlp_top_k, vitb.attention_head_dim) == (12, 4, 128)


def test_config_json_round_trip(tmp_path):
    config = tiny_modsquad_config(experts_per_layer=[3, 2, 6, 5], depth_activation="softplus")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ModSquadConfig)
    expected = {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"} == expected
    assert loaded.task_id2label["semseg"] == {0: "floor", 1: "wall", 2: "box"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tasks": ["semseg", "colour"]}, "Unknown task in `tasks` 'colour'"),
        ({"attention_top_k": 7}, "`attention_top_k` (7) exceeds `num_attention_experts` (6)"),
        ({"mlp_top_k": 0}, "`mlp_top_k` must be a positive integer"),
        ({"moe_mlp_layers": [1, 4]}, "`moe_mlp_layers` entry 4 is out of range"),
        ({"moe_attention_layers": [], "moe_mlp_layers": []}, "Mod-Squad needs an MoE layer"),
        ({"experts_per_layer": [6, 5]}, "`experts_per_layer` has 2 entries; the model has 4 MoE layers"),
        ({"experts_per_layer": [6, 1, 6, 5]}, "gives 1 experts to the MoE mlp of block 1"),
        ({"moe_layout": "sometimes"}, "`moe_layout` must be one of"),
        ({"image_size": 36}, "`image_size` (36) must be a multiple of `patch_size` (8)"),
        ({"mutual_information_loss_weight": -1.0}, "`mutual_information_loss_weight` must be in [0.0, inf), got -1.0"),
        ({"task_id2label": {"semseg": {0: "a"}}}, "needs `task_id2label['semseg']` with at least 2 classes"),
        ({"num_channels": 4}, "`num_channels` must be 3"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_modsquad_config(**overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Batched experts and layers, against independent computations
# ---------------------------------------------------------------------------------------------------------------------
def test_batched_expert_linear_equals_per_expert_loop():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(23, 7, generator=generator)
    weight, bias = torch.randn(5, 7, 4, generator=generator), torch.randn(5, 4, generator=generator)
    index = torch.randint(0, 4, (23, 2), generator=generator)  # expert 4 gets no token
    index[:, 1] = (index[:, 0] + 1) % 4
    batched = expert_linear(inputs, index, weight, bias)
    torch.testing.assert_close(batched, expert_linear_loop(inputs, index, weight, bias), rtol=1e-5, atol=1e-5)
    # And against the definition, slot by slot.
    n, j = 11, 1
    torch.testing.assert_close(batched[n, j], inputs[n] @ weight[index[n, j]] + bias[index[n, j]])
    # Gradients flow to the inputs and to used experts only.
    weight.requires_grad_(True)
    expert_linear(inputs, index, weight, None).sum().backward()
    assert weight.grad[4].abs().sum() == 0 and weight.grad[:4].abs().sum() > 0


def test_dispatch_combine_is_the_gate_weighted_sum():
    index = torch.tensor([[0, 2], [2, 1], [0, 1]])
    gates = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    dispatch = ExpertDispatch(index, num_experts=3)
    assert dispatch.capacity == 2
    expert_outputs = torch.tensor([[10.0], [20.0], [30.0]])  # expert e outputs its constant for every slot
    grouped = dispatch.dispatch(torch.zeros(3, 1)) + expert_outputs[:, None]
    expected = torch.tensor([[0.7 * 10 + 0.3 * 30], [0.5 * 30 + 0.5 * 20], [0.9 * 10 + 0.1 * 20]])
    torch.testing.assert_close(dispatch.combine(grouped, gates), expected)


def _routing(hidden, router_weight, top_k):
    """Independent top-k routing: probabilities, renormalised gates, indices."""
    probabilities = (hidden @ router_weight).softmax(-1)
    top, index = probabilities.topk(top_k, dim=-1)
    return probabilities, top / top.sum(-1, keepdim=True), index


def test_moe_mlp_matches_dense_computation_of_every_expert():
    model = build()
    layer = model.modsquad.blocks[1].mlp
    torch.nn.init.normal_(layer.fc1_bias)
    task_index = torch.tensor([0, 5])
    hidden = torch.randn(2 * 3, 17, 32)  # two tasks x three images, task-major
    output, routing = layer(hidden, task_index)

    expected = torch.empty_like(hidden)
    for t, task in enumerate(task_index.tolist()):
        x = hidden[3 * t : 3 * (t + 1)]
        _, gates, index = _routing(x, layer.router_weight[task], layer.top_k)
        every = torch.stack(
            [torch.nn.functional.gelu(x @ layer.fc1_weight[e] + layer.fc1_bias[e]) @ layer.fc2_weight[e] + layer.fc2_bias[e] for e in range(5)],
            dim=2,
        )  # (3, 17, E, C)
        chosen = every.gather(2, index[..., None].expand(-1, -1, -1, 32))
        expected[3 * t : 3 * (t + 1)] = (chosen * gates[..., None]).sum(2)
        assert routing.counts[t].sum() == 3 * 17 * layer.top_k
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_moe_attention_matches_dense_computation_of_every_head():
    model = build()
    layer = model.modsquad.blocks[0].attention
    torch.nn.init.normal_(layer.query_bias)
    task_index = torch.tensor([2])
    x = torch.randn(2, 9, 32)
    output, routing = layer(x, task_index)

    dim = layer.head_dim
    _, gates, index = _routing(x, layer.router_weight[2], layer.top_k)
    key = x @ layer.key_value.weight[:dim].T + layer.key_value.bias[:dim]
    value = x @ layer.key_value.weight[dim:].T + layer.key_value.bias[dim:]
    queries = torch.einsum("blc,ecd->bled", x, layer.query_weight) + layer.query_bias  # every expert's query
    attention = (torch.einsum("bled,bmd->blem", queries, key) / math.sqrt(dim)).softmax(-1)
    heads = torch.einsum("blem,bmd->bled", attention, value)
    projected = torch.einsum("bled,edc->blec", heads, layer.output_weight) + layer.output_bias
    chosen = projected.gather(2, index[..., None].expand(-1, -1, -1, 32))
    torch.testing.assert_close(output, (chosen * gates[..., None]).sum(2), rtol=1e-5, atol=1e-5)
    probabilities = (x @ layer.router_weight[2]).softmax(-1)
    torch.testing.assert_close(routing.probabilities[0], probabilities.reshape(-1, 6))


# ---------------------------------------------------------------------------------------------------------------------
# Routing losses
# ---------------------------------------------------------------------------------------------------------------------
def _numpy_minus_mutual_information(table: np.ndarray) -> float:
    joint = table / table.sum()
    p_task, p_expert = joint.sum(1), joint.sum(0)
    total = 0.0
    for t in range(joint.shape[0]):
        for e in range(joint.shape[1]):
            if joint[t, e] > 0:
                total += joint[t, e] * np.log(joint[t, e] / (p_task[t] * p_expert[e]))
    return -total


def test_mutual_information_loss_against_numpy():
    table = np.array([[4.0, 1.0, 0.0, 3.0], [0.5, 2.0, 6.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    value = mutual_information_loss(torch.tensor(table, dtype=torch.float32))
    assert value.item() == pytest.approx(_numpy_minus_mutual_information(table), rel=1e-5)
    # Independent routing has no information; disjoint even routing has log(T).
    assert mutual_information_loss(torch.ones(3, 5)).item() == pytest.approx(0.0, abs=1e-6)
    assert mutual_information_loss(torch.eye(3) * 7).item() == pytest.approx(-math.log(3), rel=1e-6)
    # Finite gradients even with zero entries.
    mass = torch.tensor(table, dtype=torch.float32, requires_grad=True)
    mutual_information_loss(mass).backward()
    assert torch.isfinite(mass.grad).all()


def test_load_balance_loss_is_one_for_even_routing_and_larger_otherwise():
    even = load_balance_loss(torch.full((2, 10, 4), 0.25), torch.full((2, 4), 5))
    assert even.item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(10, -1)[None]
    assert load_balance_loss(skewed, torch.tensor([[10, 0, 0, 0]])).item() == pytest.approx(4 * 0.7)


def test_forward_outputs_losses_and_usage(generator):
    config = tiny_modsquad_config(load_balance_loss_weight=0.01)
    model = build(config)
    pixel_values = torch.randn(2, 3, 32, 48)  # non-square: position embeddings are interpolated
    labels = make_labels(2, 32, 48, generator)
    out = model(pixel_values, labels=labels)
    expected_channels = {"semseg": 3, "human_parts": 3, "saliency": 1, "normals": 3, "edge": 1, "depth": 1}
    for task, channels in expected_channels.items():
        assert out.logits[task].shape == (2, channels, 32, 48), task
    assert set(out.task_losses) == set(ALL_TASKS) and "mutual_information" not in out.task_losses
    task_losses = dense_task_losses(out.logits, labels)
    for task in ALL_TASKS:
        torch.testing.assert_close(out.task_losses[task], task_losses[task])
    expected = sum(config.loss_weights[t] * task_losses[t] for t in ALL_TASKS)
    expected_aux = 0.005 * out.aux_losses["mutual_information"] + 0.01 * out.aux_losses["load_balance"]
    torch.testing.assert_close(out.aux_loss, expected_aux)
    expected = expected + expected_aux
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_losses["mutual_information"] < 0  # random routers: tasks route differently
    for task in ALL_TASKS:
        usage = out.expert_usage[task]
        assert usage.shape == (4, 6)  # 4 MoE layers, padded to the largest expert count
        torch.testing.assert_close(usage.sum(-1), torch.ones(4))
        assert (usage[[1, 3], 5] == 0).all()  # MLP layers have 5 experts: padding


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


def test_gradients_reach_routers_experts_and_heads(generator):
    model = build().train()
    out = model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator))
    out.loss.backward()
    for name, parameter in model.named_parameters():
        if "heads." in name or name.endswith("router_weight"):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    mlp = model.modsquad.blocks[1].mlp
    assert mlp.fc1_weight.grad.abs().sum(dim=(1, 2)).gt(0).sum() >= mlp.top_k


def test_zero_initialised_routers_get_gradient_from_the_task_loss(generator):
    torch.manual_seed(0)
    model = ModSquadForDensePrediction(tiny_modsquad_config()).train()
    assert all(layer.router_weight.abs().sum() == 0 for _, layer in model.modsquad.moe_layers)
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
# Usage statistics and extraction
# ---------------------------------------------------------------------------------------------------------------------
def test_usage_statistics_follow_training_mode_and_tracking():
    model = build()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values)  # eval: not tracked
    assert all(layer.expert_counts.sum() == 0 for _, layer in model.modsquad.moe_layers)
    with torch.no_grad(), model.track_expert_usage():
        first = model(pixel_values, tasks=["depth"]).expert_usage["depth"]
        second = model(pixel_values.flip(-1), tasks=["depth"]).expert_usage["depth"]
    assert model.modsquad._force_usage_tracking is None  # restored on exit
    statistics = model.expert_usage_statistics()
    slots = 2 * (1 + 16) * 2  # images x tokens (class token included) x top-k
    torch.testing.assert_close(statistics["depth"]["counts"].float(), (first + second) * slots)
    assert statistics["semseg"]["counts"].sum() == 0  # only the requested task is counted
    ema = statistics["depth"]["ema"]
    torch.testing.assert_close(ema, 0.99 * first + 0.01 * second)  # first batch initialises the average
    model.train()
    with torch.no_grad():
        model(pixel_values, tasks=["edge"])
    assert model.expert_usage_statistics()["edge"]["counts"].sum() > 0
    model.reset_expert_usage()
    assert all(layer.expert_counts.sum() == 0 for _, layer in model.modsquad.moe_layers)


def _parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


def test_extract_by_router_keeps_outputs_and_drops_parameters(tmp_path):
    model = build(tiny_modsquad_config(num_attention_experts=12, num_mlp_experts=12), router_std=2.0)
    pixel_values = torch.randn(1, 3, 16, 16)  # 5 tokens x top-2: at most 10 of the 12 experts are selected
    small = model.extract_task_model("depth", by="router", calibration_pixel_values=pixel_values)
    assert small.config.tasks == ["depth"] and list(small.heads) == ["depth"]
    assert max(small.config.experts_per_layer) <= 10
    assert min(small.config.experts_per_layer) >= 2
    assert _parameter_count(small) < _parameter_count(model)
    with torch.no_grad():
        expected = model(pixel_values).logits["depth"]
        actual = small(pixel_values)
    torch.testing.assert_close(actual.logits["depth"], expected, rtol=1e-5, atol=1e-5)
    # Kept experts are exactly those the task selected; the router columns are the task's.
    usage = model(pixel_values, tasks=["depth"]).expert_usage["depth"]
    for i, (_, layer) in enumerate(model.modsquad.moe_layers):
        kept = usage[i, : layer.num_experts].nonzero().flatten()
        assert small.config.experts_per_layer[i] == max(kept.numel(), layer.top_k)
        small_layer = small.modsquad.moe_layers[i][1]
        torch.testing.assert_close(small_layer.router_weight[0], layer.router_weight[5][:, kept])

    # Saved and reloaded (AutoModel) with the same outputs.
    small.save_pretrained(tmp_path / "depth-only")
    saved = json.loads((tmp_path / "depth-only" / "config.json").read_text())
    assert saved["experts_per_layer"] == small.config.experts_per_layer
    assert saved["auto_map"]["AutoModel"] == "modeling_modsquad.ModSquadForDensePrediction"
    for code in ("configuration_modsquad.py", "modeling_modsquad.py", "configuration_common.py", "dense_heads.py",
                 "dense_losses.py", "dense_model_utils.py", "task_definitions.py", "pipeline_taskexpert.py"):  # fmt: skip
        assert (tmp_path / "depth-only" / code).exists(), code
    loaded = AutoModel.from_pretrained(tmp_path / "depth-only").eval()
    assert isinstance(loaded, ModSquadForDensePrediction)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits["depth"], expected, rtol=1e-5, atol=1e-5)


def test_extract_by_usage_with_and_without_threshold():
    model = build(tiny_modsquad_config(num_attention_experts=12, num_mlp_experts=10), router_std=2.0)
    pixel_values = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="No expert usage has been recorded for task 'edge'"):
        model.extract_task_model("edge")
    with torch.no_grad(), model.track_expert_usage():
        model(pixel_values)
    small = model.extract_task_model("edge")
    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values).logits["edge"], model(pixel_values).logits["edge"], rtol=1e-5, atol=1e-5)
    counts = small.expert_usage_statistics()["edge"]["counts"]  # the usage statistics travel with the experts
    assert (counts[:, : min(small.config.experts_per_layer)] > 0).all()

    pruned = model.extract_task_model("edge", threshold=0.2)  # few experts have a 20% share: top-k tops up
    for i, (_, layer) in enumerate(model.modsquad.moe_layers):
        share = layer.expert_counts[ALL_TASKS.index("edge")].float()
        share = share / share.sum()
        assert pruned.config.experts_per_layer[i] == max(int((share > 0.2).sum()), layer.top_k)
    assert _parameter_count(pruned) < _parameter_count(small)

    with pytest.raises(ValueError, match="by='router' needs `calibration_pixel_values`"):
        model.extract_task_model("edge", by="router")
    with pytest.raises(ValueError, match="`by` must be 'usage' or 'router'"):
        model.extract_task_model("edge", by="magic")
    with pytest.raises(ValueError, match="Unknown task 'colour'"):
        model.extract_task_model("colour")


@pytest.mark.slow
def test_mutual_information_loss_drives_task_expert_sets_apart():
    """A short run on tiny synthetic data whose task targets depend on different input channels: with the MI loss
    weighted up, each task's expert usage entropy falls far below its start; without it, it barely moves."""

    def usage_entropy(model, pixel_values):
        model.eval()
        with torch.no_grad():
            usage = model(pixel_values).expert_usage
        model.train()
        return torch.stack([-(u * u.clamp_min(1e-12).log()).sum(-1) for u in usage.values()]).mean().item()

    def train(mi_weight):
        torch.manual_seed(0)
        config = tiny_modsquad_config(
            num_hidden_layers=2, moe_layout="every", tasks=["saliency", "edge", "depth"], task_id2label={},
            mutual_information_loss_weight=mi_weight,
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
