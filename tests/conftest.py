"""Shared fixtures: tiny TaskExpert configs and label batches made here, offline."""

import os
import sys
from pathlib import Path

import pytest
import torch
from raw_datasets import nyud_raw, pascal_raw  # noqa: F401 - fixtures of raw-format archives

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# The Space is a folder of top-level modules (on a Space it is the root); its tests import them by name. Appended, so
# that they never shadow another module.
sys.path.append(str(Path(__file__).resolve().parent.parent / "space_app"))

ALL_TASKS = ["semseg", "human_parts", "saliency", "normals", "edge", "depth"]


def tiny_config(**overrides):
    from modeling_taskexpert import TaskExpertConfig

    kwargs = dict(
        backbone_config={
            "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 32, "patch_size": 8,
        },
        tasks=ALL_TASKS,
        task_id2label={"semseg": {0: "floor", 1: "wall", 2: "box"}, "human_parts": {0: "background", 1: "head", 2: "torso"}},
        mmoe_layers=[2, 4],
        num_experts=3,
        expert_hidden_size=16,
        head_hidden_size=16,
    )  # fmt: skip
    kwargs.update(overrides)
    return TaskExpertConfig(**kwargs)


def make_labels(batch: int, height: int, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random but valid labels for every task (task_definitions conventions)."""
    normals = torch.nn.functional.normalize(torch.randn(batch, 3, height, width, generator=generator), dim=1)
    return {
        "semseg": torch.randint(0, 3, (batch, height, width), generator=generator),
        "human_parts": torch.randint(0, 3, (batch, height, width), generator=generator),
        "saliency": torch.randint(0, 2, (batch, height, width), generator=generator).float(),
        "edge": torch.randint(0, 2, (batch, height, width), generator=generator).float(),
        "normals": normals,
        "depth": torch.rand(batch, height, width, generator=generator) * 5 + 0.5,
    }


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset folder (64 px), generated once per test session."""
    from modeling_taskexpert.data import generate_synthetic_dataset

    folder = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic_dataset(folder, train_size=24, val_size=8, image_size=64, seed=0, num_workers=0)
    return folder
