"""The shared base of the dense multi-task models and the routing-report helpers (`dense_model_utils.py`)."""

import json
import re

import pytest
import torch
from conftest import ALL_TASKS, make_labels, tiny_config
from modsquad_reference import tiny_modsquad_config

from modeling_taskexpert import ModSquadForDensePrediction, TaskExpertForDensePrediction, TaskExpertModel
from modeling_taskexpert.dense_model_utils import (
    DenseMultiTaskPreTrainedModel,
    check_routing_report,
    dominant_candidates,
    mean_candidate_weights,
    resolve_tasks,
    routing_summary,
    selection_shares,
    top_candidate_shares,
)


def _random_gates(model, std=0.5):
    for layer in model.taskexpert.mmoe_layers:
        torch.nn.init.normal_(layer.gates.token_weight, std=std)
        torch.nn.init.normal_(layer.gates.context_weight, std=std)


# ---------------------------------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------------------------------
def test_both_models_share_the_base_class():
    for cls in (TaskExpertForDensePrediction, TaskExpertModel, ModSquadForDensePrediction):
        assert issubclass(cls, DenseMultiTaskPreTrainedModel)
        assert cls.main_input_name == "pixel_values" and cls.supports_gradient_checkpointing
    # One implementation of task selection: no model type overrides it.
    assert "resolve_tasks" not in vars(TaskExpertModel) and "resolve_tasks" not in vars(TaskExpertForDensePrediction)


def test_resolve_tasks_keeps_model_order_and_names_unknown_tasks():
    assert resolve_tasks(["semseg", "depth", "edge"], ["edge", "semseg"]) == ["semseg", "edge"]
    assert resolve_tasks(["semseg", "depth"], "depth") == ["depth"]
    assert resolve_tasks(["semseg", "depth"], None) == ["semseg", "depth"]
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['sky'\]"):
        resolve_tasks(["semseg"], ["sky"])
    with pytest.raises(ValueError, match="Unknown task"):
        resolve_tasks(["semseg"], [])


def test_decode_and_loss_adds_only_positively_weighted_aux_terms(generator):
    labels = make_labels(2, 32, 32, generator)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    for weight in (0.0, 0.3):
        torch.manual_seed(0)
        model = TaskExpertForDensePrediction(tiny_config(gate_balance_loss_weight=weight)).train()
        _random_gates(model)
        out = model(pixel_values, labels=labels)
        task_total = sum(model.config.loss_weights[t] * out.task_losses[t] for t in ALL_TASKS)
        balance = out.aux_losses["gate_balance"]
        assert balance > 0  # random gates are not balanced
        if weight == 0:
            assert out.aux_loss is None  # reported in aux_losses, not added
            torch.testing.assert_close(out.loss, task_total)
        else:
            torch.testing.assert_close(out.aux_loss, weight * balance)
            torch.testing.assert_close(out.loss, task_total + weight * balance)
    # Without labels: no losses at all.
    out = model(pixel_values)
    assert out.loss is None and out.aux_loss is None and out.aux_losses is None and out.task_losses is None


def test_uniform_gating_reports_no_gate_regulariser(generator):
    model = TaskExpertForDensePrediction(tiny_config(gating="uniform")).train()
    out = model(torch.randn(1, 3, 32, 32), labels=make_labels(1, 32, 32, generator))
    assert out.aux_losses is None and out.aux_loss is None


# ---------------------------------------------------------------------------------------------------------------------
# Routing report
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_memory", [True, False])
def test_taskexpert_routing_report_matches_its_names(use_memory):
    config = tiny_config(use_memory=use_memory, head_uses_all_layers=not use_memory)
    assert config.layer_names == ["MMoE 1 (after backbone layer 2)", "MMoE 2 (after backbone layer 4)"]
    expected = ["expert 0", "expert 1", "expert 2"] + (["memory"] if use_memory else [])
    assert config.candidate_names == [expected, expected]
    assert "layer_names" not in config.to_dict() and "candidate_names" not in config.to_dict()  # derived, not saved
    model = TaskExpertForDensePrediction(config).eval()
    out = model(torch.randn(2, 3, 32, 40), tasks=["depth", "semseg"], output_gates=True)
    check_routing_report(out.gates, config.layer_names, config.candidate_names)
    assert all(list(layer) == ["semseg", "depth"] for layer in out.gates)
    assert out.gates[0]["depth"].shape == (2, 4, 5, len(expected))


def test_check_routing_report_names_the_mismatch():
    gates = ({"semseg": torch.rand(1, 2, 2, 3)},)
    check_routing_report(gates, ["a"], [["x", "y", "z"]])
    with pytest.raises(ValueError, match="1 layers of gates, 2 layer names"):
        check_routing_report(gates, ["a", "b"], [["x"], ["y"]])
    with pytest.raises(
        ValueError, match=r"layer 'a', task 'semseg' have shape \(1, 2, 2, 3\); expected \(batch, h, w, 2\)"
    ):
        check_routing_report(gates, ["a"], [["x", "y"]])


def _hand_gates():
    """Two layers (3 and 2 candidates), two tasks, batch 2 on a 1x2 grid; sparse rows (zeros) in layer 0."""
    layer0_semseg = torch.tensor(
        [[[[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]], [[[1.0, 0.0, 0.0], [0.0, 0.6, 0.4]]]]
    )  # (2, 1, 2, 3)
    layer0_depth = torch.tensor([[[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]], [[[0.3, 0.0, 0.7], [0.0, 0.9, 0.1]]]])
    layer1_semseg = torch.tensor([[[[0.25, 0.75]]], [[[0.75, 0.25]]]])  # image-level gates (2, 1, 1, 2)
    layer1_depth = torch.tensor([[[[0.1, 0.9]]], [[[0.4, 0.6]]]])
    return ({"semseg": layer0_semseg, "depth": layer0_depth}, {"semseg": layer1_semseg, "depth": layer1_depth})


def test_mean_candidate_weights_by_hand():
    means = mean_candidate_weights(_hand_gates())
    torch.testing.assert_close(means["semseg"][0], torch.tensor([1.5, 1.3, 1.2]) / 4)
    torch.testing.assert_close(means["semseg"][1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(means["depth"][1], torch.tensor([0.25, 0.75]))
    per_sample = mean_candidate_weights(_hand_gates(), per_sample=True)
    torch.testing.assert_close(per_sample["depth"][0], torch.tensor([[0.0, 0.0, 1.0], [0.15, 0.45, 0.4]]))


def test_selection_shares_count_positive_weights():
    shares = selection_shares(_hand_gates())
    # semseg layer 0 selections: token 1: e0,e1; token 2: e1,e2; token 3: e0; token 4: e1,e2 -> counts 2, 3, 2 of 7.
    torch.testing.assert_close(shares["semseg"][0], torch.tensor([2.0, 3.0, 2.0]) / 7)
    # depth layer 0: e2, e2, (e0, e2), (e1, e2) -> counts 1, 1, 4 of 6.
    torch.testing.assert_close(shares["depth"][0], torch.tensor([1.0, 1.0, 4.0]) / 6)
    torch.testing.assert_close(shares["depth"][1], torch.tensor([0.5, 0.5]))  # dense gates: uniform shares


def test_dominant_candidates_and_top_shares():
    layer0 = _hand_gates()[0]["semseg"]
    torch.testing.assert_close(dominant_candidates(layer0), torch.tensor([[[0, 2]], [[0, 1]]]))  # tie -> first
    # Leaving out candidate 0 (as the Space leaves out the memory): the best of the others.
    torch.testing.assert_close(dominant_candidates(layer0, exclude=(0,)), torch.tensor([[[1, 2]], [[1, 1]]]))
    torch.testing.assert_close(dominant_candidates(layer0, exclude=(-1,)), torch.tensor([[[0, 1]], [[0, 1]]]))
    with pytest.raises(ValueError, match="leaves none"):
        dominant_candidates(layer0, exclude=(0, 1, -1))
    with pytest.raises(ValueError, match="outside 0..2"):
        dominant_candidates(layer0, exclude=(3,))
    top = top_candidate_shares(_hand_gates())
    torch.testing.assert_close(top["semseg"][0], torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(top["depth"][1], torch.tensor([0.0, 1.0]))
    excluded = top_candidate_shares(_hand_gates(), exclude=(-1,))  # the last candidate of every layer
    torch.testing.assert_close(excluded["depth"][0], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(excluded["depth"][1], torch.tensor([1.0, 0.0]))


def test_routing_summary_is_json_and_agrees_with_the_helpers():
    gates = _hand_gates()
    summary = routing_summary(gates, ["first", "second"], [["a", "b", "c"], ["a", "b"]])
    again = json.loads(json.dumps(summary))
    assert again["layers"] == ["first", "second"] and again["candidates"] == [["a", "b", "c"], ["a", "b"]]
    assert list(again["tasks"]) == ["semseg", "depth"]
    assert again["tasks"]["semseg"]["mean_weight"][1] == pytest.approx([0.5, 0.5])
    assert again["tasks"]["semseg"]["selection_share"][0] == pytest.approx([2 / 7, 3 / 7, 2 / 7])
    assert again["tasks"]["semseg"]["top_share"][0] == pytest.approx([0.5, 0.25, 0.25])


def test_summary_of_a_real_model_sums_to_one(config):
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(config).eval()
    _random_gates(model)
    out = model(torch.randn(2, 3, 32, 32), output_gates=True)
    summary = routing_summary(out.gates, config.layer_names, config.candidate_names)
    for task in ALL_TASKS:
        for key in ("mean_weight", "selection_share", "top_share"):
            for row in summary["tasks"][task][key]:
                assert sum(row) == pytest.approx(1.0, abs=1e-5)
        # mean weights are the mean of the per-token gates
        expected = out.gates[1][task].mean(dim=(0, 1, 2))
        assert summary["tasks"][task]["mean_weight"][1] == pytest.approx(expected.tolist(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: a weights file missing tensors is refused unless that is asked for
# ---------------------------------------------------------------------------------------------------------------------
def _tiny_modsquad():
    return ModSquadForDensePrediction(
        tiny_modsquad_config(
            num_hidden_layers=2,
            num_attention_experts=4,
            num_mlp_experts=4,
            tasks=["semseg", "depth"],
            task_id2label={"semseg": {0: "a", 1: "b"}},
        )
    )


def _save_without(model, folder, dropped: list[str]):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    for key in dropped:
        del state[key]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["taskexpert", "modsquad"])
def test_a_weights_file_missing_tensors_is_refused_naming_them(kind, tmp_path):
    from transformers import AutoModel

    model = TaskExpertForDensePrediction(tiny_config()) if kind == "taskexpert" else _tiny_modsquad()
    model_class = type(model)
    backbone_key = next(key for key in model.state_dict() if not key.startswith("heads."))
    dropped = ["heads.depth.classifier.weight", backbone_key]
    _save_without(model, tmp_path, dropped)
    for load in (model_class.from_pretrained, AutoModel.from_pretrained):
        names = re.escape(", ".join(sorted(dropped)))
        with pytest.raises(OSError, match=rf"lack 2 tensor\(s\) of {model_class.__name__}: {names}\. They would be"):
            load(tmp_path)
    # Only the head may be missing: the backbone tensor is still refused.
    with pytest.raises(OSError, match=rf"lack 1 tensor\(s\) of {model_class.__name__}: {re.escape(backbone_key)}\. "):
        model_class.from_pretrained(tmp_path, allow_missing_weights=["heads."])
    # The explicit opt-in loads and freshly initialises what is missing; the rest is the saved model.
    loaded, info = model_class.from_pretrained(tmp_path, allow_missing_weights=True, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(dropped)
    saved = model.state_dict()
    for key, value in loaded.state_dict().items():
        if key not in dropped:
            assert torch.equal(value, saved[key]), key
    with pytest.raises(TypeError, match="`allow_missing_weights` must be a bool or a list of key prefixes"):
        model_class.from_pretrained(tmp_path, allow_missing_weights=1)


def test_a_complete_checkpoint_loads_as_before(tmp_path):
    model = TaskExpertForDensePrediction(tiny_config())
    model.save_pretrained(tmp_path)
    loaded = TaskExpertForDensePrediction.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # The base model inside the checkpoint loads alone (the heads are extra, not missing).
    TaskExpertModel.from_pretrained(tmp_path)


def test_the_evaluation_cli_inherits_the_refusal(tmp_path, synthetic_dataset, capsys):
    from modeling_taskexpert.evaluation.__main__ import main

    config = tiny_config(tasks=["semseg", "depth"], task_id2label={"semseg": {i: str(i) for i in range(7)}})
    folder = tmp_path / "model"
    _save_without(TaskExpertForDensePrediction(config), folder, ["heads.semseg.conv.weight"])
    arguments = ["--model", str(folder), "--dataset", str(synthetic_dataset), "--output", str(tmp_path / "out.json")]
    code = main([*arguments, "--max-samples", "2", "--cpu", "--no-progress"])
    assert code != 0 and not (tmp_path / "out.json").exists()
    assert "lack 1 tensor(s) of TaskExpertForDensePrediction: heads.semseg.conv.weight" in capsys.readouterr().err


def test_push_to_hub_offline_says_the_hub_cannot_be_reached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = TaskExpertForDensePrediction(tiny_config())
    with pytest.raises(ConnectionError, match="offline mode .*cannot be reached.*save_pretrained"):
        model.push_to_hub("someone/model")


def test_a_missing_local_model_folder_is_named_as_such(tmp_path, monkeypatch):
    """Round-3 probe: a missing local folder was reported as "Repo id must be in the form 'repo_name'..."."""
    from modeling_taskexpert.loading import load_dense_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for missing in (str(tmp_path / "nothing" / "here"), "./model", "outputs/model", "a/b/c"):
        for load in (TaskExpertForDensePrediction.from_pretrained, load_dense_model):
            with pytest.raises(OSError, match=f"The model folder {re.escape(missing)} does not exist"):
                load(missing)


def test_non_finite_weights_are_named_when_loading(tmp_path, caplog):
    """Round-3 probe: NaN weights gave all-NaN maps without a word; loading names the tensors."""
    import logging

    from safetensors.torch import load_file, save_file

    model = TaskExpertForDensePrediction(tiny_config())
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = next(key for key in state if key.startswith("heads.depth"))
    state[key][...] = float("nan")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        TaskExpertForDensePrediction.from_pretrained(tmp_path)
    assert f"NaN or infinite values in 1 tensor(s): {key}" in caplog.text
