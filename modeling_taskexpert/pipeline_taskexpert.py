"""`multi-task-dense-prediction` pipeline: an image in, every task's map out."""

import io
from typing import Optional

import torch
from PIL import Image
from transformers import Pipeline

from .image_processing_taskexpert import load_rgb_image
from .task_definitions import task_specs_of
from .visualization_taskexpert import visualize_prediction

_LOGITS_PREFIX = "logits."


def _fetch_url(url: str, timeout: Optional[float]) -> io.BytesIO:
    """The bytes of an http(s) URL, read with the HTTP client transformers itself uses for image URLs."""
    import httpx

    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise ValueError(f"Cannot download the image {url!r}: {error}") from error
    return io.BytesIO(response.content)


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
            image = _fetch_url(image, timeout)
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
