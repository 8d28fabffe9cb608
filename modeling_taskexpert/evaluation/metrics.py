"""Streaming meters of the dense benchmark metrics (protocol section 4), one per task kind.

Every meter keeps its state as integer counts, histograms and float64 sums in CPU tensors, so the
result does not depend on how the split is cut into batches or processes: states add up, and a
data-parallel evaluation sums them across processes before `summarise` turns them into metrics.
Inputs are validated tensors that follow `task_definitions` (see `DenseMultiTaskEvaluator.update`).
"""

import abc
import collections
import concurrent.futures
import math
import multiprocessing
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..process_utils import end_with_parent
from ..task_definitions import IGNORE_INDEX, KINDS, METRIC_TRANSFORMS, TaskSpec
from .boundary import BOUNDARY_THRESHOLDS, DEFAULT_EXACT_SECONDS_PER_IMAGE, boundary_counts, counts_to_f

SALIENCY_MAXF_MODES = ("reference", "standard")
# Saliency thresholds t_k = 0.05 k, k = 1..19, in float32 as the reference meter builds them.
SALIENCY_THRESHOLDS = (torch.arange(1, 20, dtype=torch.float64) * 0.05).float()
SALIENCY_BETA_SQUARED = 0.3
NORMALS_ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
# Width of the angle histogram behind the streaming median: the median is exact to +-half a bin.
NORMALS_HISTOGRAM_RESOLUTION = 0.01
DEPTH_DELTA_BASE = 1.25
# The reference replaces non-positive depth predictions by this before ratios and logarithms.
DEPTH_EPSILON = 1e-9


class EmptyEvaluationError(ValueError):
    """Raised when a metric is asked for but no valid (non-ignored) pixel was seen."""


class Meter(abc.ABC):
    """Base class: a dict of state tensors, an `update` from one batch and a `summarise` of a state."""

    def __init__(self, task: str):
        self.task = task
        self.reset()

    @abc.abstractmethod
    def initial_state(self) -> dict[str, torch.Tensor]:
        """Zeroed state tensors of this meter."""

    def reset(self) -> None:
        self.state = self.initial_state()

    def flush(self) -> None:
        """Finish any work still in flight so that `state` is complete (no-op for most meters)."""

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.state[name] += value.detach().to(device="cpu", dtype=self.state[name].dtype)

    @abc.abstractmethod
    def summarise(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics from a (possibly summed across processes) state."""

    def _require(self, count, what: str) -> None:
        if int(count) == 0:
            raise EmptyEvaluationError(
                f"No valid {what} was seen for task {self.task!r}: every label pixel was {IGNORE_INDEX} (ignore) "
                "or no sample was given. Check the labels and that update() was called."
            )


class SegmentationMeter(Meter):
    """Confusion matrix -> per-class IoU and mIoU over all classes (absent classes count 0), in %.

    Args:
        task: task name (used in keys and errors).
        num_classes: number of classes C; labels are in [0, C) or `IGNORE_INDEX`.
        class_names: C names for the per-class keys (default: the class ids).
        skip_background_only_samples: treat a sample whose label holds only background (0) and ignore as
            entirely ignored. This is the protocol's rule for human parts: the metric is computed on the
            images that carry person parts only.
    """

    def __init__(
        self,
        task: str,
        num_classes: int,
        class_names: Optional[Sequence[str]] = None,
        skip_background_only_samples: bool = False,
    ):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes of {task!r} must be an integer >= 2, got {num_classes!r}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{task!r} has {num_classes} classes but {len(class_names)} class names were given.")
        self.num_classes = num_classes
        self.class_names = [str(name) for name in class_names] if class_names else [str(i) for i in range(num_classes)]
        self.skip_background_only_samples = skip_background_only_samples
        super().__init__(task)

    def initial_state(self):
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)}

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        num_classes = self.num_classes
        _check_values(
            self.task,
            "label",
            label,
            lambda x: ((x >= 0) & (x < num_classes)) | (x == IGNORE_INDEX),
            f"class ids in [0, {num_classes}) or {IGNORE_INDEX}",
        )
        _check_values(
            self.task,
            "prediction",
            prediction,
            lambda x: (x >= 0) & (x < num_classes),
            f"class ids in [0, {num_classes})",
        )
        valid = label != IGNORE_INDEX
        if self.skip_background_only_samples:
            has_foreground = (valid & (label != 0)).flatten(1).any(dim=1)
            valid &= has_foreground[:, None, None]
        index = label[valid] * self.num_classes + prediction[valid]
        counts = torch.bincount(index, minlength=self.num_classes**2)
        self._add("confusion", counts.reshape(self.num_classes, self.num_classes))

    def summarise(self, state):
        confusion = state["confusion"].double()  # rows: ground truth, columns: prediction
        self._require(confusion.sum(), "label pixel")
        true_positives = confusion.diagonal()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positives
        iou = true_positives / union.clamp(min=1e-8)
        results = {
            "mIoU": 100 * iou.mean().item(),
            "pixel_accuracy": 100 * (true_positives.sum() / confusion.sum()).item(),
        }
        results.update({f"IoU/{name}": 100 * value for name, value in zip(self.class_names, iou.tolist())})
        return results


class SaliencyMeter(Meter):
    """Pixel-pooled TP / predicted / actual positives per threshold -> maxF (beta^2 = 0.3) and mIoU, in %.

    The probability of every valid pixel is binned by how many of the 19 thresholds it reaches
    (``p >= t``), once for ``p`` itself ("standard") and once for ``sigmoid(p)`` ("reference", the
    quirk of the InvPT/TaskPrompter meter, protocol section 4); counts for every threshold follow
    from these histograms. Reported: ``maxF`` in the selected mode, both ``maxF_reference`` and
    ``maxF_standard``, and ``mIoU``: the best pixel-pooled foreground IoU over the thresholds of
    the standard mode (a pooled form of the ASTMT definition; the reference code computes none).
    """

    def __init__(self, task: str, maxf_mode: str):
        if maxf_mode not in SALIENCY_MAXF_MODES:
            raise ValueError(f"saliency_maxf_mode must be one of {SALIENCY_MAXF_MODES}, got {maxf_mode!r}.")
        self.maxf_mode = maxf_mode
        super().__init__(task)

    def initial_state(self):
        bins = len(SALIENCY_THRESHOLDS) + 1
        return {f"histogram_{mode}": torch.zeros(2, bins, dtype=torch.int64) for mode in SALIENCY_MAXF_MODES}

    def update(self, prediction, label):
        _check_values(self.task, "label", label, _is_binary_or_ignore, f"0, 1 or {IGNORE_INDEX}")
        _check_values(self.task, "prediction", prediction, _is_probability, "probabilities in [0, 1]")
        valid = label != IGNORE_INDEX
        positive = label[valid].long()
        probability = prediction[valid].float()
        thresholds = SALIENCY_THRESHOLDS.to(probability.device)
        bins = len(thresholds) + 1
        for mode, score in (("standard", probability), ("reference", torch.sigmoid(probability))):
            level = torch.bucketize(score, thresholds, right=True)  # number of thresholds <= score
            histogram = torch.bincount(positive * bins + level, minlength=2 * bins).reshape(2, bins)
            self._add(f"histogram_{mode}", histogram)

    @staticmethod
    def _counts(histogram: torch.Tensor):
        """TP, predicted positives (per threshold) and actual positives from a (2, T + 1) histogram."""
        reached = histogram.flip(1).cumsum(1).flip(1)[:, 1:].double()  # [c, k]: pixels of class c with score >= t_k
        return reached[1], reached.sum(0), histogram[1].sum().double()

    def summarise(self, state):
        results = {}
        for mode in SALIENCY_MAXF_MODES:
            histogram = state[f"histogram_{mode}"]
            self._require(histogram.sum(), "label pixel")
            true_pos, pred_pos, actual_pos = self._counts(histogram)
            precision, recall = true_pos / pred_pos, true_pos / actual_pos
            f_beta = (1 + SALIENCY_BETA_SQUARED) * precision * recall / (SALIENCY_BETA_SQUARED * precision + recall)
            results[f"maxF_{mode}"] = 100 * torch.nan_to_num(f_beta, nan=0.0).max().item()
        results["maxF"] = results[f"maxF_{self.maxf_mode}"]
        true_pos, pred_pos, actual_pos = self._counts(state["histogram_standard"])
        iou = true_pos / (pred_pos + actual_pos - true_pos)
        results["mIoU"] = 100 * torch.nan_to_num(iou, nan=0.0).max().item()
        return results


class NormalsMeter(Meter):
    """Angular error in degrees on valid pixels: mean, RMSE, median and % within 11.25 / 22.5 / 30 degrees.

    Prediction and ground truth are L2-normalised (zero vectors stay zero) and the angle is
    ``2 atan2(|p - g|, |p + g|)``. Mean and RMSE come from float64 sums, the threshold
    percentages from exact counts, and the median from a histogram with
    `NORMALS_HISTOGRAM_RESOLUTION` (0.01 degree) bins, so it is exact to within 0.005 degrees.
    """

    num_bins = round(180 / NORMALS_HISTOGRAM_RESOLUTION)

    def initial_state(self):
        return {
            "sums": torch.zeros(2, dtype=torch.float64),  # angle, angle^2
            "count": torch.zeros(1, dtype=torch.int64),
            "within": torch.zeros(len(NORMALS_ANGLE_THRESHOLDS), dtype=torch.int64),
            "histogram": torch.zeros(self.num_bins, dtype=torch.int64),
        }

    def update(self, prediction, label):
        # Pixels with supervision: not ignore and not the zero vector (no direction; it would score as 90 degrees).
        valid = KINDS["normals"].valid_label_pixels(label)  # (B, H, W)
        predicted = F.normalize(prediction.double().movedim(1, -1)[valid], dim=-1)
        target = F.normalize(label.double().movedim(1, -1)[valid], dim=-1)
        angle = torch.rad2deg(2 * torch.atan2((predicted - target).norm(dim=-1), (predicted + target).norm(dim=-1)))
        self._add("sums", torch.stack([angle.sum(), angle.square().sum()]))
        self._add("count", torch.tensor([angle.numel()]))
        self._add("within", torch.stack([(angle < limit).sum() for limit in NORMALS_ANGLE_THRESHOLDS]))
        bins = (angle / NORMALS_HISTOGRAM_RESOLUTION).floor().long().clamp(0, self.num_bins - 1)
        self._add("histogram", torch.bincount(bins, minlength=self.num_bins))

    def summarise(self, state):
        count = int(state["count"].item())
        self._require(count, "normal (label pixel with all three channels != 255 and not the zero vector)")
        results = {
            "mean": state["sums"][0].item() / count,
            "rmse": math.sqrt(state["sums"][1].item() / count),
            "median": _histogram_median(state["histogram"], NORMALS_HISTOGRAM_RESOLUTION),
        }
        for limit, within in zip(NORMALS_ANGLE_THRESHOLDS, state["within"].tolist()):
            results[f"within_{limit:g}"] = 100 * within / count
        return results


class RegressionMeter(Meter):
    """Errors of a dense regression pooled over the labelled pixels and channels of the split (labels NaN where
    unlabelled), in the task's unit: MAE and RMSE (and MSE when it is the task's primary metric), from float64 sums.

    `transforms` (the task's `metric_transforms`): for each, the RMSE after mapping prediction and label through the
    transform (`task_definitions.METRIC_TRANSFORMS`), over the pixels the transform keeps valid in the label."""

    def __init__(self, task: str, transforms: Sequence[str] = (), report_mse: bool = False):
        self.transforms = list(transforms)
        self.report_mse = report_mse
        super().__init__(task)

    def initial_state(self):
        return {
            "sums": torch.zeros(2, dtype=torch.float64),
            "count": torch.zeros(1, dtype=torch.int64),
            "transformed": torch.zeros(len(self.transforms), 2, dtype=torch.float64),  # squared errors, count
        }

    def update(self, prediction, label):
        valid = torch.isfinite(label).all(dim=1, keepdim=True).expand_as(label)  # (B, C, H, W)
        error = prediction.double()[valid] - label.double()[valid]
        self._add("sums", torch.stack([error.abs().sum(), error.square().sum()]))
        self._add("count", torch.tensor([error.numel()]))
        rows = []
        for name in self.transforms:
            transform = METRIC_TRANSFORMS[name][1]
            mapped_label, keep = transform(label.double()[valid])
            mapped_prediction, _ = transform(prediction.double()[valid])
            squared = (mapped_prediction - mapped_label).square()[keep]
            rows.append(torch.stack([squared.sum(), torch.tensor(float(squared.numel()), dtype=torch.float64)]))
        if rows:
            self._add("transformed", torch.stack(rows))

    def summarise(self, state):
        count = int(state["count"].item())
        self._require(count, "value (label pixel that is not NaN)")
        results = {"MAE": state["sums"][0].item() / count, "RMSE": math.sqrt(state["sums"][1].item() / count)}
        if self.report_mse:
            results["MSE"] = state["sums"][1].item() / count
        for name, (squared, pixels) in zip(self.transforms, state["transformed"].tolist()):
            self._require(pixels, f"value in the space of {name}")
            results[METRIC_TRANSFORMS[name][0]] = math.sqrt(squared / pixels)
        return results


class ImageClassificationMeter(Meter):
    """Top-1 accuracy (%) of image-level predictions (B, C) against the argmax of the (soft) labels (B, C), over the
    images with a label (rows without NaN), as the Taskonomy reference reports it."""

    def initial_state(self):
        return {"counts": torch.zeros(2, dtype=torch.int64)}  # correct, labelled

    def update(self, prediction, label):
        valid = torch.isfinite(label).all(dim=1)
        correct = prediction[valid].argmax(dim=1) == label[valid].argmax(dim=1)
        self._add("counts", torch.tensor([int(correct.sum()), int(valid.sum())]))

    def summarise(self, state):
        correct, count = (int(v) for v in state["counts"])
        self._require(count, "image label")
        return {"top1": 100.0 * correct / count}


def _histogram_median(histogram: torch.Tensor, width: float) -> float:
    """Median of the values binned in `histogram` (bin i = [i w, (i + 1) w)), taking bin centres."""
    cumulative = histogram.cumsum(0)
    total = int(cumulative[-1])
    # 1-based ranks of the middle element(s): one for an odd count, two (averaged) for an even one.
    ranks = torch.tensor([(total + 1) // 2, total // 2 + 1])
    bins = torch.searchsorted(cumulative, ranks)
    return ((bins.double() + 0.5) * width).mean().item()


class DepthMeter(Meter):
    """Depth errors pooled over the valid pixels of the split (label not ignore and > 0), in metres.

    As in the reference, predictions are clamped at 0 and non-positive values replaced by 1e-9.
    Reported: RMSE and log_RMSE (natural log) from pooled squared errors, abs_rel, sq_rel and log10
    (mean |log10 g - log10 p|) as pooled means, delta_1..3 = % of pixels with
    max(p / g, g / p) < 1.25^i.
    """

    def initial_state(self):
        return {
            # Sums of (g-p)^2, |g-p|/g, (g-p)^2/g, |log10 g - log10 p| and (ln g - ln p)^2.
            "sums": torch.zeros(5, dtype=torch.float64),
            "count": torch.zeros(1, dtype=torch.int64),
            "within": torch.zeros(3, dtype=torch.int64),
        }

    def update(self, prediction, label):
        valid = (label != IGNORE_INDEX) & (label > 0)
        target = label[valid].double()
        predicted = prediction[valid].double().clamp(min=0)
        predicted = torch.where(predicted <= 0, torch.full_like(predicted, DEPTH_EPSILON), predicted)
        error = target - predicted
        log_ratio = torch.log(target) - torch.log(predicted)
        sums = torch.stack([
            error.square().sum(),
            (error.abs() / target).sum(),
            (error.square() / target).sum(),
            (log_ratio.abs() / math.log(10)).sum(),
            log_ratio.square().sum(),
        ])  # fmt: skip
        ratio = torch.maximum(predicted / target, target / predicted)
        self._add("sums", sums)
        self._add("count", torch.tensor([target.numel()]))
        self._add("within", torch.stack([(ratio < DEPTH_DELTA_BASE**power).sum() for power in (1, 2, 3)]))

    def summarise(self, state):
        count = int(state["count"].item())
        self._require(count, "depth (label pixel that is not ignore and > 0)")
        sums = (state["sums"] / count).tolist()
        results = {
            "RMSE": math.sqrt(sums[0]),
            "abs_rel": sums[1],
            "sq_rel": sums[2],
            "log10": sums[3],
            "log_RMSE": math.sqrt(sums[4]),
        }
        for power, within in enumerate(state["within"].tolist(), start=1):
            results[f"delta_{power}"] = 100 * within / count
        return results


class BoundaryMeter(Meter):
    """Boundary odsF / oisF in % (see `boundary.py`), from per-image counts at 101 thresholds.

    Each sample is scored on its own image region: the rectangle given by `crops` (from the batch's
    `pad_offsets` and `original_sizes`), or else the bounding box of its non-ignored label pixels;
    samples whose label is entirely ignore are skipped, as the reference skips images without
    ground truth. Ignored pixels inside the region are neither ground truth nor predictions.
    Results are keyed ``odsF``/``oisF`` in the exact mode and ``odsF_approx``/``oisF_approx`` in
    the approximate one.

    The exact mode costs tens of seconds per full-size image on one core (the BSDS matcher, as in
    the MATLAB tool). With `workers` > 0, images are scored in that many worker processes while
    the evaluation goes on; `flush` (called by the evaluator before computing) waits for them.
    """

    # Images queued per worker before `update` waits: bounds the memory held by pending images.
    max_pending_per_worker = 4

    def __init__(
        self,
        task: str,
        tolerance: float,
        mode: str,
        workers: int = 0,
        time_limit_s: Optional[float] = DEFAULT_EXACT_SECONDS_PER_IMAGE,
    ):
        if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
            raise ValueError(
                f"The boundary tolerance of {task!r} must be a fraction of the diagonal in (0, 1), got {tolerance!r}."
            )
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"The number of boundary workers must be an integer >= 0, got {workers!r}.")
        self.tolerance = float(tolerance)
        self.mode = mode
        self.workers = workers
        if time_limit_s is not None and not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
            raise ValueError(f"The boundary time limit must be a positive number of seconds, got {time_limit_s!r}.")
        self.time_limit_s = time_limit_s
        self.images_scored = 0
        self._executor = None
        self._pending = collections.deque()
        super().__init__(task)

    def initial_state(self):
        return {
            "counts": torch.zeros(4, len(BOUNDARY_THRESHOLDS), dtype=torch.int64),  # cntR, sumR, cntP, sumP
            "best_counts": torch.zeros(4, dtype=torch.int64),  # the same at each image's best threshold (OIS)
            "images": torch.zeros(1, dtype=torch.int64),
        }

    def reset(self) -> None:
        for future in getattr(self, "_pending", ()):
            future.cancel()
        self._pending = collections.deque()
        super().reset()

    def update(self, prediction, label, crops: Optional[Sequence[tuple[int, int, int, int]]] = None):
        _check_values(self.task, "label", label, _is_binary_or_ignore, f"0, 1 or {IGNORE_INDEX}")
        _check_values(self.task, "prediction", prediction, _is_probability, "probabilities in [0, 1]")
        predictions = prediction.detach().cpu().double().numpy()
        labels = label.detach().cpu().numpy()
        for index in range(len(labels)):
            region = crops[index] if crops is not None else _valid_bounding_box(labels[index])
            if region is None:
                continue
            top, left, height, width = region
            sample_label = labels[index, top : top + height, left : left + width]
            valid = sample_label != IGNORE_INDEX
            if not valid.any():
                continue
            arguments = (
                predictions[index, top : top + height, left : left + width].copy(),
                sample_label == 1,
                self.tolerance,
                self.mode,
                valid,
            )
            self.images_scored += 1
            options = {
                "time_limit_s": self.time_limit_s,
                "image": f"boundary image {self.images_scored} of {self.task!r}",
            }
            if self.workers == 0:
                self._add_image(boundary_counts(*arguments, **options))
                continue
            self._pending.append(self._get_executor().submit(boundary_counts, *arguments, **options))
            while len(self._pending) > self.max_pending_per_worker * self.workers:
                self._add_image(self._pending.popleft().result())

    @property
    def pending_images(self) -> int:
        """Images handed to the workers whose counts have not been added yet."""
        return len(self._pending)

    def flush(self, on_image=None) -> None:
        """Wait for the images still being scored by the workers and add their counts (`on_image()` after each)."""
        while self._pending:
            self._add_image(self._pending.popleft().result())
            if on_image is not None:
                on_image()

    def close(self) -> None:
        """Stop the worker processes (they are started again if more images come)."""
        self.flush()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _get_executor(self):
        if self._executor is None:
            # "spawn": forking a process that runs torch threads can deadlock the child. The workers end with this
            # process, however it ends (killed during the final evaluation, they would otherwise wait on forever).
            context = multiprocessing.get_context("spawn")
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=end_with_parent, initargs=(os.getpid(),)
            )
        return self._executor

    def _add_image(self, counts: np.ndarray) -> None:
        best = int(np.argmax(counts_to_f(counts)))
        self._add("counts", torch.from_numpy(counts))
        self._add("best_counts", torch.from_numpy(counts[:, best]))
        self._add("images", torch.ones(1))

    def summarise(self, state):
        self._require(state["images"].item(), "boundary label (image with a non-ignored pixel)")
        suffix = "" if self.mode == "exact" else "_approx"
        return {
            f"odsF{suffix}": 100 * float(counts_to_f(state["counts"].double().numpy()).max()),
            f"oisF{suffix}": 100 * float(counts_to_f(state["best_counts"].double().numpy())),
        }


def _valid_bounding_box(label: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """(top, left, height, width) of the non-ignored pixels, or None when every pixel is ignored."""
    rows = np.flatnonzero((label != IGNORE_INDEX).any(axis=1))
    cols = np.flatnonzero((label != IGNORE_INDEX).any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def _is_binary_or_ignore(values: torch.Tensor) -> torch.Tensor:
    return (values == 0) | (values == 1) | (values == IGNORE_INDEX)


def _is_probability(values: torch.Tensor) -> torch.Tensor:
    return (values >= 0) & (values <= 1)


def _check_values(task: str, what: str, values: torch.Tensor, is_allowed, expected: str) -> None:
    """Raise a ValueError naming the first sample that holds a value outside the allowed set."""
    allowed = is_allowed(values)
    if bool(allowed.all()):
        return
    bad_samples = (~allowed).flatten(1).any(dim=1).nonzero().flatten()
    sample = int(bad_samples[0])
    bad_value = values[sample][~allowed[sample]].flatten()[0].item()
    hint = " (pass post-processed probabilities, not logits)" if "probabilities" in expected else ""
    raise ValueError(
        f"The {what} of task {task!r} holds {bad_value!r} in sample {sample} of the batch; expected {expected}{hint}."
    )


def build_meters(
    spec: TaskSpec,
    saliency_maxf_mode: str = "standard",
    boundary_tolerance: Optional[float] = None,
    boundary_modes: Sequence[str] = ("exact",),
    boundary_workers: int = 0,
    boundary_time_limit: Optional[float] = DEFAULT_EXACT_SECONDS_PER_IMAGE,
) -> dict[str, Meter]:
    """The meters of one task by its kind, keyed by meter name: the task's name, and for boundaries scored by several
    scorers "<task>:<mode>" for every mode after the first. A boundary task's own `tolerance` parameter wins over
    `boundary_tolerance` (the dataset's)."""
    kind = spec.kind.name
    if kind == "segmentation":
        meter = SegmentationMeter(
            spec.name,
            spec.num_classes,
            spec.class_names,
            skip_background_only_samples=spec.parameters["background_only_is_unlabelled"],
        )
    elif kind == "saliency":
        meter = SaliencyMeter(spec.name, saliency_maxf_mode)
    elif kind == "normals":
        meter = NormalsMeter(spec.name)
    elif kind == "depth":
        meter = DepthMeter(spec.name)
    elif kind == "regression":
        meter = RegressionMeter(
            spec.name, spec.parameters.get("metric_transforms", ()), report_mse=spec.primary_metric == "MSE"
        )
    elif kind == "image_classification":
        meter = ImageClassificationMeter(spec.name)
    elif kind == "boundary":
        tolerance = spec.parameters.get("tolerance", boundary_tolerance)
        return {
            spec.name if index == 0 else f"{spec.name}:{mode}": BoundaryMeter(
                spec.name, tolerance, mode, workers=boundary_workers, time_limit_s=boundary_time_limit
            )
            for index, mode in enumerate(boundary_modes)
        }
    else:
        raise ValueError(f"No meter for the kind {kind!r} of task {spec.name!r}.")
    return {spec.name: meter}
