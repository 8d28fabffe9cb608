"""NYUD-v2 (multi-task version, 4 tasks) from the extracted `NYUDv2/` archive of InvPT/TaskPrompter:
the `NYUD` source description and its label reading.

Labels as the reference loaders read them: 40-way semseg (stored value minus one, unlabelled ->
255), depth in metres from `.npy` (0 = invalid), normals and boundaries from PNG.
"""

from pathlib import Path

import numpy as np

from ..task_definitions import IGNORE_INDEX
from .labels import check_depth_metres, encode_depth, encode_png
from .raw_files import read_index_map, read_npy, read_rgb_image_cell, read_rgb_map
from .source import DatasetSource, convert
from .writer import RawDataError, read_raw

NAME = "nyud"
TASKS = ("semseg", "normals", "edge", "depth")
# Class names as the benchmark spells them ("refridgerator" included).
SEMSEG_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
    "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
    "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
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
"""

CARD_LICENCE = """\
## Licence and citation
NYU Depth Dataset V2 (Silberman et al.); check its terms before redistributing.

```bibtex
@inproceedings{silberman2012indoor, title={Indoor Segmentation and Support Inference from RGBD Images},
  author={Silberman, Nathan and Hoiem, Derek and Kohli, Pushmeet and Fergus, Rob}, booktitle={ECCV}, year={2012}}
```
"""


def _read_semseg(path: Path) -> np.ndarray:
    raw = read_index_map(path)
    if raw.max() > len(SEMSEG_CLASSES):
        raise ValueError(f"class values must be 0 (unlabelled) to {len(SEMSEG_CLASSES)}, found {int(raw.max())}")
    return np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int16) - 1).astype(np.uint8)


def _read_depth(path: Path) -> np.ndarray:
    depth = read_npy(path)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f"expected a 2-D depth map in metres, got shape {depth.shape}")
    return check_depth_metres(depth)


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


NYUD = DatasetSource(
    name=NAME,
    title="NYUD-v2 (multi-task)",
    archive="NYUDv2",
    root_markers=("images", "gt_sets"),
    split_lists={"train": "gt_sets/train.txt", "validation": "gt_sets/val.txt"},
    tasks=TASKS,
    class_names={"semseg": SEMSEG_CLASSES},
    train_size=INPUT_SIZE,
    eval_size=INPUT_SIZE,
    boundary_tolerance=BOUNDARY_TOLERANCE,
    card_body=CARD_BODY,
    card_licence=CARD_LICENCE,
    make_row=make_row,
)


def convert_nyud(raw_dir, output_dir, **options) -> Path:
    """Convert the extracted NYUDv2 archive at `raw_dir` to a dataset folder at `output_dir`
    (`convert(NYUD, ...)`; options: `num_workers`, `on_error`, `overwrite`, `splits`)."""
    return convert(NYUD, raw_dir, output_dir, **options)
