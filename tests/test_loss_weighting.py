"""modeling_taskexpert/loss_weighting.py: one class per strategy, applied by the models' forward, so that the loss a
model returns is the loss train.py minimises."""

import pytest
import torch
from conftest import ALL_TASKS, make_labels, tiny_config
from safetensors.torch import load_file, save_file

from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction, TaskExpertForDensePrediction
from modeling_taskexpert.loss_weighting import (
    LOSS_WEIGHTINGS,
    DynamicWeightAverage,
    FixedWeighting,
    LossWeighting,
    UncertaintyWeighting,
    build_loss_weighting,
)
from modeling_taskexpert.training.checkpoints import _own_entries


def tiny_modsquad():
    return ModSquadConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_attention_experts=4, attention_top_k=2, attention_head_dim=16, num_mlp_experts=4, mlp_top_k=2,
        tasks=ALL_TASKS, task_id2label=tiny_config().task_id2label, head_hidden_size=16,
        mutual_information_loss_weight=0.5,
    )  # fmt: skip


@pytest.fixture(params=["taskexpert", "modsquad"])
def model_and_batch(request):
    torch.manual_seed(0)
    if request.param == "taskexpert":
        model = TaskExpertForDensePrediction(tiny_config(gate_balance_loss_weight=0.3))
    else:
        model = ModSquadForDensePrediction(tiny_modsquad())
    generator = torch.Generator().manual_seed(1)
    return model.train(), torch.randn(2, 3, 32, 32, generator=generator), make_labels(2, 32, 32, generator)


def test_one_class_per_strategy():
    assert LOSS_WEIGHTINGS == {
        "fixed": FixedWeighting,
        "uncertainty": UncertaintyWeighting,
        "dwa": DynamicWeightAverage,
    }
    for name, cls in LOSS_WEIGHTINGS.items():
        weighting = build_loss_weighting(name, ["a", "b"], {"a": 1.0, "b": 2.0})
        assert type(weighting) is cls and isinstance(weighting, LossWeighting)
    # Only the uncertainty strategy learns; only DWA keeps a history.
    assert [n for n, _ in build_loss_weighting("uncertainty", ["a"], {"a": 1.0}).named_parameters()] == [
        "log_variances"
    ]
    assert not list(build_loss_weighting("fixed", ["a"], {"a": 1.0}).parameters())
    assert set(build_loss_weighting("dwa", ["a"], {"a": 1.0}).state_dict()) == {
        "base_weights", "window_sums", "window_count", "window_means"
    }  # fmt: skip
    with pytest.raises(ValueError, match="Loss weighting must be one of"):
        build_loss_weighting("equal", ["a"], {"a": 1.0})
    with pytest.raises(ValueError, match=r"no weight for task 'b'"):
        build_loss_weighting("fixed", ["a", "b"], {"a": 1.0})
    with pytest.raises(ValueError, match="have no weight"):
        FixedWeighting(["a"], {"a": 1.0})({"a": torch.tensor(1.0), "z": torch.tensor(1.0)})


def test_the_default_loss_is_the_config_weights_summed_in_task_order(model_and_batch):
    model, pixel_values, labels = model_and_batch
    out = model(pixel_values, labels=labels)
    weights = model.config.loss_weights
    expected = torch.zeros(())
    for task in out.task_losses:
        expected = expected + weights[task] * out.task_losses[task]
    assert out.aux_loss is not None  # the auxiliary term of each model type is on
    assert torch.equal(out.loss, expected + out.aux_loss)


@pytest.mark.parametrize("strategy", ["uncertainty", "dwa"])
def test_the_model_loss_is_the_given_weighting_plus_the_auxiliary_terms(model_and_batch, strategy):
    """What train.py passes (`loss_weighting=`) is what makes `loss`: the same number a user gets by calling the
    weighting on the task losses."""
    model, pixel_values, labels = model_and_batch
    weighting = build_loss_weighting(strategy, list(model.config.tasks), model.config.loss_weights, dwa_window=1)
    if strategy == "uncertainty":
        with torch.no_grad():
            weighting.log_variances.copy_(torch.linspace(-0.5, 0.5, len(model.config.tasks)))
    else:  # two windows of history, so that the weights differ from the base weights
        weighting({task: torch.tensor(1.0) for task in model.config.tasks})
        weighting({task: torch.tensor(1.0 + i) for i, task in enumerate(model.config.tasks)})
    reference = type(weighting)(list(model.config.tasks), model.config.loss_weights)
    reference.load_state_dict(weighting.state_dict())
    reference.eval()  # the check must not add to DWA's history
    out = model(pixel_values, labels=labels, loss_weighting=weighting)
    torch.testing.assert_close(out.loss, reference(out.task_losses) + out.aux_loss, rtol=0, atol=1e-6)
    assert not torch.allclose(out.loss, model(pixel_values, labels=labels).loss)  # the weighting mattered
    if strategy == "uncertainty":  # the learned weights get their gradient through the model's loss
        out.loss.backward()
        assert weighting.log_variances.grad is not None and weighting.log_variances.grad.abs().sum() > 0


def test_a_checkpoint_written_when_every_strategy_held_every_buffer_resumes(tmp_path):
    """Before one class per strategy, every weighting saved all buffers; a checkpoint of that time still loads."""
    earlier = {
        "base_weights": torch.tensor([1.0, 2.0]), "window_sums": torch.zeros(2),
        "window_count": torch.zeros((), dtype=torch.long), "window_means": torch.full((2, 2), float("nan")),
        "log_variances": torch.tensor([0.25, -0.25]),
    }  # fmt: skip
    save_file(earlier, tmp_path / "loss_weighting.safetensors")
    saved = load_file(tmp_path / "loss_weighting.safetensors")
    uncertainty = build_loss_weighting("uncertainty", ["a", "b"], {"a": 1.0, "b": 2.0})
    uncertainty.load_state_dict(_own_entries(saved, uncertainty))
    assert torch.equal(uncertainty.log_variances.detach(), earlier["log_variances"])
    fixed = build_loss_weighting("fixed", ["a", "b"], {"a": 1.0, "b": 2.0})
    fixed.load_state_dict(_own_entries(saved, fixed))
    with pytest.raises(KeyError):  # what the strategy needs must be there
        _own_entries({"base_weights": earlier["base_weights"]}, uncertainty)
