"""What a transformers user meets with remote code, in an environment holding only torch, transformers, numpy and
pillow (no `modeling_taskexpert`, no gradio, no httpx): loading, a save -> load round trip (what fine-tuning and
`push_to_hub` do), the pipeline from the saved folder, and `pipe.save_pretrained`, for both model types."""

import subprocess
import textwrap

import pytest
import torch
from clean_environment import clean_environment_packages, clean_python
from conftest import tiny_config
from modsquad_reference import build_modsquad
from safetensors.torch import save_file

from modeling_taskexpert import TaskExpertForDensePrediction, DenseMultiTaskImageProcessor

pytestmark = pytest.mark.slow


def test_the_clean_environment_holds_only_what_transformers_users_have():
    installed = clean_environment_packages(clean_python())
    assert {"torch", "transformers", "numpy", "pillow"} <= installed
    assert not {"modeling-taskexpert", "gradio", "httpx", "accelerate", "datasets", "requests"} & installed


@pytest.mark.parametrize("model_type", ["taskexpert", "modsquad"])
def test_remote_code_survives_a_save_and_load_round_trip_with_its_pipeline(model_type, tmp_path):
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(tiny_config()).eval() if model_type == "taskexpert" else build_modsquad()
    source = tmp_path / "source"
    model.save_pretrained(source)
    DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(source)
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values).logits
    save_file(
        {"pixel_values": pixel_values, **{f"logits.{k}": v for k, v in expected.items()}}, tmp_path / "io.safetensors"
    )
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, AutoModel, pipeline
        try:
            import modeling_taskexpert
            raise SystemExit("the package is importable")
        except ImportError:
            pass
        data = load_file({str(tmp_path / "io.safetensors")!r})
        model = AutoModel.from_pretrained({str(source)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(source)!r}, trust_remote_code=True)
        model.save_pretrained("resaved")  # what fine-tuning and push_to_hub do
        processor.save_pretrained("resaved")
        again = AutoModel.from_pretrained("resaved", trust_remote_code=True).eval()
        with torch.no_grad():
            for loaded in (model, again):
                logits = loaded(data["pixel_values"]).logits
                assert all(torch.equal(logits[t], data["logits." + t]) for t in logits), "outputs changed"
        image = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
        pipe = pipeline("multi-task-dense-prediction", model="resaved", trust_remote_code=True)
        first = pipe(image)
        pipe.save_pretrained("pipeline-saved")
        second = pipeline("multi-task-dense-prediction", model="pipeline-saved", trust_remote_code=True)(image)
        assert sorted(first) == sorted(second) == sorted(logits)
        for task in first:
            assert np.array_equal(first[task]["prediction"], second[task]["prediction"]), task
        print("CLEAN-OK", sorted(first))
        """
    )
    completed = subprocess.run(
        [str(clean_python()), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"),
             "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "CLEAN-OK" in completed.stdout
