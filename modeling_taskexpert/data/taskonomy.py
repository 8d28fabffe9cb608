"""Taskonomy (Zamir et al., CVPR 2018), Mod-Squad's benchmark: the raw layout, its 13 tasks and its protocol.

Raw layout: `{root}/{task}/taskonomy/{building}/point_{p}_view_{v}_domain_{task}.png` (`.npy` for the two image-level
tasks), the input being the task `rgb`, and the split files `{root}/splits_taskonomy/train_val_test_{size}.csv` (one
row per building: building, train, val, test as 1/0). As in the public reference (Mod-Squad's Taskonomy loader), the
training split is the union of the train and val buildings and the evaluation split (`validation` here) the test
buildings.

Samples are the views of the `rgb` task, paired with every other task by (building, point, view) — not by sorted
position, where one missing file would shift every later pair. A view without a file of some task has no label for
that task (None: no loss, no metric), and the missing files are counted per task and building in the card.

Every dense map is stored as its raw file (8- or 16-bit PNG, losslessly); the task's declaration carries the scaling
of the reference as `decode` steps (see `task_definitions.check_decode_steps`), applied when the sample is read. The
image-level tasks store their soft label (1000 or 365 values). Geometry: resize to 256 (image and labels bilinear),
crop 224 (random in training, centred in evaluation), random horizontal flip in training, which — unlike the
reference's — negates the x component of the normals.
"""

import csv
import io
import re
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..task_definitions import make_task_spec
from .labels import encode_label
from .raw_files import read_npy, read_rgb_image_cell
from .source import DatasetSource, convert
from .writer import RawDataError, read_raw

NAME = "taskonomy"
TASKS = (
    "class_object", "class_scene", "depth_euclidean", "depth_zbuffer", "edge_occlusion", "edge_texture",
    "keypoints2d", "keypoints3d", "normal", "principal_curvature", "reshading", "segment_unsup2d", "segment_unsup25d",
)  # fmt: skip
SPLIT_SIZES = ("tiny", "medium", "full", "fullplus")
# Buildings the reference leaves out whatever the split size: woodbine is missing from the release, wiconisco lacks
# 80 edge_texture images. (The reference also drops a further fixed list per split size, not reproduced here: pass
# them with --exclude-buildings.)
DEFAULT_EXCLUDED_BUILDINGS = ("woodbine", "wiconisco")
RESIZE = 256
CROP = 224
_VIEW = re.compile(r"^point_(\d+)_view_(\d+)_domain_rgb\.png$")
_SIXTEEN_BIT = 2.0**16


def _to_unit(high: float, clip: bool = True) -> dict:
    return {"op": "linear", "from": [0.0, high], "to": [-1.0, 1.0], "clip": clip}


_ONE_CHANNEL = {"op": "channels", "keep": [0]}
_LOG_DEPTH = {"op": "log1p", "base": _SIXTEEN_BIT}


def _unit_map(description: str, high: float, loss: str = "l1", **extra) -> dict:
    return {"kind": "regression", "channels": 1, "value_range": [-1.0, 1.0], "loss": loss,
            "decode": [_ONE_CHANNEL, _to_unit(high)], "description": description, **extra}  # fmt: skip


# The 13 tasks as the reference scales them (to [-1, 1] unless said otherwise) and trains them (loss).
TASK_KINDS = {
    "class_object": {"kind": "image_classification", "num_classes": 1000,
                     "description": "object classification (1000-way soft label)"},
    "class_scene": {"kind": "image_classification", "num_classes": 365,
                    "description": "scene classification (365-way soft label)"},
    "depth_euclidean": {
        "kind": "regression", "channels": 1, "value_range": [0.0, 1.0], "loss": "l1",
        "decode": [_ONE_CHANNEL, _LOG_DEPTH], "primary_metric": "RMSE_reference",
        "metric_transforms": ["taskonomy_depth_reference", "taskonomy_depth_metres"],
        "description": "Euclidean depth (log scale)",
    },
    "depth_zbuffer": {
        "kind": "regression", "channels": 1, "value_range": [0.0, 1.0], "loss": "l1",
        "decode": [_ONE_CHANNEL, _LOG_DEPTH], "metric_transforms": ["taskonomy_depth_metres"],
        "description": "z-buffer depth (log scale)",
    },
    "edge_occlusion": {
        "kind": "regression", "channels": 1, "value_range": [-1.0, 1.0], "loss": "l1",
        "decode": [_ONE_CHANNEL, _to_unit(0.00625 * _SIXTEEN_BIT, clip=False), {"op": "gaussian_blur", "sigma": 4.0},
                   {"op": "clip", "min": -1.0, "max": 1.0}],
        "description": "occlusion edges",
    },
    "edge_texture": _unit_map("texture edges", 0.08 * _SIXTEEN_BIT),
    "keypoints2d": _unit_map("2D keypoints", 0.005 * _SIXTEEN_BIT),
    "keypoints3d": _unit_map("3D keypoints", _SIXTEEN_BIT),
    "normal": {
        "kind": "regression", "channels": 3, "value_range": [-1.0, 1.0], "loss": "cosine", "negate_on_flip": [0],
        "decode": [{"op": "channels", "keep": [0, 1, 2]}, _to_unit(255.0)], "description": "surface normals",
    },
    "principal_curvature": {
        "kind": "regression", "channels": 2, "value_range": [-6.0, 6.5], "loss": "l2", "primary_metric": "MSE",
        "decode": [{"op": "channels", "keep": [0, 1]},
                   {"op": "standardize", "mean": [123.572, 120.1], "std": [31.922, 21.658]}],
        "description": "principal curvature",
    },
    "reshading": _unit_map("reshading", 255.0),
    "segment_unsup2d": _unit_map("unsupervised 2D segmentation", 255.0),
    "segment_unsup25d": _unit_map("unsupervised 2.5D segmentation", 255.0),
}  # fmt: skip
IMAGE_LEVEL_TASKS = ("class_object", "class_scene")

CARD_BODY = """\
Taskonomy (Zamir et al., CVPR 2018) in the form Mod-Squad (Chen et al., CVPR 2023) trains on: RGB views of indoor
buildings with 13 tasks, converted from the raw release by `python -m modeling_taskexpert.data taskonomy`.

## How it was converted
- Split file `{split_file}`; training split = the train and val buildings, evaluation split (`validation`) = the
  test buildings, as the reference does.{subset}
- Excluded buildings: {excluded}. (The reference also excludes a fixed list of further buildings per split size, which
  this conversion does not reproduce unless they were passed with `--exclude-buildings`.)
- Views are paired across tasks by (building, point, view). A view without a file of a task has no label for it.
- Dense maps are stored as the raw files (8- or 16-bit PNG, unchanged); each task's `decode` steps (in the
  metadata and below) reproduce the reference's scaling when a sample is read. `class_object` and `class_scene`
  store the soft label of the `.npy` file.
- Protocol geometry: resize to {resize} (labels bilinear too), crop {crop} (random in training, centred in
  evaluation), horizontal flip in training; the flip negates the x component of `normal` (the reference's does not).

## Missing files
{missing}
"""

CARD_LICENCE = """\
## Licence and citation
Taskonomy is released by its authors under their own terms (see the Taskonomy / Omnidata download pages); check them
before redistributing this conversion.

```bibtex
@inproceedings{zamir2018taskonomy, title={Taskonomy: Disentangling Task Transfer Learning},
  author={Zamir, Amir R. and Sax, Alexander and Shen, William and Guibas, Leonidas and Malik, Jitendra and
  Savarese, Silvio}, booktitle={CVPR}, year={2018}}
```
"""


def task_file(root: Path, task: str, building: str, point: int, view: int) -> Path:
    suffix = "npy" if task in IMAGE_LEVEL_TASKS else "png"
    return root / task / "taskonomy" / building / f"point_{point}_view_{view}_domain_{task}.{suffix}"


def parse_sample_id(sample_id: str) -> tuple[str, int, int]:
    building, rest = sample_id.split("__", 1)
    point, view = re.fullmatch(r"point_(\d+)_view_(\d+)", rest).groups()
    return building, int(point), int(view)


def read_split_buildings(root: Path, split_size: str) -> dict[str, list[str]]:
    """{"train": buildings of the train and val columns, "validation": those of the test column}, from the CSV."""
    path = root / "splits_taskonomy" / f"train_val_test_{split_size}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"Missing split file {path} (columns building, train, val, test).")
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    if not rows or not {"building", "train", "val", "test"} <= set(rows[0]):
        raise ValueError(f"{path}: expected the columns building, train, val, test; got {list(rows[0]) if rows else []}.")
    splits = {"train": [], "validation": []}
    for number, row in enumerate(rows, start=2):
        try:
            flags = {key: int(float(row[key])) for key in ("train", "val", "test")}
        except (TypeError, ValueError):
            raise ValueError(f"{path}, line {number}: train/val/test must be 0 or 1, got {row}.") from None
        building = row["building"].strip()
        if flags["train"] or flags["val"]:
            splits["train"].append(building)
        if flags["test"]:
            splits["validation"].append(building)
    return splits


def building_views(root: Path, building: str) -> list[tuple[int, int]]:
    """(point, view) of every rgb file of a building, in numeric order."""
    folder = root / "rgb" / "taskonomy" / building
    if not folder.is_dir():
        return []
    views = [tuple(int(g) for g in match.groups()) for name in (p.name for p in folder.iterdir())
             if (match := _VIEW.match(name))]  # fmt: skip
    return sorted(views)


def _read_soft_label(path: Path, size: int) -> list:
    vector = read_npy(path).astype(np.float32).reshape(-1)
    if vector.size != size or not np.isfinite(vector).all():
        raise ValueError(f"expected {size} finite class scores, got {vector.size} values")
    return vector.tolist()


def _read_raw_map(path: Path) -> bytes:
    content = path.read_bytes()
    with Image.open(io.BytesIO(content)) as image:
        image.load()
    return content


def make_row(tasks: Sequence[str], root: Path, split: str, sample_id: str) -> dict:
    """One view as a row: the rgb image, every task's raw file (None where it is missing)."""
    building, point, view = parse_sample_id(sample_id)
    image_cell, size = read_raw(task_file(root, "rgb", building, point, view), sample_id, read_rgb_image_cell, "rgb")
    row = {"id": sample_id, "image": image_cell}
    for task in tasks:
        path = task_file(root, task, building, point, view)
        if not path.is_file():
            row[task] = None  # reported per task and building in the card
            continue
        spec = make_task_spec(task, TASK_KINDS[task])
        if task in IMAGE_LEVEL_TASKS:
            row[task] = read_raw(path, sample_id, partial(_read_soft_label, size=spec.parameters["num_classes"]), task)
            continue
        content = read_raw(path, sample_id, _read_raw_map, task)
        with Image.open(io.BytesIO(content)) as image:
            if (image.height, image.width) != size:
                raise RawDataError(path, sample_id, f"size {(image.height, image.width)} differs from the rgb's {size}")
        try:
            row[task] = encode_label(spec, content, where=f"{path}")  # checks the decoded values
        except ValueError as error:
            raise RawDataError(path, sample_id, str(error)) from None
    return row


def scan(root: Path, split_size: str, tasks: Sequence[str], buildings: Optional[Sequence[str]] = None,
         max_views_per_building: Optional[int] = None,
         excluded: Sequence[str] = DEFAULT_EXCLUDED_BUILDINGS) -> tuple[dict, dict]:  # fmt: skip
    """(split -> sample ids, task -> building -> number of missing files) for a conversion."""
    split_buildings = read_split_buildings(root, split_size)
    split_ids, missing = {}, {task: {} for task in tasks}
    for split, names in split_buildings.items():
        ids = []
        for building in names:
            if building in excluded or (buildings is not None and building not in buildings):
                continue
            views = building_views(root, building)[:max_views_per_building]
            for point, view in views:
                ids.append(f"{building}__point_{point}_view_{view}")
                for task in tasks:
                    if not task_file(root, task, building, point, view).is_file():
                        missing[task][building] = missing[task].get(building, 0) + 1
        split_ids[split] = ids
    return split_ids, {task: counts for task, counts in missing.items() if counts}


def missing_report(missing: dict) -> str:
    if not missing:
        return "None: every view has a file of every converted task."
    lines = ["| task | building | missing files |", "|---|---|---|"]
    for task, counts in missing.items():
        lines += [f"| {task} | {building} | {count} |" for building, count in sorted(counts.items())]
    return "\n".join(lines)


def taskonomy_source(
    root: Path,
    split_size: str = "tiny",
    tasks: Optional[Sequence[str]] = None,
    buildings: Optional[Sequence[str]] = None,
    max_views_per_building: Optional[int] = None,
    excluded: Sequence[str] = DEFAULT_EXCLUDED_BUILDINGS,
) -> tuple[DatasetSource, dict]:
    """The `DatasetSource` of one conversion (its options decide the splits and the card), and the missing files."""
    if split_size not in SPLIT_SIZES:
        raise ValueError(f"split size {split_size!r}: expected one of {SPLIT_SIZES}.")
    tasks = list(TASKS if tasks is None else tasks)
    unknown = [task for task in tasks if task not in TASK_KINDS]
    if unknown or not tasks:
        raise ValueError(f"Unknown Taskonomy task(s) {unknown or tasks}; the tasks are {', '.join(TASKS)}.")
    tasks = [task for task in TASKS if task in tasks]
    split_ids, missing = scan(root, split_size, tasks, buildings, max_views_per_building, excluded)
    for split, ids in split_ids.items():
        if not ids:
            raise ValueError(
                f"No view of the {split} split was found under {root}/rgb/taskonomy/ (split file "
                f"train_val_test_{split_size}.csv, buildings {buildings or 'all'}, excluded {list(excluded)})."
            )
    subset = ""
    if buildings is not None or max_views_per_building is not None:
        subset = (f" A subset: buildings {', '.join(buildings) if buildings else 'all'}, at most "
                  f"{max_views_per_building or 'all'} views per building.")  # fmt: skip
    body = CARD_BODY.format(
        split_file=f"train_val_test_{split_size}.csv", subset=subset, excluded=", ".join(excluded) or "none",
        resize=RESIZE, crop=CROP, missing=missing_report(missing),
    )  # fmt: skip
    source = DatasetSource(
        name=NAME, title="Taskonomy (Mod-Squad's 13 tasks)", archive="taskonomy", root_markers=("rgb", "splits_taskonomy"),
        split_lists={"train": "", "validation": ""}, tasks=tuple(tasks), class_names={},
        train_size=(CROP, CROP), eval_size=(CROP, CROP), boundary_tolerance=0.011, card_body=body,
        card_licence=CARD_LICENCE, make_row=partial(make_row, tuple(tasks)),
        read_split_ids=partial(_split_ids, split_ids), task_kinds={task: TASK_KINDS[task] for task in tasks},
        geometry={"kind": "resize_crop", "resize": RESIZE},
    )  # fmt: skip
    return source, missing


def _split_ids(split_ids: dict, root: Path, split: str) -> list[str]:
    return list(split_ids[split])


def convert_taskonomy(
    raw_dir,
    output_dir,
    split_size: str = "tiny",
    tasks: Optional[Sequence[str]] = None,
    buildings: Optional[Sequence[str]] = None,
    max_views_per_building: Optional[int] = None,
    excluded: Sequence[str] = DEFAULT_EXCLUDED_BUILDINGS,
    **options,
) -> Path:
    """Convert the raw Taskonomy layout at `raw_dir` to a dataset folder (options of `convert`: `num_workers`,
    `on_error`, `overwrite`); returns the folder. Missing files are logged and listed in the card."""
    root = Path(raw_dir)
    if not (root / "rgb").is_dir() and (root / "taskonomy" / "rgb").is_dir():
        root = root / "taskonomy"
    source, missing = taskonomy_source(root, split_size, tasks, buildings, max_views_per_building, excluded)
    for task, counts in missing.items():
        print(f"taskonomy: {sum(counts.values())} missing {task} file(s): "
              + ", ".join(f"{b} {n}" for b, n in sorted(counts.items())))  # fmt: skip
    return convert(source, root, output_dir, **options)
