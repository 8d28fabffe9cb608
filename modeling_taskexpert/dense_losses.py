"""Dense task losses of the benchmark protocol, shared by every model type of this package.

All losses average over the valid pixels of the whole batch (pixels whose label is not
`IGNORE_INDEX`), so a sample without a label for a task (all-ignore) contributes nothing, and a
batch without any valid pixel gives an exact zero that still depends on the logits (so that
gradient bookkeeping in data-parallel training sees every parameter).
"""

import torch
import torch.nn.functional as F

from .task_definitions import IGNORE_INDEX, TASKS


def _masked_mean(per_pixel: torch.Tensor, valid: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    if count == 0:
        return logits.sum() * 0.0
    return (per_pixel * valid).sum() / count


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    """Cross-entropy over classes; logits (B, C, H, W), labels int64 (B, H, W)."""
    valid = labels != IGNORE_INDEX
    per_pixel = F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none")
    return _masked_mean(per_pixel, valid, logits)


def saliency_loss(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    """Class-balanced binary cross-entropy; logits (B, 1, H, W), labels (B, H, W) in {0, 1}.

    The protocol uses a 2-channel softmax; one logit l with sigmoid is the same model
    (l = difference of the two softmax logits) and gives the same loss values. Positives are
    weighted by the fraction of negatives among the batch's valid pixels, negatives by its
    complement.
    """
    logits = logits[:, 0]
    valid = labels != IGNORE_INDEX
    target = labels.masked_fill(~valid, 0)
    count = valid.sum()
    positive_weight = ((target == 0) & valid).sum() / count.clamp(min=1)
    weights = torch.where(target > 0.5, positive_weight, 1.0 - positive_weight)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weights
    return _masked_mean(per_pixel, valid, logits)


def boundary_loss(logits: torch.Tensor, labels: torch.Tensor, positive_weight: float = 0.95, **_) -> torch.Tensor:
    """Weighted binary cross-entropy: w y (-log s) + (1 - w)(1 - y)(-log(1 - s)), mean over valid pixels."""
    logits = logits[:, 0]
    valid = labels != IGNORE_INDEX
    target = labels.masked_fill(~valid, 0)
    weights = torch.where(target > 0.5, positive_weight, 1.0 - positive_weight)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weights
    return _masked_mean(per_pixel, valid, logits)


def normals_loss(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    """L1 between the L2-normalised prediction and the label, summed over xyz, mean over valid pixels."""
    valid = (labels != IGNORE_INDEX).all(dim=1)
    prediction = F.normalize(logits, p=2, dim=1)
    per_pixel = (prediction - labels.masked_fill(~valid[:, None], 0)).abs().sum(dim=1)
    return _masked_mean(per_pixel, valid, logits)


def depth_loss(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    """L1 in metres over valid pixels; logits (B, 1, H, W) (after the depth activation)."""
    prediction = logits[:, 0]
    valid = labels != IGNORE_INDEX
    per_pixel = (prediction - labels.masked_fill(~valid, 0)).abs()
    return _masked_mean(per_pixel, valid, logits)


LOSS_BY_KIND = {
    "segmentation": segmentation_loss,
    "saliency": saliency_loss,
    "boundary": boundary_loss,
    "normals": normals_loss,
    "depth": depth_loss,
}


def check_label(task: str, label: torch.Tensor, logits: torch.Tensor) -> None:
    """Raise a ValueError when a label tensor does not fit the task's conventions or the logits."""
    info = TASKS[task]
    batch, _, height, width = logits.shape
    expected = (batch, 3, height, width) if info.label_channels == 3 else (batch, height, width)
    if tuple(label.shape) != expected:
        raise ValueError(f"labels[{task!r}] has shape {tuple(label.shape)}; expected {expected} for this batch.")
    if info.kind == "segmentation" and label.dtype != torch.long:
        raise ValueError(f"labels[{task!r}] must be int64 class ids, got {label.dtype}.")
    if info.kind != "segmentation" and not label.is_floating_point():
        raise ValueError(f"labels[{task!r}] must be a float tensor, got {label.dtype}.")


def dense_task_losses(
    logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], edge_positive_weight: float = 0.95
) -> dict[str, torch.Tensor]:
    """Loss of every task present in both `logits` and `labels`, computed in float32."""
    losses = {}
    for task, task_logits in logits.items():
        if task not in labels or labels[task] is None:
            continue
        label = labels[task].to(task_logits.device)
        check_label(task, label, task_logits)
        loss_fn = LOSS_BY_KIND[TASKS[task].kind]
        losses[task] = loss_fn(task_logits.float(), label, positive_weight=edge_positive_weight)
    return losses
