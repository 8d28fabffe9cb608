"""The compared variants: TaskExpert, its bare backbone and a shared-decoder multi-task baseline, plus the inputs,
labels and training step the benchmarks feed them."""

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from modeling_taskexpert import TaskExpertConfig, TaskExpertForDensePrediction
from modeling_taskexpert.task_definitions import TASKS

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "hub_configs" / "models"
# Benchmark name -> published model config (hub_configs/models/taskexpert-<name>.json).
MODEL_PRESETS = {"tiny": "taskexpert-tiny", "vit-s": "taskexpert-vits", "vit-b": "taskexpert-vitb"}
VARIANTS = ("taskexpert", "backbone", "shared_decoder")


def load_config(preset: str, **overrides) -> TaskExpertConfig:
    """The published config of a preset (`MODEL_PRESETS`), with field overrides."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {preset!r}; known presets are {sorted(MODEL_PRESETS)}.")
    path = MODEL_CONFIG_DIR / f"{MODEL_PRESETS[preset]}.json"
    settings = json.loads(path.read_text())
    settings.pop("model_type", None)
    settings.update(overrides)
    return TaskExpertConfig(**settings)


def shared_decoder_config(config: TaskExpertConfig) -> TaskExpertConfig:
    """The shared-decoder baseline of a TaskExpert config: one expert (a shared MLP decoder per tapped layer),
    no memory and uniform gates, so every task reads the same features; same backbone and heads."""
    settings = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        settings.pop(key, None)
    settings.update(num_experts=1, use_memory=False, gating="uniform", gate_top_k=None)
    return TaskExpertConfig(**settings)


def build_model(config: TaskExpertConfig, seed: int = 0, device: str = "cpu") -> TaskExpertForDensePrediction:
    torch.manual_seed(seed)
    with torch.device(device):
        model = TaskExpertForDensePrediction(config)
    return model.eval()


def build_variants(config: TaskExpertConfig, device: str = "cpu") -> dict[str, nn.Module]:
    """TaskExpert, its bare backbone (the very module inside it) and the shared-decoder baseline."""
    model = build_model(config, device=device)
    return {
        "taskexpert": model,
        "backbone": model.taskexpert.backbone,
        "shared_decoder": build_model(shared_decoder_config(config), device=device),
    }


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def random_pixels(batch: int, size: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def random_labels(config: TaskExpertConfig, batch: int, size: int, seed: int = 0, device: str = "cpu") -> dict:
    """Valid labels of every task of `config` (task_definitions conventions), drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    labels = {}
    for task in config.tasks:
        kind = TASKS[task].kind.name
        if kind == "segmentation":
            label = torch.randint(0, config.num_labels_of(task), (batch, size, size), generator=generator)
        elif kind in ("saliency", "boundary"):
            label = torch.randint(0, 2, (batch, size, size), generator=generator).float()
        elif kind == "normals":
            label = nn.functional.normalize(torch.randn(batch, 3, size, size, generator=generator), dim=1)
        else:
            label = torch.rand(batch, size, size, generator=generator) * 10.0
        labels[task] = label.to(device)
    return labels


def inference_call(module: nn.Module, pixel_values: torch.Tensor, tasks: Optional[list[str]] = None) -> Callable:
    """A no-grad forward of a variant (a model, or the bare backbone)."""

    is_model = isinstance(getattr(module, "_orig_mod", module), TaskExpertForDensePrediction)

    def call():
        with torch.inference_mode():
            if is_model:
                return module(pixel_values, tasks=tasks)
            return module(pixel_values)

    return call


def train_step(
    module: nn.Module, pixel_values: torch.Tensor, labels: dict, autocast_dtype: Optional[torch.dtype] = None
) -> Callable:
    """One optimisation step (forward, backward, AdamW update) of a variant.

    A model trains on its task losses. The bare backbone has no heads: its loss is the mean square of its tapped
    maps, which back-propagates through every backbone layer a model would train.
    """
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    # A torch.compile wrapper keeps the compiled module in `_orig_mod`.
    is_model = isinstance(getattr(module, "_orig_mod", module), TaskExpertForDensePrediction)

    def step():
        with torch.autocast(pixel_values.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if is_model:
                loss = module(pixel_values, labels=labels).loss
            else:
                loss = sum(feature_map.float().pow(2).mean() for feature_map in module(pixel_values))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class ReplayBackbone(nn.Module):
    """Stands in for a model's backbone and returns feature maps computed once: timing a model with it measures
    the MMoE layers and heads alone, without the backbone's cost and noise."""

    def __init__(self, feature_maps: list[torch.Tensor], channels: list[int]):
        super().__init__()
        self.feature_maps = feature_maps
        self.channels = channels

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self.feature_maps


def replay_backbone(model: TaskExpertForDensePrediction, pixel_values: torch.Tensor) -> TaskExpertForDensePrediction:
    """Replace the backbone of `model` (in place) by a `ReplayBackbone` of its maps for `pixel_values`."""
    backbone = model.taskexpert.backbone
    with torch.inference_mode():
        feature_maps = backbone(pixel_values)
    model.taskexpert.backbone = ReplayBackbone(feature_maps, backbone.channels)
    return model
