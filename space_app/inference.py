"""Inference: one image through the model, the maps of the chosen tasks, the routing report, and the raw arrays."""

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from experts_tab import RoutingView, routing_view
from model_loading import DemoModel, load_image
from modeling_taskexpert.dense_model_utils import resolve_tasks
from modeling_taskexpert.file_utils import atomic_write


@dataclass
class DemoPrediction:
    """Everything the page shows for one image.

    Attributes:
        image: the RGB uint8 image (H, W, 3) the maps are drawn on (after conversion and the demo's size limit).
        predictions: per task, the post-processed prediction at (H, W) (`task_definitions` conventions).
        routing: the model's routing report for the chosen tasks, on the tokens that cover the image.
        canvas: (height, width) of the model's input canvas.
        resized: (height, width) of the image on that canvas (the padding around it is left out of every map).
        seconds: model time (pre-processing, forward, post-processing), without image decoding.
        notes: what was done to the input (conversion, resizing).
    """

    image: np.ndarray
    predictions: dict[str, np.ndarray]
    routing: RoutingView
    canvas: tuple[int, int]
    resized: tuple[int, int]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def model_view(self) -> str:
        """One sentence: how the image sat on the canvas the model saw."""
        height, width = self.image.shape[:2]
        canvas_h, canvas_w = self.canvas
        resized_h, resized_w = self.resized
        if (resized_h, resized_w) == (height, width):
            placed = f"at its own size, {width}×{height}"
        else:
            verb = "shrunk" if resized_h * resized_w < height * width else "enlarged"
            placed = f"{verb} to {resized_w}×{resized_h}"
        padded = "" if (resized_h, resized_w) == (canvas_h, canvas_w) else ", padded around it"
        return f"The model saw the image {placed} on its {canvas_w}×{canvas_h} canvas{padded}."


def predict(demo_model: DemoModel, image, tasks: Optional[list[str]] = None) -> DemoPrediction:
    """Run the model on one image (a file path, PIL image or array) for `tasks` (default: all of the model's)."""
    rgb, notes = load_image(image)
    if tasks is not None and not tasks:
        raise ValueError("Choose at least one task.")
    tasks = resolve_tasks(demo_model.tasks, tasks)
    model, processor = demo_model.model, demo_model.processor
    size = rgb.shape[:2]
    _, resized, offset = processor.geometry(size)
    start = time.perf_counter()
    pixel_values = processor(rgb, return_tensors="pt")["pixel_values"].to(model.device)
    with torch.inference_mode():
        outputs = model(pixel_values=pixel_values, tasks=tasks, output_gates=True)
        predictions = processor.post_process_dense_predictions(outputs, target_sizes=[size], task_specs=model.config)[0]
        predictions = {task: value.cpu().numpy() for task, value in predictions.items()}
        routing = routing_view(model.config, outputs.gates, tasks, demo_model.canvas, resized, offset)
    seconds = time.perf_counter() - start
    return DemoPrediction(rgb, predictions, routing, demo_model.canvas, resized, seconds, notes)


def save_npz(prediction: DemoPrediction, folder: Path) -> Path:
    """Write the raw arrays of `prediction` to a new `.npz` file in `folder` (atomically) and return its path.

    Keys: `image`; every task's prediction under its name; `layer_names` and `candidate_names/<l>` (the routing
    layers and the candidates of layer l, in gate order); per task, `dominant_candidate/<task>` (layers, H, W) uint8
    (the candidate with the largest gate weight at each pixel) and `mean_weight/<task>/<l>` (K_l,) (each candidate's
    mean gate weight over the image at layer l).
    """
    routing = prediction.routing
    height, width = prediction.image.shape[:2]
    arrays = {"image": prediction.image, **prediction.predictions, "layer_names": np.array(routing.layer_names)}
    for layer, names in enumerate(routing.candidate_names):
        arrays[f"candidate_names/{layer}"] = np.array(names)
    for task in routing.tasks:
        arrays[f"dominant_candidate/{task}"] = np.stack(
            [routing.dominant_map(task, layer, (height, width)) for layer in range(routing.num_layers)]
        )
        for layer in range(routing.num_layers):
            arrays[f"mean_weight/{task}/{layer}"] = routing.mean_weights(task, layer)
    target = Path(folder) / f"taskexpert_prediction_{uuid.uuid4().hex[:8]}.npz"

    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    return atomic_write(target, write)
