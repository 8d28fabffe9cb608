"""Mod-Squad checkpoints (full and extracted per-task) load through remote code in a process without our package."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from modsquad_reference import build_modsquad as build
from transformers import AutoImageProcessor

from modeling_taskexpert import DenseMultiTaskImageProcessor


@pytest.mark.slow
def test_extracted_model_loads_through_remote_code_in_a_clean_process(tmp_path):
    model = build(router_std=2.0)
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32)
    small = model.extract_task_model("depth", by="router", calibration_pixel_values=pixel_values)
    folder = tmp_path / "depth-only"
    small.save_pretrained(folder)
    DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_modsquad.ModSquadConfig",
        "AutoModel": "modeling_modsquad.ModSquadForDensePrediction",
    }
    assert "multi-task-dense-prediction" in config["custom_pipelines"]
    assert isinstance(AutoImageProcessor.from_pretrained(folder), DenseMultiTaskImageProcessor)

    with torch.no_grad():
        expected = model(pixel_values).logits["depth"]
    torch.save({"pixel_values": pixel_values, "depth": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_taskexpert"] = None  # make our package unimportable
        import numpy as np, torch
        from transformers import AutoModel, pipeline
        data = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)  # our own test tensors
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        assert type(model).__name__ == "ModSquadForDensePrediction"
        with torch.no_grad():
            logits = model(data["pixel_values"]).logits
        assert list(logits) == ["depth"], list(logits)
        torch.testing.assert_close(logits["depth"], data["depth"], rtol=1e-5, atol=1e-5)
        pipe = pipeline("multi-task-dense-prediction", model={str(folder)!r}, trust_remote_code=True)
        result = pipe(np.zeros((20, 24, 3), dtype=np.uint8))
        assert result["depth"]["prediction"].shape == (20, 24), result["depth"]["prediction"].shape
        print("REMOTE-OK")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "REMOTE-OK" in completed.stdout
