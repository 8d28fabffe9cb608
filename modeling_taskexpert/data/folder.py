"""Bring your own data: a plain folder of images and label files, described by a small YAML, into the schema.

Layout (file stems pair an image with its labels; any image format PIL reads):

    my_data/
      tasks.yaml
      images/train/0001.jpg ...          images/validation/0107.jpg ...
      roads/train/0001.png ...           roads/validation/0107.png ...      (one folder per task)
      elevation/train/0001.npy ...

`tasks.yaml` names the dataset and declares every task: its kind, the kind's parameters (`task_definitions`), and how
its files encode the labels:

    name: my-roads
    eval_size: [256, 256]         # evaluation canvas (H, W); default: the largest image, rounded up to 32
    train_size: [256, 256]        # training crop; default: eval_size
    boundary_tolerance: 0.0075    # boundary matching distance (fraction of the diagonal), for boundary tasks
    tasks:
      roads: {kind: segmentation, classes: [background, road, lane]}
      elevation: {kind: regression, channels: 1, value_range: [0, 50], unit: m, scale: 0.01}
      contours: {kind: boundary, positive_value: 255}

Label files per kind (read options in brackets, defaults after '='):
- segmentation: 8- or 16-bit gray or palette PNG (or integer .npy) of class ids [`classes` (the names, required),
  `ignore_value`=255: pixels without a label].
- saliency, boundary: gray PNG (or .npy) of 0 / positive [`positive_value`=1, `ignore_value`=255; a 0/255 mask needs
  `positive_value: 255`, and then has no ignore value unless one is given].
- depth: float .npy or 32-bit float TIFF in metres, or a 16-bit PNG times `scale` (0.001 for millimetres)
  [`scale`=1, `invalid_value`=0].
- normals: RGB PNG with n = 2 v / 255 - 1 ((0, 0, 0) = no normal), or float .npy (H, W, 3).
- regression: float .npy (H, W) or (H, W, C), float TIFF, or an integer PNG [`scale`=1, `offset`=0: value =
  file value * scale + offset; `invalid_value`: file value of pixels without a label (NaN in .npy always is)].

A sample may lack a task's file (that label is empty); a task whose split has no file at all is refused, as is any
value outside the kind's range, a label whose size differs from its image, or a stem that pairs no image.
"""

import math
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from PIL import Image

from ..task_definitions import KINDS, TaskSpec, make_task_spec
from .labels import LabelError, encode_label
from .raw_files import read_rgb_image_cell
from .schema import SPLITS, build_features, build_metadata, render_card
from .source import check_disjoint_splits, check_sample_id
from .writer import DEFAULT_MAX_SHARD_BYTES, RawDataError, read_raw, write_dataset

CONFIG_FILENAME = "tasks.yaml"
IMAGES_DIRNAME = "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_SUFFIXES = (".png", ".npy", ".tif", ".tiff")
# Options of a task entry that say how its files encode the labels (the rest is the task's declaration).
READ_OPTIONS = ("classes", "ignore_value", "positive_value", "scale", "offset", "invalid_value")
DATASET_KEYS = ("name", "title", "description", "licence", "eval_size", "train_size", "boundary_tolerance", "tasks")


class FolderLayoutError(ValueError):
    """The folder or its `tasks.yaml` does not follow the layout."""


def read_folder_config(root: Path) -> tuple[dict, dict[str, TaskSpec], dict[str, dict]]:
    """(dataset settings, {task: TaskSpec}, {task: read options}) of a folder's `tasks.yaml`, checked."""
    path = root / CONFIG_FILENAME
    if not path.is_file():
        raise FolderLayoutError(f"{root} has no {CONFIG_FILENAME}: it must name the dataset and declare its tasks.")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise FolderLayoutError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("tasks"), dict) or not settings["tasks"]:
        raise FolderLayoutError(f"{path}: expected a mapping with `tasks: {{name: {{kind: ...}}}}`.")
    unknown = sorted(set(settings) - set(DATASET_KEYS))
    if unknown:
        raise FolderLayoutError(f"{path}: unknown key(s) {unknown}; the keys are {list(DATASET_KEYS)}.")
    specs, options = {}, {}
    for task, entry in settings["tasks"].items():
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise FolderLayoutError(
                f"{path}: task {task!r} needs `kind:` one of {', '.join(KINDS)}, got {entry!r}."
            )
        options[task] = {key: entry[key] for key in READ_OPTIONS if key in entry}
        declaration = {key: value for key, value in entry.items() if key not in READ_OPTIONS}
        try:
            specs[task] = make_task_spec(str(task), declaration, options[task].get("classes"))
        except ValueError as error:
            raise FolderLayoutError(f"{path}: {error}") from None
        _check_options(path, specs[task], options[task])
    for key in ("eval_size", "train_size"):
        size = settings.get(key)
        if size is not None and not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
        ):
            raise FolderLayoutError(f"{path}: `{key}` must be [height, width] of positive integers, got {size!r}.")
    tolerance = settings.get("boundary_tolerance")
    if any(spec.kind.name == "boundary" and "tolerance" not in spec.parameters for spec in specs.values()):
        if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
            raise FolderLayoutError(
                f"{path}: boundary tasks need `boundary_tolerance` (the matching distance as a fraction of the image "
                f"diagonal, e.g. 0.0075 as PASCAL-Context), got {tolerance!r}."
            )
    return settings, specs, options


def _check_options(path: Path, spec: TaskSpec, options: dict) -> None:
    allowed = {
        "segmentation": ("classes", "ignore_value"),
        "saliency": ("positive_value", "ignore_value"),
        "boundary": ("positive_value", "ignore_value"),
        "depth": ("scale", "invalid_value"),
        "normals": (),
        "regression": ("scale", "offset", "invalid_value"),
    }[spec.kind.name]
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise FolderLayoutError(f"{path}: task {spec.name!r} ({spec.kind.name}) does not take {extra}.")
    for key, value in options.items():
        if key != "classes" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise FolderLayoutError(f"{path}: task {spec.name!r}: `{key}` must be a number, got {value!r}.")
    if spec.kind.name in ("saliency", "boundary"):
        positive, ignore = _binary_values(options)
        if positive in (0, ignore):
            raise FolderLayoutError(
                f"{path}: task {spec.name!r}: `positive_value` {positive} must differ from 0 and `ignore_value`."
            )


def _binary_values(options: dict) -> tuple:
    """(positive, ignore) file values of a saliency or boundary task: 1 and 255 by default; a 0/255 mask
    (`positive_value: 255`) has no ignore value unless one is given."""
    positive = options.get("positive_value", 1)
    return positive, options.get("ignore_value", 255 if positive != 255 else None)


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def _split_folders(root: Path) -> dict[str, Path]:
    images = root / IMAGES_DIRNAME
    if not images.is_dir():
        raise FolderLayoutError(f"{root} has no {IMAGES_DIRNAME}/ folder.")
    splits = {split: images / split for split in SPLITS if (images / split).is_dir()}
    if "train" not in splits:
        raise FolderLayoutError(
            f"{images} must hold a train/ folder of images (and a validation/ folder for evaluation)."
        )
    return splits


def _files_by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        check_sample_id(path.stem, str(path))
        if path.stem in files:
            raise FolderLayoutError(f"{folder}: two {what} files have the stem {path.stem!r}: {files[path.stem].name}, {path.name}.")
        files[path.stem] = path
    return files


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    image = Image.open(path)
    image.load()
    return np.asarray(image)


def read_label_file(path: Path, spec: TaskSpec, options: dict) -> np.ndarray:
    """The working array (see `data/labels.py`) of one label file, by the task's kind and read options."""
    array = _read_array(path)
    kind = spec.kind.name
    if kind == "segmentation":
        if not np.issubdtype(array.dtype, np.integer) or array.ndim != 2:
            raise LabelError(f"expected a single-channel map of integer class ids, got {array.dtype} {array.shape}")
        ignore = options.get("ignore_value", 255)
        labelled = array != ignore
        if (array[labelled] < 0).any() or (array[labelled] >= spec.num_classes).any():
            bad = np.unique(array[labelled & ((array < 0) | (array >= spec.num_classes))])
            raise LabelError(
                f"class ids must be 0 to {spec.num_classes - 1} ({spec.num_classes} classes) or {ignore} (ignore), "
                f"found {bad[:10].tolist()}"
            )
        return np.where(labelled, array, 255).astype(np.uint8)
    if kind in ("saliency", "boundary"):
        if array.ndim != 2:
            raise LabelError(f"expected a single-channel mask, got shape {array.shape}")
        positive, ignore = _binary_values(options)
        known = (array == 0) | (array == positive) | ((array == ignore) if ignore is not None else False)
        if not known.all():
            raise LabelError(
                f"values must be 0, {positive} (positive)"
                + (f" or {ignore} (ignore)" if ignore is not None else "")
                + f", found {np.unique(array[~known])[:10].tolist()} (set positive_value / ignore_value)"
            )
        label = np.zeros(array.shape, dtype=np.uint8)
        label[array == positive] = 1
        if ignore is not None:
            label[array == ignore] = 255
        return label
    if kind == "normals":
        if array.dtype == np.uint8:
            if array.ndim != 3 or array.shape[-1] != 3:
                raise LabelError(f"expected an RGB normals map, got shape {array.shape}")
            from .labels import decode_normals

            return decode_normals(array).astype(np.float64)
        return np.asarray(array, dtype=np.float64)
    scale, offset = options.get("scale", 1.0), options.get("offset", 0.0)
    invalid = options.get("invalid_value", 0 if kind == "depth" else None)
    values = array.astype(np.float64) * scale + offset
    if invalid is not None:
        values[array == invalid] = 0.0 if kind == "depth" else math.nan  # depth: 0 = invalid; regression: NaN
    return values.astype(np.float32)


def make_folder_row(root: Path, specs: dict, options: dict, files: dict, split: str, sample_id: str) -> dict:
    """One row of the schema from the image and label files of `sample_id` (picklable for the writer's workers)."""
    image_path = files[split]["image"][sample_id]
    cell, size = read_raw(image_path, sample_id, read_rgb_image_cell, "image")
    row = {"id": sample_id, "image": cell}
    for task, spec in specs.items():
        path = files[split][task].get(sample_id)
        if path is None:
            row[task] = None
            continue
        label = read_raw(path, sample_id, partial(read_label_file, spec=spec, options=options[task]), f"{task} label")
        if tuple(label.shape[:2]) != tuple(size):
            raise RawDataError(path, sample_id, f"the label is {label.shape[:2]}, its image {image_path.name} is {size}")
        try:
            row[task] = encode_label(spec, label)
        except LabelError as error:
            raise RawDataError(path, sample_id, str(error)) from None
    return row


def convert_folder(
    input_dir,
    output_dir,
    num_workers: Optional[int] = None,
    on_error: str = "stop",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert a folder in the layout above to a dataset folder of the schema at `output_dir`."""
    root = Path(input_dir)
    settings, specs, options = read_folder_config(root)
    split_dirs = _split_folders(root)
    files, sizes = {}, []
    for split, folder in split_dirs.items():
        images = _files_by_stem(folder, IMAGE_SUFFIXES, "image")
        if not images:
            raise FolderLayoutError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
        files[split] = {"image": images}
        for task in specs:
            labels = _files_by_stem(root / task / split, LABEL_SUFFIXES, f"{task} label")
            if not labels:
                raise FolderLayoutError(
                    f"{root / task / split} holds no label file of task {task!r} ({', '.join(LABEL_SUFFIXES)}) for "
                    f"the {split} images; each task has a folder <task>/<split>/ of files named like the images."
                )
            orphans = sorted(set(labels) - set(images))
            if orphans:
                raise FolderLayoutError(
                    f"{root / task / split}: label file(s) {orphans[:5]} pair no image of {folder} (by file stem)."
                )
            files[split][task] = labels
        sizes += [Image.open(path).size[::-1] for path in images.values()]  # headers only
    check_disjoint_splits({split: list(f["image"]) for split, f in files.items()}, str(root))
    eval_size = settings.get("eval_size") or [_round_up(max(s[0] for s in sizes)), _round_up(max(s[1] for s in sizes))]
    train_size = settings.get("train_size") or eval_size
    name = str(settings.get("name") or root.name)
    title = str(settings.get("title") or name)

    def finalize(split_sizes):
        metadata = build_metadata(
            name, specs, train_size, eval_size, settings.get("boundary_tolerance", 0.0075), split_sizes,
            crop_balance_task=next((t for t, s in specs.items() if s.kind.name == "segmentation"), None),
        )  # fmt: skip
        body = str(settings.get("description") or f"The {name} dataset, converted from a folder of image and label files.")
        licence = str(settings.get("licence") or "other")
        return metadata, render_card(metadata, build_features(specs), title, body, licence)

    split_ids = {split: list(f["image"]) for split, f in files.items()}
    make_row = partial(make_folder_row, root, specs, options, files)
    return write_dataset(
        output_dir, split_ids, make_row, specs, finalize, num_workers=num_workers, on_error=on_error,
        overwrite=overwrite, description=name, max_shard_bytes=max_shard_bytes,
    )  # fmt: skip


def _round_up(value: int, multiple: int = 32) -> int:
    return int(math.ceil(value / multiple) * multiple)
