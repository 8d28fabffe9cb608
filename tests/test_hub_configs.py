"""Smoke test of the real-benchmark recipes: one training step and the final evaluation pass of the PASCAL-Context
and NYUD-v2 recipes on converted raw fixtures, with the recipes' own model configs (random backbone).

ViT-S on both datasets and ViT-L on PASCAL-Context: the ViT-B recipes differ from these in the backbone sizes alone
and the NYUD ViT-L recipe from the PASCAL one in its data and learning rate alone, while each ViT-L run takes minutes
on 2 CPU cores (its evaluation pass is a full 512x512 forward of a 300 M-parameter model).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The raw fixtures are those of the converter tests (imported, so that pytest uses them as fixtures here too).

from modeling_taskexpert.data import convert_nyud, convert_pascal_context, read_dataset_metadata
from modeling_taskexpert.evaluation import PRIMARY_METRICS

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_OVERRIDES = [
    "--max_steps", "1", "--warmup_steps", "0", "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "1",
    "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--max_eval_samples", "1", "--num_workers", "0",
    "--crop_size", "[64, 64]", "--mixed_precision", "no", "--model_overrides", "{backbone_checkpoint: null}",
]  # fmt: skip


def _train_one_step(recipe: str, dataset: Path, output_dir: Path) -> dict:
    command = [sys.executable, "train.py", "--config", f"hub_configs/{recipe}.yaml", "--dataset", str(dataset),
               "--output_dir", str(output_dir), *SMOKE_OVERRIDES]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"{recipe} failed:\n{completed.stderr[-3000:]}"
    return json.loads((output_dir / "metrics.json").read_text())


def _check_run(output_dir: Path, metrics: dict, tasks: list[str]) -> None:
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if record["kind"] == "train"] == [1]
    for task in tasks:
        key = PRIMARY_METRICS[task][0] if task != "edge" else "edge/odsF_approx"
        assert key in metrics, f"no {key} in {sorted(metrics)}"
    config = json.loads((output_dir / "config.json").read_text())
    assert config["tasks"] == tasks and config["backbone_checkpoint"] is None
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "README.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["pascal-context-vits", "pascal-context-vitl"])
def test_pascal_context_recipe_trains_and_evaluates(recipe, pascal_raw, tmp_path):
    raw_dir, _, _ = pascal_raw
    dataset = convert_pascal_context(raw_dir, tmp_path / "pascal-context", num_workers=0)
    metadata = read_dataset_metadata(dataset)
    # The fixture images (at most 17 px) are padded to the protocol's evaluation size.
    assert metadata["eval_size"] == [512, 512]
    metrics = _train_one_step(recipe, dataset, tmp_path / "run")
    _check_run(tmp_path / "run", metrics, ["semseg", "human_parts", "saliency", "edge", "normals"])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["nyud-vits"])
def test_nyud_recipe_trains_and_evaluates(recipe, nyud_raw, tmp_path):
    raw_dir, _, _ = nyud_raw
    dataset = convert_nyud(raw_dir, tmp_path / "nyud", num_workers=0)
    assert read_dataset_metadata(dataset)["eval_size"] == [448, 576]
    metrics = _train_one_step(recipe, dataset, tmp_path / "run")
    _check_run(tmp_path / "run", metrics, ["semseg", "edge", "normals", "depth"])
