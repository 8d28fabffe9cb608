"""NYUD-v2 (multi-task version, 4 tasks) from the extracted `NYUDv2/` archive of InvPT/TaskPrompter.

Labels as the reference loaders read them: 40-way semseg (stored value minus one, unlabelled ->
255), depth in metres from `.npy` (0 = invalid), normals and boundaries from PNG.
"""

from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np

from ..task_definitions import IGNORE_INDEX
from .labels import encode_depth, encode_png
from .raw_files import read_index_map, read_npy, read_rgb_image_cell, read_rgb_map
from .schema import SCHEMA_DESCRIPTION, build_features, build_metadata, render_card
from .writer import RawDataError, read_raw, write_dataset

NAME = "nyud"
TASKS = ("semseg", "normals", "edge", "depth")
# Class names as the benchmark spells them ("refridgerator" included).
SEMSEG_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
    "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
    "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt"}
INPUT_SIZE = (448, 576)
BOUNDARY_TOLERANCE = 0.011

CARD_BODY = f"""\
The multi-task version of NYUD-v2 used by InvPT, TaskPrompter and TaskExpert (795 train / 654
validation indoor RGB-D images with four dense tasks), converted from the `NYUDv2` archive of the
InvPT/TaskPrompter repositories by `python -m modeling_taskexpert.data nyud`.

## Labels (exactly as the benchmark's reference loaders read them)
- `semseg`: 40 classes; the raw map stores 1-40 with 0 = unlabelled, this dataset stores
  `v - 1` and 255 for unlabelled.
- `depth`: the raw `.npy` depth in metres as float32, 0 = invalid.
- `normals`: the raw RGB normal map as is (`n = 2 v / 255 - 1`).
- `edge`: the raw boundary map `v / 255` -> {{0, 1}}.
- Boundary evaluation tolerance: {BOUNDARY_TOLERANCE} of the image diagonal.

{SCHEMA_DESCRIPTION}

## Licence and citation
NYU Depth Dataset V2 (Silberman et al.); check its terms before redistributing.

```bibtex
@inproceedings{{silberman2012indoor, title={{Indoor Segmentation and Support Inference from RGBD Images}},
  author={{Silberman, Nathan and Hoiem, Derek and Kohli, Pushmeet and Fergus, Rob}}, booktitle={{ECCV}}, year={{2012}}}}
```
"""


def find_root(raw_dir) -> Path:
    """The `NYUDv2` folder: `raw_dir` itself or its `NYUDv2/` subfolder."""
    raw_dir = Path(raw_dir)
    for root in (raw_dir / "NYUDv2", raw_dir):
        if (root / "images").is_dir() and (root / "gt_sets").is_dir():
            return root
    raise FileNotFoundError(
        f"{raw_dir} is not an extracted NYUDv2 archive: expected images/ and gt_sets/ in it (or in its NYUDv2/ subfolder)."
    )


def read_split_ids(root: Path, split: str) -> list[str]:
    """Sample ids of a split, in the order of its list file."""
    path = root / "gt_sets" / SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"Missing split list {path} (one image id per line).")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"The split list {path} is empty.")
    return ids


def _read_semseg(path: Path) -> np.ndarray:
    raw = read_index_map(path)
    if raw.max() > len(SEMSEG_CLASSES):
        raise ValueError(f"class values must be 0 (unlabelled) to {len(SEMSEG_CLASSES)}, found {int(raw.max())}")
    return np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int16) - 1).astype(np.uint8)


def _read_depth(path: Path) -> np.ndarray:
    depth = read_npy(path)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"expected a 2-D float depth map in metres, got {depth.dtype} {depth.shape}")
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise ValueError("depth values must be finite and >= 0 (0 = invalid)")
    return depth.astype(np.float32)


def _read_edge(path: Path) -> np.ndarray:
    raw = read_index_map(path)
    if not np.isin(raw, (0, 255)).all():
        raise ValueError(f"boundary maps must hold only 0 and 255, found values {np.unique(raw)[:10].tolist()}")
    return (raw // 255).astype(np.uint8)


def make_row(root: Path, split: str, sample_id: str) -> dict:
    """Convert one NYUD-v2 sample to a row of the schema."""
    image_cell, size = read_raw(root / "images" / f"{sample_id}.png", sample_id, read_rgb_image_cell, "image")
    paths = {
        "semseg": root / "segmentation" / f"{sample_id}.png",
        "normals": root / "normals" / f"{sample_id}.png",
        "edge": root / "edge" / f"{sample_id}.png",
        "depth": root / "depth" / f"{sample_id}.npy",
    }
    readers = {"semseg": _read_semseg, "normals": read_rgb_map, "edge": _read_edge, "depth": _read_depth}
    row = {"id": sample_id, "image": image_cell}
    for task in TASKS:
        label = read_raw(paths[task], sample_id, readers[task], task)
        if label.shape[:2] != size:
            raise RawDataError(paths[task], sample_id, f"size {label.shape[:2]} differs from the image's {size}")
        row[task] = encode_depth(label) if task == "depth" else encode_png(label)
    return row


def convert_nyud(
    raw_dir,
    output_dir,
    num_workers: Optional[int] = None,
    on_error: str = "stop",
    overwrite: bool = False,
    splits=("train", "validation"),
) -> Path:
    """Convert the extracted NYUDv2 archive at `raw_dir` to a dataset folder at `output_dir`.

    Args:
        num_workers: conversion processes (None = all cores).
        on_error: "stop" at the first missing/corrupt raw file, or "skip" such samples.
        overwrite: replace an existing `output_dir`.
        splits: the splits to convert.
    """
    root = find_root(raw_dir)
    split_ids = {split: read_split_ids(root, split) for split in splits}

    def finalize(split_sizes):
        task_labels = {"semseg": SEMSEG_CLASSES, "normals": None, "edge": None, "depth": None}
        metadata = build_metadata(NAME, task_labels, INPUT_SIZE, INPUT_SIZE, BOUNDARY_TOLERANCE, split_sizes)
        return metadata, render_card(metadata, build_features(TASKS), "NYUD-v2 (multi-task)", CARD_BODY, "other")

    return write_dataset(
        output_dir, split_ids, partial(make_row, root), TASKS, finalize,
        num_workers=num_workers, on_error=on_error, overwrite=overwrite, description="NYUD-v2",
    )  # fmt: skip
