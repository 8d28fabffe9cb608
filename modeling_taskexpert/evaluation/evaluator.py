"""`DenseMultiTaskEvaluator`: the benchmark metrics of several dense tasks, streamed batch by batch."""

import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..data import nyud, pascal_context
from ..data.schema import dataset_task_specs
from ..task_definitions import PRESET_TASKS, TaskSpec, check_task_name, make_task_spec
from .boundary import BOUNDARY_MODES, BOUNDARY_THRESHOLDS, DEFAULT_EXACT_SECONDS_PER_IMAGE, require_exact_scorer
from .delta_m import compute_delta_m, load_baselines
from .metrics import NORMALS_HISTOGRAM_RESOLUTION, BoundaryMeter, EmptyEvaluationError, Meter, build_meters

# Boundary tolerance of the benchmark datasets (fraction of the image diagonal), keyed by dataset name.
PROTOCOL_BOUNDARY_TOLERANCES = {
    pascal_context.NAME: pascal_context.BOUNDARY_TOLERANCE,
    nyud.NAME: nyud.BOUNDARY_TOLERANCE,
}


def sum_across_processes(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums of `tensors` over all processes of the initialised torch.distributed group.

    Returns new tensors (the inputs are left untouched, so a local state can be reduced again);
    without a process group, or with a single process, these are plain copies.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [tensor.clone() for tensor in tensors]
    if torch.distributed.get_world_size() == 1:
        return [tensor.clone() for tensor in tensors]
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    reduced = []
    for tensor in tensors:
        buffer = tensor.to(device, copy=True)
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
        reduced.append(buffer.cpu())
    return reduced


class DenseMultiTaskEvaluator:
    """Streams the dense benchmark metrics (protocol section 4) over batches, exact under accumulation.

    Example:

    ```python
    evaluator = DenseMultiTaskEvaluator(tasks=["semseg", "depth"], num_classes={"semseg": 40}, dataset="nyud")
    for batch in dataloader:
        evaluator.update(predictions, batch["labels"], meta=batch)
    results = evaluator.compute()  # {"semseg/mIoU": ..., "depth/RMSE": ..., ...}
    ```

    Inputs follow `task_definitions`: post-processed predictions (class ids; saliency and boundary
    probabilities in [0, 1]; unit normals (B, 3, H, W); depth in metres) and labels with
    `IGNORE_INDEX` (255) wherever there is no supervision, including the padding of the canvas.
    Padding therefore drops out of every pixel metric by itself. The boundary metric works per
    image on the image region (the reference crops the padding before scoring): pass the batch as
    `meta` so its `pad_offsets` and `original_sizes` give that region, or else the bounding box of
    the non-255 label pixels is used.

    Results, keyed "<task>/<metric>": mIoU, per-class "IoU/<name>" and pixel accuracy in % for
    semseg and human_parts (human_parts only on samples that carry parts); saliency maxF (β² = 0.3),
    maxF_reference, maxF_standard and mIoU in %; normals mean, median, rmse (degrees) and
    within_11.25 / within_22.5 / within_30 (%); depth RMSE, log_RMSE (metres, log), abs_rel,
    sq_rel, log10 and delta_1..3 (%); edge odsF and oisF in % from the exact scorer, odsF_approx and
    oisF_approx from the approximate one (each key names its scorer; both when both are requested); and
    "multi_task/delta_m" (%) when single-task baselines are given.

    Data-parallel evaluation: every process updates with its own samples only and `compute()` sums
    the states over the torch.distributed group (as set up by `accelerate`), so the result equals a
    single-process run. Never feed samples that a sampler duplicated to even out the last batch
    (`evaluate_model` drops them); since states are summed rather than predictions gathered,
    `gather_for_metrics` is not involved.

    Args:
        tasks: tasks to evaluate: preset task names (`task_definitions.PRESET_TASKS`), or {task: TaskSpec} for any
            task (`model.config.task_specs`; `from_metadata` reads them from a dataset).
        num_classes: number of classes of each segmentation task, e.g. `{"semseg": 21, "human_parts": 7}`.
        dataset: dataset name ("pascal-context", "nyud", "synthetic", ...). For the two benchmark
            datasets it sets the protocol's boundary tolerance and the saliency maxF mode.
        class_names: optional class names per segmentation task (a list, or an id2label dict), used in
            the per-class keys; the class ids are used otherwise.
        boundary_tolerance: boundary matching distance as a fraction of the image diagonal; defaults to
            the protocol's value of `dataset` (0.0075 PASCAL-Context, 0.011 NYUD), required otherwise.
        boundary_mode: "exact" (the protocol's NMS + thinning + one-to-one matching over 101 thresholds; needs
            `pyEdgeEval`; reported as "edge/odsF"), "approximate" (fast, for periodic evaluation during training,
            reported as "edge/odsF_approx"), or a sequence of both to score the same predictions with each.
        saliency_maxf_mode: "reference" thresholds sigmoid(p), the quirk of the InvPT/TaskPrompter meter
            that every published maxF on PASCAL-Context was computed with (so it is the default for
            dataset="pascal-context", where numbers are compared with those tables); "standard"
            thresholds p itself, the textbook maxF (the default for every other dataset).
        single_task_baselines: baseline metrics (a dict keyed like the results, or a JSON file) for Δm.
        boundary_time_limit: the exact boundary scorer's time limit per image in seconds (None: none); past it the
            evaluation fails naming the image (`BoundaryTimeLimitError`) instead of running for hours.
        class_maps: per segmentation task whose model classes are not the dataset's, model class id -> dataset class
            id (a tensor), applied to the predictions before scoring (the evaluation CLI's `--class-mapping`).
        boundary_workers: processes that score boundary images in the background (0: score in `update`). The
            exact mode takes tens of seconds per full-size image on one core, so use as many as there are
            free cores for full benchmark runs; call `close()` when done to stop them.
    """

    def __init__(
        self,
        tasks: Union[Sequence[str], Mapping[str, TaskSpec]],
        num_classes: Optional[Mapping[str, int]] = None,
        dataset: Optional[str] = None,
        class_names: Optional[Mapping[str, Union[Sequence[str], Mapping[Any, str]]]] = None,
        boundary_tolerance: Optional[float] = None,
        boundary_mode: Union[str, Sequence[str]] = "exact",
        saliency_maxf_mode: Optional[str] = None,
        single_task_baselines: Optional[Union[Mapping[str, float], str, os.PathLike]] = None,
        boundary_workers: int = 0,
        class_maps: Optional[Mapping[str, torch.Tensor]] = None,
        boundary_time_limit: Optional[float] = DEFAULT_EXACT_SECONDS_PER_IMAGE,
        **earlier_names,
    ):
        for old, new in (("edge_mode", "boundary_mode"), ("edge_workers", "boundary_workers")):
            if old in earlier_names:  # the previous release's names, read for one release
                warnings.warn(f"`{old}` is now called `{new}`; the old name is read until the next release.",
                              FutureWarning, stacklevel=2)  # fmt: skip
        boundary_mode = earlier_names.pop("edge_mode", boundary_mode)
        boundary_workers = earlier_names.pop("edge_workers", boundary_workers)
        if earlier_names:
            raise TypeError(f"DenseMultiTaskEvaluator got unexpected argument(s) {sorted(earlier_names)}.")
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}.")
        if not isinstance(tasks, Mapping) and len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks lists a task more than once: {list(tasks)}.")
        self.task_specs = _resolve_specs(tasks, dict(num_classes or {}), dict(class_names or {}))
        kinds = {spec.kind.name for spec in self.task_specs.values()}
        boundary_modes = [boundary_mode] if isinstance(boundary_mode, str) else list(boundary_mode)
        if (
            not boundary_modes
            or any(mode not in BOUNDARY_MODES for mode in boundary_modes)
            or len(set(boundary_modes)) != len(boundary_modes)
        ):
            raise ValueError(
                f"boundary_mode must be one of {BOUNDARY_MODES}, or a sequence of both, got {boundary_mode!r}."
            )
        if "boundary" in kinds and "exact" in boundary_modes:
            require_exact_scorer()
        self.tasks = list(self.task_specs)
        self.dataset = dataset
        # Per segmentation task whose model classes are not the dataset's: model class id -> dataset class id.
        self.class_maps = {task: torch.as_tensor(lookup).long() for task, lookup in (class_maps or {}).items()}

        boundary_tasks = [spec for spec in self.task_specs.values() if spec.kind.name == "boundary"]
        if boundary_tolerance is None and any("tolerance" not in spec.parameters for spec in boundary_tasks):
            boundary_tolerance = PROTOCOL_BOUNDARY_TOLERANCES.get(dataset)
            if boundary_tolerance is None:
                raise ValueError(
                    f"Evaluating the boundary task(s) {[spec.name for spec in boundary_tasks]} on dataset {dataset!r} "
                    "needs boundary_tolerance (a fraction of the image diagonal); the protocol defines it only for "
                    f"{sorted(PROTOCOL_BOUNDARY_TOLERANCES)}."
                )
        if saliency_maxf_mode is None:
            saliency_maxf_mode = "reference" if dataset == pascal_context.NAME else "standard"
        self.boundary_tolerance = boundary_tolerance
        self.boundary_modes = boundary_modes
        self.boundary_mode = boundary_mode if isinstance(boundary_mode, str) else list(boundary_modes)
        self.saliency_maxf_mode = saliency_maxf_mode
        self.single_task_baselines = None
        if single_task_baselines is not None:
            self.single_task_baselines = load_baselines(single_task_baselines)

        self.meters: dict[str, Meter] = {}
        for spec in self.task_specs.values():
            self.meters.update(
                build_meters(
                    spec,
                    saliency_maxf_mode,
                    boundary_tolerance,
                    boundary_modes,
                    boundary_workers=boundary_workers,
                    boundary_time_limit=boundary_time_limit,
                )
            )
        self.num_samples = torch.zeros(1, dtype=torch.int64)

    @classmethod
    def from_metadata(
        cls, metadata: Mapping, tasks: Optional[Sequence[str]] = None, **kwargs
    ) -> "DenseMultiTaskEvaluator":
        """An evaluator for a dataset described by its metadata (`modeling_taskexpert.data.read_dataset_metadata`).

        Tasks default to all of the dataset's; their kinds, class names, the dataset name and boundary tolerance come
        from the metadata unless given in `kwargs`.
        """
        if not isinstance(metadata, Mapping) or not isinstance(metadata.get("tasks"), Mapping):
            raise ValueError(
                "metadata must be the dict of a dataset's metadata file (read_dataset_metadata), with a 'tasks' mapping."
            )
        available = dataset_task_specs(metadata)
        tasks = list(available) if tasks is None else list(tasks)
        for task in tasks:
            if task not in available:
                raise ValueError(
                    f"Task {task!r} is not in the dataset {metadata.get('name')!r} (it has {list(available)})."
                )
        kwargs.setdefault("dataset", metadata.get("name"))
        if metadata.get("boundary_tolerance") is not None:
            kwargs.setdefault("boundary_tolerance", metadata["boundary_tolerance"])
        return cls(tasks={task: available[task] for task in tasks}, **kwargs)

    @property
    def settings(self) -> dict:
        """The choices behind the numbers, to store next to them."""
        settings = {"dataset": self.dataset, "tasks": list(self.tasks)}
        kinds = {spec.kind.name for spec in self.task_specs.values()}
        if "saliency" in kinds:
            settings["saliency_maxf_mode"] = self.saliency_maxf_mode
        if "boundary" in kinds:
            settings.update(
                boundary_mode=self.boundary_mode,
                boundary_tolerance=self.boundary_tolerance,
                boundary_thresholds=len(BOUNDARY_THRESHOLDS),
            )
        if "normals" in kinds:
            settings["normals_median_resolution_degrees"] = NORMALS_HISTOGRAM_RESOLUTION
        return settings

    def reset(self) -> None:
        """Forget every sample seen so far."""
        for meter in self.meters.values():
            meter.reset()
        self.num_samples.zero_()

    def close(self) -> None:
        """Stop the boundary worker processes, if any (see `boundary_workers`)."""
        for meter in self.meters.values():
            if isinstance(meter, BoundaryMeter):
                meter.close()

    def flush(self, progress: bool = False) -> None:
        """Wait for the boundary images still being scored in the background (see `boundary_workers`), with a progress
        bar and its ETA when `progress`; `compute` does this by itself, silently."""
        from tqdm.auto import tqdm

        boundary_meters = [meter for meter in self.meters.values() if isinstance(meter, BoundaryMeter)]
        pending = sum(meter.pending_images for meter in boundary_meters)
        with tqdm(total=pending, desc="Scoring boundaries", unit="image", disable=not progress or pending == 0) as bar:
            for meter in boundary_meters:
                meter.flush(on_image=lambda: bar.update(1))

    def update(
        self,
        predictions: Mapping[str, Union[torch.Tensor, np.ndarray]],
        labels: Mapping[str, Union[torch.Tensor, np.ndarray]],
        meta: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Add one batch.

        Args:
            predictions: task -> post-processed prediction batch (extra tasks are ignored).
            labels: task -> label batch, as the collate makes them.
            meta: optional batch dict with "original_sizes" and "pad_offsets" (B, 2); only the boundary
                metric uses them, to crop each sample to its image region.
        """
        batch_size = None
        checked = {}
        for task in self.tasks:
            for name, mapping in (("predictions", predictions), ("labels", labels)):
                if task not in mapping:
                    raise ValueError(f"{name} has no entry for task {task!r} (it has {sorted(mapping)}).")
            prediction, label = _check_pair(self.task_specs[task], predictions[task], labels[task])
            if task in self.class_maps:
                lookup = self.class_maps[task].to(prediction.device)
                if prediction.numel() and (prediction.min() < 0 or prediction.max() >= len(lookup)):
                    raise ValueError(f"Predictions of {task!r} hold class ids outside the mapped 0..{len(lookup) - 1}.")
                prediction = lookup[prediction]
            if batch_size is None:
                batch_size = len(label)
            elif len(label) != batch_size:
                raise ValueError(f"Task {task!r} has a batch of {len(label)} samples, the other tasks {batch_size}.")
            checked[task] = prediction, label
        has_boundaries = any(isinstance(meter, BoundaryMeter) for meter in self.meters.values())
        crops = _crops_from_meta(meta, batch_size) if meta is not None and has_boundaries else None
        for name, meter in self.meters.items():
            prediction, label = checked[meter.task]
            if isinstance(meter, BoundaryMeter):
                meter.update(prediction, label, crops=crops)
            else:
                meter.update(prediction, label)
        self.num_samples += batch_size

    def compute(self, sync: bool = True) -> dict[str, float]:
        """The metrics over every sample seen (summed over all processes when `sync` and distributed).

        Does not change the state: more batches can be added and `compute` called again.
        """
        for meter in self.meters.values():
            meter.flush()
        names = [(name, key) for name, meter in self.meters.items() for key in meter.state]
        local = [self.meters[name].state[key] for name, key in names] + [self.num_samples]
        totals = sum_across_processes(local) if sync else [tensor.clone() for tensor in local]
        if int(totals[-1]) == 0:
            raise EmptyEvaluationError("compute() was called before any sample was added with update().")
        states = {name: {} for name in self.meters}
        for (name, key), tensor in zip(names, totals):
            states[name][key] = tensor
        results = {}
        for name, meter in self.meters.items():
            results.update({f"{meter.task}/{key}": value for key, value in meter.summarise(states[name]).items()})
        if self.single_task_baselines is not None:
            results["multi_task/delta_m"] = compute_delta_m(results, self.single_task_baselines, self.task_specs)
        return results


def _resolve_specs(tasks, num_classes: dict, class_names: dict) -> dict[str, TaskSpec]:
    """{task: TaskSpec} from a mapping of specs, or from preset task names with `num_classes` / `class_names` for the
    segmentation tasks."""
    if isinstance(tasks, Mapping):
        return dict(tasks)
    specs = {}
    for task in tasks:
        check_task_name(task)
        if task not in PRESET_TASKS:
            raise ValueError(
                f"Task {task!r} is not a preset task ({', '.join(PRESET_TASKS)}); give the evaluator the tasks as "
                "{task: TaskSpec} (e.g. model.config.task_specs, or DenseMultiTaskEvaluator.from_metadata)."
            )
        names = None
        if PRESET_TASKS[task]["kind"] == "segmentation":
            if task not in num_classes:
                raise ValueError(f"Segmentation task {task!r} needs num_classes[{task!r}].")
            names = _class_name_list(class_names.get(task), num_classes[task], task)
            names = names if names is not None else [str(i) for i in range(num_classes[task])]
            if len(names) != num_classes[task]:
                raise ValueError(f"{task!r} has {num_classes[task]} classes but {len(names)} class names were given.")
            if num_classes[task] < 2:
                raise ValueError(f"num_classes of {task!r} must be an integer >= 2, got {num_classes[task]!r}.")
        specs[task] = make_task_spec(task, None, names)
    return specs


def _as_tensor(value, task: str, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"The {name} of task {task!r} must be a torch tensor or numpy array, got {type(value).__name__}."
        )
    return value.detach()


def _check_pair(spec: TaskSpec, prediction, label) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes, dtypes and finiteness of one task's prediction and label batches."""
    task = spec.name
    prediction = _as_tensor(prediction, task, "prediction")
    label = _as_tensor(label, task, "label")
    channels = spec.label_channels
    ndim = 2 if spec.kind.image_level else 4 if channels else 3
    layout = {2: f"(B, {channels})", 3: "(B, H, W)", 4: f"(B, {channels}, H, W)"}[ndim]
    for name, tensor in (("prediction", prediction), ("label", label)):
        if tensor.dim() != ndim or (ndim != 3 and tensor.shape[1] != channels):
            raise ValueError(f"The {name} of task {task!r} must have shape {layout}, got {tuple(tensor.shape)}.")
    if prediction.shape != label.shape:
        raise ValueError(
            f"Task {task!r}: prediction shape {tuple(prediction.shape)} differs from label shape {tuple(label.shape)}."
        )
    if label.shape[0] == 0 or label[0].numel() == 0:
        raise ValueError(f"Task {task!r}: the batch is empty (shape {tuple(label.shape)}).")
    integer = spec.kind.label_dtype == torch.int64
    for name, tensor in (("prediction", prediction), ("label", label)):
        if integer and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
            raise TypeError(
                f"The {name} of segmentation task {task!r} must hold integer class ids, got {tensor.dtype}."
            )
        if not integer and not tensor.is_floating_point():
            raise TypeError(f"The {name} of task {task!r} must be a floating-point tensor, got {tensor.dtype}.")
        # NaN marks unlabelled pixels of a kind whose unsupervised value is NaN (regression); never infinity.
        allowed_nan = name == "label" and math.isnan(spec.kind.unsupervised_value)
        bad = torch.isinf(tensor) if allowed_nan else ~torch.isfinite(tensor)
        if not integer and bool(bad.any()):
            sample = int(bad.flatten(1).any(dim=1).nonzero()[0])
            raise ValueError(
                f"The {name} of task {task!r} holds NaN or infinite values (sample {sample} of the batch)."
            )
    if integer:
        prediction, label = prediction.long(), label.long()
    return prediction, label.to(prediction.device)


def _crops_from_meta(meta: Mapping[str, Any], batch_size: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of each sample's image inside the padded canvas."""
    try:
        offsets = torch.as_tensor(meta["pad_offsets"]).reshape(-1, 2).tolist()
        sizes = torch.as_tensor(meta["original_sizes"]).reshape(-1, 2).tolist()
    except KeyError as error:
        raise ValueError(f"meta must hold 'pad_offsets' and 'original_sizes' (B, 2); it lacks {error}.") from None
    if len(offsets) != batch_size or len(sizes) != batch_size:
        raise ValueError(
            f"meta gives {len(offsets)} pad_offsets and {len(sizes)} original_sizes for a batch of "
            f"{batch_size} samples."
        )
    return [(int(top), int(left), int(height), int(width)) for (top, left), (height, width) in zip(offsets, sizes)]


def _class_name_list(names, num_classes: int, task: str) -> Optional[list[str]]:
    """Class names as a list ordered by id, from a list or an id2label mapping (string or int keys)."""
    if names is None:
        return None
    if isinstance(names, Mapping):
        try:
            by_id = {int(key): value for key, value in names.items()}
        except ValueError:
            raise ValueError(
                f"The id2label of {task!r} must have integer ids as keys, got {list(names)[:5]}."
            ) from None
        if sorted(by_id) != list(range(num_classes)):
            raise ValueError(f"The id2label of {task!r} must cover ids 0..{num_classes - 1} exactly.")
        return [by_id[index] for index in range(num_classes)]
    return list(names)
