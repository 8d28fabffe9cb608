"""TaskExpert model: shapes, losses, gradients, gates, task subsets, options, errors."""

import pytest
import torch
from conftest import ALL_TASKS, make_labels, tiny_config

from modeling_taskexpert import TaskExpertConfig, TaskExpertForDensePrediction, TaskExpertModel
from modeling_taskexpert.modeling_taskexpert import TaskExpertExperts
from modeling_taskexpert.testing_utils import taskexpert_experts_loop


def build(config, seed=0):
    torch.manual_seed(seed)
    return TaskExpertForDensePrediction(config).eval()


def test_logit_shapes_for_every_task(config):
    model = build(config)
    pixel_values = torch.randn(2, 3, 32, 48)  # non-square: position embeddings are interpolated
    out = model(pixel_values)
    expected_channels = {"semseg": 3, "human_parts": 3, "saliency": 1, "normals": 3, "edge": 1, "depth": 1}
    assert set(out.logits) == set(ALL_TASKS)
    for task, channels in expected_channels.items():
        assert out.logits[task].shape == (2, channels, 32, 48), task
    assert out.loss is None and out.task_losses is None


def test_gates_are_distributions_over_experts_and_memory(config):
    model = build(config)
    # Non-zero gate weights so that the gates depend on the input.
    for layer in model.taskexpert.mmoe_layers:
        torch.nn.init.normal_(layer.gates.token_weight, std=0.5)
        torch.nn.init.normal_(layer.gates.context_weight, std=0.5)
    out = model(torch.randn(2, 3, 32, 32), output_gates=True)
    assert len(out.gates) == len(config.mmoe_layers)
    for layer_gates in out.gates:
        for task, gates in layer_gates.items():
            assert gates.shape == (2, 4, 4, config.num_experts + 1)
            torch.testing.assert_close(gates.sum(-1), torch.ones(2, 4, 4))
            assert (gates >= 0).all()
            # Sample-dependent: the two images get different gates.
            assert not torch.allclose(gates[0], gates[1])


def test_uniform_and_image_level_gating():
    model = build(tiny_config(gating="uniform"))
    out = model(torch.randn(1, 3, 32, 32), output_gates=True)
    gates = out.gates[0]["depth"]
    torch.testing.assert_close(gates, torch.full_like(gates, 1 / 4))
    model = build(tiny_config(gate_granularity="image"))
    out = model(torch.randn(2, 3, 32, 32), output_gates=True)
    assert out.gates[1]["semseg"].shape == (2, 1, 1, 4)


def test_gate_top_k_keeps_k_renormalised_weights():
    model = build(tiny_config(gate_top_k=2))
    for layer in model.taskexpert.mmoe_layers:
        torch.nn.init.normal_(layer.gates.token_weight, std=1.0)
    gates = model(torch.randn(1, 3, 32, 32), output_gates=True).gates[0]["semseg"]
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))


def test_batched_experts_equal_per_expert_loop():
    for expert_type in ("mlp", "conv"):
        config = tiny_config(expert_type=expert_type, num_experts=5)
        torch.manual_seed(0)
        experts = TaskExpertExperts(config, in_channels=32)
        torch.nn.init.normal_(experts.fc1_weight, std=0.2)
        torch.nn.init.normal_(experts.fc2_weight, std=0.2)
        torch.nn.init.normal_(experts.norm_weight, std=1.0)
        tokens = torch.randn(2, 12, 32)
        torch.testing.assert_close(
            experts(tokens, (3, 4)), taskexpert_experts_loop(experts, tokens, (3, 4)), rtol=1e-5, atol=1e-5
        )


def test_assembly_matches_the_formula(config):
    """F_t = sum_e g_e Z_e + g_mem M, and the memory write M' = LN_t(F_t), computed by hand."""
    model = build(config)
    layer = model.taskexpert.mmoe_layers[0]
    torch.nn.init.normal_(layer.gates.token_weight, std=0.5)
    feature_map = torch.randn(2, 32, 4, 4)
    task_index = torch.tensor([0, 5])
    features, memory, gates = layer(feature_map, None, None, task_index)
    tokens = layer.input_norm(feature_map.flatten(2).transpose(1, 2))
    experts = layer.experts(tokens, (4, 4))
    initial = torch.einsum("bnc,tcd->btnd", tokens, layer.memory_projection[task_index])
    for i, task in enumerate(task_index.tolist()):
        g = gates[:, i]  # (B, N, E+1)
        expected = (g[..., :3, None] * experts).sum(2) + g[..., 3:] * initial[:, i]
        torch.testing.assert_close(features[:, i], expected, rtol=1e-5, atol=1e-5)
        normed = torch.nn.functional.layer_norm(expected, (16,), eps=config.layer_norm_eps)
        normed = normed * layer.memory_norm.weight[task] + layer.memory_norm.bias[task]
        torch.testing.assert_close(memory[:, i], normed, rtol=1e-5, atol=1e-5)


def test_task_subset_equals_full_forward(config):
    model = build(config)
    pixel_values = torch.randn(2, 3, 32, 32)
    full = model(pixel_values, output_gates=True)
    subset = model(pixel_values, tasks=["depth", "semseg"], output_gates=True)
    assert set(subset.logits) == {"semseg", "depth"}
    for task in ("semseg", "depth"):
        torch.testing.assert_close(subset.logits[task], full.logits[task])
        torch.testing.assert_close(subset.gates[1][task], full.gates[1][task])


def test_loss_combines_weighted_task_losses(config, generator):
    model = build(config)
    labels = make_labels(2, 32, 32, generator)
    out = model(torch.randn(2, 3, 32, 32), labels=labels)
    assert set(out.task_losses) == set(ALL_TASKS)
    expected = sum(config.loss_weights[t] * out.task_losses[t] for t in ALL_TASKS)
    torch.testing.assert_close(out.loss, expected)
    assert torch.isfinite(out.loss)


def test_partial_labels_contribute_no_loss(config, generator):
    model = build(config)
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = make_labels(2, 32, 32, generator)
    # Sample 1 lacks depth: its map is all-ignore; the loss must equal the loss of sample 0 alone.
    partial = dict(labels, depth=labels["depth"].clone())
    partial["depth"][1] = 255
    both = model(pixel_values, labels=partial).task_losses["depth"]
    first = model(pixel_values[:1], labels={"depth": labels["depth"][:1]}).task_losses["depth"]
    torch.testing.assert_close(both, first)
    # No valid pixel at all: an exact zero, not NaN.
    empty = model(pixel_values, labels={"depth": torch.full((2, 32, 32), 255.0)}).task_losses["depth"]
    assert empty.item() == 0.0


def test_gradients_reach_every_expert_gate_memory_and_head(config, generator):
    model = build(config).train()
    out = model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator))
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    layer = model.taskexpert.mmoe_layers[0]
    # Every expert's own slice of the stacked weights gets gradient.
    per_expert = layer.experts.fc2_weight.grad.abs().flatten(1).sum(1)
    assert (per_expert > 0).all()
    assert layer.memory_projection.grad.abs().flatten(1).sum(1).gt(0).all()


def test_without_memory_every_mmoe_layer_reaches_the_heads_only_through_concatenation(generator, caplog):
    """use_memory=False: with head_uses_all_layers every MMoE layer's gates train; without it the first layer is dead
    weight (no gradient), and the model says so when it is built."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            dead = build(tiny_config(use_memory=False)).train()
        assert "only the last MMoE layer reaches the heads" in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING"):
            alive = build(tiny_config(use_memory=False, head_uses_all_layers=True)).train()
        assert "only the last MMoE layer" not in caplog.text
    finally:
        hf_logging.disable_propagation()
    for model, first_layer_trains in ((dead, False), (alive, True)):
        for layer in model.taskexpert.mmoe_layers:
            torch.nn.init.normal_(layer.gates.token_weight, std=0.1)  # zero-initialised gates would hide the effect
        model(torch.randn(2, 3, 32, 32), labels=make_labels(2, 32, 32, generator)).loss.backward()
        gradient = model.taskexpert.mmoe_layers[0].gates.token_weight.grad
        assert (gradient is not None and bool(gradient.abs().sum() > 0)) == first_layer_trains


def test_overfits_one_tiny_batch(config, generator):
    model = build(config).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    # Labels constant on 8x8 blocks (the token grid), so that a tiny model can fit them.
    coarse = make_labels(2, 4, 4, generator)
    labels = {}
    for task, label in coarse.items():
        upsampled = label.float().repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2)
        labels[task] = upsampled.to(label.dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_ablations_build_and_run(generator):
    labels = make_labels(1, 32, 32, generator)
    variants = [
        dict(use_memory=False),
        dict(num_experts=1),
        dict(mmoe_layers=[4]),
        dict(tasks=["depth"], task_id2label={}),
        dict(memory_update="residual"),
        dict(memory_update="ema", memory_init="zeros"),
        dict(head_uses_all_layers=True),
        dict(head_norm="batch", depth_activation="softplus"),
        dict(gate_balance_loss_weight=0.1),
        dict(mmoe_layers=[1, 3]),  # last tap before the last layer: the backbone is truncated
    ]
    for overrides in variants:
        config = tiny_config(**overrides)
        model = build(config).train()
        task_labels = {t: labels[t] for t in config.tasks}
        out = model(torch.randn(1, 3, 32, 32), labels=task_labels, output_gates=True)
        assert torch.isfinite(out.loss), overrides
        out.loss.backward()
        num_candidates = config.num_experts + int(config.use_memory)
        assert out.gates[0][config.tasks[0]].shape[-1] == num_candidates
    # Truncation: only the layers up to the last tap exist.
    assert len(build(tiny_config(mmoe_layers=[1, 3])).taskexpert.backbone.model.layers) == 3


def test_no_memory_heads_read_last_layer_features():
    model = build(tiny_config(use_memory=False))
    base = model.taskexpert
    assert not any(hasattr(layer, "memory_norm") for layer in base.mmoe_layers)
    out = base(torch.randn(1, 3, 32, 32))
    assert out.task_features.shape == (1, 6, 16, 4, 4)


def test_gate_balance_regulariser_is_zero_for_uniform_usage():
    from modeling_taskexpert.modeling_taskexpert import gate_balance_loss

    uniform = ({"a": torch.full((2, 3, 3, 4), 0.25)},)
    assert gate_balance_loss(uniform).abs().item() < 1e-6
    peaked = torch.zeros(2, 3, 3, 4)
    peaked[..., 0] = 1
    assert gate_balance_loss(({"a": peaked},)).item() == pytest.approx(3.0)


def test_bf16_autocast_and_gradient_checkpointing(config, generator):
    model = build(config).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = make_labels(2, 32, 32, generator)
    reference = model(pixel_values, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values, labels=labels)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference.item()) < 0.05 * reference.item()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert model.taskexpert.mmoe_layers[0].gradient_checkpointing
    checkpointed = model(pixel_values, labels=labels)
    torch.testing.assert_close(checkpointed.loss, reference)
    checkpointed.loss.backward()
    assert model.taskexpert.mmoe_layers[0].experts.fc1_weight.grad is not None


def test_base_model_returns_task_features(config):
    torch.manual_seed(0)
    model = TaskExpertModel(config)
    out = model(torch.randn(1, 3, 32, 32), tasks=["normals"], output_hidden_states=True)
    assert out.tasks == ("normals",)
    assert out.task_features.shape == (1, 1, 16, 4, 4)
    assert [h.shape for h in out.hidden_states] == [(1, 32, 4, 4)] * 2


def test_other_auto_backbone_types():
    """A DINOv2 backbone built through AutoBackbone, tapped at the MMoE layers."""
    config = tiny_config(
        backbone_config={
            "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
            "mlp_ratio": 2, "image_size": 32, "patch_size": 8,
        }
    )  # fmt: skip
    model = build(config)
    out = model(torch.randn(1, 3, 32, 32), output_gates=True)
    assert out.logits["semseg"].shape == (1, 3, 32, 32)
    assert model.taskexpert.backbone.channels == [32, 32]
    # The backbone runs on the config's own backbone_config, tapped at the MMoE layers.
    backbone = model.taskexpert.backbone.model
    assert backbone.config is model.config.backbone_config and backbone.config.out_indices == [2, 4]
    assert model.get_input_embeddings() is backbone.embeddings.patch_embeddings
    model.set_attn_implementation("eager")
    assert backbone.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tasks=["semseg", "optical_flow"]), "'optical_flow' is not one of the preset tasks"),
        (dict(mmoe_layers=[2, 9]), "out of range"),
        (dict(mmoe_layers=[4, 2]), "strictly increasing"),
        (dict(num_experts=0), "`num_experts` must be a positive integer"),
        (dict(gate_top_k=9), "`gate_top_k`"),
        (dict(gating="sparse"), "`gating` must be one of"),
        (dict(task_id2label={"semseg": {0: "a"}, "human_parts": {0: "x", 1: "y"}}), "at least 2 classes"),
        (dict(tasks=["depth", "depth"]), "duplicates"),
        (dict(loss_weights={"flow": 1.0}), "Unknown task in `loss_weights`"),
        (dict(backbone_config={"hidden_size": 8}), "model_type"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tiny_config(**overrides)


def test_bad_inputs_raise_clear_errors(config, generator):
    model = build(config)
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="float tensor"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['flow'\]"):
        model(torch.randn(1, 3, 32, 32), tasks=["flow"])
    with pytest.raises(ValueError, match=r"labels\['depth'\] has shape"):
        model(torch.randn(1, 3, 32, 32), labels={"depth": torch.rand(1, 16, 16)})
    with pytest.raises(ValueError, match="int64 class ids"):
        model(torch.randn(1, 3, 32, 32), labels={"semseg": torch.zeros(1, 32, 32)})
    with pytest.raises(ValueError, match="does not predict"):
        model(torch.randn(1, 3, 32, 32), labels={"flow": torch.zeros(1, 32, 32)})


def test_config_json_round_trip(tmp_path, config):
    config.save_pretrained(tmp_path)
    loaded = TaskExpertConfig.from_pretrained(tmp_path)
    assert loaded.task_id2label == config.task_id2label
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()
    assert loaded.mmoe_layers == config.mmoe_layers and loaded.loss_weights == config.loss_weights


def test_tasks_given_as_a_string_is_a_clear_error():
    with pytest.raises(ValueError, match="`tasks` must be a list of task names, got 'semseg'"):
        tiny_config(tasks="semseg", task_id2label={})


def test_backbone_attention_implementation_is_kept():
    """The backbone is built from a copy of its config; the attention implementation chosen there must survive."""
    config = tiny_config()
    config.backbone_config._attn_implementation = "eager"
    model = TaskExpertForDensePrediction(config)
    assert model.taskexpert.backbone.model.config._attn_implementation == "eager"
    # The truncated copy does not change the config the model saves.
    assert model.config.backbone_config.num_hidden_layers == 4
