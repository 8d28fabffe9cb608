"""A user's own multi-task data, as files a user would have: a folder of images and, per task, a folder of label
files, with a `tasks.yaml`, for tasks whose names exist nowhere in the package (a 3-class segmentation `roads`, a
1-channel regression `elevation` in metres, a boundary task `contours` stored as 0/255 masks).

The scenes are learnable: a road band and a lane line cross a textured ground whose brightness encodes the elevation,
and the contours are the road's borders."""

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROAD_CLASSES = ["background", "road", "lane"]
TASKS_YAML = {
    "name": "own-roads",
    "title": "Roads, elevation and contours (test data)",
    "eval_size": [32, 32],
    "train_size": [32, 32],
    "boundary_tolerance": 0.02,
    "licence": "cc0-1.0",
    "tasks": {
        "roads": {"kind": "segmentation", "classes": ROAD_CLASSES, "description": "road and lane segmentation"},
        "elevation": {"kind": "regression", "channels": 1, "value_range": [0.0, 50.0], "unit": "m", "scale": 0.01},
        "contours": {"kind": "boundary", "positive_value": 255},
    },
}


def scene(index: int, size: int = 32) -> dict[str, np.ndarray]:
    """One sample: image (H, W, 3) uint8, roads class ids, elevation in centimetres (uint16), contours 0/255."""
    rng = np.random.default_rng(index)
    rows, cols = np.mgrid[0:size, 0:size]
    elevation_m = np.clip(10 + 30 * (rows / size) + rng.normal(0, 0.5, (size, size)), 0, 50)
    centre, half_width = rng.integers(8, size - 8), rng.integers(3, 6)
    road = np.abs(cols - centre) <= half_width
    lane = np.abs(cols - centre) == 0
    roads = np.where(lane, 2, np.where(road, 1, 0)).astype(np.uint8)
    contours = (np.abs(np.abs(cols - centre) - half_width) == 0).astype(np.uint8) * 255
    image = np.stack([elevation_m * 5, elevation_m * 5, elevation_m * 5], axis=-1)
    image[road] = (90, 90, 95)
    image[lane] = (250, 250, 250)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return {
        "image": image,
        "roads": roads,
        "elevation": np.rint(elevation_m * 100).astype(np.uint16),
        "contours": contours.astype(np.uint8),
    }


def write_own_task_folder(root: Path, train: int = 12, validation: int = 4, size: int = 32) -> Path:
    """Write the folder layout of `python -m modeling_taskexpert.data folder` at `root`; return it."""
    root = Path(root)
    for split, count, offset in (("train", train, 0), ("validation", validation, 1000)):
        for index in range(offset, offset + count):
            sample = scene(index, size)
            stem = f"tile_{index:04d}"
            for folder in ("images", "roads", "elevation", "contours"):
                (root / folder / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample["image"]).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(sample["roads"]).save(root / "roads" / split / f"{stem}.png")
            Image.fromarray(sample["elevation"]).save(root / "elevation" / split / f"{stem}.png")
            Image.fromarray(sample["contours"]).save(root / "contours" / split / f"{stem}.png")
    (root / "tasks.yaml").write_text(yaml.safe_dump(TASKS_YAML, sort_keys=False))
    return root
