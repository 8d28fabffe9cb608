"""Helpers shared by every dense multi-task model type of this package (TaskExpert, Mod-Squad): task selection, the
input check, the depth output activation, safetensors-only loading, and writing the pipeline code beside a remote-code
checkpoint."""

import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from torch.nn import functional as F

from .dense_heads import DenseTaskHead
from .dense_losses import dense_task_losses
from .task_definitions import PIPELINE_TASK, TASKS, output_channels

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


class SafetensorsOnlyLoadMixin:
    """Mixin for `PreTrainedModel` subclasses: `from_pretrained` reads weights from safetensors files only.

    Unpickling a `.bin`/`.pt` checkpoint can run arbitrary code, so such checkpoints are refused with an explanation
    instead of being loaded (transformers falls back to them by default), and a damaged safetensors file is reported
    with its name rather than as a bare decoder error.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        source = str(pretrained_model_name_or_path)
        refusal = (
            f"{cls.__name__} loads weights only from safetensors files: pickle checkpoints (pytorch_model.bin, .pt) "
            "are refused because loading them can run arbitrary code. If you trust the file, convert it with "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`."
        )
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"use_safetensors=False is not supported. {refusal}")
        kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            local = Path(source) / "model.safetensors"
            name = str(local) if local.is_file() else f"the safetensors weights of {source}"
            raise OSError(f"{name} is damaged or truncated and cannot be read ({error}); save or download it again.") from error
        except OSError as error:
            if "no file named" not in str(error) and "does not appear to have a file named" not in str(error):
                raise  # not a missing weights file (e.g. a network error): transformers' message says it best
            pickles = sorted(p.name for p in Path(source).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f" It holds {', '.join(pickles)}." if pickles else ""
            raise OSError(f"{source} has no model.safetensors (or model.safetensors.index.json).{found} {refusal}") from error


class DenseTaskHeadsMixin:
    """The dense-prediction end shared by every model type: one `DenseTaskHead` per task on the model's task feature
    maps, the depth activation, and the weighted benchmark losses. Expects `self.config` with `tasks`,
    `head_hidden_size`, `head_norm`, `depth_activation`, `loss_weights`, `edge_positive_weight`, `num_labels_of`."""

    def build_task_heads(self, in_channels: int) -> torch.nn.ModuleDict:
        config = self.config
        return torch.nn.ModuleDict(
            {
                task: DenseTaskHead(
                    in_channels, config.head_hidden_size, output_channels(task, config.num_labels_of(task)), config.head_norm
                )
                for task in config.tasks
            }
        )

    def check_label_tasks(self, labels: Optional[dict]) -> None:
        if labels is not None:
            unknown = [task for task in labels if task not in self.config.tasks]
            if unknown:
                raise ValueError(f"labels name task(s) {unknown} that this model does not predict ({self.config.tasks}).")

    def decode_tasks(self, task_features: torch.Tensor, tasks: list[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Task feature maps (B, T, C, h, w), in the order of `tasks` -> logits per task at `size`."""
        return {
            task: activate_output(task, self.heads[task](task_features[:, i], size), self.config.depth_activation)
            for i, task in enumerate(tasks)
        }

    def weighted_task_losses(self, logits: dict, labels: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(unweighted loss per task with labels, sum of loss_weights[t] * loss_t)."""
        task_losses = dense_task_losses(logits, labels, edge_positive_weight=self.config.edge_positive_weight)
        reference = next(iter(logits.values()))
        total = sum((self.config.loss_weights[t] * value for t, value in task_losses.items()), reference.new_zeros(()))
        return task_losses, total
