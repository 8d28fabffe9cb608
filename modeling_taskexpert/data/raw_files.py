"""Readers for the raw files of the benchmark archives, shared by the converters.

Each reader takes a path and returns an array (or an encoded cell); wrapped in
`writer.read_raw`, any failure becomes a `RawDataError` that names the file and the sample.
"""

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from ..image_processing_dense_multitask import load_rgb_image
from .labels import encode_png

_EXIF_ORIENTATION = 0x0112


def _open_fully(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()  # decode now, so a truncated file fails here and not later
    return image


def _is_8_bit_png(content: bytes) -> bool:
    """Whether PNG bytes declare 8 bits per sample (IHDR's bit depth, byte 24 of the file)."""
    return len(content) > 24 and content[24] == 8


def read_rgb_image_cell(path: Path) -> tuple[dict, tuple[int, int]]:
    """The `image` cell of a raw RGB image and its (height, width), in the file's own pixel grid.

    An 8-bit RGB JPEG or PNG is stored byte for byte (no re-encoding loss). Anything else is turned
    into 8-bit RGB by the package's image loader, `load_rgb_image`, as the processor and pipeline
    do (16-bit scaled, not clipped; transparency composited on white; grayscale replicated), and
    stored as PNG. So is a photo with an EXIF orientation tag, but without applying the tag (the
    one difference from the loader): the benchmarks' labels are drawn on the stored pixel grid (the
    reference loaders ignore EXIF), while `datasets` would rotate a stored JPEG by its tag.
    """
    image = _open_fully(path)
    size = (image.height, image.width)
    content = path.read_bytes()
    exif = image.getexif()  # PIL caches this object; exif_transpose in the loader reads the same one
    oriented = exif.get(_EXIF_ORIENTATION, 1) != 1
    if image.mode == "RGB" and not oriented and (
        image.format == "JPEG" or (image.format == "PNG" and _is_8_bit_png(content))
    ):
        return {"bytes": content, "path": None}, size
    exif.pop(_EXIF_ORIENTATION, None)  # keep the stored grid the labels are on
    return encode_png(load_rgb_image(image, name=str(path))), size


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

