"""save_pretrained -> from_pretrained round trips, in process and through remote code in a clean process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from modeling_taskexpert import TaskExpertForDensePrediction, DenseMultiTaskImageProcessor


@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(tiny_config()).eval()
    for layer in model.taskexpert.mmoe_layers:  # non-trivial gates so that a lost weight would show
        torch.nn.init.normal_(layer.gates.token_weight, std=0.3)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(folder)
    return model, folder


def test_save_writes_safetensors_auto_map_and_code(saved_model):
    _, folder = saved_model
    files = set(os.listdir(folder))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    for code in ("configuration_taskexpert.py", "configuration_common.py", "modeling_taskexpert.py", "task_definitions.py",
                 "dense_heads.py", "dense_losses.py", "image_processing_dense_multitask.py", "pipeline_dense_multitask.py"):  # fmt: skip
        assert code in files, code
    # Test-only references and the loading helper are not remote code.
    assert "testing_utils.py" not in files and "loading.py" not in files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_taskexpert.TaskExpertConfig",
        "AutoModel": "modeling_taskexpert.TaskExpertForDensePrediction",
    }
    assert "multi-task-dense-prediction" in config["custom_pipelines"]
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert (
        processor_config["auto_map"]["AutoImageProcessor"]
        == "image_processing_dense_multitask.DenseMultiTaskImageProcessor"
    )


def test_from_pretrained_round_trip_equal_outputs(saved_model):
    model, folder = saved_model
    loaded = AutoModel.from_pretrained(folder).eval()
    assert isinstance(loaded, TaskExpertForDensePrediction)
    assert isinstance(AutoConfig.from_pretrained(folder), type(model.config))
    assert isinstance(AutoImageProcessor.from_pretrained(folder), DenseMultiTaskImageProcessor)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, actual = model(pixel_values, output_gates=True), loaded(pixel_values, output_gates=True)
    for task in expected.logits:
        torch.testing.assert_close(actual.logits[task], expected.logits[task], rtol=0, atol=0)
    torch.testing.assert_close(actual.gates[0]["semseg"], expected.gates[0]["semseg"], rtol=0, atol=0)


@pytest.mark.slow
def test_remote_code_in_a_clean_process(saved_model, tmp_path):
    """A process where our package cannot be imported loads the model, the processor and the pipeline from the
    folder with trust_remote_code=True and reproduces the outputs exactly."""
    model, folder = saved_model
    torch.manual_seed(1)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.save({"pixel_values": pixel_values, **{f"logits.{k}": v for k, v in expected.items()}}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_taskexpert"] = None  # make our package unimportable
        import numpy as np, torch
        from transformers import AutoImageProcessor, AutoModel, pipeline
        try:
            import modeling_taskexpert
            raise SystemExit("package importable")
        except ImportError:
            pass
        data = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)  # our own test tensors
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        with torch.no_grad():
            logits = model(data["pixel_values"]).logits
        for task, value in logits.items():
            assert torch.equal(value, data["logits." + task]), task
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "transformers_modules" in type(processor).__module__
        pipe = pipeline("multi-task-dense-prediction", model={str(folder)!r}, trust_remote_code=True)
        result = pipe(np.zeros((20, 24, 3), dtype=np.uint8))
        assert result["depth"]["prediction"].shape == (20, 24), result["depth"]["prediction"].shape
        print("REMOTE-OK", sorted(logits))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "REMOTE-OK" in completed.stdout


def test_remote_code_is_never_trusted_implicitly(saved_model, tmp_path):
    """Without trust_remote_code, loading the folder in a process without our package fails with the HF message."""
    _, folder = saved_model
    script = (
        "import sys; sys.modules['modeling_taskexpert'] = None\n"
        "from transformers import AutoModel\n"
        f"AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=False)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode != 0
    assert "trust_remote_code=True" in completed.stderr
