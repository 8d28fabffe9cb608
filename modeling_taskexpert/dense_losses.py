"""The dense task losses, shared by every model type of this package: each task's kind computes its loss (see
`task_definitions`); this module checks the labels and dispatches.

All losses average over the valid pixels of the whole batch (pixels with supervision), so a sample without a label
for a task (all-unsupervised) contributes nothing, and a batch without any valid pixel gives an exact zero that still
depends on the logits (so that gradient bookkeeping in data-parallel training sees every parameter).
"""

from typing import Mapping, Optional

import torch

from .task_definitions import TaskSpec, preset_spec


def check_label(spec: TaskSpec, label: torch.Tensor, logits: torch.Tensor) -> None:
    """Raise a ValueError when a label tensor does not fit the task's kind or the logits."""
    channels = spec.label_channels
    if spec.kind.image_level:
        expected = (logits.shape[0], channels)
    else:
        batch, _, height, width = logits.shape
        expected = (batch, channels, height, width) if channels else (batch, height, width)
    if tuple(label.shape) != expected:
        raise ValueError(f"labels[{spec.name!r}] has shape {tuple(label.shape)}; expected {expected} for this batch.")
    if spec.kind.label_dtype == torch.int64 and label.dtype != torch.long:
        raise ValueError(f"labels[{spec.name!r}] must be int64 class ids, got {label.dtype}.")
    if spec.kind.label_dtype != torch.int64 and not label.is_floating_point():
        raise ValueError(f"labels[{spec.name!r}] must be a float tensor, got {label.dtype}.")


def dense_task_losses(
    logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    task_specs: Optional[Mapping[str, TaskSpec]] = None,
    config=None,
) -> dict[str, torch.Tensor]:
    """Loss of every task present in both `logits` and `labels`, computed in float32.

    `task_specs` gives each task's kind and parameters (default: the preset of the task's name); `config` the
    model-wide loss options (`boundary_positive_weight`)."""
    losses = {}
    for task, task_logits in logits.items():
        if task not in labels or labels[task] is None:
            continue
        spec = task_specs[task] if task_specs is not None else preset_spec(task)
        label = labels[task].to(task_logits.device)
        check_label(spec, label, task_logits)
        losses[task] = spec.kind.loss(task_logits.float(), label, spec, config)
    return losses
