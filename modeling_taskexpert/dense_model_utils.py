"""Helpers shared by every dense multi-task model type of this package (TaskExpert, Mod-Squad): task selection, the
input check, the depth output activation, and writing the pipeline code beside a remote-code checkpoint."""

import shutil
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

from .task_definitions import PIPELINE_TASK, TASKS

# The pipeline's remote code, copied beside the weights by `save_pretrained`. It is not imported here because it
# needs PIL, which a transformers + torch environment may lack.
PIPELINE_FILES = ("pipeline_taskexpert.py", "visualization_taskexpert.py")
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {"impl": "pipeline_taskexpert.MultiTaskDensePredictionPipeline", "pt": ["AutoModel"], "type": "image"}
}


def resolve_tasks(model_tasks: list[str], tasks: Optional[list[str]]) -> list[str]:
    """The requested `tasks` in the model's order (all of `model_tasks` for None); a clear error for names the model
    does not predict."""
    if tasks is None:
        return list(model_tasks)
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [task for task in tasks if task not in model_tasks]
    if unknown or not tasks:
        raise ValueError(f"Unknown task(s) {unknown or tasks}; this model predicts {list(model_tasks)}.")
    return [task for task in model_tasks if task in tasks]


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int, patch_size: int) -> None:
    """Raise a ValueError unless `pixel_values` is a float (B, num_channels, H, W) tensor with H and W positive
    multiples of `patch_size`."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}.")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values must have {num_channels} channels (RGB), got shape {tuple(pixel_values.shape)}.")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a float tensor (normalised image), got {pixel_values.dtype}.")
    height, width = pixel_values.shape[-2:]
    if height % patch_size or width % patch_size or height < patch_size or width < patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not a positive multiple of the patch size {patch_size}; pad or resize it "
            f"(TaskExpertImageProcessor does this)."
        )


def activate_output(task: str, logits: torch.Tensor, depth_activation: str) -> torch.Tensor:
    """Apply the configured output activation of the depth head (`"none"`, `"softplus"`, `"exp"`); other tasks'
    logits pass unchanged."""
    if TASKS[task].kind == "depth":
        if depth_activation == "softplus":
            return F.softplus(logits)
        if depth_activation == "exp":
            return logits.exp()
    return logits


class RemotePipelineSaveMixin:
    """Mixin for `PreTrainedModel` subclasses: when the class is registered for remote code, `save_pretrained` also
    declares and copies the pipeline so that `pipeline(..., trust_remote_code=True)` works from the saved folder."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            self.config.custom_pipelines = CUSTOM_PIPELINES
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None:
            here = Path(__file__).parent
            for name in PIPELINE_FILES:
                if (here / name).exists():
                    shutil.copyfile(here / name, Path(save_directory) / name)
