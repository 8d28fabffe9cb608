"""`multi-task-dense-prediction` pipeline: an image in, every task's map out."""

from typing import Optional

import numpy as np
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .visualization_taskexpert import visualize_prediction


class MultiTaskDensePredictionPipeline(Pipeline):
    """Predicts every task of a TaskExpert (or other dense multi-task) model for one image.

    Accepts a PIL image, a local path or URL, or a numpy array (H, W[, 3|4]). Returns a dict task ->
    `{"prediction": np.ndarray, "image": PIL.Image}`: the post-processed prediction at the image's size (class ids,
    probabilities, unit normals (3, H, W), depth in metres) and an RGB rendering of it.

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

    def _sanitize_parameters(self, tasks: Optional[list[str]] = None, **kwargs):
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)}; the pipeline accepts `tasks`.")
        return {}, {"tasks": tasks}, {}

    def preprocess(self, image):
        if isinstance(image, str):
            try:
                image = load_image(image)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise ValueError(f"Cannot read the image {image!r}: {error}") from error
        elif isinstance(image, np.ndarray) and image.ndim not in (2, 3):
            raise ValueError(f"Expected an image array of shape (H, W) or (H, W, C), got {image.shape}.")
        inputs = self.image_processor(image, return_tensors="pt")
        size = image.size[::-1] if isinstance(image, Image.Image) else np.asarray(image).shape[:2]
        inputs["target_size"] = tuple(int(s) for s in size)
        return inputs

    def _forward(self, model_inputs, tasks=None):
        target_size = model_inputs.pop("target_size")
        outputs = self.model(pixel_values=model_inputs["pixel_values"], tasks=tasks)
        return {"logits": outputs.logits, "target_size": target_size}

    def postprocess(self, model_outputs):
        target_size = model_outputs["target_size"]
        predictions = self.image_processor.post_process_dense_predictions(model_outputs, target_sizes=[target_size])[0]
        results = {}
        for task, prediction in predictions.items():
            array = prediction.cpu().numpy()
            num_classes = self.model.config.num_labels_of(task)
            results[task] = {"prediction": array, "image": Image.fromarray(visualize_prediction(task, array, num_classes))}
        return results
