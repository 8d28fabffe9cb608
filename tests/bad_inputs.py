"""The bad-input corpus of the reliability tests: odd, damaged and hostile files, built in a folder on demand.

Nothing is downloaded; every file is made here from a few random pixels. `build_image_corpus` returns name -> path of
image files a user might upload or pass to the processor and pipeline, each with what a correct answer is
(`"error"`: a clear error; `"ok"`: a prediction of the image's size).
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImageCase:
    """One file of the corpus: its path, whether it must be accepted, and the original (height, width) if so."""

    path: Path
    accept: bool
    size: tuple[int, int] = (0, 0)


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _gradient16(height: int, width: int) -> np.ndarray:
    """A 16-bit grayscale ramp over the whole 0..65535 range (a plain RGB conversion clips most of it to white)."""
    return np.linspace(0, 65535, height * width).astype(np.uint16).reshape(height, width)


def _random_rgba(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)


def _exif_orientation(orientation: int) -> Image.Exif:
    """EXIF data with only an orientation tag (6: shown turned 90 degrees clockwise, as phones store portraits)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _with_nan(height: int, width: int) -> np.ndarray:
    values = np.random.default_rng(2).random((height, width), dtype=np.float32)
    values[3, 5] = np.nan
    return values


def huge_png_bytes(height: int, width: int) -> bytes:
    """A valid, highly compressible single-colour PNG of `height` x `width` pixels (a few hundred kB at 10000²):
    small to upload, huge to decode."""
    return _encoded(Image.new("L", (width, height), 0), "PNG", optimize=False, compress_level=9)


def build_image_corpus(folder: Path) -> dict[str, ImageCase]:
    """Write the image corpus into `folder`; name -> case."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_random_rgb(40, 56))
    jpeg, png = _encoded(rgb, "JPEG", quality=90), _encoded(rgb, "PNG")
    files = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], False, None),
        "truncated.png": (png[: len(png) // 2], False, None),
        "empty.png": (b"", False, None),
        "text_as_image.jpg": (b"This is a text file, not a photo.\n" * 20, False, None),
        "one_pixel.png": (_encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), True, (1, 1)),
        "huge_10000x10000.png": (huge_png_bytes(10000, 10000), False, None),
        "gray.png": (_encoded(rgb.convert("L"), "PNG"), True, (40, 56)),
        "rgba.png": (_encoded(rgb.convert("RGBA"), "PNG"), True, (40, 56)),
        "cmyk.jpg": (_encoded(rgb.convert("CMYK"), "JPEG"), True, (40, 56)),
        "gray16.png": (_encoded(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)), "PNG"), True, (40, 56)),
        # Below PIL's own decompression-bomb limit (89 Mpx), so only the package's pixel cap stops it before decoding.
        "huge_9000x9000.png": (huge_png_bytes(9000, 9000), False, None),
        "gray16_gradient.png": (_encoded(Image.fromarray(_gradient16(40, 56)), "PNG"), True, (40, 56)),
        "rgba_transparent.png": (_encoded(Image.fromarray(_random_rgba(40, 56)), "PNG"), True, (40, 56)),
        "exif_rotated.jpg": (_encoded(rgb, "JPEG", quality=90, exif=_exif_orientation(6)), True, (56, 40)),
        "nan_float.tif": (_encoded(Image.fromarray(_with_nan(40, 56), mode="F"), "TIFF"), False, None),
    }  # fmt: skip
    corpus = {}
    for name, (content, accept, size) in files.items():
        path = folder / name
        path.write_bytes(content)
        corpus[name] = ImageCase(path=path, accept=accept, size=size or (0, 0))
    return corpus
