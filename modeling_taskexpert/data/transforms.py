"""Training and evaluation transforms of the benchmark protocol, and the batch collate.

Implemented on numpy and torch only. `build_transforms` returns a function for
`datasets.Dataset.with_transform` / `set_transform`; it turns a batch of stored rows into samples

    {"pixel_values": float32 (3, H, W), "labels": {task: tensor or None}, "id": str,
     "original_size": (h, w), "pad_offset": (top, left)}

with labels in the conventions of `task_definitions` (no batch dimension; None where the sample
has no label for the task), and `collate_dense_batch` stacks such samples into the batch format of
`docs/architecture.md`. Random draws use torch's global generator, so `torch.manual_seed` makes
them reproducible and DataLoader workers get different streams.
"""

import hashlib
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..image_processing_dense_multitask import load_rgb_image
from ..task_definitions import IGNORE_INDEX, TaskSpec, preset_spec
from .labels import CODECS, decode_label, resize_nearest
from .schema import as_task_specs, crop_balance_task, dataset_task_specs, ordered_tasks, task_columns

# ImageNet statistics of the protocol, on [0, 1] RGB values: transformers' constants, which the image processor
# (DenseMultiTaskImageProcessor) reads too.
IMAGE_MEAN = tuple(IMAGENET_DEFAULT_MEAN)
IMAGE_STD = tuple(IMAGENET_DEFAULT_STD)

SCALE_RANGE = (0.5, 2.0)
CROP_TRIES = 10
CROP_MAX_CLASS_RATIO = 0.75
FLIP_PROBABILITY = 0.5
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV hue units (degrees / 2)



# ----------------------------------------------------------------------------- geometry
GEOMETRIES = ("protocol", "resize_crop")


def check_geometry(geometry: Optional[Mapping]) -> dict:
    """A dataset's training/evaluation geometry (metadata key `geometry`): {"kind": "protocol"} (the default: random
    scale, balanced crop, flip, photometric distortion in training; centred padding in evaluation) or {"kind":
    "resize_crop", "resize": R} (Taskonomy: resize to R x R, crop the train/eval size, random in training and centred
    in evaluation, flip in training)."""
    geometry = dict(geometry or {"kind": "protocol"})
    if geometry.get("kind") not in GEOMETRIES:
        raise ValueError(f"geometry {geometry!r}: `kind` must be one of {GEOMETRIES}.")
    if geometry["kind"] == "resize_crop":
        side = geometry.get("resize")
        if not (isinstance(side, int) and not isinstance(side, bool) and side > 0):
            raise ValueError(f"geometry {geometry!r}: `resize` must be a positive integer.")
    return geometry


def _resize_label_bilinear(label: np.ndarray, side: int) -> np.ndarray:
    """A float label map (H, W) or (H, W, C) resized bilinearly (Taskonomy resizes its labels so)."""
    resized = resize_bilinear(label.astype(np.float32), (side, side))
    return resized.astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (H, W, C) array to (height, width), OpenCV INTER_LINEAR sampling.

    Pixel centres are aligned (source x = (x + 0.5) * src / dst - 0.5, clamped at the borders)
    and there is no antialiasing, as in OpenCV.
    """
    height, width = size

    def weights(dst, src):
        position = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, src - 1)
        return low, high, (position - low).astype(np.float32)

    top, bottom, wy = weights(height, image.shape[0])
    left, right, wx = weights(width, image.shape[1])
    rows = image[top] * (1 - wy)[:, None, None] + image[bottom] * wy[:, None, None]
    return rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]


def pad_centered(array: np.ndarray, size: tuple[int, int], value) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad (H, W[, C]) to `size` with the content centred (offset floor(delta / 2)); return it and (top, left)."""
    height, width = array.shape[:2]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    canvas = np.full((size[0], size[1]) + array.shape[2:], value, dtype=array.dtype)
    canvas[top : top + height, left : left + width] = array
    return canvas, (top, left)


# ----------------------------------------------------------------------------- colour


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV with OpenCV's 8-bit ranges (H in [0, 180), S and V in [0, 255])."""
    rgb = image.astype(np.float32)
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        saturation = np.where(value > 0, 255.0 * delta / value, 0.0)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        hue = np.where(value == r, 60.0 * (g - b) / delta,
                       np.where(value == g, 120.0 + 60.0 * (b - r) / delta, 240.0 + 60.0 * (r - g) / delta))  # fmt: skip
    hue = np.where(delta > 0, hue, 0.0) % 360.0
    hue = np.rint(hue / 2.0) % 180
    return np.stack([hue, np.rint(saturation), value], axis=-1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (OpenCV 8-bit ranges) -> uint8 RGB."""
    hue = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    saturation = hsv[..., 1].astype(np.float32) / 255.0
    value = hsv[..., 2].astype(np.float32)
    sector = np.floor(hue).astype(np.int64) % 6
    fraction = hue - np.floor(hue)
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    rgb = np.zeros(hsv.shape, dtype=np.float32)
    for index, channels in enumerate(choices):
        mask = sector == index
        for channel in range(3):
            rgb[..., channel][mask] = channels[channel][mask]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The protocol's photometric distortion of a uint8 RGB image (each step with p = 0.5).

    Brightness, then contrast either first or last, saturation and hue in HSV. The reference
    runs an OpenCV BGR->HSV conversion on RGB data, which mirrors the direction of its hue
    shift; drawing the shift from the same range gives the same distribution up to the one-unit
    asymmetry of that range.
    """
    if rng.random() < 0.5:
        image = _convert(image, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = rng.random() < 0.5

    def contrast(image):
        return _convert(image, alpha=rng.uniform(*CONTRAST_RANGE)) if rng.random() < 0.5 else image

    if contrast_first:
        image = contrast(image)
    apply_saturation, apply_hue = rng.random() < 0.5, rng.random() < 0.5
    if apply_saturation or apply_hue:
        hsv = rgb_to_hsv(image)
        if apply_saturation:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*SATURATION_RANGE))
        if apply_hue:
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-HUE_DELTA, HUE_DELTA)) % 180
        image = hsv_to_rgb(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


# ----------------------------------------------------------------------------- samples


def _crop_is_balanced(semseg: np.ndarray) -> bool:
    _, counts = np.unique(semseg[semseg != IGNORE_INDEX], return_counts=True)
    return len(counts) > 1 and counts.max() / counts.sum() < CROP_MAX_CLASS_RATIO


def _random_crop_box(shape, crop_size, semseg, rng) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, preferring crops with balanced classes."""
    height, width = min(shape[0], crop_size[0]), min(shape[1], crop_size[1])

    def draw():
        return int(rng.integers(0, shape[0] - height + 1)), int(rng.integers(0, shape[1] - width + 1))

    if semseg is not None:
        for _ in range(CROP_TRIES):
            top, left = draw()
            if _crop_is_balanced(semseg[top : top + height, left : left + width]):
                return top, left, height, width
    top, left = draw()
    return top, left, height, width


def _to_label_tensor(spec: TaskSpec, label: np.ndarray) -> torch.Tensor:
    """Protocol step 7 (ignore regions) and step 8 (tensor in the kind's convention, see `task_definitions`)."""
    kind = spec.kind.name
    if kind == "segmentation":
        if spec.parameters["background_only_is_unlabelled"] and np.isin(label, (0, IGNORE_INDEX)).all():
            label = np.full_like(label, IGNORE_INDEX)  # no instance pixel at all (human parts): the map is ignored
        return torch.from_numpy(label.astype(np.int64))
    if kind == "normals":
        label = label.copy()
        label[(label == 0).all(axis=-1)] = IGNORE_INDEX
        return torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1), dtype=np.float32))
    if kind == "regression":
        return torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1), dtype=np.float32))
    if kind == "depth":
        label = np.where(label == 0, np.float32(IGNORE_INDEX), label)
    return torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))


class DenseTransform:
    """Turns stored rows into model inputs (picklable, for DataLoader workers).

    Args:
        tasks: the tasks whose labels are produced.
        train: training augmentation (protocol steps 1-8) or evaluation (normalise, pad).
        size: (height, width) of the output canvas: the crop size in training, the padded size
            in evaluation.
        seed: when given, the augmentation of a sample is a function of (seed, epoch, sample id) alone,
            whatever the worker, the batch order or the samples skipped before it, which makes resumed
            training reproduce an uninterrupted run exactly (see `set_epoch`). Without it, random draws
            come from torch's global generator.
    """

    def __init__(
        self,
        tasks,
        train: bool,
        size: tuple[int, int],
        seed: Optional[int] = None,
        columns: Optional[Mapping[str, str]] = None,
        balance_task: Optional[str] = "semseg",
        source: str = "dataset",
        geometry: Optional[Mapping] = None,
    ):
        self.task_specs = as_task_specs(tasks)
        self.tasks = list(self.task_specs)
        self.columns = {task: (columns or {}).get(task, task) for task in self.tasks}
        balance_spec = self.task_specs.get(balance_task)
        self.balance_task = balance_task if balance_spec and balance_spec.kind.name == "segmentation" else None
        self.source = source
        self.geometry = check_geometry(geometry)
        self.train = train
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed
        self.epoch = 0
        self.mean = np.array(IMAGE_MEAN, dtype=np.float32) * 255.0
        self.std = np.array(IMAGE_STD, dtype=np.float32) * 255.0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations (with a seed); DataLoader workers copy the transform per epoch."""
        self.epoch = int(epoch)

    def _generator(self, sample_id: str) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        id_key = int.from_bytes(hashlib.blake2b(str(sample_id).encode(), digest_size=8).digest(), "little")
        return np.random.default_rng([self.seed, self.epoch, id_key])

    def __call__(self, batch: dict) -> dict:
        outputs = {key: [] for key in ("pixel_values", "labels", "id", "original_size", "pad_offset")}
        for index in range(len(batch["image"])):
            row = {"id": batch["id"][index], "image": batch["image"][index]}
            row.update({task: batch[column][index] for task, column in self.columns.items()})
            sample = self.transform_sample(row)
            for key, value in sample.items():
                outputs[key].append(value)
        return outputs

    def transform_sample(self, row: dict) -> dict:
        """Transform one decoded row ({"id", "image": PIL, task: stored label or None}). Every label's values are
        checked against its kind; an invalid one is a `LabelError` naming the dataset, split, sample and column."""
        # The processor's rule for every image mode (grayscale replicated, transparency composited on white), so that
        # training sees what inference sees.
        image = load_rgb_image(row["image"], name=f"{self.source}, sample {row['id']!r}, column 'image'")
        split = "train" if self.train else "validation"
        labels, image_labels = {}, {}  # maps, and the labels of image-level tasks (no geometry applies to them)
        for task, spec in self.task_specs.items():
            value = row.get(task)
            target = image_labels if spec.kind.image_level else labels
            if value is None:
                target[task] = None
                continue
            where = f"{self.source}, {split} split, sample {row['id']!r}, column {self.columns[task]!r}"
            target[task] = decode_label(spec, value, where)
            if not spec.kind.image_level and target[task].shape[:2] != image.shape[:2]:
                raise ValueError(
                    f"Sample {row['id']!r}: the {task} label is {labels[task].shape[:2]} but the image is {image.shape[:2]}."
                )
        if self.geometry["kind"] == "resize_crop":
            image, labels = self._resize_crop(image, labels, self._generator(row["id"]) if self.train else None)
        elif self.train:
            image, labels = self._augment(image, labels, self._generator(row["id"]))
        elif image.shape[0] > self.size[0] or image.shape[1] > self.size[1]:
            raise ValueError(
                f"Sample {row['id']!r}: the image is {image.shape[0]}x{image.shape[1]}, larger than the evaluation size "
                f"{self.size[0]}x{self.size[1]}; evaluation pads and never resizes. Use a larger size (the dataset's "
                "eval_size) or resize the dataset."
            )
        original_size = image.shape[:2]
        pixels = (image.astype(np.float32) - self.mean) / self.std
        pixels, offset = pad_centered(pixels, self.size, 0.0)
        tensors = {}
        for task, label in labels.items():
            if label is None:
                tensors[task] = None
                continue
            spec = self.task_specs[task]
            label, _ = pad_centered(label, self.size, CODECS[spec.kind.name].pad_value)
            tensors[task] = _to_label_tensor(spec, label)
        for task, label in image_labels.items():
            tensors[task] = None if label is None else torch.from_numpy(np.asarray(label, dtype=np.float32).copy())
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            "labels": tensors,
            "id": row["id"],
            "original_size": tuple(int(v) for v in original_size),
            "pad_offset": offset,
        }

    def _resize_crop(self, image: np.ndarray, labels: dict, rng: Optional[np.random.Generator]):
        """The `resize_crop` geometry (Taskonomy's protocol): resize to `resize` x `resize` (image and labels
        bilinear), crop `size` (random with `rng`, i.e. in training, else centred), then in training a horizontal flip
        with probability one half (negating the channels a task declares, e.g. the x of normals)."""
        side = self.geometry["resize"]
        image = resize_bilinear(image.astype(np.float32), (side, side))
        labels = {task: None if label is None else _resize_label_bilinear(label, side) for task, label in labels.items()}
        height, width = self.size
        if height > side or width > side:
            raise ValueError(f"The crop {height}x{width} is larger than the resized image {side}x{side}.")
        if rng is None:
            top, left = (side - height) // 2, (side - width) // 2
        else:
            top, left = int(rng.integers(0, side - height + 1)), int(rng.integers(0, side - width + 1))
        image = image[top : top + height, left : left + width]
        labels = {task: None if label is None else label[top : top + height, left : left + width] for task, label in labels.items()}
        if rng is not None and rng.random() < FLIP_PROBABILITY:
            image, labels = flip_horizontal(image, labels, self.task_specs)
        return image, labels

    def _augment(self, image: np.ndarray, labels: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """Protocol steps 1-4: random scale, balanced random crop, flip, photometric distortion."""
        image, labels = rescale(image, labels, rng.uniform(*SCALE_RANGE), self.task_specs)
        balance = labels.get(self.balance_task) if self.balance_task else None
        top, left, height, width = _random_crop_box(image.shape, self.size, balance, rng)
        image = image[top : top + height, left : left + width]
        labels = {task: None if label is None else label[top : top + height, left : left + width] for task, label in labels.items()}
        if rng.random() < FLIP_PROBABILITY:
            image, labels = flip_horizontal(image, labels, self.task_specs)
        image = photometric_distortion(np.clip(image, 0, 255).astype(np.uint8), rng)
        return image, labels


def rescale(image: np.ndarray, labels: dict, scale: float, task_specs=None) -> tuple[np.ndarray, dict]:
    """Resize to int(H * scale) x int(W * scale): image bilinear (float32), labels nearest; the values of a kind that
    scales with zoom (depth) divide by the scale. `task_specs` as in `as_task_specs` (default: presets)."""
    specs = as_task_specs(task_specs if task_specs is not None else list(labels))
    new_size = (int(image.shape[0] * scale), int(image.shape[1] * scale))
    image = resize_bilinear(image.astype(np.float32), new_size)
    resized = {}
    for task, label in labels.items():
        if label is not None:
            label = resize_nearest(label, new_size)
            if specs[task].scales_with_zoom:
                label = label / np.float32(scale)  # the scene looks closer when the image is enlarged
        resized[task] = label
    return image, resized


def flip_horizontal(image: np.ndarray, labels: dict, task_specs=None) -> tuple[np.ndarray, dict]:
    """Mirror the image and every label left-right; the channels a kind negates on a flip (the x component of
    normals) change sign."""
    specs = as_task_specs(task_specs if task_specs is not None else list(labels))
    flipped = {task: None if label is None else label[:, ::-1].copy() for task, label in labels.items()}
    for task, label in flipped.items():
        if label is not None:
            for channel in specs[task].negate_on_flip:
                label[..., channel] *= -1
    return image[:, ::-1].copy(), flipped


def build_transforms(
    metadata: dict, train: bool, tasks: Optional[Sequence[str]] = None, size=None, seed: Optional[int] = None
) -> DenseTransform:
    """The transform of a dataset for `with_transform`/`set_transform`.

    Args:
        metadata: the dataset metadata (`read_dataset_metadata`).
        train: protocol training augmentation, or evaluation (normalise and centred pad only).
        tasks: tasks whose labels are produced (default: all of the dataset).
        size: (height, width) overriding the metadata's train_size (training) / eval_size (evaluation).
        seed: makes the training augmentations a function of (seed, epoch, sample id); see `DenseTransform`.
    """
    specs = dataset_task_specs(metadata)
    tasks = list(specs) if tasks is None else list(tasks)
    for task in tasks:
        if task not in specs:
            raise ValueError(f"Task {task!r} is not in the dataset {metadata.get('name')!r} (it has {list(specs)}).")
    if size is None:
        size = metadata["train_size" if train else "eval_size"]
    elif isinstance(size, int):
        size = (size, size)
    return DenseTransform(
        {task: spec for task, spec in specs.items() if task in tasks},
        train=train,
        size=tuple(size),
        seed=seed,
        columns=task_columns(metadata),
        balance_task=crop_balance_task(metadata),
        source=f"dataset {metadata.get('name')!r}",
        geometry=metadata.get("geometry"),
    )


def collate_dense_batch(samples: Sequence[dict], task_specs=None) -> dict:
    """Stack transformed samples into a batch; a missing label becomes a map of its kind's unsupervised value (255,
    NaN for regression). `task_specs` ({task: TaskSpec}, e.g. the transform's `task_specs`) is needed for tasks that
    are not presets; bind it with `functools.partial` for a DataLoader."""
    if not samples:
        raise ValueError("Cannot collate an empty list of samples.")
    pixel_values = torch.stack([sample["pixel_values"] for sample in samples])
    height, width = pixel_values.shape[-2:]
    tasks = ordered_tasks({task for sample in samples for task in sample["labels"]})
    specs = dict(task_specs or {})
    labels = {}
    for task in tasks:
        if task not in specs:
            try:
                specs[task] = preset_spec(task)
            except ValueError:
                raise ValueError(
                    f"collate_dense_batch: task {task!r} is not a preset; pass task_specs (the transform's "
                    "task_specs) so that missing labels get its kind's fill value."
                ) from None
        spec = specs[task]
        channels = spec.label_channels
        if spec.kind.image_level:
            shape = (channels,)
        else:
            shape = (channels, height, width) if channels else (height, width)
        labels[task] = torch.stack([
            sample["labels"].get(task) if sample["labels"].get(task) is not None
            else torch.full(shape, spec.kind.unsupervised_value, dtype=spec.kind.label_dtype)
            for sample in samples
        ])  # fmt: skip
    return {
        "pixel_values": pixel_values,
        "labels": labels,
        "ids": [sample["id"] for sample in samples],
        "original_sizes": torch.tensor([sample["original_size"] for sample in samples], dtype=torch.int64),
        "pad_offsets": torch.tensor([sample["pad_offset"] for sample in samples], dtype=torch.int64),
    }
