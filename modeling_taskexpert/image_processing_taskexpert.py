"""Image processor for TaskExpert: RGB conversion, optional resize, normalisation, centred padding; and the
post-processing of dense predictions back to each image's original size (no torchvision)."""

from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .task_definitions import TASKS

RESIZE_MODES = ("shrink", "fit", "none")


def logits_to_predictions(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model logits (B, C, H, W) per task -> post-processed predictions (task_definitions conventions).

    Segmentation: argmax class ids; saliency and boundaries: sigmoid probabilities; normals: L2-normalised;
    depth: clamped at 0 (metres). No resizing: this is what the metrics read on the padded inputs.
    """
    predictions = {}
    for task, task_logits in logits.items():
        kind = TASKS[task].kind
        task_logits = task_logits.float()
        if kind == "segmentation":
            predictions[task] = task_logits.argmax(dim=1)
        elif kind in ("saliency", "boundary"):
            predictions[task] = task_logits[:, 0].sigmoid()
        elif kind == "normals":
            predictions[task] = F.normalize(task_logits, p=2, dim=1)
        else:
            predictions[task] = task_logits[:, 0].clamp(min=0)
    return predictions


def _check_pixel_count(height: int, width: int, name: str) -> None:
    """Refuse images above PIL's decompression-bomb limit before any full-size copy of them is made."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > limit:
        raise ValueError(
            f"{name}: {width}x{height} is {height * width:,} pixels, more than the limit of {limit:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS, PIL's decompression-bomb guard); downscale the image first, or raise that "
            "limit if you trust the file."
        )


def to_rgb_array(image, name: str = "image") -> np.ndarray:
    """PIL image, numpy array or torch tensor -> RGB uint8 array (H, W, 3).

    Grayscale is replicated, an alpha channel is composited onto white, 16-bit images are scaled to 8 bits,
    float arrays must hold values in [0, 1]. Anything else raises a ValueError that says what was expected, and so
    do images with more pixels than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`; None disables it).
    """
    if isinstance(image, Image.Image):
        _check_pixel_count(image.height, image.width, name)
        try:
            image.load()  # a lazily opened file is decoded here, so a damaged one fails with its name
        except (OSError, SyntaxError) as error:
            raise ValueError(f"{name}: the image cannot be decoded; the file is damaged or truncated ({error}).") from error
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(array[..., None], 3, axis=2)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # CHW -> HWC
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    array = image
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"{name}: expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name}: the image is empty ({array.shape}).")
    _check_pixel_count(array.shape[0], array.shape[1], name)
    if array.dtype == np.uint8:
        rgb = array.astype(np.float64)
    elif array.dtype == np.uint16:
        rgb = array.astype(np.float64) / 257.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: the image contains NaN or infinite values.")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"{name}: float images must hold values in [0, 1], got [{array.min():.3g}, {array.max():.3g}]; "
                "pass uint8 for 0..255 data."
            )
        rgb = array.astype(np.float64) * 255.0
    else:
        raise ValueError(f"{name}: unsupported dtype {array.dtype}; expected uint8, uint16 or float in [0, 1].")
    if rgb.shape[-1] == 4:
        alpha = rgb[..., 3:] / 255.0
        rgb = rgb[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


class TaskExpertImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for TaskExpert like the benchmark protocol's evaluation transform, and post-processes the
    predictions back to every image's original size.

    Steps: convert to RGB, resize (see `resize_mode`), scale to [0, 1], normalise with `image_mean` / `image_std`,
    pad centred to `size` with 0 (after normalisation; the top/left offset is floor(delta / 2)).

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 512, "width": 512}`):
            Canvas of the model input; both sides must be multiples of `size_divisor`.
        resize_mode (`str`, *optional*, defaults to `"shrink"`):
            `"shrink"`: images larger than the canvas are scaled down to fit (aspect kept), smaller ones are only
            padded, which is exactly the protocol's evaluation transform on the benchmarks; `"fit"`: always scale
            to fit; `"none"`: never resize (larger images are an error).
        resample (`int`, *optional*, defaults to `PIL.Image.BILINEAR`):
            PIL resampling filter of the resize.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with the mean and std.
        image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
        image_std (`list[float]`, *optional*, defaults to the ImageNet std):
        size_divisor (`int`, *optional*, defaults to 16):
            The backbone's patch size.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: Optional[dict[str, int]] = None,
        resize_mode: str = "shrink",
        resample: int = Image.BILINEAR,
        do_normalize: bool = True,
        image_mean: Optional[list[float]] = None,
        image_std: Optional[list[float]] = None,
        size_divisor: int = 16,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 512, "width": 512}
        self.resize_mode = resize_mode
        self.resample = int(resample)
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_DEFAULT_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_DEFAULT_STD)
        self.size_divisor = size_divisor
        if set(self.size) != {"height", "width"}:
            raise ValueError(f"size must be a dict with 'height' and 'width', got {self.size}.")
        if any(v < size_divisor or v % size_divisor for v in self.size.values()):
            raise ValueError(f"size {self.size} must be positive multiples of size_divisor={size_divisor}.")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")

    # --------------------------------------------------------------------------------------------------------
    def geometry(self, original_size: tuple[int, int]) -> tuple[float, tuple[int, int], tuple[int, int]]:
        """(scale, resized (h, w), pad offset (top, left)) of an image of `original_size` on the canvas."""
        height, width = int(original_size[0]), int(original_size[1])
        canvas_h, canvas_w = self.size["height"], self.size["width"]
        fit = min(canvas_h / height, canvas_w / width)
        if self.resize_mode == "fit" or (self.resize_mode == "shrink" and fit < 1.0):
            scale = fit
        elif fit < 1.0:
            raise ValueError(
                f"Image of size {height}x{width} is larger than the canvas {canvas_h}x{canvas_w} and resize_mode='none'."
            )
        else:
            scale = 1.0
        resized = (min(max(round(height * scale), 1), canvas_h), min(max(round(width * scale), 1), canvas_w))
        offset = ((canvas_h - resized[0]) // 2, (canvas_w - resized[1]) // 2)
        return scale, resized, offset

    def preprocess(self, images, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """Images (one or a list; PIL, numpy or torch) -> `BatchFeature` with `pixel_values` (B, 3, H, W)."""
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)} for TaskExpertImageProcessor.preprocess.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}.")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("No images given.")
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        canvas = np.zeros((len(images), 3, self.size["height"], self.size["width"]), dtype=np.float32)
        for index, image in enumerate(images):
            rgb = to_rgb_array(image, name=f"images[{index}]")
            _, resized, (top, left) = self.geometry(rgb.shape[:2])
            if resized != rgb.shape[:2]:
                rgb = np.asarray(Image.fromarray(rgb).resize((resized[1], resized[0]), resample=self.resample))
            pixels = rgb.astype(np.float32) / 255.0
            if self.do_normalize:
                pixels = (pixels - mean) / std
            canvas[index, :, top : top + resized[0], left : left + resized[1]] = pixels.transpose(2, 0, 1)
        pixel_values = torch.from_numpy(canvas) if return_tensors == "pt" else canvas
        return BatchFeature(data={"pixel_values": pixel_values})

    def post_process_dense_predictions(
        self, outputs, target_sizes: Optional[list[tuple[int, int]]] = None
    ) -> list[dict[str, torch.Tensor]]:
        """Model outputs -> per image, a dict task -> prediction at the image's original size.

        Predictions: class-id maps (h, w) int64 for segmentation tasks, probabilities (h, w) for saliency and
        boundaries, unit normals (3, h, w), depth (h, w) in metres. `target_sizes` are the original (h, w) of the
        images given to `preprocess` (with this processor's settings): the padding is cropped away and the rest
        resized back before the logits are turned into predictions. Without `target_sizes`, predictions stay at the
        input resolution.

        Depth: the model learns depth/s for an image scaled by s (the training augmentation divides depth by the
        scale factor), so a prediction on an image that was resized by s is multiplied by s here.
        """
        # Model outputs (a ModelOutput or a dict with "logits"), or the logits dict itself.
        logits = outputs["logits"] if isinstance(outputs, dict) and "logits" in outputs else outputs
        if not isinstance(logits, dict) or not logits:
            raise ValueError("post_process_dense_predictions expects model outputs with a `logits` dict.")
        batch = next(iter(logits.values())).shape[0]
        if target_sizes is None:
            predictions = logits_to_predictions(logits)
            return [{task: value[i] for task, value in predictions.items()} for i in range(batch)]
        if len(target_sizes) != batch:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch} predictions.")
        canvas = (self.size["height"], self.size["width"])
        if tuple(next(iter(logits.values())).shape[-2:]) != canvas:
            raise ValueError(
                f"The logits are {tuple(next(iter(logits.values())).shape[-2:])}, not this processor's canvas {canvas}: "
                "target_sizes can only be used for inputs prepared by this processor."
            )
        results = []
        for index, target in enumerate(target_sizes):
            scale, resized, (top, left) = self.geometry(target)
            image_logits = {}
            for task, task_logits in logits.items():
                crop = task_logits[index : index + 1, :, top : top + resized[0], left : left + resized[1]].float()
                if tuple(crop.shape[-2:]) != tuple(int(s) for s in target):
                    crop = F.interpolate(crop, size=tuple(int(s) for s in target), mode="bilinear", align_corners=False)
                image_logits[task] = crop
            predictions = logits_to_predictions(image_logits)
            result = {task: value[0] for task, value in predictions.items()}
            for task in result:
                if TASKS[task].kind == "depth":
                    result[task] = result[task] * scale
            results.append(result)
        return results


__all__ = ["TaskExpertImageProcessor", "logits_to_predictions", "to_rgb_array"]
