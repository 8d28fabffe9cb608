"""Label encodings of the dataset schema and the label derivations shared by several sources.

The stored encodings (see `docs/architecture.md`) are lossless 8-bit or float32 maps; this module
turns arrays into the bytes stored in the parquet shards and back, so that the converters, the
synthetic generator and the transforms agree on one definition of each encoding.
"""

import io

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.morphology import thin

from ..task_definitions import IGNORE_INDEX

# Depth at or beyond this is no real metric depth of the indoor benchmarks (NYUD-v2 spans about 0.5-10 m; the
# protocol's metric ignores depth >= 80 m): such values are taken to be in another unit.
MAX_DEPTH_METRES = 80.0

# Four-neighbour Laplacian, the boundary detector of the benchmark protocol.
_LAPLACIAN_KERNEL = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


def boundaries_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """Thin {0, 1} uint8 boundary map of a 2-D label (or instance) map.

    Protocol: a pixel is a boundary candidate where the four-neighbour Laplacian of the label
    map is non-zero (borders reflected without repeating the edge pixel, OpenCV's default), and
    the candidates are thinned to one pixel with scikit-image's `thin`.
    """
    response = ndimage.convolve(np.asarray(label_map, dtype=np.float64), _LAPLACIAN_KERNEL, mode="mirror")
    return thin(response != 0).astype(np.uint8)


def encode_png(array: np.ndarray) -> dict:
    """Encode an 8-bit map (H, W) or RGB image (H, W, 3) as a PNG cell of an `Image()` column."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"PNG label maps must be uint8, got {array.dtype}.")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def encode_depth(depth: np.ndarray) -> dict:
    """Encode a float32 depth map in metres (0 = invalid) as a mode-'F' TIFF cell (exact)."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"A depth map must be 2-D, got shape {depth.shape}.")
    buffer = io.BytesIO()
    Image.fromarray(depth.astype(np.float32, copy=False), mode="F").save(buffer, format="TIFF")
    return {"bytes": buffer.getvalue(), "path": None}


def encode_normals(normals: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Quantise unit normals (H, W, 3) in [-1, 1] to the stored RGB uint8 encoding.

    `valid` (H, W) marks pixels with a normal; the others get the (0, 0, 0) sentinel. A unit
    vector can never quantise to (0, 0, 0) (that would need every component below -0.996).
    """
    encoded = np.clip(np.rint((np.asarray(normals, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if valid is not None:
        encoded[~valid] = 0
    return encoded


def decode_normals(encoded: np.ndarray) -> np.ndarray:
    """Stored RGB uint8 normals -> float32 (H, W, 3) with `n = 2 v / 255 - 1`; the sentinel decodes to 0."""
    encoded = np.asarray(encoded)
    normals = encoded.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    normals[(encoded == 0).all(axis=-1)] = 0.0
    return normals


def decode_label(task: str, image: Image.Image) -> np.ndarray:
    """Decode one stored label (a PIL image from the `Image()` column) to its working array.

    Segmentation maps stay uint8 class ids; saliency and edge become float32 in {0, 1, 255};
    normals float32 (H, W, 3) with the zero vector where invalid; depth float32 metres with 0
    where invalid. The ignore handling of the protocol (step 7) happens in the transforms.
    """
    array = np.asarray(image)
    if task in ("semseg", "human_parts"):
        return array.astype(np.uint8, copy=False)
    if task in ("saliency", "edge"):
        return array.astype(np.float32)
    if task == "normals":
        return decode_normals(array)
    if task == "depth":
        return array.astype(np.float32, copy=True)
    raise ValueError(f"No stored encoding for task {task!r}.")


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (height, width) with OpenCV's INTER_NEAREST sampling.

    Destination pixel i samples source pixel floor(i / (dst / src)), clipped to the last one.
    """
    height, width = size
    rows = np.minimum((np.arange(height) * (1.0 / (height / array.shape[0]))).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum((np.arange(width) * (1.0 / (width / array.shape[1]))).astype(np.int64), array.shape[1] - 1)
    return array[rows[:, None], cols[None, :]]


def check_class_ids(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Refuse a segmentation map with ids outside 0..num_classes-1 and the ignore value; return it."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(
            f"class ids must be 0 to {num_classes - 1} ({num_classes} classes) or {IGNORE_INDEX} (ignore), found "
            f"{bad[:10].tolist()}"
        )
    return label


def check_depth_metres(depth: np.ndarray) -> np.ndarray:
    """Refuse a depth map that is not float metres with 0 = invalid (NaN, negative, integer or millimetre-like
    values); return it as float32."""
    if np.issubdtype(depth.dtype, np.integer):
        raise ValueError(
            f"expected float depth in metres, got integers ({depth.dtype}); integer depth usually holds millimetres: "
            "convert it with depth.astype(np.float32) / 1000 (0 stays invalid)"
        )
    if not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"expected float depth in metres, got {depth.dtype}")
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise ValueError("depth values must be finite and >= 0 (0 = invalid)")
    deepest = float(depth.max(initial=0.0))
    if deepest >= MAX_DEPTH_METRES:
        raise ValueError(
            f"depth values reach {deepest:g}, which looks like millimetres (or centimetres), not metres; indoor "
            f"depth stays far below {MAX_DEPTH_METRES:g} m. Convert the maps to metres (millimetres / 1000) first"
        )
    return depth.astype(np.float32)
