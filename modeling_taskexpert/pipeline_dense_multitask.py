"""`multi-task-dense-prediction` pipeline: an image in, every task's map out."""

import io
import time
from typing import Optional

import torch
from PIL import Image
from transformers import Pipeline

from .image_processing_dense_multitask import DEFAULT_MAX_IMAGE_PIXELS, load_rgb_image
from .task_definitions import task_specs_of
from .visualization_dense_multitask import visualize_prediction

_LOGITS_PREFIX = "logits."


# Overall deadline of an image download when the caller gives none, in seconds.
DEFAULT_DOWNLOAD_TIMEOUT = 60.0
# Bytes an image file may take per pixel of the processor's pixel cap (uncompressed 16-bit RGBA), plus headers.
_BYTES_PER_PIXEL, _HEADER_BYTES = 8, 1 << 20


def _fetch_url(url: str, timeout: Optional[float], max_bytes: int) -> io.BytesIO:
    """The bytes of an http(s) URL, read with the HTTP client that `huggingface_hub` provides (and transformers uses
    for image URLs), within an overall deadline of `timeout` seconds (default `DEFAULT_DOWNLOAD_TIMEOUT`, however slowly the
    server sends) and at most `max_bytes` (refused early when the server announces more)."""
    from huggingface_hub.utils import httpx  # the hub's own session refuses every URL in offline mode

    timeout = DEFAULT_DOWNLOAD_TIMEOUT if timeout is None else float(timeout)
    deadline = time.monotonic() + timeout
    buffer = io.BytesIO()
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            announced = response.headers.get("content-length")
            if announced is not None and announced.isdigit() and int(announced) > max_bytes:
                raise ValueError(
                    f"The image {url!r} is {int(announced):,} bytes, more than the limit of {max_bytes:,} (from the "
                    "processor's max_image_pixels)."
                )
            for chunk in response.iter_bytes():  # as received, so that the deadline is checked as bytes arrive
                buffer.write(chunk)
                if buffer.tell() > max_bytes:
                    raise ValueError(f"The image {url!r} is larger than the limit of {max_bytes:,} bytes.")
                if time.monotonic() > deadline:
                    raise ValueError(f"Downloading the image {url!r} took longer than {timeout:g} s (timeout=...).")
    except httpx.HTTPError as error:
        raise ValueError(f"Cannot download the image {url!r}: {error}") from error
    buffer.seek(0)
    return buffer


class MultiTaskDensePredictionPipeline(Pipeline):
    """Predicts every task of a TaskExpert (or Mod-Squad) model for images.

    Accepts one image or a list: a local path or an http(s) URL, a PIL image, a numpy array or a torch tensor
    ((H, W), (H, W, C) or (C, H, W)); images are read by `load_rgb_image` (EXIF orientation applied, 16-bit scaled,
    transparency composited on white, the processor's `max_image_pixels` checked before decoding). Returns, per image,
    a dict task -> `{"prediction": np.ndarray, "image": PIL.Image}`: the post-processed prediction at the image's size
    (class ids, probabilities, unit normals (3, H, W), depth in metres) and an RGB rendering of it. `batch_size`
    runs several images through the model at once (they share the processor's canvas).

    ```python
    >>> pipe = pipeline("multi-task-dense-prediction", model="path/to/model", trust_remote_code=True)
    >>> maps = pipe("photo.jpg", tasks=["semseg", "depth"])
    >>> maps["depth"]["prediction"].shape
    ```
    """

    _load_image_processor = True
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_video_processor = False

    def _sanitize_parameters(self, tasks: Optional[list[str]] = None, timeout: Optional[float] = None, **kwargs):
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)}; the pipeline accepts `tasks` and `timeout`.")
        return {"timeout": timeout}, {"tasks": tasks}, {}

    def preprocess(self, image, timeout: Optional[float] = None):
        name = None
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            name = f"'{image}'"
            pixels = self.image_processor.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
            image = _fetch_url(image, timeout, pixels * _BYTES_PER_PIXEL + _HEADER_BYTES)
        rgb = load_rgb_image(image, name=name, max_pixels=self.image_processor.max_image_pixels)
        inputs = self.image_processor(rgb, return_tensors="pt")
        # A (1, 2) tensor, so that batching concatenates it and un-batching gives every image its own size.
        inputs["target_size"] = torch.tensor([rgb.shape[:2]], dtype=torch.long)
        return inputs

    def _forward(self, model_inputs, tasks=None):
        outputs = self.model(pixel_values=model_inputs["pixel_values"], tasks=tasks)
        # Flat tensors with the batch first: the pipeline's un-batching slices every entry of this dict.
        result = {"target_size": model_inputs["target_size"]}
        result.update({_LOGITS_PREFIX + task: value for task, value in outputs.logits.items()})
        return result

    def postprocess(self, model_outputs):
        logits = {
            key[len(_LOGITS_PREFIX) :]: value for key, value in model_outputs.items() if key.startswith(_LOGITS_PREFIX)
        }
        target_sizes = model_outputs["target_size"].tolist()
        specs = task_specs_of(self.model.config)
        predictions = self.image_processor.post_process_dense_predictions(
            {"logits": logits}, target_sizes=target_sizes, task_specs=specs
        )[0]
        results = {}
        for task, prediction in predictions.items():
            array = prediction.cpu().numpy()
            results[task] = {"prediction": array, "image": Image.fromarray(visualize_prediction(specs[task], array))}
        return results
