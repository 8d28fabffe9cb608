"""Task kinds and task specifications: a task *kind* is code, a task *name* is data.

A **kind** (`TaskKind` subclass, one per kind, all in this file) declares everything that follows from what a task
predicts: the head's output channels from the task's parameters, the output activation and post-processing, the loss
with its ignore rule, the label tensor's dtype and the value that marks unsupervised pixels, which label values are
valid, what a horizontal flip or a zoom does to a label, the primary metric and its direction (for Δm), the Hub
category, the card's wording and the demo's legend. Kinds now: `segmentation` (N named classes), `saliency`,
`boundary`, `normals`, `depth` (metres) and `regression` (C channels with a declared range and unit).

A **task** (`TaskSpec`) is a name, a kind and the kind's parameters (class names, channels, range, unit, ...). Model
configs and dataset metadata declare their tasks as `{name: {"kind": ..., parameter: value}}`; the six tasks of the
PASCAL-Context / NYUD-v2 protocol are presets (`PRESET_TASKS`), so a config or dataset that names them needs no
declaration.

This module needs only torch and numpy: it is part of the remote code of saved models. The dataset side registers
each kind's storage codec in `data/labels.py`, the evaluation side each kind's meter in `evaluation/metrics.py`.

Conventions (B = batch, H x W = the padded input size):

=============  ================================  =====================================  ==========================
kind           label (from the collate)          post-processed prediction              unsupervised label value
=============  ================================  =====================================  ==========================
segmentation   int64 (B, H, W), class id         int64 (B, H, W), class id              255
saliency       float32 (B, H, W) in {0, 1}       float32 (B, H, W), probability         255
boundary       float32 (B, H, W) in {0, 1}       float32 (B, H, W), probability         255
normals        float32 (B, 3, H, W) (x, y, z)    float32 (B, 3, H, W), unit length      255 on all three channels
depth          float32 (B, H, W), metres         float32 (B, H, W), metres >= 0         255
regression     float32 (B, C, H, W), its unit    float32 (B, C, H, W), clamped to range NaN on every channel
=============  ================================  =====================================  ==========================

A sample that lacks a task's label is filled with the unsupervised value entirely. Model logits are always
(B, C, H, W) at input resolution, with C = `TaskSpec.head_channels`.
"""

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

# Name of the transformers pipeline task this package registers.
PIPELINE_TASK = "multi-task-dense-prediction"

# Class names of the PASCAL-Context multi-task benchmark: the 21 VOC classes of `semseg` (not Context-59) and the
# protocol's 6 human-part groups plus background. The presets' defaults and the dataset converter read these.
PASCAL_SEMSEG_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
PASCAL_HUMAN_PARTS_CLASSES = ("background", "head", "torso", "uarm", "larm", "uleg", "lleg")


def _masked_mean(per_pixel: torch.Tensor, valid: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean of `per_pixel` over the valid pixels of the batch; an exact zero that still depends on the logits when
    none is valid (so that data-parallel gradient bookkeeping sees every parameter)."""
    count = valid.sum()
    if count == 0:
        return logits.sum() * 0.0
    return (per_pixel * valid).sum() / count


def _shown(values) -> str:
    values = sorted({float(v) for v in values})
    shown = ", ".join(f"{v:g}" for v in values[:8])
    return shown + (f", ... ({len(values)} distinct values)" if len(values) > 8 else "")


# ---------------------------------------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------------------------------------
class TaskKind(abc.ABC):
    """What a kind of dense task declares. Subclasses set the class attributes and implement the methods that
    depend on the kind; a method's `spec` is the `TaskSpec` of the task at hand."""

    name: str = ""
    description: str = ""  # what a task of this kind predicts, in a few words (cards, the demo)
    parameters: tuple[str, ...] = ()  # parameters a declaration may give (besides `kind`, `description`, `column`)
    label_dtype: torch.dtype = torch.float32
    unsupervised_value: float = float(IGNORE_INDEX)  # label tensor value of pixels without supervision
    primary_metric: str = ""  # result key suffix: "<task>/<primary_metric>"
    higher_is_better: bool = True
    hub_category: Optional[str] = None  # Hub task category of datasets and models with such a task
    stored_as: str = ""  # the dataset column's encoding, for dataset cards
    legend: str = "colorbar"  # "classes" (a swatch per class), "colorbar" (a scale) or "rgb" (direction colours)
    image_level: bool = False  # one prediction per image (logits (B, C), labels (B, C)) instead of a map
    has_class_names: bool = False  # whether a task of the kind names its classes (`task_id2label`)
    negate_on_flip: tuple[int, ...] = ()  # label channels whose sign changes on a horizontal flip
    scales_with_zoom: bool = False  # values divide by the zoom factor when the image is resized (depth)
    card_task_type: str = ""  # the model-index task type of a model card
    # Metric key suffix -> (model-index metric type, label with its unit; "{unit}" is the task's unit): the metrics a
    # model card lists, the primary one first.
    card_metrics: dict[str, tuple[str, str]] = {}
    lower_is_better: tuple[str, ...] = ()  # metric suffixes (besides a lower-is-better primary) where lower is better

    def check_parameters(self, task: str, parameters: dict, class_names: Optional[tuple]) -> dict:
        """The kind's parameters with defaults filled in; a ValueError naming the task for a bad one."""
        return parameters

    def head_channels(self, spec: "TaskSpec") -> int:
        return 1

    def label_channels(self, spec: "TaskSpec") -> int:
        """0 for a (B, H, W) label, C for (B, C, H, W)."""
        return 0

    def stored_values(self, spec: "TaskSpec") -> str:
        """What the stored values mean, for dataset cards."""
        return ""

    def storage(self, spec: "TaskSpec") -> str:
        """How the dataset column stores the task's labels, for dataset cards."""
        return self.stored_as

    def activate(self, logits: torch.Tensor, spec: "TaskSpec", config) -> torch.Tensor:
        """The head's output activation (identity unless the kind or config asks for one)."""
        return logits

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, spec: "TaskSpec", config) -> torch.Tensor:
        """The task's loss, averaged over the pixels with supervision (an exact zero when there is none)."""

    def postprocess(self, logits: torch.Tensor, spec: "TaskSpec") -> torch.Tensor:
        """Logits (B, C, H, W) -> predictions in the kind's convention (see the module docstring)."""
        return logits[:, 0]

    def postprocess_steps(self, spec: "TaskSpec") -> list[dict]:
        """`postprocess` as data, for runtimes without torch (the ONNX export's description): steps applied in order
        to the (B, C, H, W) logits, each one of {"op": "channel", "index": i} (keep channel i, dropping the axis),
        {"op": "argmax"} (over the channels), {"op": "sigmoid"}, {"op": "l2_normalize", "eps": e} (over the
        channels, norm floored at e) and {"op": "clip", "min": a, "max": b} (either bound may be None)."""
        return [{"op": "channel", "index": 0}]

    def valid_label_pixels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, H, W) mask of the pixels that carry supervision."""
        valid = labels != IGNORE_INDEX
        return valid.all(dim=1) if labels.dim() == 4 else valid

    def invalid_label_values(self, label, spec: "TaskSpec") -> Optional[str]:
        """None when the decoded label (a numpy array in the working convention of the data pipeline: (H, W) or
        (H, W, C)) holds only valid values; otherwise what is wrong, in words."""
        return None


class SegmentationKind(TaskKind):
    name = "segmentation"
    description = "segmentation"
    card_task_type = "image-segmentation"
    card_metrics = {"mIoU": ("mean_iou", "mIoU (%)"), "pixel_accuracy": ("accuracy", "Pixel accuracy (%)")}
    parameters = ("background_only_is_unlabelled",)
    label_dtype = torch.int64
    primary_metric = "mIoU"
    hub_category = "image-segmentation"
    stored_as = "PNG, 8-bit gray"
    legend = "classes"
    has_class_names = True

    def check_parameters(self, task, parameters, class_names):
        if not class_names or len(class_names) < 2:
            raise ValueError(f"Segmentation task {task!r} needs at least 2 classes (class names), got {class_names!r}.")
        if len(class_names) > IGNORE_INDEX:
            raise ValueError(
                f"Segmentation task {task!r} has {len(class_names)} classes; at most {IGNORE_INDEX} fit the 8-bit "
                f"label maps (ids 0..{IGNORE_INDEX - 1}, {IGNORE_INDEX} = ignore)."
            )
        flag = parameters.get("background_only_is_unlabelled", False)
        if not isinstance(flag, bool):
            raise ValueError(f"Task {task!r}: `background_only_is_unlabelled` must be true or false, got {flag!r}.")
        return {"background_only_is_unlabelled": flag}

    def head_channels(self, spec):
        return spec.num_classes

    def stored_values(self, spec):
        extra = (
            "; a map with class 0 only counts as unlabelled (no annotated instance)"
            if spec.parameters.get("background_only_is_unlabelled")
            else ""
        )
        return f"class id (names below), {IGNORE_INDEX} = ignore{extra}"

    def loss(self, logits, labels, spec, config):
        """Cross-entropy over classes; logits (B, C, H, W), labels int64 (B, H, W)."""
        valid = labels != IGNORE_INDEX
        per_pixel = F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none")
        return _masked_mean(per_pixel, valid, logits)

    def postprocess(self, logits, spec):
        return logits.argmax(dim=1)

    def postprocess_steps(self, spec):
        return [{"op": "argmax"}]

    def invalid_label_values(self, label, spec):
        import numpy as np

        values = np.unique(label)
        bad = values[((values < 0) | (values >= spec.num_classes)) & (values != IGNORE_INDEX)]
        if bad.size:
            return (
                f"class ids must be 0 to {spec.num_classes - 1} ({spec.num_classes} classes) or {IGNORE_INDEX} "
                f"(ignore), found {bad[:10].tolist()}"
            )
        return None


class _BinaryKind(TaskKind):
    """A per-pixel probability of one class: labels in {0, 1} and 255 (ignore), a sigmoid head."""

    stored_as = "PNG, 8-bit gray"
    hub_category = "image-segmentation"

    def stored_values(self, spec):
        return f"1 = {spec.description or self.description}, 0 = not, {IGNORE_INDEX} = ignore"

    def postprocess(self, logits, spec):
        return logits[:, 0].sigmoid()

    def postprocess_steps(self, spec):
        return [{"op": "channel", "index": 0}, {"op": "sigmoid"}]

    def invalid_label_values(self, label, spec):
        import numpy as np

        values = np.unique(label)
        bad = values[(values != 0) & (values != 1) & (values != IGNORE_INDEX)]
        if bad.size:
            return (
                f"values must be 0, 1 or {IGNORE_INDEX} (ignore), found {_shown(bad)}; positives are stored as 1 "
                f"({IGNORE_INDEX} marks pixels without a label)"
            )
        return None


class SaliencyKind(_BinaryKind):
    name = "saliency"
    description = "salient object"
    card_task_type = "saliency-detection"
    card_metrics = {"maxF": ("max_f_measure", "maxF, beta^2 = 0.3 (%)"), "mIoU": ("mean_iou", "mIoU (%)")}
    primary_metric = "maxF"

    def loss(self, logits, labels, spec, config):
        """Class-balanced binary cross-entropy; logits (B, 1, H, W), labels (B, H, W) in {0, 1}.

        The protocol uses a 2-channel softmax; one logit l with sigmoid is the same model (l = difference of the two
        softmax logits) and gives the same loss values. Positives are weighted by the fraction of negatives among the
        batch's valid pixels, negatives by its complement."""
        logits = logits[:, 0]
        valid = labels != IGNORE_INDEX
        target = labels.masked_fill(~valid, 0)
        count = valid.sum()
        positive_weight = ((target == 0) & valid).sum() / count.clamp(min=1)
        weights = torch.where(target > 0.5, positive_weight, 1.0 - positive_weight)
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weights
        return _masked_mean(per_pixel, valid, logits)


class BoundaryKind(_BinaryKind):
    name = "boundary"
    description = "boundary"
    card_task_type = "edge-detection"
    card_metrics = {
        "odsF": ("ods_f_measure", "odsF, exact scorer (%)"),
        "oisF": ("ois_f_measure", "oisF, exact scorer (%)"),
        "odsF_approx": ("ods_f_measure_approx", "odsF, approximate scorer (%)"),
        "oisF_approx": ("ois_f_measure_approx", "oisF, approximate scorer (%)"),
    }
    parameters = ("tolerance",)
    primary_metric = "odsF"

    def check_parameters(self, task, parameters, class_names):
        tolerance = parameters.get("tolerance")
        if tolerance is not None and not (_is_number(tolerance) and 0 < tolerance < 1):
            raise ValueError(
                f"Task {task!r}: `tolerance` (boundary matching distance, a fraction of the image diagonal) must be "
                f"in (0, 1), got {tolerance!r}."
            )
        return {} if tolerance is None else {"tolerance": float(tolerance)}

    def loss(self, logits, labels, spec, config):
        """Weighted binary cross-entropy: w y (-log s) + (1 - w)(1 - y)(-log(1 - s)), mean over valid pixels, with w
        the config's `boundary_positive_weight`."""
        positive_weight = getattr(config, "boundary_positive_weight", 0.95)
        logits = logits[:, 0]
        valid = labels != IGNORE_INDEX
        target = labels.masked_fill(~valid, 0)
        weights = torch.where(target > 0.5, positive_weight, 1.0 - positive_weight)
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weights
        return _masked_mean(per_pixel, valid, logits)


class NormalsKind(TaskKind):
    name = "normals"
    description = "surface normals"
    card_task_type = "surface-normals-estimation"
    card_metrics = {
        "mean": ("mean_angular_error", "Mean angular error (degrees)"),
        "median": ("median_angular_error", "Median angular error (degrees)"),
        "rmse": ("rmse_angular_error", "RMSE of angles (degrees)"),
    }
    lower_is_better = ("median", "rmse")
    primary_metric = "mean"
    higher_is_better = False
    stored_as = "PNG, RGB 8-bit"
    legend = "rgb"
    negate_on_flip = (0,)

    def head_channels(self, spec):
        return 3

    def label_channels(self, spec):
        return 3

    def stored_values(self, spec):
        return "surface normal (x, y, z), `n = 2 v / 255 - 1` per channel; (0, 0, 0) = invalid"

    def valid_label_pixels(self, labels):
        # A zero vector has no direction: it carries no supervision (it would be scored as a 90 degree error).
        return (labels != IGNORE_INDEX).all(dim=1) & (labels != 0).any(dim=1)

    def loss(self, logits, labels, spec, config):
        """L1 between the L2-normalised prediction and the label, summed over xyz, mean over valid pixels."""
        valid = self.valid_label_pixels(labels)
        prediction = F.normalize(logits, p=2, dim=1)
        per_pixel = (prediction - labels.masked_fill(~valid[:, None], 0)).abs().sum(dim=1)
        return _masked_mean(per_pixel, valid, logits)

    def postprocess(self, logits, spec):
        return F.normalize(logits, p=2, dim=1)

    def postprocess_steps(self, spec):
        return [{"op": "l2_normalize", "eps": 1e-12}]  # F.normalize's floor

    def invalid_label_values(self, label, spec):
        import numpy as np

        if label.ndim != 3 or label.shape[-1] != 3:
            return f"a normals label must have 3 channels, got shape {label.shape}"
        if not np.isfinite(label).all() or np.abs(label).max(initial=0) > 1.0 + 1e-6:
            return "normal components must be finite and in [-1, 1]"
        return None


class DepthKind(TaskKind):
    name = "depth"
    description = "depth"
    card_task_type = "depth-estimation"
    card_metrics = {
        "RMSE": ("rmse", "RMSE (m)"),
        "abs_rel": ("abs_rel", "Absolute relative error"),
        "delta_1": ("delta_1", "delta < 1.25 (%)"),
    }
    lower_is_better = ("abs_rel",)
    parameters = ("max_depth",)
    primary_metric = "RMSE"
    higher_is_better = False
    hub_category = "depth-estimation"
    stored_as = "TIFF, 32-bit float (mode F)"
    scales_with_zoom = True

    def check_parameters(self, task, parameters, class_names):
        # Depth at or beyond 80 m is no metric depth of the indoor benchmarks (NYUD-v2 spans about 0.5-10 m; the
        # protocol's metric ignores depth >= 80 m): such values are taken to be in another unit.
        max_depth = parameters.get("max_depth", 80.0)
        if not (_is_number(max_depth) and math.isfinite(max_depth) and max_depth > 0):
            raise ValueError(f"Task {task!r}: `max_depth` (metres) must be a positive number, got {max_depth!r}.")
        return {"max_depth": float(max_depth)}

    def stored_values(self, spec):
        return "depth in metres, 0 = invalid"

    def activate(self, logits, spec, config):
        activation = getattr(config, "depth_activation", "none")
        if activation == "softplus":
            return F.softplus(logits)
        if activation == "exp":
            return logits.exp()
        return logits

    def loss(self, logits, labels, spec, config):
        """L1 in metres over valid pixels; logits (B, 1, H, W) (after the depth activation)."""
        prediction = logits[:, 0]
        valid = labels != IGNORE_INDEX
        per_pixel = (prediction - labels.masked_fill(~valid, 0)).abs()
        return _masked_mean(per_pixel, valid, logits)

    def postprocess(self, logits, spec):
        return logits[:, 0].clamp(min=0)

    def postprocess_steps(self, spec):
        return [{"op": "channel", "index": 0}, {"op": "clip", "min": 0.0, "max": None}]

    def invalid_label_values(self, label, spec):
        import numpy as np

        if not np.issubdtype(label.dtype, np.floating):
            return f"depth must be float metres, got {label.dtype}"
        if not np.isfinite(label).all() or (label < 0).any():
            return "depth values must be finite and >= 0 (0 = invalid)"
        deepest = float(label.max(initial=0.0))
        if deepest >= spec.parameters["max_depth"]:
            return (
                f"depth values reach {deepest:g}, beyond the task's max_depth {spec.parameters['max_depth']:g} m: this "
                "looks like millimetres (or centimetres), not metres; convert the maps to metres (millimetres / 1000)"
            )
        return None


class RegressionKind(TaskKind):
    """A generic dense regression: C channels of values within a declared range, in a declared unit. Pixels without a
    label are NaN on every channel.

    Parameters besides the range: `loss` ("l1", "l2" or "cosine": 1 - cosine similarity over the channels),
    `primary_metric` ("MAE", "MSE" or "RMSE"), `negate_on_flip`, `scales_with_zoom`, `metric_transforms` (names of
    `METRIC_TRANSFORMS`: the RMSE is also reported after mapping prediction and label through each) and `decode`:
    a dataset storing the raw integer maps (8- or 16-bit PNG, kept losslessly) declares the steps that turn them into
    the working values (see `check_decode_steps`); without it the column holds float32 arrays."""

    name = "regression"
    description = "dense regression"
    card_task_type = "dense-regression"
    card_metrics = {"MAE": ("mae", "Mean absolute error ({unit})"), "RMSE": ("rmse", "RMSE ({unit})"),
                    "MSE": ("mse", "Mean squared error ({unit}²)"),
                    "RMSE_reference": ("rmse", "RMSE in the Taskonomy reference's depth space"),
                    "RMSE_m": ("rmse", "RMSE (m)")}  # fmt: skip
    parameters = (
        "channels", "value_range", "unit", "loss", "negate_on_flip", "scales_with_zoom", "decode", "primary_metric",
        "metric_transforms",
    )  # fmt: skip
    lower_is_better = ("RMSE", "MSE", "MAE", "RMSE_reference", "RMSE_m")
    unsupervised_value = float("nan")
    primary_metric = "MAE"
    higher_is_better = False
    stored_as = "float32 array (.npy bytes), (H, W, C)"

    def check_parameters(self, task, parameters, class_names):
        channels = parameters.get("channels", 1)
        if not (_is_integer(channels) and channels >= 1):
            raise ValueError(f"Task {task!r}: `channels` must be a positive integer, got {channels!r}.")
        value_range = parameters.get("value_range")
        if not (
            isinstance(value_range, (list, tuple))
            and len(value_range) == 2
            and all(_is_number(v) and math.isfinite(v) for v in value_range)
            and value_range[0] < value_range[1]
        ):
            raise ValueError(
                f"Task {task!r} (regression) needs `value_range: [low, high]` with finite low < high, got "
                f"{value_range!r}."
            )
        unit = parameters.get("unit", "")
        if not isinstance(unit, str):
            raise ValueError(f"Task {task!r}: `unit` must be a string, got {unit!r}.")
        loss = parameters.get("loss", "l1")
        if loss not in ("l1", "l2", "cosine"):
            raise ValueError(f"Task {task!r}: `loss` must be 'l1', 'l2' or 'cosine', got {loss!r}.")
        if loss == "cosine" and channels < 2:
            raise ValueError(f"Task {task!r}: the cosine loss needs at least 2 channels, got {channels}.")
        transforms = list(parameters.get("metric_transforms", []))
        unknown = [name for name in transforms if name not in METRIC_TRANSFORMS]
        if unknown:
            raise ValueError(
                f"Task {task!r}: unknown `metric_transforms` {unknown}; known: {', '.join(METRIC_TRANSFORMS)}."
            )
        primary = parameters.get("primary_metric", "MAE")
        choices = ["MAE", "MSE", "RMSE"] + [METRIC_TRANSFORMS[name][0] for name in transforms]
        if primary not in choices:
            raise ValueError(f"Task {task!r}: `primary_metric` must be one of {choices}, got {primary!r}.")
        negate = list(parameters.get("negate_on_flip", []))
        if not all(_is_integer(c) and 0 <= c < channels for c in negate):
            raise ValueError(f"Task {task!r}: `negate_on_flip` must list channel indices 0..{channels - 1}.")
        zoom = parameters.get("scales_with_zoom", False)
        if not isinstance(zoom, bool):
            raise ValueError(f"Task {task!r}: `scales_with_zoom` must be true or false, got {zoom!r}.")
        checked = {
            "channels": int(channels),
            "value_range": [float(value_range[0]), float(value_range[1])],
            "unit": unit,
            "loss": loss,
            "negate_on_flip": negate,
            "scales_with_zoom": zoom,
        }
        # Written only when set, so that the declarations of tasks made before these parameters read as before.
        decode = check_decode_steps(task, parameters.get("decode"))
        if decode is not None:
            checked["decode"] = decode
        if primary != "MAE":
            checked["primary_metric"] = primary
        if transforms:
            checked["metric_transforms"] = transforms
        return checked

    def head_channels(self, spec):
        return spec.parameters["channels"]

    def label_channels(self, spec):
        return spec.parameters["channels"]

    def stored_values(self, spec):
        low, high = spec.parameters["value_range"]
        unit = f" {spec.parameters['unit']}" if spec.parameters["unit"] else ""
        working = f"{spec.parameters['channels']} channel(s) in [{low:g}, {high:g}]{unit}"
        if spec.parameters.get("decode"):
            steps = "; ".join(
                ", ".join(f"{k} {v}" if k == "op" else f"{k}={v}" for k, v in step.items())
                for step in spec.parameters["decode"]
            )
            return f"the raw values, decoded to {working} by: {steps}"
        return f"{working}, NaN = no label"

    def storage(self, spec):
        return "PNG, the raw 8- or 16-bit map" if spec.parameters.get("decode") else self.stored_as

    def valid_label_pixels(self, labels):
        return torch.isfinite(labels).all(dim=1)

    def loss(self, logits, labels, spec, config):
        """L1 (or squared error) per channel, mean over channels and valid pixels."""
        valid = self.valid_label_pixels(labels)
        target = torch.where(valid[:, None], labels, torch.zeros_like(labels))
        if spec.parameters["loss"] == "cosine":  # 1 - cosine similarity over the channels
            per_pixel = 1.0 - F.cosine_similarity(logits, target, dim=1, eps=1e-8)
            return _masked_mean(per_pixel, valid, logits)
        difference = logits - target
        per_pixel = (difference.abs() if spec.parameters["loss"] == "l1" else difference.square()).mean(dim=1)
        return _masked_mean(per_pixel, valid, logits)

    def postprocess(self, logits, spec):
        low, high = spec.parameters["value_range"]
        return logits.clamp(min=low, max=high)

    def postprocess_steps(self, spec):
        low, high = spec.parameters["value_range"]
        return [{"op": "clip", "min": low, "max": high}]

    def invalid_label_values(self, label, spec):
        import numpy as np

        channels = spec.parameters["channels"]
        shape_channels = label.shape[-1] if label.ndim == 3 else 1
        if label.ndim not in (2, 3) or shape_channels != channels:
            return f"expected {channels} channel(s), got an array of shape {label.shape}"
        if not np.issubdtype(label.dtype, np.floating):
            return f"regression labels must be floats (NaN = no label), got {label.dtype}"
        values = label[np.isfinite(label)]
        if np.isinf(label).any():
            return "values must be finite (NaN marks pixels without a label)"
        low, high = spec.parameters["value_range"]
        if values.size and (values.min() < low or values.max() > high):
            unit = f" {spec.parameters['unit']}" if spec.parameters["unit"] else ""
            return (
                f"values span [{values.min():g}, {values.max():g}]{unit}, outside the declared value_range "
                f"[{low:g}, {high:g}]{unit}"
            )
        return None


class ImageClassificationKind(TaskKind):
    """An image-level task: one (soft) label over N classes per image, a probability vector (one-hot for a hard
    label). The head pools the task's features over the image (`ImageLevelHead`); logits and labels are (B, N), an
    image without a label is a row of NaN. Loss: the mean squared error between the logits and the label vector (the
    Taskonomy protocol's); the prediction is the score vector; the metric is the top-1 accuracy against the argmax of
    the label."""

    name = "image_classification"
    description = "image classification"
    card_task_type = "image-classification"
    card_metrics = {"top1": ("accuracy", "Top-1 accuracy (%)")}
    parameters = ("num_classes",)
    image_level = True
    has_class_names = True
    unsupervised_value = float("nan")
    primary_metric = "top1"
    hub_category = "image-classification"
    stored_as = "float32 sequence (the soft label)"
    legend = "scores"

    def check_parameters(self, task, parameters, class_names):
        count = parameters.get("num_classes", len(class_names) if class_names else None)
        if not (_is_integer(count) and count >= 2):
            raise ValueError(
                f"Image classification task {task!r} needs `num_classes` (an integer >= 2) or class names, got {count!r}."
            )
        if class_names and len(class_names) != count:
            raise ValueError(f"Task {task!r}: num_classes {count} but {len(class_names)} class names.")
        return {"num_classes": int(count)}

    def head_channels(self, spec):
        return spec.parameters["num_classes"]

    def label_channels(self, spec):
        return spec.parameters["num_classes"]

    def stored_values(self, spec):
        return f"{spec.parameters['num_classes']} class probabilities per image (NaN: no label)"

    def valid_label_pixels(self, labels):
        return torch.isfinite(labels).all(dim=1)  # (B,): images with a label

    def loss(self, logits, labels, spec, config):
        valid = self.valid_label_pixels(labels)
        target = torch.where(valid[:, None], labels, torch.zeros_like(labels))
        return _masked_mean((logits - target).square().mean(dim=1), valid, logits)

    def postprocess(self, logits, spec):
        return logits

    def postprocess_steps(self, spec):
        return []

    def invalid_label_values(self, label, spec):
        import numpy as np

        count = spec.parameters["num_classes"]
        if label.shape != (count,):
            return f"expected a vector of {count} class probabilities, got shape {label.shape}"
        if np.isnan(label).all():
            return None
        if not np.isfinite(label).all() or (label < -1e-6).any():
            return "class probabilities must be finite and >= 0 (a row of NaN marks an image without a label)"
        return None


DECODE_OPS = ("channels", "invalid", "linear", "log1p", "gaussian_blur", "clip", "standardize")


def check_decode_steps(task: str, steps) -> Optional[list]:
    """Validate a regression task's `decode`: the ordered steps from a raw integer map (H, W, C) to working values.

    - {"op": "channels", "keep": [i, ...]}: keep these channels of the stored image;
    - {"op": "invalid", "value": v}: remember the pixels whose raw value (any channel) equals v; they become NaN
      (no label) at the end;
    - {"op": "linear", "from": [a, b], "to": [c, d], "clip": bool}: map [a, b] linearly to [c, d], clipping to it
      first when "clip" (default true);
    - {"op": "log1p", "base": b}: log(1 + x) / log(b);
    - {"op": "gaussian_blur", "sigma": s}: a Gaussian blur of every channel;
    - {"op": "clip", "min": a, "max": b};
    - {"op": "standardize", "mean": [...], "std": [...]}: (x - mean) / std per channel.
    """
    if steps is None:
        return None
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ValueError(f"Task {task!r}: `decode` must be a non-empty list of steps, got {steps!r}.")
    checked = []
    for index, step in enumerate(steps):
        op = step.get("op") if isinstance(step, Mapping) else None
        where = f"Task {task!r}: decode step {index} ({step!r})"
        if op not in DECODE_OPS:
            raise ValueError(f"{where} has no known `op`; the ops are {', '.join(DECODE_OPS)}.")
        step = dict(step)
        numbers = {
            "channels": ["keep"], "invalid": ["value"], "linear": ["from", "to"], "log1p": ["base"],
            "gaussian_blur": ["sigma"], "clip": ["min", "max"], "standardize": ["mean", "std"],
        }[op]  # fmt: skip
        for key in numbers:
            value = step.get(key)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is None or not values or not all(_is_number(v) and math.isfinite(v) for v in values):
                raise ValueError(f"{where}: `{key}` must be a finite number or a list of them, got {value!r}.")
        if op == "linear" and not (len(step["from"]) == len(step["to"]) == 2 and step["from"][0] != step["from"][1]):
            raise ValueError(f"{where}: `from` and `to` must be [low, high] pairs.")
        if op == "standardize" and (len(step["mean"]) != len(step["std"]) or min(step["std"]) <= 0):
            raise ValueError(f"{where}: `mean` and `std` must have one value per channel, std > 0.")
        checked.append(step)
    return checked


def _taskonomy_depth_reference(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Taskonomy reference's depth metric space, from the log-scaled values v = log(1 + d) / log(2^16): d =
    exp(v log 2^16) - 1, then log(d) / 11.09, (x - 0.64) / 0.18, (x + 1) / 2 * 80, clamped to [1, 80]."""
    raw = torch.exp(values * math.log(2.0**16)) - 1.0
    mapped = ((torch.log(raw.clamp_min(1e-8)) / 11.09 - 0.64) / 0.18 + 1.0) / 2.0 * 80.0
    return mapped.clamp(1.0, 80.0), torch.ones_like(values, dtype=torch.bool)


def _taskonomy_depth_metres(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Metres from the log-scaled values (the 16-bit depth is in 1/512 m; 65535, v = 1, means no depth)."""
    raw = torch.exp(values * math.log(2.0**16)) - 1.0
    return raw / 512.0, raw < 65535.0 - 0.5


# Name -> (result key suffix, function values -> (mapped values, valid mask)). A regression task lists the names in
# `metric_transforms`; the meter reports the RMSE in each space, over the pixels valid in the label's.
METRIC_TRANSFORMS = {
    "taskonomy_depth_reference": ("RMSE_reference", _taskonomy_depth_reference),
    "taskonomy_depth_metres": ("RMSE_m", _taskonomy_depth_metres),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        SegmentationKind(),
        SaliencyKind(),
        BoundaryKind(),
        NormalsKind(),
        DepthKind(),
        RegressionKind(),
        ImageClassificationKind(),
    )  # fmt: skip
}


# ---------------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, its kind, the kind's parameters (defaults filled in) and, for segmentation, its classes."""

    name: str
    kind: TaskKind
    parameters: dict = field(default_factory=dict)
    class_names: Optional[tuple[str, ...]] = None
    description: str = ""

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.class_names) if self.class_names is not None else None

    @property
    def head_channels(self) -> int:
        return self.kind.head_channels(self)

    @property
    def label_channels(self) -> int:
        return self.kind.label_channels(self)

    @property
    def negate_on_flip(self) -> tuple[int, ...]:
        return tuple(self.parameters.get("negate_on_flip", self.kind.negate_on_flip))

    @property
    def scales_with_zoom(self) -> bool:
        return bool(self.parameters.get("scales_with_zoom", self.kind.scales_with_zoom))

    @property
    def unit(self) -> str:
        return "m" if self.kind.name == "depth" else self.parameters.get("unit", "")

    @property
    def primary_metric(self) -> str:
        """The result key suffix of the task's primary metric (the kind's, or the task's `primary_metric`)."""
        return self.parameters.get("primary_metric") or self.kind.primary_metric

    @property
    def primary_metric_key(self) -> str:
        return f"{self.name}/{self.primary_metric}"

    @property
    def primary_metric_keys(self) -> tuple[str, ...]:
        """The keys of the primary metric: the primary one, and for boundaries the approximate scorer's beside it."""
        key = self.primary_metric_key
        return (key, key + "_approx") if self.kind.name == "boundary" else (key,)

    @property
    def title(self) -> str:
        """What the task does, for cards and the demo: its description, or its name and kind."""
        return self.description or f"{self.name} ({self.kind.description})"

    @property
    def card_title(self) -> str:
        """The title in title case (model-index task names: "Semantic Segmentation", "Road and Lane Segmentation")."""
        small = {"a", "an", "and", "as", "at", "by", "for", "in", "of", "on", "or", "the", "to"}
        words = []
        for index, word in enumerate(self.title.split(" ")):
            lead = len(word) - len(word.lstrip("(["))
            if index == 0 or word[lead:] not in small:
                word = word[:lead] + word[lead : lead + 1].upper() + word[lead + 1 :]
            words.append(word)
        return " ".join(words)

    def lower_is_better(self, key: str) -> bool:
        """Whether a lower value of the result key `key` of this task is better."""
        suffix = key.split("/", 1)[1].removesuffix("_approx")
        primary = suffix == self.primary_metric and not self.kind.higher_is_better
        return primary or suffix in self.kind.lower_is_better

    def card_metric(self, key: str) -> Optional[tuple[str, str]]:
        """(model-index metric type, label with unit) of the result key `key`, or None for metrics cards leave out."""
        entry = self.kind.card_metrics.get(key.split("/", 1)[1])
        if entry is None:
            return None
        unit = self.unit or "unit"
        return entry[0], entry[1].replace("{unit}", unit)

    def declaration(self) -> dict:
        """The JSON form of the task (without class names, which configs and metadata keep in `id2label`)."""
        declared = {"kind": self.kind.name, **self.parameters}
        if self.description:
            declared["description"] = self.description
        return declared


# The tasks of the PASCAL-Context / NYUD-v2 protocol: their kinds, parameters, wording and default class names.
PRESET_TASKS: dict[str, dict] = {
    "semseg": {"kind": "segmentation", "description": "semantic segmentation"},
    "human_parts": {
        "kind": "segmentation",
        "description": "human part segmentation",
        "background_only_is_unlabelled": True,
    },
    "saliency": {"kind": "saliency", "description": "salient object detection"},
    "edge": {"kind": "boundary", "description": "edge detection"},
    "normals": {"kind": "normals", "description": "surface normals estimation"},
    "depth": {"kind": "depth", "description": "monocular depth estimation"},
}
PRESET_CLASS_NAMES = {"semseg": PASCAL_SEMSEG_CLASSES, "human_parts": PASCAL_HUMAN_PARTS_CLASSES}
# Task-loss weights of the benchmark protocol (InvPT / TaskPrompter lineage); other tasks default to 1.
PROTOCOL_LOSS_WEIGHTS = {
    "semseg": 1.0,
    "human_parts": 2.0,
    "saliency": 5.0,
    "normals": 10.0,
    "edge": 50.0,
    "depth": 1.0,
}
# Keys of a declaration that are not kind parameters.
_DECLARATION_KEYS = ("kind", "description", "column")


def check_task_name(task: Any, where: str = "task") -> str:
    """Refuse anything but a non-empty identifier-like task name (letters, digits, '_' and '-')."""
    if not isinstance(task, str) or not task or not all(c.isalnum() or c in "_-" for c in task):
        raise ValueError(f"Invalid {where} {task!r}: a task name is a non-empty string of letters, digits, '_', '-'.")
    return task


def make_task_spec(name: str, declaration: Optional[Mapping] = None, class_names=None) -> TaskSpec:
    """The `TaskSpec` of task `name` from its declaration (`{"kind": ..., parameter: value}`; a preset's when None)
    and its class names (a list, or an `{id: name}` mapping). A ValueError names the task and what is wrong."""
    check_task_name(name)
    if declaration is None:
        if name not in PRESET_TASKS:
            raise ValueError(
                f"Task {name!r} is not one of the preset tasks ({', '.join(PRESET_TASKS)}); declare its kind and "
                f"parameters, e.g. {{{name!r}: {{'kind': 'regression', 'channels': 1, 'value_range': [0, 1]}}}} "
                f"(kinds: {', '.join(KINDS)})."
            )
        declaration = PRESET_TASKS[name]
    if not isinstance(declaration, Mapping):
        raise ValueError(f"The declaration of task {name!r} must be a mapping with a 'kind', got {declaration!r}.")
    kind_name = declaration.get("kind")
    if kind_name not in KINDS:
        raise ValueError(f"Task {name!r} has kind {kind_name!r}; the kinds are: {', '.join(KINDS)}.")
    kind = KINDS[kind_name]
    unknown = sorted(set(declaration) - set(_DECLARATION_KEYS) - set(kind.parameters))
    if unknown:
        raise ValueError(
            f"Task {name!r} ({kind_name}) has unknown parameter(s) {unknown}; a {kind_name} task takes "
            f"{list(kind.parameters) or 'no parameters'} (and 'description', 'column')."
        )
    if class_names is None and kind_name == "segmentation" and name in PRESET_CLASS_NAMES:
        class_names = PRESET_CLASS_NAMES[name]
    names = _class_name_tuple(name, class_names)
    if names is not None and not kind.has_class_names:
        classy = ", ".join(k for k, v in KINDS.items() if v.has_class_names)
        raise ValueError(f"Task {name!r} is a {kind_name} task; only {classy} tasks have class names.")
    parameters = {key: value for key, value in declaration.items() if key not in _DECLARATION_KEYS}
    parameters = kind.check_parameters(name, parameters, names)
    description = declaration.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"Task {name!r}: `description` must be a string, got {description!r}.")
    return TaskSpec(name=name, kind=kind, parameters=parameters, class_names=names, description=description)


def _class_name_tuple(task: str, class_names) -> Optional[tuple[str, ...]]:
    if class_names is None:
        return None
    if isinstance(class_names, Mapping):
        ids = []
        for key in class_names:
            if isinstance(key, str) and key.lstrip("-").isdigit():
                key = int(key)
            if not _is_integer(key):
                raise ValueError(f"Class ids of task {task!r} must be integers, got {key!r}.")
            ids.append(key)
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"Class ids of task {task!r} must be 0..{len(ids) - 1}, got {sorted(ids)}.")
        by_id = {int(key): value for key, value in class_names.items()}
        class_names = [by_id[i] for i in range(len(ids))]
    if not isinstance(class_names, (list, tuple)):
        raise ValueError(
            f"Class names of task {task!r} must be a list or an {{id: name}} mapping, got {class_names!r}."
        )
    return tuple(str(name) for name in class_names)


def task_specs_of(config) -> dict[str, TaskSpec]:
    """Every task of a model config (`tasks`, `task_kinds`, `task_id2label`) as a `TaskSpec`, in config order."""
    declared = getattr(config, "task_kinds", None) or {}
    id2label = getattr(config, "task_id2label", None) or {}
    return {task: make_task_spec(task, declared.get(task), id2label.get(task)) for task in config.tasks}


def preset_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of a preset task with its default class names."""
    return make_task_spec(task)


def as_specs(tasks) -> dict[str, TaskSpec]:
    """{task: TaskSpec} from such a mapping (kept as it is) or from preset task names, in the order given."""
    if isinstance(tasks, Mapping) and all(isinstance(spec, TaskSpec) for spec in tasks.values()):
        return dict(tasks)
    return {task: preset_spec(task) for task in tasks}


# The preset tasks as specs, in the protocol's canonical order.
TASKS: dict[str, TaskSpec] = {task: preset_spec(task) for task in PRESET_TASKS}
