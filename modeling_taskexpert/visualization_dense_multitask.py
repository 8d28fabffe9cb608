"""Colour maps that turn post-processed predictions into RGB images (numpy only).

The one place where the package's colours live: the pipeline, the Space demo and the reports use these functions.
"""

from typing import Optional

import numpy as np

from .task_definitions import TaskSpec, preset_spec

# Anchor colours of matplotlib's "viridis" (sampled at 9 evenly spaced points), linearly interpolated between them.
_VIRIDIS_ANCHORS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    dtype=np.float64,
)  # fmt: skip


def label_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour of every class id (bit-interleaved RGB), as uint8 (num_classes, 3)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for class_id in range(num_classes):
        value, red, green, blue = class_id, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[class_id] = (red, green, blue)
    return palette


def colorize_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-id map (H, W) -> RGB uint8 (H, W, 3); ids outside [0, num_classes) are drawn black."""
    palette = np.concatenate([label_palette(num_classes), np.zeros((1, 3), dtype=np.uint8)])
    labels = np.asarray(labels).astype(np.int64)
    return palette[np.where((labels >= 0) & (labels < num_classes), labels, num_classes)]


def colorize_scalar(values: np.ndarray, vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """Scalar map (H, W) -> RGB uint8 with the viridis colour map over [vmin, vmax] (default: the map's range)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    vmin = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
    vmax = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
    scaled = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    position = scaled * (len(_VIRIDIS_ANCHORS) - 1)
    low = np.floor(position).astype(np.int64).clip(0, len(_VIRIDIS_ANCHORS) - 2)
    fraction = (position - low)[..., None]
    rgb = _VIRIDIS_ANCHORS[low] * (1 - fraction) + _VIRIDIS_ANCHORS[low + 1] * fraction
    return np.round(rgb).astype(np.uint8)


def colorbar(length: int, thickness: int) -> np.ndarray:
    """Horizontal legend strip of the `colorize_scalar` colour map, low values on the left: RGB uint8
    (thickness, length, 3)."""
    if not (
        isinstance(length, (int, np.integer))
        and isinstance(thickness, (int, np.integer))
        and length >= 1
        and thickness >= 1
    ):
        raise ValueError(f"colorbar needs a positive integer length and thickness, got {length!r} and {thickness!r}.")
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, length), (thickness, length))
    return colorize_scalar(ramp, 0.0, 1.0)


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """Unit normals (3, H, W) -> RGB uint8 (H, W, 3) with the usual (n + 1) / 2 encoding."""
    normals = np.asarray(normals, dtype=np.float64)
    return np.round((np.clip(normals, -1, 1).transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)


def score_bars(scores: np.ndarray, class_names=None, top: int = 5, width: int = 240, row: int = 16) -> np.ndarray:
    """An image-level prediction as RGB uint8: the `top` highest scores as horizontal bars (length relative to the
    highest), each with its class name (or id) and score."""
    from PIL import Image, ImageDraw

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:top]
    image = Image.new("RGB", (width, row * len(order)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    highest = max(float(scores[order[0]]), 1e-12) if len(order) else 1.0
    for rank, index in enumerate(order):
        length = int(round(max(float(scores[index]), 0.0) / highest * (width - 2)))
        draw.rectangle([0, rank * row + 2, max(length, 1), (rank + 1) * row - 2], fill=(120, 170, 230))
        name = class_names[index] if class_names is not None else str(index)
        draw.text((4, rank * row + 2), f"{name} {scores[index]:.2f}", fill=(0, 0, 0))
    return np.asarray(image)


def visualize_prediction(task, prediction: np.ndarray, num_classes: Optional[int] = None) -> np.ndarray:
    """Post-processed prediction of a task (no batch dim) -> RGB uint8 (H, W, 3), by the task's kind.

    `task` is a `TaskSpec` or a preset task's name. Segmentation: the class palette (`num_classes` defaults to the
    spec's); normals: direction colours; depth: viridis over the map's range; saliency and boundaries: viridis over
    [0, 1]; regression: viridis over the declared value range (the first channel of a multi-channel map); image
    classification: bars of the five highest scores (`score_bars`)."""
    spec = task if isinstance(task, TaskSpec) else preset_spec(task)
    kind = spec.kind.name
    if kind == "segmentation":
        num_classes = num_classes or spec.num_classes
        if num_classes is None:
            raise ValueError(f"visualize_prediction({spec.name!r}) needs num_classes.")
        return colorize_labels(prediction, num_classes)
    if kind == "normals":
        return normals_to_rgb(prediction)
    if kind == "depth":
        return colorize_scalar(prediction)
    if kind == "image_classification":
        return score_bars(np.asarray(prediction), spec.class_names)
    if kind == "regression":
        prediction = np.asarray(prediction)
        low, high = spec.parameters["value_range"]
        return colorize_scalar(prediction[0] if prediction.ndim == 3 else prediction, low, high)
    return colorize_scalar(prediction, 0.0, 1.0)  # saliency and boundary probabilities
