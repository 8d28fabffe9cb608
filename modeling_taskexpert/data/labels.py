"""Label encodings of the dataset schema and the label derivations shared by several sources.

The stored encodings (see `docs/architecture.md`) are lossless 8-bit or float32 maps; this module
turns arrays into the bytes stored in the parquet shards and back, so that the converters, the
synthetic generator and the transforms agree on one definition of each encoding.
"""

import io
from dataclasses import dataclass
from typing import Any, Callable

import datasets
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.morphology import thin

from ..task_definitions import IGNORE_INDEX, KINDS, TaskSpec, preset_spec


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


def encode_raw_png(array: np.ndarray) -> dict:
    """Encode a raw integer map as a lossless PNG cell: uint8 (H, W) or (H, W, 3), or uint16 (H, W)."""
    array = np.asarray(array)
    if array.dtype == np.uint16 and array.ndim == 2:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")  # mode I;16, 16-bit grayscale PNG
        return {"bytes": buffer.getvalue(), "path": None}
    return encode_png(array)


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


# ---------------------------------------------------------------------------------------------------------------------
# One storage codec per task kind: the column's feature, array -> stored cell, stored cell -> working array, and the
# working array's padding value. The working array is (H, W) or (H, W, C) numpy, what the transforms resize, crop,
# flip and pad; the protocol's ignore step (turning invalid values into the kind's unsupervised value) follows there.
# ---------------------------------------------------------------------------------------------------------------------
class LabelError(ValueError):
    """A label whose values or shape do not fit its task's kind."""


def _single_channel(array: np.ndarray, spec: TaskSpec) -> np.ndarray:
    if array.ndim != 2:
        raise LabelError(f"a {spec.kind.name} label must be a single-channel (H, W) map, got shape {array.shape}")
    return array


def _decode_class_ids(image, spec: TaskSpec) -> np.ndarray:
    array = _single_channel(np.asarray(image), spec)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):  # 16-bit or 32-bit maps: never wrapped, their ids are checked
        return array.astype(np.int32)
    raise LabelError(f"a segmentation label must hold integer class ids, got {array.dtype}")


def _encode_class_ids(array: np.ndarray, spec: TaskSpec) -> dict:
    array = _single_channel(np.asarray(array), spec)
    check_label_values(spec, array)
    return encode_png(array.astype(np.uint8))


def _decode_binary(image, spec: TaskSpec) -> np.ndarray:
    return _single_channel(np.asarray(image), spec).astype(np.float32)


def _encode_binary(array: np.ndarray, spec: TaskSpec) -> dict:
    array = _single_channel(np.asarray(array), spec)
    check_label_values(spec, array)
    return encode_png(array.astype(np.uint8))


def _decode_normals(image, spec: TaskSpec) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise LabelError(f"a normals label must be an RGB 8-bit image, got {array.dtype} of shape {array.shape}")
    return decode_normals(array)


def _encode_normals(array: np.ndarray, spec: TaskSpec) -> dict:
    """Unit normals (H, W, 3) in [-1, 1] with the zero vector where invalid."""
    array = np.asarray(array, dtype=np.float64)
    check_label_values(spec, array)
    return encode_png(encode_normals(array, valid=(array != 0).any(axis=-1)))


def _decode_depth(image, spec: TaskSpec) -> np.ndarray:
    return _single_channel(np.asarray(image), spec).astype(np.float32, copy=True)


def _encode_depth(array: np.ndarray, spec: TaskSpec) -> dict:
    array = _single_channel(np.asarray(array), spec)
    check_label_values(spec, array)
    return encode_depth(array)


def _decode_array(cell, spec: TaskSpec) -> np.ndarray:
    """A float32 (H, W, C) array from `.npy` bytes (read without pickle)."""
    data = cell["bytes"] if isinstance(cell, dict) else cell
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim == 2:
        array = array[..., None]
    return array.astype(np.float32, copy=False)


def _encode_array(array: np.ndarray, spec: TaskSpec) -> bytes:
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    check_label_values(spec, array.astype(np.float32))
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def apply_decode_steps(raw: np.ndarray, steps: list, spec: TaskSpec) -> np.ndarray:
    """A raw integer map (H, W) or (H, W, C) -> float32 (H, W, C) working values, following the task's `decode`
    steps (see `task_definitions.check_decode_steps`)."""
    values = np.asarray(raw)
    if values.ndim == 2:
        values = values[..., None]
    values = values.astype(np.float64)
    invalid = np.zeros(values.shape[:2], dtype=bool)
    for step in steps:
        op = step["op"]
        if op == "channels":
            keep = [int(c) for c in step["keep"]]
            if max(keep) >= values.shape[-1]:
                raise LabelError(f"decode keeps channels {keep} of a map with {values.shape[-1]} channel(s)")
            values = values[..., keep]
        elif op == "invalid":
            invalid |= (values == step["value"]).any(axis=-1)
        elif op == "linear":
            (low, high), (to_low, to_high) = step["from"], step["to"]
            if step.get("clip", True):
                values = np.clip(values, min(low, high), max(low, high))
            values = (values - low) / (high - low) * (to_high - to_low) + to_low
        elif op == "log1p":
            values = np.log1p(values) / np.log(step["base"])
        elif op == "gaussian_blur":
            values = np.stack(
                [ndimage.gaussian_filter(values[..., c], sigma=step["sigma"]) for c in range(values.shape[-1])], -1
            )
        elif op == "clip":
            values = np.clip(values, step["min"], step["max"])
        elif op == "standardize":
            mean, std = np.asarray(step["mean"], np.float64), np.asarray(step["std"], np.float64)
            if mean.size != values.shape[-1]:
                raise LabelError(f"decode standardizes {mean.size} channel(s) of a map with {values.shape[-1]}")
            values = (values - mean) / std
    channels = spec.parameters["channels"]
    if values.shape[-1] != channels:
        raise LabelError(
            f"the decoded map has {values.shape[-1]} channel(s), the task declares {channels} (add a 'channels' step)"
        )
    values = values.astype(np.float32)
    values[invalid] = np.nan
    return values


def _decode_regression(cell, spec: TaskSpec) -> np.ndarray:
    steps = spec.parameters.get("decode")
    if steps is None:
        return _decode_array(cell, spec)
    raw = np.asarray(cell)
    if not np.issubdtype(raw.dtype, np.integer):
        raise LabelError(f"a raw map to decode must hold integers (8- or 16-bit PNG), got {raw.dtype}")
    return apply_decode_steps(raw, steps, spec)


def _encode_regression(array, spec: TaskSpec):
    """Float working values -> .npy bytes; with `decode`, the stored cell is the raw integer map itself (an 8- or
    16-bit array or PNG bytes, kept losslessly), checked by decoding it."""
    if spec.parameters.get("decode") is None:
        return _encode_array(array, spec)
    if isinstance(array, (bytes, bytearray)):
        raw = np.asarray(Image.open(io.BytesIO(array)))
        stored = {"bytes": bytes(array), "path": None}
    else:
        raw = np.asarray(array)
        if raw.dtype not in (np.uint8, np.uint16):
            raise LabelError(f"a raw map to store must be uint8 or uint16, got {raw.dtype}")
        stored = encode_raw_png(raw)
    check_label_values(spec, apply_decode_steps(raw, spec.parameters["decode"], spec))
    return stored


def _regression_feature(spec: TaskSpec):
    return datasets.Image() if spec.parameters.get("decode") is not None else datasets.Value("binary")


def _decode_scores(cell, spec: TaskSpec) -> np.ndarray:
    return np.asarray(cell, dtype=np.float32).reshape(-1)


def _encode_scores(array, spec: TaskSpec) -> list:
    vector = np.asarray(array, dtype=np.float32).reshape(-1)
    check_label_values(spec, vector)
    return vector.tolist()


@dataclass(frozen=True)
class LabelCodec:
    """How a kind's labels are stored in a dataset column and read back."""

    feature: Callable[[TaskSpec], Any]  # the `datasets` feature of the column, from the task's spec
    encode: Callable[[np.ndarray, TaskSpec], Any]  # working array -> stored cell (values checked first)
    decode: Callable[[Any, TaskSpec], np.ndarray]  # stored cell (decoded by `datasets`) -> working array
    pad_value: float  # value of the padding of the working array, before the ignore step


def _image_feature(spec: TaskSpec):
    return datasets.Image()


CODECS: dict[str, LabelCodec] = {
    "segmentation": LabelCodec(_image_feature, _encode_class_ids, _decode_class_ids, IGNORE_INDEX),
    "saliency": LabelCodec(_image_feature, _encode_binary, _decode_binary, IGNORE_INDEX),
    "boundary": LabelCodec(_image_feature, _encode_binary, _decode_binary, IGNORE_INDEX),
    "normals": LabelCodec(_image_feature, _encode_normals, _decode_normals, 0.0),  # the zero vector: invalid
    "depth": LabelCodec(_image_feature, _encode_depth, _decode_depth, 0.0),  # 0: invalid
    "regression": LabelCodec(_regression_feature, _encode_regression, _decode_regression, float("nan")),
    "image_classification": LabelCodec(
        lambda spec: datasets.List(datasets.Value("float32")), _encode_scores, _decode_scores, float("nan")
    ),
}


def check_label_values(spec: TaskSpec, label: np.ndarray, where: str = "") -> np.ndarray:
    """Refuse a working label whose values do not fit the task's kind (class ids beyond the class count, a saliency
    value of 2, negative or millimetre depth, ...), with a LabelError naming `where` and the task; return it."""
    problem = spec.kind.invalid_label_values(label, spec)
    if problem:
        raise LabelError(f"{where + ': ' if where else ''}the {spec.name!r} label ({spec.kind.name}) is invalid: {problem}.")
    return label


def decode_label(spec, stored, where: str = "") -> np.ndarray:
    """Decode one stored label (the cell `datasets` returns: a PIL image, or bytes) to its working array, with its
    values checked (see `check_label_values`). `spec` is a `TaskSpec` or a preset task's name.

    Segmentation maps stay integer class ids (uint8, or int32 for 16-bit maps, never wrapped); saliency and boundaries
    become float32 in {0, 1, 255}; normals float32 (H, W, 3) with the zero vector where invalid; depth float32 metres
    with 0 where invalid; regression float32 (H, W, C) with NaN where unlabelled. The ignore handling of the protocol
    (step 7) happens in the transforms."""
    spec = spec if isinstance(spec, TaskSpec) else preset_spec(spec)
    try:
        label = CODECS[spec.kind.name].decode(stored, spec)
    except LabelError as error:
        raise LabelError(f"{where + ': ' if where else ''}the {spec.name!r} label is invalid: {error}.") from None
    return check_label_values(spec, label, where)


def encode_label(spec: TaskSpec, array: np.ndarray, where: str = ""):
    """The stored cell of a working label array, after checking its values."""
    try:
        return CODECS[spec.kind.name].encode(array, spec)
    except LabelError as error:
        raise LabelError(f"{where}: {error}" if where else str(error)) from None


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (height, width) with OpenCV's INTER_NEAREST sampling.

    Destination pixel i samples source pixel floor(i / (dst / src)), clipped to the last one.
    """
    height, width = size
    rows = np.minimum((np.arange(height) * (1.0 / (height / array.shape[0]))).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum((np.arange(width) * (1.0 / (width / array.shape[1]))).astype(np.int64), array.shape[1] - 1)
    return array[rows[:, None], cols[None, :]]


def check_class_ids(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Refuse a segmentation map with ids outside 0..num_classes-1 and the ignore value (the segmentation kind's
    rule); return it."""
    spec = TaskSpec("classes", KINDS["segmentation"], {}, tuple(str(i) for i in range(num_classes)))
    problem = spec.kind.invalid_label_values(label, spec)
    if problem:
        raise ValueError(problem)
    return label


def check_depth_metres(depth: np.ndarray) -> np.ndarray:
    """Refuse a depth map that is not float metres with 0 = invalid (NaN, negative, integer or millimetre-like
    values: the depth kind's rule, with a hint for integer maps); return it as float32."""
    if np.issubdtype(depth.dtype, np.integer):
        raise ValueError(
            f"expected float depth in metres, got integers ({depth.dtype}); integer depth usually holds millimetres: "
            "convert it with depth.astype(np.float32) / 1000 (0 stays invalid)"
        )
    spec = preset_spec("depth")
    problem = spec.kind.invalid_label_values(depth, spec)
    if problem:
        raise ValueError(problem)
    return depth.astype(np.float32)
