"""Rendering: task predictions as images for the page, their legends, and the output components that serve them.

Legends (colour bars, the normals' orientation sphere) are HTML next to the maps rather than pixels drawn into them,
so their text keeps its screen size however large or small the image is.
"""

import base64
import hashlib
import html
import io
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import gradio as gr
import numpy as np
from gradio.components.annotated_image import AnnotatedImageData, Annotation
from gradio.data_classes import FileData
from PIL import Image

from modeling_taskexpert.task_definitions import TaskSpec, preset_spec
from modeling_taskexpert.visualization_dense_multitask import (
    colorize_scalar,
    label_palette,
    normals_to_rgb,
    visualize_prediction,
)

# Alpha of the class colours over the photo in segmentation and expert overlays.
OVERLAY_OPACITY = 0.7
# Side of the orientation sphere in the normals legend, in pixels.
SPHERE_SIZE = 72


def task_title(task) -> str:
    """Title of a task's output on the page: its description, capitalised ("Semantic segmentation"), or its declared
    name. `task` is a `TaskSpec` or a preset task's name."""
    spec = task if isinstance(task, TaskSpec) else preset_spec(task)
    return spec.description[:1].upper() + spec.description[1:] if spec.description else spec.name


def _hex(color) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color))


def class_names(config, task: str) -> list[str]:
    labels = config.task_id2label[task]
    return [labels[index] for index in range(len(labels))]


def class_color_map(names: list[str]) -> dict[str, str]:
    """Legend colours of a segmentation task: the package's label palette."""
    return {name: _hex(color) for name, color in zip(names, label_palette(len(names)))}


def segmentation_overlay(image: np.ndarray, labels: np.ndarray, names: list[str], skip: tuple[int, ...] = ()):
    """(image, [(mask, class name)]) for `gr.AnnotatedImage`: one mask per class present, except `skip`."""
    present = [int(c) for c in np.unique(labels) if int(c) not in skip and 0 <= int(c) < len(names)]
    return image, [((labels == c) * OVERLAY_OPACITY, names[c]) for c in present]


def empty_map_note(prediction: np.ndarray, task: str, config) -> Optional[str]:
    """What a segmentation map shows nothing of, when it shows nothing: every pixel predicted as the class that is
    left unpainted (human parts' background). None otherwise."""
    spec = config.task_specs[task]
    if spec.kind.name != "segmentation" or not spec.parameters["background_only_is_unlabelled"]:
        return None
    if np.any(prediction != 0):
        return None
    return f"nothing found: every pixel is {spec.class_names[0]}"


def render_task(prediction: np.ndarray, task: str, image: np.ndarray, config):
    """A task's prediction -> the value its output component shows (its legend is `task_legend`), by its kind."""
    spec = config.task_specs[task] if config is not None else preset_spec(task)
    kind = spec.kind.name
    if kind == "segmentation":
        # Where class 0 means "no instance" (human parts' background), leave the photo visible.
        skip = (0,) if spec.parameters["background_only_is_unlabelled"] else ()
        return segmentation_overlay(image, prediction, class_names(config, task), skip)
    if kind == "depth":
        low, high = depth_range(prediction)
        return colorize_scalar(prediction, low, high)
    return visualize_prediction(spec, prediction)  # normals, probabilities, regression over its declared range


def depth_range(depth: np.ndarray) -> tuple[float, float]:
    """(nearest, farthest) finite depth of a map, in metres; (0, 0) when nothing is finite."""
    finite = depth[np.isfinite(depth)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Legends (HTML)
# ----------------------------------------------------------------------------------------------------------------
LEGEND_CSS = """
.map-legend {font-size: 13px; line-height: 1.3; margin-top: 4px;}
.map-legend .bar {height: 12px; border-radius: 2px;}
.map-legend .ends {display: flex; justify-content: space-between; gap: 8px;}
.map-legend .sphere {display: flex; align-items: center; gap: 10px;}
.map-legend .sphere img {width: 72px; height: 72px; flex: none;}
"""


def _gradient_css() -> str:
    stops = colorize_scalar(np.linspace(0.0, 1.0, 9), 0.0, 1.0)
    return "linear-gradient(to right, " + ", ".join(_hex(color) for color in stops) + ")"


def colorbar_legend(low: str, high: str, what: str) -> str:
    """A colour bar of the scalar colour map with text labels at both ends and what the colours measure."""
    return (
        f'<div class="map-legend"><div class="bar" style="background: {_gradient_css()}"></div>'
        f'<div class="ends"><span>{html.escape(low)}</span><span>{html.escape(what)}</span>'
        f"<span>{html.escape(high)}</span></div></div>"
    )


def orientation_sphere(size: int = SPHERE_SIZE) -> np.ndarray:
    """RGBA uint8 (size, size, 4): a sphere coloured by its own surface normals (x right, y up, z towards the
    viewer), transparent outside; a surface in a normals map faces where the sphere has the same colour."""
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x, y = np.meshgrid(centres, -centres)
    inside = x**2 + y**2 <= 1.0
    z = np.sqrt(np.clip(1.0 - x**2 - y**2, 0.0, 1.0))
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = normals_to_rgb(np.stack([x, y, z]))
    rgba[..., 3] = inside * 255
    return rgba


def normals_legend() -> str:
    """The orientation sphere and how the colours encode directions."""
    buffer = io.BytesIO()
    Image.fromarray(orientation_sphere()).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        '<div class="map-legend"><div class="sphere">'
        f'<img alt="orientation sphere" src="data:image/png;base64,{data}">'
        "<span>Orientation sphere: a surface facing some direction gets the colour the sphere has where it faces "
        "that way. Red grows with x (right), green with y (up), blue with z (towards you).</span></div></div>"
    )


def task_legend(task, value_range: Optional[tuple[float, float]] = None) -> Optional[str]:
    """The HTML legend of a task's map by its kind (None for segmentation tasks: their annotated image has a class
    legend). `task` is a `TaskSpec` or a preset task's name. Depth's end labels are `value_range` (the nearest and
    farthest depth of the map, `depth_range`); a regression's are its declared range and unit."""
    spec = task if isinstance(task, TaskSpec) else preset_spec(task)
    kind = spec.kind.name
    if kind == "segmentation":
        return None
    if kind == "image_classification":
        classes = spec.parameters["num_classes"]
        return f'<div class="map-legend">the five highest of the {classes} class scores of the image</div>'
    if kind == "normals":
        return normals_legend()
    if kind == "depth":
        if value_range is None:
            return colorbar_legend("near", "far", "depth (metres, scaled per image)")
        low, high = value_range
        return colorbar_legend(f"{low:.2f} m", f"{high:.2f} m", "depth, near to far")
    if kind == "regression":
        low, high = spec.parameters["value_range"]
        unit = f" {spec.unit}" if spec.unit else ""
        channel = " (channel 0)" if spec.parameters["channels"] > 1 else ""
        return colorbar_legend(f"{low:g}{unit}", f"{high:g}{unit}", f"{spec.name}{channel}")
    what = "saliency probability" if kind == "saliency" else "boundary probability"
    return colorbar_legend("0", "1", what if spec.name in ("saliency", "edge") else f"{what} ({spec.name})")


# ----------------------------------------------------------------------------------------------------------------
# Output components
# ----------------------------------------------------------------------------------------------------------------
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
        os.utime(target)  # the cache is cleaned by file age: keep a re-served file alive
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
