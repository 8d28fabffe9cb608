"""Image processor for TaskExpert: RGB conversion, optional resize, normalisation, centred padding; and the
post-processing of dense predictions back to each image's original size (no torchvision).

`load_rgb_image` is the package's one image loader: the processor, the pipeline, the Space and the dataset
converters all read images through it, so a file gives the same pixels whichever of them reads it.
"""

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn import functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .task_definitions import PRESET_TASKS, TaskSpec, preset_spec, task_specs_of

logger = logging.get_logger(__name__)

RESIZE_MODES = ("shrink", "fit", "none")
# Images with more pixels are refused, before their pixels are decoded (decoding an 81-Mpx PNG of 79 kB took 87 s
# and 14 GB in an earlier version). 50 Mpx covers the sensors of phones and most cameras; it is far above what the
# model sees (the image is shrunk to the canvas), so larger images only cost time and memory.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
CHANNEL_FORMATS = ("channels_first", "channels_last")
_PIL_FILTERS = {int(f) for f in Image.Resampling}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
ImageSource = Union[str, os.PathLike, io.IOBase, Image.Image, np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Loading any image as 8-bit RGB
# ----------------------------------------------------------------------------------------------------------------
def _check_pixel_count(height: int, width: int, max_pixels: Optional[int], name: str) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"{name}: {width}x{height} is {height * width:,} pixels, more than the limit of {max_pixels:,} "
            "(max_image_pixels); downscale the image first, or raise the limit if you trust the file."
        )


def _open_image_file(source, name: str) -> Image.Image:
    """Open a file lazily: only the header is read, so its size can be checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # the size is checked right after, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except FileNotFoundError as error:
        path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
        where = f" {path!r}" if path is not None and path not in name else ""
        raise ValueError(f"{name}: no such file{where}.") from error
    except IsADirectoryError as error:
        raise ValueError(f"{name}: is a folder, not an image file.") from error
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{name}: {error} (PIL.Image.MAX_IMAGE_PIXELS, PIL's own guard, applies before max_image_pixels)."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{name}: not an image file that can be read ({error}).") from error


def _pil_to_array(image: Image.Image, name: str, max_pixels: Optional[int]) -> np.ndarray:
    """Decode a PIL image (EXIF orientation applied) to an array whose dtype keeps its bit depth: uint8 (H, W, 3|4),
    uint16 (H, W) for 16-bit grayscale, float32 (H, W) for float images."""
    _check_pixel_count(image.height, image.width, max_pixels, name)
    try:
        # The pixels are decoded here, so a damaged file fails with its name. exif_transpose removes the orientation
        # tag from the image it returns, so an image that was already transposed is not turned again.
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: the image cannot be decoded; the file is damaged or truncated ({error}).") from error
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":  # 32-bit integers: how PIL hands over some 16-bit files
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(
                f"{name}: a 32-bit integer image with values in [{array.min()}, {array.max()}]; expected 16-bit "
                "values (0..65535)."
            )
        return array.astype(np.uint16)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    # Transparency from an alpha channel or a tRNS chunk (palette, gray and RGB PNGs): composited on white later.
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))
    if mode == "L":
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))


def _channels_last(array: np.ndarray, input_data_format: Optional[str], from_torch: bool, name: str) -> np.ndarray:
    """A 2-D or 3-D array -> (H, W) or (H, W, C), reading the channel axis from `input_data_format` or the shape."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(
            f"{name}: expected one image of shape (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, got {array.shape}."
        )
    if input_data_format is None:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if not (first or last):
            raise ValueError(
                f"{name}: cannot tell the channel axis of an image of shape {array.shape}; expected 1, 3 or 4 "
                "channels first or last."
            )
        # Both plausible (a 3x4x3 array): tensors are channels-first by torch's convention, arrays channels-last by
        # PIL's; input_data_format settles it.
        input_data_format = "channels_first" if first and (from_torch or not last) else "channels_last"
    if input_data_format == "channels_first":
        array = np.moveaxis(array, 0, -1)
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected 1, 3 or 4 channels ({input_data_format}), got shape {array.shape}.")
    return array[..., 0] if array.shape[-1] == 1 else array


def _to_uint8_rgb(array: np.ndarray, name: str, convert_rgb: bool) -> np.ndarray:
    """(H, W) or (H, W, 3|4) array of uint8, uint16 or float in [0, 1] -> RGB uint8 (H, W, 3)."""
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name}: the image is empty ({array.shape}).")
    channels = 1 if array.ndim == 2 else array.shape[-1]
    if channels != 3 and not convert_rgb:
        raise ValueError(
            f"{name}: has {channels} channel(s) and do_convert_rgb=False; pass an RGB image or set do_convert_rgb=True "
            "(grayscale is replicated, transparency composited on white)."
        )
    if array.dtype == np.uint8:
        if channels == 3:
            return np.ascontiguousarray(array)
        values = array
    elif array.dtype == np.uint16:
        # round(x / 257) in integers: 65535 / 255 = 257 exactly.
        values = ((array.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: the image contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{name}: float images must hold values in [0, 1], got [{low:.3g}, {high:.3g}]; pass uint8 for 0..255 "
                "data or uint16 for 16-bit data."
            )
        values = np.clip(array.astype(np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"{name}: unsupported dtype {array.dtype}; expected uint8, uint16 or float in [0, 1].")
    if values.ndim == 2:
        return np.repeat(values[..., None], 3, axis=2)
    if channels == 4:  # composite on white: rgb * alpha + 255 * (1 - alpha), rounded
        alpha = values[..., 3:].astype(np.float64) / 255.0
        return np.clip(values[..., :3] * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(values)


def load_rgb_image(
    image: ImageSource,
    name: Optional[str] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    input_data_format: Optional[str] = None,
    convert_rgb: bool = True,
) -> np.ndarray:
    """Any image -> RGB uint8 array (H, W, 3), the same pixels whichever form the image comes in.

    Args:
        image: a local file path (`str` or `os.PathLike`), an open binary file, a PIL image, a numpy array or a torch
            tensor. Arrays hold one image: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, of dtype uint8, uint16
            (16-bit) or float with values in [0, 1].
        name: how errors name the image (default: the path, or "image").
        max_pixels: images with more pixels are refused with a ValueError; for files this is checked from the header,
            before any pixel is decoded. None: no limit (PIL's own decompression-bomb guard,
            `PIL.Image.MAX_IMAGE_PIXELS`, still applies to files).
        input_data_format: `"channels_first"` or `"channels_last"` for arrays and tensors; by default read from the
            shape (if both ends could be channels: tensors are taken as channels-first, arrays as channels-last).
        convert_rgb: if False, an image that is not 3-channel (grayscale, RGBA, CMYK, palette) is an error instead of
            being converted.

    Conversions: EXIF orientation is applied; 16-bit values are scaled to 8 bits (round(x / 257)); float values in
    [0, 1] are scaled by 255; grayscale is replicated; transparency (RGBA, LA, palette) is composited on white; other
    modes (CMYK, YCbCr, ...) are converted by PIL. NaN or infinite values, other dtypes, empty images and files that
    cannot be decoded raise a ValueError naming the image and what was expected.
    """
    if input_data_format is not None and input_data_format not in CHANNEL_FORMATS:
        raise ValueError(f"input_data_format must be one of {CHANNEL_FORMATS} or None, got {input_data_format!r}.")
    if isinstance(image, (str, os.PathLike)):
        name = name or f"'{os.fspath(image)}'"
        with _open_image_file(image, name) as opened:
            return _to_uint8_rgb(_pil_to_array(opened, name, max_pixels), name, convert_rgb)
    name = name or "image"
    if isinstance(image, io.IOBase):
        with _open_image_file(image, name) as opened:
            return _to_uint8_rgb(_pil_to_array(opened, name, max_pixels), name, convert_rgb)
    if isinstance(image, Image.Image):
        return _to_uint8_rgb(_pil_to_array(image, name, max_pixels), name, convert_rgb)
    from_torch = isinstance(image, torch.Tensor)
    if from_torch:
        image = image.detach().cpu()
        image = (image.float() if image.dtype in (torch.bfloat16, torch.float16) else image).numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"{name}: expected a file path, a PIL image, a numpy array or a torch tensor, got {type(image).__name__}."
        )
    array = _channels_last(image, input_data_format, from_torch, name)
    _check_pixel_count(array.shape[0], array.shape[1], max_pixels, name)
    return _to_uint8_rgb(array, name, convert_rgb)


# ----------------------------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------------------------
def resolve_task_specs(task_specs, tasks) -> dict[str, TaskSpec]:
    """`TaskSpec` of every task in `tasks` from `task_specs`: a model config, a {task: TaskSpec} mapping, or None
    (the presets of the protocol's task names). A clear error for a task that cannot be resolved."""
    if task_specs is not None and hasattr(task_specs, "tasks"):
        task_specs = task_specs_of(task_specs)
    resolved = {}
    for task in tasks:
        if task_specs is not None and task in task_specs:
            resolved[task] = task_specs[task]
        elif task in PRESET_TASKS:
            resolved[task] = preset_spec(task)
        else:
            raise ValueError(
                f"Task {task!r} is not a preset task: pass its kind with task_specs=model.config (or a {{task: "
                "TaskSpec}} mapping) so that its logits can be post-processed."
            )
    return resolved


def logits_to_predictions(logits: dict[str, torch.Tensor], task_specs=None) -> dict[str, torch.Tensor]:
    """Model logits (B, C, H, W) per task -> post-processed predictions, each by its task's kind (see
    `task_definitions`): segmentation argmax class ids; saliency and boundaries sigmoid probabilities; normals
    L2-normalised; depth clamped at 0 (metres); regression clamped to its declared range. No resizing: this is what
    the metrics read on the padded inputs. `task_specs`: see `resolve_task_specs`."""
    specs = resolve_task_specs(task_specs, logits)
    return {task: specs[task].kind.postprocess(value.float(), specs[task]) for task, value in logits.items()}


# ----------------------------------------------------------------------------------------------------------------
# Settings and their validation
# ----------------------------------------------------------------------------------------------------------------
class DenseMultiTaskImageProcessorKwargs(ImagesKwargs, total=False):
    """The processor's own fields beyond transformers' `ImagesKwargs` (so that `from_dict(..., resize_mode=...)` and
    `from_pretrained(..., size_divisor=...)` build the processor through `__init__`, validated)."""

    resize_mode: Optional[str]
    size_divisor: Optional[int]
    max_image_pixels: Optional[int]


@dataclass(frozen=True)
class _Settings:
    """The validated settings of one call: the processor's fields with that call's overrides."""

    do_resize: bool
    size: dict
    resize_mode: str
    resample: int
    do_normalize: bool
    image_mean: tuple
    image_std: tuple
    size_divisor: int
    do_convert_rgb: bool
    max_image_pixels: Optional[int]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_bool(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field} must be True or False, got {value!r}.")
    return bool(value)


def _as_size(size, field: str = "size") -> dict:
    """`{"height": h, "width": w}`, an int (square) or an (h, w) pair -> `{"height": h, "width": w}`."""
    if _is_int(size):
        size = {"height": size, "width": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    elif isinstance(size, dict):
        size = {key: value for key, value in dict(size).items() if value is not None}  # a transformers SizeDict
        if set(size) != {"height", "width"}:
            raise ValueError(
                f"{field} must give the canvas as {{'height': h, 'width': w}} (or one int for a square), got {size}; "
                "this processor pads every image onto a fixed canvas, so other size keys do not apply."
            )
    else:
        raise ValueError(f"{field} must be {{'height': h, 'width': w}}, an int or an (h, w) pair, got {size!r}.")
    if not all(_is_int(value) and value > 0 for value in size.values()):
        raise ValueError(f"{field} must hold positive integers, got {size}.")
    return {"height": int(size["height"]), "width": int(size["width"])}


def _as_channel_values(values, field: str, positive: bool) -> tuple:
    """A number or 3 numbers (one per RGB channel) -> a tuple of 3 finite floats."""
    if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        values = [values] * 3
    try:
        floats = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number or 3 numbers (R, G, B), got {values!r}.") from None
    if len(floats) != 3 or not all(math.isfinite(value) for value in floats):
        raise ValueError(f"{field} must be 3 finite numbers (R, G, B), got {values!r}.")
    if positive and min(floats) <= 0:
        raise ValueError(f"{field} must be positive (it divides the pixels), got {values!r}.")
    return floats


def _validated_settings(
    do_resize, size, resize_mode, resample, do_normalize, image_mean, image_std, size_divisor, do_convert_rgb,
    max_image_pixels,
) -> _Settings:  # fmt: skip
    if not _is_int(size_divisor) or size_divisor < 1:
        raise ValueError(f"size_divisor must be a positive integer (the backbone's patch size), got {size_divisor!r}.")
    size = _as_size(size)
    if size["height"] % size_divisor or size["width"] % size_divisor:
        raise ValueError(f"size {size} must be multiples of size_divisor={size_divisor} (the backbone's patch size).")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")
    if not _is_int(resample) or int(resample) not in _PIL_FILTERS:
        raise ValueError(f"resample must be a PIL resampling filter {sorted(_PIL_FILTERS)}, got {resample!r}.")
    if max_image_pixels is not None and (not _is_int(max_image_pixels) or max_image_pixels < 1):
        raise ValueError(f"max_image_pixels must be a positive integer or None (no limit), got {max_image_pixels!r}.")
    # The canvas is allocated for every image: bounded like the images themselves, before any allocation (an untrusted
    # preprocessor_config.json of 100000x100000 would otherwise ask for 112 GiB per call).
    canvas_limit = max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    if size["height"] * size["width"] > canvas_limit:
        raise ValueError(
            f"size {size} is a canvas of {size['height'] * size['width']:,} pixels, more than the limit of "
            f"{canvas_limit:,} (max_image_pixels); the benchmarks use 512x512 or 448x576."
        )
    return _Settings(
        do_resize=_as_bool(do_resize, "do_resize"),
        size=size,
        resize_mode=resize_mode,
        resample=int(resample),
        do_normalize=_as_bool(do_normalize, "do_normalize"),
        image_mean=_as_channel_values(image_mean, "image_mean", positive=False),
        image_std=_as_channel_values(image_std, "image_std", positive=True),
        size_divisor=int(size_divisor),
        do_convert_rgb=_as_bool(do_convert_rgb, "do_convert_rgb"),
        max_image_pixels=None if max_image_pixels is None else int(max_image_pixels),
    )


def _as_target_size(target, index: int) -> tuple[int, int]:
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    if (
        not isinstance(target, (list, tuple, np.ndarray)) or len(target) != 2
        or not all(_is_int(value) and value > 0 for value in target)
    ):  # fmt: skip
        raise ValueError(
            f"target_sizes[{index}] must be the original (height, width) of the image, two positive integers; got "
            f"{target!r}."
        )
    return int(target[0]), int(target[1])


# ----------------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------------
class DenseMultiTaskImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for TaskExpert (and Mod-Squad) like the benchmark protocol's evaluation transform, and
    post-processes the predictions back to every image's original size.

    Steps: read the image as 8-bit RGB (`load_rgb_image`: EXIF orientation, 16-bit scaled, transparency on white),
    resize (see `resize_mode`), scale to [0, 1], normalise with `image_mean` / `image_std`, pad centred to `size`
    with 0 (after normalisation; the top/left offset is floor(delta / 2)).

    Every field can also be given to a call (`processor(image, size=..., do_normalize=False)`) for that call only,
    as with transformers' image processors; `post_process_dense_predictions` then needs the same `size`,
    `do_resize` and `resize_mode`.

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 512, "width": 512}`):
            Canvas of the model input (an int gives a square); both sides must be multiples of `size_divisor`.
        resize_mode (`str`, *optional*, defaults to `"shrink"`):
            `"shrink"`: images larger than the canvas are scaled down to fit (aspect kept), smaller ones are only
            padded, which is exactly the protocol's evaluation transform on the benchmarks; `"fit"`: always scale
            to fit; `"none"`: never resize (larger images are an error).
        resample (`int`, *optional*, defaults to `PIL.Image.BILINEAR`):
            PIL resampling filter of the resize.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with the mean and std.
        image_mean (`float` or `list[float]`, *optional*, defaults to the ImageNet mean):
        image_std (`float` or `list[float]`, *optional*, defaults to the ImageNet std):
        size_divisor (`int`, *optional*, defaults to 16):
            The backbone's patch size.
        do_resize (`bool`, *optional*, defaults to `True`):
            `False` never resizes, whatever `resize_mode` says (the same as `resize_mode="none"`).
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Convert grayscale, transparent, palette and CMYK images to RGB; `False` refuses images that are not
            3-channel.
        max_image_pixels (`int`, *optional*, defaults to 50,000,000):
            Images with more pixels are refused with a ValueError (checked from a file's header, before decoding;
            they are refused rather than shrunk because shrinking needs the decoded pixels). `None`: no limit.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = DenseMultiTaskImageProcessorKwargs
    # Class-level defaults: transformers' `to_dict` keeps a field set to None (max_image_pixels=None) only when the
    # class default is not None, so the round trip through JSON keeps "no limit".
    do_resize = True
    size = {"height": 512, "width": 512}
    resize_mode = "shrink"
    resample = int(Image.BILINEAR)
    do_normalize = True
    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)
    size_divisor = 16
    do_convert_rgb = True
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(
        self,
        size: Optional[Union[dict[str, int], int]] = None,
        resize_mode: str = "shrink",
        resample: int = Image.BILINEAR,
        do_normalize: bool = True,
        image_mean: Optional[Union[float, list[float]]] = None,
        image_std: Optional[Union[float, list[float]]] = None,
        size_divisor: int = 16,
        do_resize: bool = True,
        do_convert_rgb: bool = True,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        unknown = sorted(
            set(kwargs) - {"image_processor_type", "auto_map", "processor_class", "feature_extractor_type"}
        )
        if unknown:  # transformers keeps unknown keys as attributes; a typo would otherwise change nothing silently
            logger.warning(f"DenseMultiTaskImageProcessor: ignoring unknown arguments {unknown} (kept as attributes).")
        super().__init__(**kwargs)
        settings = _validated_settings(
            do_resize, size if size is not None else {"height": 512, "width": 512}, resize_mode, resample,
            do_normalize, IMAGENET_DEFAULT_MEAN if image_mean is None else image_mean,
            IMAGENET_DEFAULT_STD if image_std is None else image_std, size_divisor, do_convert_rgb, max_image_pixels,
        )  # fmt: skip
        self.do_resize = settings.do_resize
        self.size = settings.size
        self.resize_mode = settings.resize_mode
        self.resample = settings.resample
        self.do_normalize = settings.do_normalize
        self.image_mean = list(settings.image_mean)
        self.image_std = list(settings.image_std)
        self.size_divisor = settings.size_divisor
        self.do_convert_rgb = settings.do_convert_rgb
        self.max_image_pixels = settings.max_image_pixels

    def _settings(self, **overrides) -> _Settings:
        """This processor's fields, with the given (non-None) overrides, validated."""
        fields = {
            "do_resize": self.do_resize, "size": self.size, "resize_mode": self.resize_mode, "resample": self.resample,
            "do_normalize": self.do_normalize, "image_mean": self.image_mean, "image_std": self.image_std,
            "size_divisor": self.size_divisor, "do_convert_rgb": self.do_convert_rgb,
            "max_image_pixels": self.max_image_pixels,
        }  # fmt: skip
        fields.update({key: value for key, value in overrides.items() if value is not None})
        return _validated_settings(**fields)

    # --------------------------------------------------------------------------------------------------------
    def geometry(
        self,
        original_size: tuple[int, int],
        size: Optional[Union[dict[str, int], int]] = None,
        resize_mode: Optional[str] = None,
        do_resize: Optional[bool] = None,
    ) -> tuple[float, tuple[int, int], tuple[int, int]]:
        """(scale, resized (h, w), pad offset (top, left)) of an image of `original_size` on the canvas."""
        settings = self._settings(size=size, resize_mode=resize_mode, do_resize=do_resize)
        return self._geometry(_as_target_size(original_size, 0), settings)

    @staticmethod
    def _geometry(original_size: tuple[int, int], settings: _Settings):
        height, width = original_size
        canvas_h, canvas_w = settings.size["height"], settings.size["width"]
        fit = min(canvas_h / height, canvas_w / width)
        mode = settings.resize_mode if settings.do_resize else "none"
        if mode == "fit" or (mode == "shrink" and fit < 1.0):
            scale = fit
        elif fit < 1.0:
            reason = "resize_mode='none'" if settings.do_resize else "do_resize=False"
            raise ValueError(
                f"Image of size {height}x{width} is larger than the canvas {canvas_h}x{canvas_w} and {reason}."
            )
        else:
            scale = 1.0
        resized = (min(max(round(height * scale), 1), canvas_h), min(max(round(width * scale), 1), canvas_w))
        offset = ((canvas_h - resized[0]) // 2, (canvas_w - resized[1]) // 2)
        return scale, resized, offset

    def preprocess(
        self,
        images,
        do_resize: Optional[bool] = None,
        size: Optional[Union[dict[str, int], int]] = None,
        resize_mode: Optional[str] = None,
        resample: Optional[int] = None,
        do_normalize: Optional[bool] = None,
        image_mean: Optional[Union[float, list[float]]] = None,
        image_std: Optional[Union[float, list[float]]] = None,
        size_divisor: Optional[int] = None,
        do_convert_rgb: Optional[bool] = None,
        max_image_pixels: Optional[int] = None,
        input_data_format: Optional[str] = None,
        return_tensors: Optional[str] = "pt",
    ) -> BatchFeature:
        """Images -> `BatchFeature` with `pixel_values` (B, 3, H, W) on the canvas.

        `images`: one image or a list of images, each a file path, PIL image, numpy array or torch tensor (see
        `load_rgb_image`); a 4-D array or tensor is a batch. Every other argument overrides the field of the same
        name for this call; `input_data_format` (`"channels_first"` / `"channels_last"`) says where the channels
        of arrays and tensors are (default: read from the shape). `return_tensors`: `"pt"` (default) for a torch
        tensor, `"np"` or None for a numpy array.
        """
        settings = self._settings(
            do_resize=do_resize, size=size, resize_mode=resize_mode, resample=resample, do_normalize=do_normalize,
            image_mean=image_mean, image_std=image_std, size_divisor=size_divisor, do_convert_rgb=do_convert_rgb,
            max_image_pixels=max_image_pixels,
        )  # fmt: skip
        return_tensors = getattr(return_tensors, "value", return_tensors)  # transformers' TensorType enum
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        if input_data_format is not None:
            input_data_format = getattr(input_data_format, "value", input_data_format)  # ChannelDimension enum
            if input_data_format not in CHANNEL_FORMATS:
                raise ValueError(
                    f"input_data_format must be one of {CHANNEL_FORMATS} or None, got {input_data_format!r}."
                )
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)  # a batch
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("No images given.")
        mean = np.asarray(settings.image_mean, dtype=np.float32)
        std = np.asarray(settings.image_std, dtype=np.float32)
        canvas = np.zeros((len(images), 3, settings.size["height"], settings.size["width"]), dtype=np.float32)
        for index, image in enumerate(images):
            if isinstance(image, (list, tuple)):
                raise ValueError(f"images[{index}]: expected an image, got a nested {type(image).__name__}.")
            rgb = load_rgb_image(
                image, name=f"images[{index}]", max_pixels=settings.max_image_pixels,
                input_data_format=input_data_format, convert_rgb=settings.do_convert_rgb,
            )  # fmt: skip
            _, resized, (top, left) = self._geometry(rgb.shape[:2], settings)
            if resized != rgb.shape[:2]:
                rgb = np.asarray(Image.fromarray(rgb).resize((resized[1], resized[0]), resample=settings.resample))
            pixels = rgb.astype(np.float32) / 255.0
            if settings.do_normalize:
                pixels = (pixels - mean) / std
            canvas[index, :, top : top + resized[0], left : left + resized[1]] = pixels.transpose(2, 0, 1)
        pixel_values = torch.from_numpy(canvas) if return_tensors == "pt" else canvas
        return BatchFeature(data={"pixel_values": pixel_values})

    def post_process_dense_predictions(
        self,
        outputs,
        target_sizes: Optional[list[tuple[int, int]]] = None,
        size: Optional[Union[dict[str, int], int]] = None,
        resize_mode: Optional[str] = None,
        do_resize: Optional[bool] = None,
        task_specs=None,
    ) -> list[dict[str, torch.Tensor]]:
        """Model outputs -> per image, a dict task -> prediction at the image's original size.

        Predictions: class-id maps (h, w) int64 for segmentation tasks, probabilities (h, w) for saliency and
        boundaries, unit normals (3, h, w), depth (h, w) in metres, a score vector (C,) for image-level tasks; plain tensors without autograd history, on the
        device of the logits. `target_sizes` are the original (h, w) of the images given to `preprocess` (a list of
        pairs, or a tensor (B, 2)): the padding is cropped away and the rest resized back before the logits are
        turned into predictions. Without `target_sizes`, predictions stay at the input resolution. `size`,
        `resize_mode` and `do_resize` must be those of the `preprocess` call when it overrode them.

        Depth: the model learns depth/s for an image scaled by s (the training augmentation divides depth by the
        scale factor), so a prediction on an image that was resized by s is multiplied by s here (likewise for any
        task whose kind scales with zoom).

        `task_specs` (the model's config, or a {task: TaskSpec} mapping) tells each task's kind; it may be omitted
        when every task is one of the protocol's preset tasks.
        """
        # Model outputs (a ModelOutput or a dict with "logits"), or the logits dict itself.
        logits = outputs["logits"] if isinstance(outputs, dict) and "logits" in outputs else outputs
        if not isinstance(logits, dict) or not logits:
            raise ValueError("post_process_dense_predictions expects model outputs with a `logits` dict.")
        logits = {task: value.detach() for task, value in logits.items()}
        specs = resolve_task_specs(task_specs, logits)
        batch = next(iter(logits.values())).shape[0]
        if target_sizes is None:
            predictions = logits_to_predictions(logits, specs)
            return [{task: value[i] for task, value in predictions.items()} for i in range(batch)]
        # Image-level tasks (one score vector per image) have no geometry to undo.
        image_level = {task: value for task, value in logits.items() if specs[task].kind.image_level}
        image_predictions = logits_to_predictions(image_level, specs) if image_level else {}
        logits = {task: value for task, value in logits.items() if task not in image_level}
        if not logits:
            return [{task: value[i] for task, value in image_predictions.items()} for i in range(batch)]
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        if len(target_sizes) != batch:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch} predictions.")
        targets = [_as_target_size(target, index) for index, target in enumerate(target_sizes)]
        settings = self._settings(size=size, resize_mode=resize_mode, do_resize=do_resize)
        canvas = (settings.size["height"], settings.size["width"])
        if tuple(next(iter(logits.values())).shape[-2:]) != canvas:
            raise ValueError(
                f"The logits are {tuple(next(iter(logits.values())).shape[-2:])}, not the canvas {canvas}: target_sizes "
                "can only be used for inputs prepared by this processor (with the same size)."
            )
        results = []
        for index, target in enumerate(targets):
            scale, resized, (top, left) = self._geometry(target, settings)
            image_logits = {}
            for task, task_logits in logits.items():
                crop = task_logits[index : index + 1, :, top : top + resized[0], left : left + resized[1]].float()
                if tuple(crop.shape[-2:]) != target:
                    crop = F.interpolate(crop, size=target, mode="bilinear", align_corners=False)
                image_logits[task] = crop
            predictions = logits_to_predictions(image_logits, specs)
            result = {task: value[0] for task, value in predictions.items()}
            for task in result:
                if specs[task].scales_with_zoom:
                    result[task] = result[task] * scale
            result.update({task: value[index] for task, value in image_predictions.items()})
            results.append(result)
        return results


class TaskExpertImageProcessor(DenseMultiTaskImageProcessor):
    """The earlier name of [`DenseMultiTaskImageProcessor`], which serves every model type of this package; kept so
    that code importing it and `preprocessor_config.json` files naming it (`image_processor_type`) keep working."""


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DenseMultiTaskImageProcessor",
    "TaskExpertImageProcessor",
    "load_rgb_image",
    "logits_to_predictions",
]
