"""Readers for the raw files of the benchmark archives, shared by the converters.

Each reader takes a path and returns an array (or an encoded cell); wrapped in
`writer.read_raw`, any failure becomes a `RawDataError` that names the file and the sample.
"""

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from .labels import encode_png


def _open_fully(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()  # decode now, so a truncated file fails here and not later
    return image


def read_rgb_image_cell(path: Path) -> tuple[dict, tuple[int, int]]:
    """The `image` cell of a raw RGB image and its (height, width).

    An 8-bit RGB JPEG or PNG is stored byte for byte (no re-encoding loss); any other mode is
    converted to RGB as the reference loaders do and stored as PNG.
    """
    image = _open_fully(path)
    size = (image.height, image.width)
    if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
        return {"bytes": path.read_bytes(), "path": None}, size
    return encode_png(np.asarray(image.convert("RGB"))), size


def read_index_map(path: Path) -> np.ndarray:
    """An 8-bit single-channel (gray or palette-index) PNG as a uint8 (H, W) array."""
    image = _open_fully(path)
    if image.mode not in ("L", "P"):
        raise ValueError(f"expected an 8-bit single-channel PNG (mode L or P), got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def read_gray_map(path: Path) -> np.ndarray:
    """An 8-bit gray PNG as a uint8 (H, W) array."""
    image = _open_fully(path)
    if image.mode != "L":
        raise ValueError(f"expected an 8-bit gray PNG (mode L), got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def read_rgb_map(path: Path) -> np.ndarray:
    """An 8-bit RGB PNG as a uint8 (H, W, 3) array."""
    image = _open_fully(path)
    if image.mode != "RGB":
        raise ValueError(f"expected an 8-bit RGB PNG, got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def read_mat(path: Path, variable: str):
    """One variable of a MATLAB .mat file, as `scipy.io.loadmat` returns it (no squeezing)."""
    content = scipy.io.loadmat(path)
    if variable not in content:
        raise KeyError(f"the .mat file has no variable {variable!r} (it has {sorted(k for k in content if not k.startswith('__'))})")
    return content[variable]


def read_npy(path: Path) -> np.ndarray:
    """A .npy array, without unpickling objects."""
    return np.load(path, allow_pickle=False)

