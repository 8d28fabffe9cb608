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
    }  # fmt: skip
    corpus = {}
    for name, (content, accept, size) in files.items():
        path = folder / name
        path.write_bytes(content)
        corpus[name] = ImageCase(path=path, accept=accept, size=size or (0, 0))
    return corpus
