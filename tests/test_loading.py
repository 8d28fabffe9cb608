"""`modeling_taskexpert.loading`: a config.json without (or with a wrong) `model_type` gets a clear error from every
entry point that loads either model type, never transformers' interactive "run custom code? [y/N]" prompt."""

import builtins
import json

import pytest
import torch
from conftest import tiny_config
from modsquad_reference import tiny_modsquad_config

from modeling_taskexpert import ModSquadForDensePrediction, TaskExpertForDensePrediction
from modeling_taskexpert.loading import load_dense_model, read_model_config


@pytest.fixture
def no_prompt(monkeypatch):
    """Fails the test if anything asks the user a question on stdin (transformers' remote-code prompt does)."""
    asked = []

    def record(prompt=""):
        asked.append(prompt)
        raise EOFError  # what a closed stdin gives

    monkeypatch.setattr(builtins, "input", record)
    yield
    assert not asked, f"an interactive prompt was shown: {asked[0][-120:]!r}"


def _saved(tmp_path, kind="taskexpert"):
    if kind == "taskexpert":
        model = TaskExpertForDensePrediction(tiny_config(tasks=["depth"], task_id2label={}))
    else:
        model = ModSquadForDensePrediction(
            tiny_modsquad_config(
                num_hidden_layers=2, num_attention_experts=4, num_mlp_experts=4, tasks=["depth"], task_id2label={}
            )
        )
    folder = tmp_path / kind
    model.save_pretrained(folder)
    return model, folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["taskexpert", "modsquad"])
def test_load_dense_model_loads_both_types(tmp_path, kind, no_prompt):
    model, folder = _saved(tmp_path, kind)
    loaded = load_dense_model(folder)
    assert type(loaded) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert read_model_config(folder)["model_type"] == kind


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_a_config_without_model_type_is_named_not_prompted(tmp_path, no_prompt, trust_remote_code):
    _, folder = _saved(tmp_path)
    _edit_config(folder, model_type=None)
    assert "auto_map" in json.loads((folder / "config.json").read_text())  # what makes transformers ask
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'} has no `model_type`.*'taskexpert' or 'modsquad'"):
        load_dense_model(folder, trust_remote_code=trust_remote_code)


def test_a_misspelt_model_type_is_named(tmp_path, no_prompt):
    _, folder = _saved(tmp_path)
    _edit_config(folder, model_type="taskexpet")
    with pytest.raises(
        ValueError, match=r"has `model_type` 'taskexpet'; this package loads 'taskexpert' or 'modsquad'"
    ):
        load_dense_model(folder)


def test_class_specific_loading_knows_its_type(tmp_path, no_prompt):
    model, folder = _saved(tmp_path)
    _edit_config(folder, model_type=None)
    loaded = TaskExpertForDensePrediction.from_pretrained(folder)
    assert torch.equal(loaded.heads["depth"].classifier.weight, model.heads["depth"].classifier.weight)


def test_the_evaluation_cli_names_a_config_without_model_type(tmp_path, synthetic_dataset, capsys, no_prompt):
    from modeling_taskexpert.evaluation.__main__ import main

    _, folder = _saved(tmp_path)
    _edit_config(folder, model_type=None)
    code = main(["--model", str(folder), "--dataset", str(synthetic_dataset), "--output", str(tmp_path / "m.json"),
                 "--cpu", "--no-progress"])  # fmt: skip
    assert code != 0
    assert "has no `model_type`" in capsys.readouterr().err
