"""TaskExpert Space: every task's dense map for one image, and which experts and how much memory each task uses.

Run it with `make space` or `python space_app/app.py` (serves on 127.0.0.1, port `GRADIO_SERVER_PORT` or 7860). The
model comes from `TASKEXPERT_MODEL` (a local folder or a Hub id), by default the folder `make train` writes.

The file has two halves: plain functions that load the model and an image, run the model and render the results
(tests call them directly), and `build_demo`, which wires them to the Gradio page and its `predict` API endpoint.
"""

import hashlib
import inspect
import io
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch.nn import functional as F
from gradio.components.annotated_image import AnnotatedImageData, Annotation
from gradio.data_classes import FileData
from transformers import AutoImageProcessor, AutoModel

import modeling_taskexpert  # noqa: F401  (registers the model types with the Auto classes)
from modeling_taskexpert.image_processing_taskexpert import to_rgb_array
from modeling_taskexpert.task_definitions import TASKS
from modeling_taskexpert.visualization_taskexpert import colorbar, colorize_scalar, label_palette, normals_to_rgb

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
SPACE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SPACE_DIR.parent
MODEL_ENV_VAR = "TASKEXPERT_MODEL"
# The default models, relative to the repository root, in order of preference: the best TaskExpert of the synthetic
# study (`make experiments` copies it there), else the one `make train` writes.
BEST_MODEL = "outputs/taskexpert-synthetic-best"
DEFAULT_MODEL = "outputs/taskexpert-synthetic-tiny"
EXAMPLES_DIR = SPACE_DIR / "examples"

MAX_UPLOAD_MB = 20
# Images with more pixels are refused: decoding alone would take seconds and gigabytes.
MAX_INPUT_PIXELS = 50_000_000
# Images with a longer side are shrunk to it before inference (with a note on the page); the outputs are
# full-resolution maps of every task, so this bounds the time and memory of one request.
MAX_IMAGE_SIDE = 1024
# Requests waiting in the queue at most; the model serves one request at a time.
MAX_QUEUE_SIZE = 16
SUPPORTED_FORMATS = "PNG, JPEG, WebP, BMP, TIFF or GIF"

TITLE = "TaskExpert: multi-task dense prediction with task experts and memory"
DESCRIPTION = (
    "TaskExpert (Ye & Xu, ICCV 2023) predicts several dense maps of one image at once. A shared backbone feeds "
    "*Memorial Mixture-of-Experts* layers: a set of expert networks decomposes the backbone features, and every task "
    "has its own gate that mixes the experts, pixel by pixel, together with a per-task *memory* carried from layer "
    "to layer. Upload an image (or pick an example), choose tasks and press **Run**; the **Experts** tab shows which "
    "expert each task relies on where, and how much each task reads from its memory."
)
CSS = """
.gradio-container {max-width: 1280px !important; margin: auto;}
#model-info {font-size: 0.9em;}
#model-missing {border-left: 4px solid #e5484d; padding-left: 12px;}
"""
# Short titles of the task outputs (the longer descriptions live in task_definitions).
TASK_TITLES = {
    "semseg": "Semantic segmentation", "human_parts": "Human parts", "saliency": "Saliency (probability)",
    "edge": "Boundaries (probability)", "normals": "Surface normals", "depth": "Depth (metres)",
}  # fmt: skip
_MEMORY_COLOR = "#9a9a9a"
# Alpha of the class colours over the photo in segmentation and expert overlays.
_OVERLAY_OPACITY = 0.7
_MODE_NAMES = {
    "1": "black-and-white", "L": "grayscale", "LA": "grayscale + alpha", "P": "palette", "PA": "palette + alpha",
    "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV", "I": "32-bit integer",
    "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale", "F": "floating-point",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class ModelUnavailable(Exception):
    """No model could be loaded; the message (Markdown) tells the user how to get one."""


@dataclass
class DemoModel:
    """A loaded model with its image processor and where it came from."""

    model: torch.nn.Module
    processor: object
    source: str

    @property
    def config(self):
        return self.model.config

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    def layer_names(self) -> list[str]:
        """Display name of every MMoE layer, with the backbone layer it follows when the config says so."""
        backbone_layers = getattr(self.config, "mmoe_layers", None)
        if backbone_layers:
            return [f"MMoE {k + 1} (after backbone layer {layer})" for k, layer in enumerate(backbone_layers)]
        return [f"layer {k + 1}" for k in range(getattr(self.config, "num_layers", 0))]

    def describe(self) -> str:
        """Markdown summary of the model: source, tasks, backbone, experts, input canvas."""
        config = self.config
        backbone = getattr(config, "backbone_config", None)
        details = [f"{getattr(backbone, name)} {label}" for name, label in
                   (("num_hidden_layers", "layers"), ("hidden_size", "channels"), ("patch_size", "px patches"))
                   if getattr(backbone, name, None) is not None]  # fmt: skip
        backbone_text = f" · **backbone**: {backbone.model_type} ({', '.join(details)})" if backbone else ""
        experts = f"{getattr(config, 'num_experts', '?')} experts per layer"
        if getattr(config, "use_memory", False):
            experts += " + a per-task memory"
        layers = getattr(config, "mmoe_layers", None)
        if layers:
            experts += f", MMoE layers after backbone layers {', '.join(map(str, layers))}"
        size = getattr(self.processor, "size", None)
        canvas = f" · input canvas {size['width']}×{size['height']} px" if isinstance(size, dict) else ""
        tasks = ", ".join(TASKS[task].description for task in self.tasks)
        return (
            f"**Model** `{self.source}` ({config.model_type}) · **tasks**: {tasks}{backbone_text} · **experts**: "
            f"{experts}{canvas}"
        )


def load_demo_model(model_path: Optional[str] = None) -> DemoModel:
    """Load the model and its processor from `model_path`, else `$TASKEXPERT_MODEL`, else the study's best synthetic
    TaskExpert when `make experiments` has written it, else the `make train` folder.

    A local folder or a Hub id. Only the model classes this environment has (the installed package) are used;
    remote code is never trusted implicitly. Raises `ModelUnavailable` with instructions when nothing can be loaded.
    """
    explicit = model_path or os.environ.get(MODEL_ENV_VAR)
    best = REPO_ROOT / BEST_MODEL
    source = str(explicit or (best if (best / "config.json").is_file() else REPO_ROOT / DEFAULT_MODEL))
    how_to_get_one = (
        f"Run `make train` to train the tiny synthetic model into `{DEFAULT_MODEL}` (or `make experiments` for the "
        f"study's best model in `{BEST_MODEL}`), or set `{MODEL_ENV_VAR}` to a model folder or a Hub model id, then "
        "restart the app."
    )
    if not Path(source).expanduser().is_dir():
        if explicit is None:
            raise ModelUnavailable(f"No trained model found at `{DEFAULT_MODEL}`. {how_to_get_one}")
        if Path(source).is_absolute() or source.startswith(("./", "../", "~")) or source.count("/") != 1:
            raise ModelUnavailable(f"The model folder `{source}` does not exist. {how_to_get_one}")
    else:
        source = str(Path(source).expanduser())
        if not (Path(source) / "config.json").is_file():
            raise ModelUnavailable(
                f"The folder `{source}` holds no model yet (no `config.json`; `make train` writes it when training "
                f"ends). {how_to_get_one}"
            )
    try:
        model = AutoModel.from_pretrained(source).eval()
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailable(
            f"Could not load the model `{source}`: {reason} A local folder needs `config.json`, `model.safetensors` "
            "and `preprocessor_config.json`; a Hub id needs network access (or the files in the local cache). "
            f"{how_to_get_one}"
        ) from error
    return DemoModel(model=model, processor=processor, source=source)


# ----------------------------------------------------------------------------------------------------------------
# Input images
# ----------------------------------------------------------------------------------------------------------------
def load_image(
    source: Union[str, Path, Image.Image, np.ndarray],
    max_bytes: int = MAX_UPLOAD_MB * 2**20,
    max_pixels: int = MAX_INPUT_PIXELS,
    max_side: int = MAX_IMAGE_SIDE,
) -> tuple[np.ndarray, list[str]]:
    """An image file, PIL image or array -> (RGB uint8 array (H, W, 3), notes for the user about what was changed).

    Grayscale, palette, 16-bit and RGBA images are converted (transparency composited on white); EXIF rotation is
    applied; images whose longer side exceeds `max_side` are shrunk to it. Files that are not images, larger than
    `max_bytes` or with more than `max_pixels` pixels raise a ValueError that says so.
    """
    notes = []
    name = "The image"
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = f"`{path.name}`"
        if not path.is_file():
            raise ValueError(f"{name} does not exist.")
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{name} is {size / 2**20:.1f} MB; this demo accepts images up to {max_bytes / 2**20:.0f} MB.")
        try:
            source = Image.open(path)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
            if isinstance(error, Image.DecompressionBombError):
                raise ValueError(f"{name} has too many pixels; this demo accepts up to {max_pixels:,}.") from error
            raise ValueError(f"{name} is not an image this demo can read; upload a {SUPPORTED_FORMATS} file.") from error
    if isinstance(source, Image.Image):
        width, height = source.size
        if width * height > max_pixels:
            raise ValueError(f"{name} is {width}×{height} pixels; this demo accepts up to {max_pixels:,} pixels.")
        if getattr(source, "n_frames", 1) > 1:
            notes.append(f"The image has {source.n_frames} frames; the first one is used.")
        try:
            source = ImageOps.exif_transpose(source)
            source.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{name} is damaged or truncated and cannot be decoded ({error}).") from error
        if source.mode != "RGB":
            converted = f"Converted the {_MODE_NAMES.get(source.mode, source.mode)} image to 8-bit RGB"
            has_alpha = "A" in source.mode or (source.mode == "P" and "transparency" in source.info)
            notes.append(converted + (" (transparent areas shown on white)." if has_alpha else "."))
    elif isinstance(source, np.ndarray):
        if source.ndim >= 2 and source.shape[0] * source.shape[1] > max_pixels:
            raise ValueError(f"{name} is {source.shape[1]}×{source.shape[0]} pixels; this demo accepts up to {max_pixels:,}.")
    else:
        raise ValueError(f"Expected an image file, a PIL image or a numpy array, got {type(source).__name__}.")
    rgb = to_rgb_array(source, name="the image")
    height, width = rgb.shape[:2]
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(new_size, Image.LANCZOS))
        notes.append(
            f"Resized from {width}×{height} to {new_size[0]}×{new_size[1]} pixels (this demo's limit is {max_side} px "
            "per side)."
        )
    return rgb, notes


class ImageUpload(gr.Image):
    """`gr.Image` that answers an upload it cannot open with a clear message instead of the decoder's traceback.

    A template of `gr.Image`: the page shows the standard image component.
    """

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            name = getattr(payload, "orig_name", None) or "The upload"
            raise gr.Error(f"`{name}` is not an image this demo can read; upload a {SUPPORTED_FORMATS} file.") from error


def save_png_once(image: Union[np.ndarray, Image.Image], cache_dir: Union[str, Path]) -> str:
    """Save `image` as PNG under `cache_dir/<sha256 of the bytes>/image.png` and return the path.

    gradio's own helper (`processing_utils.save_pil_to_cache`) rewrites that content-addressed file in place on every
    request, so when two concurrent requests produce the same map, one can be served a file the other is rewriting.
    Here an existing file is never touched, and a new one is written under a temporary name and renamed into place.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    folder = Path(cache_dir) / hashlib.sha256(data).hexdigest()
    target = folder / "image.png"
    if target.is_file():
        os.utime(target)  # gradio's `delete_cache` ages files by their time: keep a re-served file alive
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=folder, prefix=".image.png.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(target)


class ImageOutput(gr.Image):
    """`gr.Image` for outputs: array values are saved with `save_png_once` (safe under concurrent requests).

    A template of `gr.Image`: the page shows the standard image component.
    """

    is_template = True

    def postprocess(self, value):
        if isinstance(value, (np.ndarray, Image.Image)):
            value = save_png_once(value, self.GRADIO_CACHE)
        return super().postprocess(value)


class AnnotatedImageOutput(gr.AnnotatedImage):
    """`gr.AnnotatedImage` whose base image and masks are saved with `save_png_once` (safe under concurrent requests).

    Takes what `gr.AnnotatedImage` takes with array masks: (RGB image, [(mask in [0, 1] (H, W), label), ...]). A
    template of `gr.AnnotatedImage`: the page shows the standard component.
    """

    is_template = True

    def postprocess(self, value):
        if value is None:
            return None
        image, annotations = value
        if isinstance(image, str):  # a path or URL, handled as gr.AnnotatedImage does
            base = super().postprocess((image, [])).image
        else:
            base = FileData(path=save_png_once(np.asarray(image), self.GRADIO_CACHE))
        color_map = self.color_map or {}
        sections = []
        for mask, label in annotations:
            mask = np.asarray(mask, dtype=np.float64)
            rgb = _rgb_of_hex(color_map.get(label, "#ff0000"))
            colored = np.zeros((*mask.shape, 4), dtype=np.uint8)
            colored[..., :3] = np.where((mask > 0)[..., None], np.array(rgb, dtype=np.uint8), 0)
            colored[..., 3] = (mask * 255).astype(np.uint8)
            sections.append(Annotation(image=FileData(path=save_png_once(colored, self.GRADIO_CACHE)), label=label))
        return AnnotatedImageData(image=base, annotations=sections)


def _rgb_of_hex(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) for i in (0, 2, 4))


# ----------------------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DemoPrediction:
    """Everything the page shows for one image.

    Attributes:
        image: the RGB uint8 image (H, W, 3) the model saw (after conversion and the demo's size limit).
        predictions: per task, the post-processed prediction at (H, W) (`task_definitions` conventions).
        expert_maps: per task, per MMoE layer, the id of the dominant expert (highest gate weight among the experts)
            at every pixel, uint8 (H, W); empty for models without per-pixel gates.
        expert_usage: per task, (num_layers, K) mean weight of every candidate over the image: the experts, then the
            memory when `has_memory`: the mean gate weight (for Mod-Squad the top-k routing probabilities, 0 where not
            selected; layers with fewer experts zero-padded).
        has_memory: whether the last candidate of `expert_usage` is the memory.
        seconds: model time (pre-processing, forward, post-processing), without image decoding.
        notes: what was done to the input (conversion, resizing).
    """

    image: np.ndarray
    predictions: dict[str, np.ndarray]
    expert_maps: dict[str, list[np.ndarray]] = field(default_factory=dict)
    expert_usage: dict[str, np.ndarray] = field(default_factory=dict)
    has_memory: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def resolve_tasks(demo_model: DemoModel, tasks: Optional[list[str]]) -> list[str]:
    """Requested tasks in the model's order; None means all. A clear error for none or unknown ones."""
    if tasks is None:
        return demo_model.tasks
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [task for task in tasks if task not in demo_model.tasks]
    if unknown:
        raise ValueError(f"Unknown task(s) {', '.join(unknown)}; this model predicts {', '.join(demo_model.tasks)}.")
    if not tasks:
        raise ValueError("Choose at least one task.")
    return [task for task in demo_model.tasks if task in tasks]


def gates_on_image(gates: torch.Tensor, processor, image_size: tuple[int, int]) -> torch.Tensor:
    """Gate weights (h, w, K) on the model's token grid -> (K, h', w') over the image's area of the input canvas.

    Each token's weights fill its patch (nearest neighbour), and the padding around the image is cropped away, so
    the maps cover exactly the pixels of the image as the model saw it (h' x w' = the resized image on the canvas).
    """
    canvas = (processor.size["height"], processor.size["width"])
    _, resized, (top, left) = processor.geometry(image_size)
    maps = F.interpolate(gates.permute(2, 0, 1)[None].float(), size=canvas, mode="nearest")[0]
    return maps[:, top : top + resized[0], left : left + resized[1]]


def predict(demo_model: DemoModel, image, tasks: Optional[list[str]] = None) -> DemoPrediction:
    """Run the model on one image (a file path, PIL image or array) for `tasks` (default: all of the model's)."""
    rgb, notes = load_image(image)
    tasks = resolve_tasks(demo_model, tasks)
    model, processor = demo_model.model, demo_model.processor
    size = rgb.shape[:2]
    start = time.perf_counter()
    pixel_values = processor(rgb, return_tensors="pt")["pixel_values"].to(model.device)
    kwargs = {"tasks": tasks}
    if "output_gates" in inspect.signature(model.forward).parameters:
        kwargs["output_gates"] = True
    with torch.inference_mode():
        outputs = model(pixel_values=pixel_values, **kwargs)
        predictions = processor.post_process_dense_predictions(outputs, target_sizes=[size])[0]
        predictions = {task: value.cpu().numpy() for task, value in predictions.items()}
        expert_maps, expert_usage, has_memory = {}, {}, False
        gates = getattr(outputs, "gates", None)
        if gates:
            has_memory = bool(getattr(model.config, "use_memory", False))
            for task in tasks:
                layers = [gates_on_image(layer[task][0], processor, size) for layer in gates]
                width = max(maps.shape[0] for maps in layers)  # Mod-Squad layers differ in expert count: zero-pad
                expert_usage[task] = torch.stack(
                    [F.pad(maps.mean(dim=(1, 2)), (0, width - maps.shape[0])) for maps in layers]
                ).cpu().numpy()
                expert_maps[task] = [
                    _resize_nearest(maps[: maps.shape[0] - int(has_memory)].argmax(dim=0).to(torch.uint8).cpu().numpy(), size)
                    for maps in layers
                ]
    seconds = time.perf_counter() - start
    return DemoPrediction(rgb, predictions, expert_maps, expert_usage, has_memory, seconds, notes)


def _resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if labels.shape == tuple(size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


def save_npz(prediction: DemoPrediction, folder: Path) -> Path:
    """Write the raw arrays of `prediction` to a new `.npz` file in `folder` (atomically) and return its path.

    Keys: `image`; every task's prediction under its name; `expert_map/<task>` (layers, H, W) uint8 and
    `expert_usage/<task>` (layers, K) when the model reports them.
    """
    arrays = {"image": prediction.image, **prediction.predictions}
    arrays.update({f"expert_map/{task}": np.stack(maps) for task, maps in prediction.expert_maps.items()})
    arrays.update({f"expert_usage/{task}": usage for task, usage in prediction.expert_usage.items()})
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"taskexpert_prediction_{uuid.uuid4().hex[:8]}.npz"
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(partial, target)
    return target


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------
def _hex(color) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color))


def class_names(config, task: str) -> list[str]:
    labels = config.task_id2label[task]
    return [labels[index] for index in range(len(labels))]


def class_color_map(names: list[str]) -> dict[str, str]:
    """Legend colours of a segmentation task: the package's label palette."""
    return {name: _hex(color) for name, color in zip(names, label_palette(len(names)))}


def expert_color_map(num_experts: int) -> dict[str, str]:
    """Legend colours of the experts: palette entries 1..E (entry 0 is black)."""
    return {f"expert {e + 1}": _hex(color) for e, color in enumerate(label_palette(num_experts + 1)[1:])}


def segmentation_overlay(image: np.ndarray, labels: np.ndarray, names: list[str], skip: tuple[int, ...] = ()):
    """(image, [(mask, class name)]) for `gr.AnnotatedImage`: one mask per class present, except `skip`."""
    present = [int(c) for c in np.unique(labels) if int(c) not in skip and 0 <= int(c) < len(names)]
    return image, [((labels == c) * _OVERLAY_OPACITY, names[c]) for c in present]


def with_colorbar(rgb: np.ndarray, low: str, high: str) -> np.ndarray:
    """Append a colour-bar legend under a `colorize_scalar` image, labelled `low` (left) and `high` (right)."""
    height, width = rgb.shape[:2]
    font_size = max(10, min(24, width // 22))
    margin = max(4, font_size // 2)
    bar_height = max(6, font_size // 2)
    legend = Image.new("RGB", (width, bar_height + font_size + 3 * margin), "white")
    legend.paste(Image.fromarray(colorbar(width - 2 * margin, bar_height)), (margin, margin))
    draw = ImageDraw.Draw(legend)
    font = ImageFont.load_default(size=font_size)
    text_top = bar_height + 2 * margin
    draw.text((margin, text_top), low, fill="black", font=font)
    draw.text((width - margin, text_top), high, fill="black", font=font, anchor="ra")
    return np.concatenate([rgb, np.asarray(legend)], axis=0)


def render_task(prediction: np.ndarray, task: str, image: np.ndarray, config):
    """A task's prediction -> the value its output component shows."""
    kind = TASKS[task].kind
    if kind == "segmentation":
        # Human-part id 0 is the background: leave the photo visible there.
        skip = (0,) if task == "human_parts" else ()
        return segmentation_overlay(image, prediction, class_names(config, task), skip)
    if kind == "normals":
        return normals_to_rgb(prediction)
    if kind == "depth":
        finite = prediction[np.isfinite(prediction)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return with_colorbar(colorize_scalar(prediction, low, high), f"{low:.2f} m (near)", f"{high:.2f} m (far)")
    return with_colorbar(colorize_scalar(prediction, 0.0, 1.0), "0", "1")  # saliency and boundary probabilities


def task_label(task: str) -> str:
    """Title of a task's output on the page."""
    return TASK_TITLES.get(task, task)


def expert_map_overlay(prediction: DemoPrediction, task: str, layer: int):
    """(image, [(mask, "expert k")]) of the dominant expert of `task` at MMoE layer `layer`."""
    dominant = prediction.expert_maps[task][layer]
    num_experts = prediction.expert_usage[task].shape[1] - int(prediction.has_memory)
    names = list(expert_color_map(num_experts))
    return segmentation_overlay(prediction.image, dominant, names)


def plot_expert_usage(prediction: DemoPrediction, task: str, layer_names: list[str]) -> Figure:
    """Bars of the mean weight of every expert (and the memory) per layer for `task`; with memory, a second panel
    with each task's memory reliance per layer."""
    usage = prediction.expert_usage[task]
    num_layers, num_candidates = usage.shape
    num_experts = num_candidates - int(prediction.has_memory)
    names = layer_names[:num_layers] if len(layer_names) >= num_layers else [f"layer {k + 1}" for k in range(num_layers)]
    panels = 2 if prediction.has_memory else 1
    figure = Figure(figsize=(5.2 * panels, 0.6 + 0.55 * num_layers + 1.2), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    bars = axes[0]
    colors = list(expert_color_map(num_experts).values()) + [_MEMORY_COLOR] * int(prediction.has_memory)
    labels = list(expert_color_map(num_experts)) + ["memory"] * int(prediction.has_memory)
    rows = np.arange(num_layers)[::-1]
    left = np.zeros(num_layers)
    for k in range(num_candidates):
        bars.barh(rows, usage[:, k], left=left, color=colors[k], label=labels[k], edgecolor="white", height=0.7)
        left += usage[:, k]
    bars.set_yticks(rows, [name.split(" (")[0] for name in names])
    bars.set_xlim(0, max(1.0, float(left.max())))
    bars.set_xlabel("mean weight over the image")
    bars.set_title(f"{task}: who the gate picks, per layer", fontsize=10)
    bars.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=min(num_candidates, 5), fontsize=8, frameon=False)
    if prediction.has_memory:
        reliance = axes[1]
        x = np.arange(1, num_layers + 1)
        for other, other_usage in prediction.expert_usage.items():
            chosen = other == task
            reliance.plot(x, other_usage[:, -1], marker="o", linewidth=2.5 if chosen else 1.0,
                          alpha=1.0 if chosen else 0.5, label=other)  # fmt: skip
        reliance.set_xticks(x, [f"MMoE {k}" for k in x])
        reliance.set_ylim(0, 1)
        reliance.set_ylabel("mean memory gate")
        reliance.set_title("How much each task reads from memory", fontsize=10)
        reliance.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure


# ----------------------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------------------
_OUTPUT_FOLDER = tempfile.TemporaryDirectory(prefix="taskexpert-space-")


def build_demo(model_path: Optional[str] = None) -> gr.Blocks:
    """The Gradio page for the model at `model_path` (see `load_demo_model`), with the `predict` API endpoint.

    Without a loadable model the page explains how to get one and the Run button is disabled.
    """
    try:
        demo_model, problem = load_demo_model(model_path), None
    except ModelUnavailable as error:
        demo_model, problem = None, str(error)
    tasks = demo_model.tasks if demo_model else []
    layer_names = demo_model.layer_names() if demo_model else []

    with gr.Blocks(title="TaskExpert", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        if problem:
            gr.Markdown(f"**The demo has no model.** {problem}", elem_id="model-missing")
        else:
            gr.Markdown(demo_model.describe(), elem_id="model-info")
        last_prediction = gr.State()

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image_input = ImageUpload(
                    label="Image", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                    height=300, elem_id="input-image",
                )  # fmt: skip
                task_choice = gr.CheckboxGroup(
                    choices=[(task_label(task), task) for task in tasks], value=tasks, label="Tasks"
                )
                run_button = gr.Button("Run", variant="primary", interactive=demo_model is not None, elem_id="run")
                examples = sorted(str(path) for path in EXAMPLES_DIR.glob("*.jpg"))
                if examples:
                    gr.Examples(examples=examples, inputs=image_input, label="Examples (synthetic scenes like the training data)")
            with gr.Column(scale=3):
                status = gr.Markdown("Upload an image and press **Run**.", elem_id="status")
                with gr.Tabs():
                    with gr.Tab("Task maps"):
                        task_outputs = {}
                        for row_start in range(0, len(tasks), 3):
                            with gr.Row():
                                for task in tasks[row_start : row_start + 3]:
                                    task_outputs[task] = _task_component(task, demo_model)
                    with gr.Tab("Experts"):
                        gr.Markdown(
                            "For one task and one MMoE layer: which expert has the largest gate weight at each "
                            "pixel (hover a legend entry to highlight its region). The plot shows every "
                            "candidate's mean gate weight per layer and how much each task reads from its memory."
                        )
                        with gr.Row():
                            expert_task = gr.Dropdown(choices=tasks, value=tasks[0] if tasks else None, label="Task")
                            expert_layer = gr.Radio(
                                choices=[(name, k) for k, name in enumerate(layer_names)],
                                value=0 if layer_names else None,
                                label="MMoE layer",
                            )
                        expert_map = AnnotatedImageOutput(
                            label="Dominant expert", format="png", height=420, elem_id="expert-map"
                        )
                        expert_plot = gr.Plot(label="Expert and memory usage", show_label=False, elem_id="expert-plot")
                    with gr.Tab("Raw arrays"):
                        gr.Markdown(
                            "All predictions as numpy arrays (`np.load`): `image`, one array per task at the image's "
                            "size (class ids, probabilities, unit normals (3, H, W), depth in metres), "
                            "`expert_map/<task>` and `expert_usage/<task>`."
                        )
                        arrays_file = gr.File(label="Predictions (.npz)", elem_id="arrays")

        def run(image, tasks):
            if demo_model is None:
                raise gr.Error(problem)
            if image is None:
                raise gr.Error("Upload an image or pick an example first.")
            try:
                prediction = predict(demo_model, image, tasks)
            except ValueError as error:
                raise gr.Error(str(error)) from error
            except Exception as error:  # an unexpected failure: the log gets the traceback, the user a message
                logger.exception("Inference failed")
                raise gr.Error(f"Inference failed ({type(error).__name__}: {error}).") from error
            height, width = prediction.image.shape[:2]
            device = "GPU" if demo_model.model.device.type == "cuda" else "CPU"
            lines = [
                f"**{len(prediction.predictions)} task(s)** on a {width}×{height} image in "
                f"**{prediction.seconds:.2f} s** ({device})."
            ]
            depth = prediction.predictions.get("depth")
            if depth is not None:
                lines.append(f"- Depth range: {depth.min():.2f} – {depth.max():.2f} m.")
            lines += [f"- {note}" for note in prediction.notes]
            maps = [
                None if task not in prediction.predictions
                else render_task(prediction.predictions[task], task, prediction.image, demo_model.config)
                for task in task_outputs
            ]  # fmt: skip
            return "\n".join(lines), *maps, str(save_npz(prediction, Path(_OUTPUT_FOLDER.name))), prediction

        def show_tasks(chosen_tasks):
            return [gr.update(visible=task in chosen_tasks) for task in task_outputs]

        def experts_after_run(prediction: DemoPrediction, layer: Optional[int]):
            selected = list(prediction.predictions)
            return gr.Dropdown(choices=selected, value=selected[0]), *show_experts(prediction, selected[0], layer)

        def show_experts(prediction: Optional[DemoPrediction], task: Optional[str], layer: Optional[int]):
            if prediction is None or task not in prediction.expert_usage:
                return gr.AnnotatedImage(value=None), None
            layer = int(layer or 0)
            if task in prediction.expert_maps:
                num_experts = prediction.expert_usage[task].shape[1] - int(prediction.has_memory)
                overlay = gr.AnnotatedImage(
                    value=expert_map_overlay(prediction, task, layer),
                    color_map=expert_color_map(num_experts),
                    label=f"Dominant expert of {task} at {layer_names[layer] if layer < len(layer_names) else layer}",
                    visible=True,
                )
            else:  # models that report routing fractions only (e.g. Mod-Squad) have no per-pixel map
                overlay = gr.AnnotatedImage(value=None, visible=False)
            return overlay, plot_expert_usage(prediction, task, layer_names)

        # The API endpoint returns the status, every task's map and the arrays; the Experts tab follows on the page.
        run_button.click(
            run,
            inputs=[image_input, task_choice],
            outputs=[status, *task_outputs.values(), arrays_file, last_prediction],
            api_name="predict",
        ).success(
            experts_after_run,
            inputs=[last_prediction, expert_layer],
            outputs=[expert_task, expert_map, expert_plot],
            api_visibility="private",
        )
        task_choice.change(show_tasks, inputs=task_choice, outputs=list(task_outputs.values()), api_visibility="private")
        for control in (expert_task, expert_layer):
            control.input(
                show_experts,
                inputs=[last_prediction, expert_task, expert_layer],
                outputs=[expert_map, expert_plot],
                api_visibility="private",
            )
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE_SIZE)
    return demo


def _task_component(task: str, demo_model: DemoModel):
    """The output component of one task: an annotated overlay for segmentation, an image otherwise."""
    common = {"label": task_label(task), "format": "png", "elem_id": f"map-{task}", "min_width": 240}
    if TASKS[task].kind == "segmentation":
        return AnnotatedImageOutput(color_map=class_color_map(class_names(demo_model.config, task)), **common)
    return ImageOutput(interactive=False, **common)


def launch(demo: gr.Blocks, **launch_kwargs):
    """Launch `demo` with the page style and the upload limit; `launch_kwargs` go to `Blocks.launch` (host and port
    default to `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`, else 127.0.0.1:7860)."""
    return demo.launch(max_file_size=f"{MAX_UPLOAD_MB}mb", css=CSS, theme=gr.themes.Soft(), **launch_kwargs)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    launch(build_demo())


if __name__ == "__main__":
    main()
