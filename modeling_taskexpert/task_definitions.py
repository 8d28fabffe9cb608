"""The dense tasks this package knows, and the tensor conventions every part of it shares.

One place for: task names, task kinds, output channels, the ignore value, and the shapes and
dtypes of labels, logits and post-processed predictions. The data pipeline, the losses, the
metrics, the processor and the demo all read these definitions instead of repeating them.

Conventions (B = batch, H x W = the padded input size):

=============  ==========  ================================  ===============================
task           kind        label (from the collate)          post-processed prediction
=============  ==========  ================================  ===============================
semseg         segment.    int64 (B, H, W), class id         int64 (B, H, W), class id
human_parts    segment.    int64 (B, H, W), part id          int64 (B, H, W), part id
saliency       saliency    float32 (B, H, W) in {0, 1}       float32 (B, H, W), probability
edge           boundary    float32 (B, H, W) in {0, 1}       float32 (B, H, W), probability
normals        normals     float32 (B, 3, H, W) (x, y, z)    float32 (B, 3, H, W), unit length
depth          depth       float32 (B, H, W), metres         float32 (B, H, W), metres >= 0
=============  ==========  ================================  ===============================

Every label uses ``IGNORE_INDEX`` (255) for pixels that carry no supervision (padding,
unlabelled pixels, invalid depth, invalid normals on all three channels) and a sample that lacks
a task's label is filled with it entirely. Model logits are always (B, C, H, W) at input
resolution, with C = ``output_channels(task, num_labels)``.
"""

from dataclasses import dataclass
from typing import Optional

IGNORE_INDEX = 255

# Name of the transformers pipeline task this package registers.
PIPELINE_TASK = "multi-task-dense-prediction"


@dataclass(frozen=True)
class TaskInfo:
    """Static facts about one dense task."""

    name: str
    kind: str  # "segmentation" | "saliency" | "boundary" | "normals" | "depth"
    description: str
    # Output channels of the head; None means "the number of classes" (segmentation tasks).
    channels: Optional[int]
    # Label channels: 0 means a (B, H, W) map, 3 means (B, 3, H, W).
    label_channels: int


TASKS: dict[str, TaskInfo] = {
    "semseg": TaskInfo("semseg", "segmentation", "semantic segmentation", None, 0),
    "human_parts": TaskInfo("human_parts", "segmentation", "human part segmentation", None, 0),
    "saliency": TaskInfo("saliency", "saliency", "salient object detection", 1, 0),
    "edge": TaskInfo("edge", "boundary", "object boundary detection", 1, 0),
    "normals": TaskInfo("normals", "normals", "surface normal estimation", 3, 3),
    "depth": TaskInfo("depth", "depth", "monocular depth estimation (metres)", 1, 0),
}

SEGMENTATION_TASKS = tuple(name for name, info in TASKS.items() if info.kind == "segmentation")

# Class names of the PASCAL-Context multi-task benchmark: the 21 VOC classes of `semseg` (not Context-59) and the
# protocol's 6 human-part groups plus background. The model configs' defaults and the dataset converter read these.
PASCAL_SEMSEG_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
PASCAL_HUMAN_PARTS_CLASSES = ("background", "head", "torso", "uarm", "larm", "uleg", "lleg")


def check_task_name(task: str, where: str = "task") -> TaskInfo:
    """Return the `TaskInfo` of `task`, or raise a ValueError that lists the known tasks."""
    if task not in TASKS:
        raise ValueError(f"Unknown {where} {task!r}; known tasks are: {', '.join(TASKS)}.")
    return TASKS[task]


def output_channels(task: str, num_labels: Optional[int] = None) -> int:
    """Number of logit channels the head of `task` predicts."""
    info = check_task_name(task)
    if info.channels is not None:
        return info.channels
    if num_labels is None or num_labels < 2:
        raise ValueError(f"Task {task!r} is a segmentation task and needs num_labels >= 2, got {num_labels!r}.")
    return num_labels
