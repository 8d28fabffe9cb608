"""PASCAL-Context (multi-task version, 5 tasks) from the extracted `PASCALContext/` archive: the
`PASCAL_CONTEXT` source description and its label derivation.

Labels are derived exactly as the benchmark's reference loaders do (see the protocol notes in
the dataset card): 21-class VOC semseg as stored, 6-group human parts painted from the
PASCAL-Part annotations of persons, saliency thresholded at 0.5, normals masked to the classes
that have indoor-like geometry, and thinned boundaries of the 459-class Context label map.
"""

from pathlib import Path
from typing import Optional

import numpy as np

from ..task_definitions import PASCAL_HUMAN_PARTS_CLASSES, PASCAL_SEMSEG_CLASSES
from .labels import boundaries_from_label_map, check_class_ids, encode_png, resize_nearest
from .raw_files import read_gray_map, read_index_map, read_mat, read_rgb_image_cell, read_rgb_map
from .source import DatasetSource, convert
from .writer import RawDataError, read_raw

NAME = "pascal-context"
TASKS = ("semseg", "human_parts", "saliency", "normals", "edge")
SEMSEG_CLASSES = PASCAL_SEMSEG_CLASSES
HUMAN_PART_CLASSES = PASCAL_HUMAN_PARTS_CLASSES
# PASCAL-Part person part names -> id in HUMAN_PART_CLASSES (the protocol's 6-group merge).
HUMAN_PART_GROUPS = {
    **dict.fromkeys(("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
PERSON_CLASS_INDEX = SEMSEG_CLASSES.index("person")
# Context (459-class) ids whose pixels keep their distilled normal: the Context names that are
# also NYU class names (except "unknown"), plus "tvmonitor".
NORMALS_VALID_CONTEXT_IDS = np.array([
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56, 59,
    61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124, 135,
    141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215,
    216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272,
    273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329,
    330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405,
    407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
])  # fmt: skip
INPUT_SIZE = (512, 512)
BOUNDARY_TOLERANCE = 0.0075

CARD_BODY = f"""\
The multi-task version of PASCAL-Context used by ASTMT, MTI-Net, ATRC, InvPT, TaskPrompter and
TaskExpert: PASCAL VOC 2010 images with five dense tasks, converted from the `PASCALContext`
archive of the InvPT/TaskPrompter repositories by `python -m modeling_taskexpert.data pascal-context`.

## Labels (exactly as the benchmark's reference loaders derive them)
- `semseg`: the 21-class VOC labels (not Context-59) as stored in `semseg/VOC12` (or
  `semseg/pascal-context`), 255 = ignore.
- `human_parts`: persons of the PASCAL-Part annotations painted with 6 part groups (head, torso,
  upper/lower arm, upper/lower leg; later parts overwrite earlier ones; pixels outside any
  part are 0). Images without an annotated person-with-parts store no map (None): the
  reference gives them an all-zero map that its ignore step turns into all-255, so they are
  excluded from loss and metric either way.
- `saliency`: the distilled saliency pseudo-labels, `v / 255 > 0.5` -> {{0, 1}}.
- `normals`: the distilled normal pseudo-labels, kept only on pixels of the
  {len(NORMALS_VALID_CONTEXT_IDS)} Context classes the protocol treats as valid; other pixels are
  (0, 0, 0) (invalid).
- `edge`: pixels where the four-neighbour Laplacian of the 459-class Context `LabelMap` is
  non-zero, thinned to one pixel -> {{0, 1}}.
- A label whose size differs from its image is resized to it (nearest; normals bicubic).
- Boundary evaluation tolerance: {BOUNDARY_TOLERANCE} of the image diagonal.
"""

CARD_LICENCE = """\
## Licence and citation
Images come from PASCAL VOC (Flickr images under their owners' terms; see the VOC challenge
site); annotations from PASCAL-Context and PASCAL-Part; saliency and normal pseudo-labels were
distilled by Maninis et al. (ASTMT). Check those terms before redistributing.

```bibtex
@article{everingham2010pascal, title={The PASCAL Visual Object Classes (VOC) Challenge},
  author={Everingham, Mark and Van Gool, Luc and Williams, Christopher K. I. and Winn, John and Zisserman, Andrew},
  journal={IJCV}, year={2010}}
@inproceedings{mottaghi2014role, title={The Role of Context for Object Detection and Semantic Segmentation in the Wild},
  author={Mottaghi, Roozbeh and others}, booktitle={CVPR}, year={2014}}
@inproceedings{chen2014detect, title={Detect What You Can: Detecting and Representing Objects using Holistic Models and Body Parts},
  author={Chen, Xianjie and others}, booktitle={CVPR}, year={2014}}
@inproceedings{maninis2019attentive, title={Attentive Single-Tasking of Multiple Tasks},
  author={Maninis, Kevis-Kokitsi and Radosavovic, Ilija and Kokkinos, Iasonas}, booktitle={CVPR}, year={2019}}
```
"""


def _read_semseg(path: Path) -> np.ndarray:
    return check_class_ids(read_index_map(path), len(SEMSEG_CLASSES))


def _read_human_parts(path: Path) -> Optional[np.ndarray]:
    """6-group part map of the persons of a PASCAL-Part `anno` struct, or None without any."""
    objects = read_mat(path, "anno")[0][0][1][0]
    # The reference only paints images that hold a person object of non-empty area.
    if not any(int(obj[1].item()) == PERSON_CLASS_INDEX and np.sum(obj[2]) > 0 for obj in objects):
        return None
    target = None
    for obj in objects:
        if int(obj[1].item()) != PERSON_CLASS_INDEX or len(obj[3]) == 0:
            continue
        if target is None:
            target = np.zeros(obj[2].shape, dtype=np.uint8)
        for part in obj[3][0]:
            part_name = str(part[0][0])
            if part_name not in HUMAN_PART_GROUPS:
                raise ValueError(f"unknown person part name {part_name!r}; expected one of {sorted(HUMAN_PART_GROUPS)}")
            target[part[1].astype(bool)] = HUMAN_PART_GROUPS[part_name]
    if target is None or not target.any():
        return None  # an all-background map is all-ignore after the protocol's ignore step
    return target


def _read_label_map(path: Path) -> np.ndarray:
    label_map = read_mat(path, "LabelMap")
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"LabelMap must be a 2-D integer array, got {label_map.dtype} {label_map.shape}")
    return label_map


def _resize_normals(normals: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of uint8 normals, channel by channel (used only for mismatched raw sizes)."""
    from PIL import Image

    channels = [
        np.asarray(Image.fromarray(normals[..., c].astype(np.float32), mode="F").resize(size[::-1], Image.BICUBIC))
        for c in range(3)
    ]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def _check_same_size(arrays: dict, sample_id: str) -> None:
    shapes = {path: array.shape[:2] for path, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{path}: {shape}" for path, shape in shapes.items())
        raise RawDataError(next(iter(shapes)), sample_id, f"label maps of different sizes ({listing})")


def make_row(root: Path, split: str, sample_id: str) -> dict:
    """Convert one PASCAL-Context sample to a row of the schema."""
    image_cell, size = read_raw(root / "JPEGImages" / f"{sample_id}.jpg", sample_id, read_rgb_image_cell, "image")

    semseg_path = root / "semseg" / "VOC12" / f"{sample_id}.png"
    if not semseg_path.is_file() and (root / "semseg" / "pascal-context" / f"{sample_id}.png").is_file():
        semseg_path = root / "semseg" / "pascal-context" / f"{sample_id}.png"
    semseg = read_raw(semseg_path, sample_id, _read_semseg, "semseg")

    parts_path = root / "human_parts" / f"{sample_id}.mat"
    human_parts = read_raw(parts_path, sample_id, _read_human_parts, "human parts")

    label_map_path = root / "pascal-context" / "trainval" / f"{sample_id}.mat"
    label_map = read_raw(label_map_path, sample_id, _read_label_map, "Context label map")

    normals_path = root / "normals_distill" / f"{sample_id}.png"
    normals = read_raw(normals_path, sample_id, read_rgb_map, "normals")
    _check_same_size({normals_path: normals, label_map_path: label_map}, sample_id)
    normals = np.where(np.isin(label_map, NORMALS_VALID_CONTEXT_IDS)[..., None], normals, 0).astype(np.uint8)

    saliency = read_raw(root / "sal_distill" / f"{sample_id}.png", sample_id, read_gray_map, "saliency")
    saliency = (saliency.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)

    edge = boundaries_from_label_map(label_map)

    labels = {"semseg": semseg, "human_parts": human_parts, "saliency": saliency, "normals": normals, "edge": edge}
    for task, label in labels.items():
        if label is None or label.shape[:2] == size:
            continue
        labels[task] = _resize_normals(label, size) if task == "normals" else resize_nearest(label, size)
    row = {"id": sample_id, "image": image_cell}
    row.update({task: None if label is None else encode_png(label) for task, label in labels.items()})
    return row


PASCAL_CONTEXT = DatasetSource(
    name=NAME,
    title="PASCAL-Context (multi-task)",
    archive="PASCALContext",
    root_markers=("JPEGImages", "ImageSets/Context"),
    split_lists={"train": "ImageSets/Context/train.txt", "validation": "ImageSets/Context/val.txt"},
    tasks=TASKS,
    class_names={"semseg": SEMSEG_CLASSES, "human_parts": HUMAN_PART_CLASSES},
    train_size=INPUT_SIZE,
    eval_size=INPUT_SIZE,
    boundary_tolerance=BOUNDARY_TOLERANCE,
    card_body=CARD_BODY,
    card_licence=CARD_LICENCE,
    make_row=make_row,
)


def convert_pascal_context(raw_dir, output_dir, **options) -> Path:
    """Convert the extracted PASCALContext archive at `raw_dir` to a dataset folder at `output_dir`
    (`convert(PASCAL_CONTEXT, ...)`; options: `num_workers`, `on_error`, `overwrite`, `splits`)."""
    return convert(PASCAL_CONTEXT, raw_dir, output_dir, **options)
