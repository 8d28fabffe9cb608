"""The Experts tab: the model's routing report, reduced to what the page shows and what a session keeps.

Both model types report routing the same way (`output_gates=True`): per routing layer (`config.layer_names`), per
task, the weight of each of the layer's candidates (`config.candidate_names`: TaskExpert's experts and memory,
Mod-Squad's attention or MLP experts) at every token. Nothing here depends on the model type.
"""

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from modeling_taskexpert.dense_model_utils import check_routing_report, dominant_candidates
from modeling_taskexpert.visualization_dense_multitask import label_palette
from rendering import depth_range

# Longer side of the image a session keeps for the dominant-candidate map (the gates are per token, so a larger
# base image would show no more detail).
EXPERTS_MAP_SIDE = 512


@dataclass(frozen=True)
class TokenWindow:
    """Where the image lies on one layer's token grid.

    Attributes:
        rows, cols: the [first, last) token rows and columns that cover the image (the others cover padding only).
        coverage: (rows, cols) the share of each of those tokens that the image covers.
        box: (top, left, height, width) of the image on those tokens, in tokens.
    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    coverage: np.ndarray
    box: tuple[float, float, float, float]


def token_window(grid: tuple[int, int], canvas, resized, offset) -> TokenWindow:
    """The `TokenWindow` of an image of size `resized` at `offset` on a `canvas` seen as a `grid` of tokens."""
    token_h, token_w = canvas[0] / grid[0], canvas[1] / grid[1]
    top, left = offset[0] / token_h, offset[1] / token_w
    height, width = resized[0] / token_h, resized[1] / token_w
    rows = (int(np.floor(top)), int(np.ceil(top + height)))
    cols = (int(np.floor(left)), int(np.ceil(left + width)))
    row_cover = _overlap(np.arange(*rows), top, top + height)
    col_cover = _overlap(np.arange(*cols), left, left + width)
    coverage = np.outer(row_cover, col_cover).astype(np.float32)
    return TokenWindow(rows, cols, coverage, (top - rows[0], left - cols[0], height, width))


def _overlap(cells: np.ndarray, start: float, stop: float) -> np.ndarray:
    """Length of [cell, cell + 1) inside [start, stop), per cell."""
    return np.clip(np.minimum(cells + 1, stop) - np.maximum(cells, start), 0.0, 1.0)


@dataclass
class RoutingView:
    """The routing report of one image, kept for the tokens that cover it.

    Attributes:
        layer_names: one name per routing layer, in network order (`config.layer_names`).
        candidate_names: per layer, the names of its candidates in gate order (`config.candidate_names`).
        tasks: the tasks routed.
        gates: per task, per layer, the gate weights (h, w, K_l) of the tokens that cover the image, float32.
        windows: per layer, where the image lies on those tokens.
    """

    layer_names: list[str]
    candidate_names: list[list[str]]
    tasks: list[str]
    gates: dict[str, list[np.ndarray]]
    windows: list[TokenWindow]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def nbytes(self) -> int:
        return sum(window.coverage.nbytes for window in self.windows) + sum(
            layer.nbytes for layers in self.gates.values() for layer in layers
        )

    def mean_weights(self, task: str, layer: int) -> np.ndarray:
        """(K_l,): each candidate's mean gate weight over the image's pixels, each token weighted by the share of it
        the image covers (the canvas padding is left out, unlike a plain mean over the token grid)."""
        weights = self.windows[layer].coverage[..., None]
        return (self.gates[task][layer].astype(np.float64) * weights).sum(axis=(0, 1)) / weights.sum()

    def dominant_map(self, task: str, layer: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 for an image drawn at `size`: the index of the candidate with the largest gate weight
        (`dense_model_utils.dominant_candidates`) at the token under each pixel."""
        dominant = dominant_candidates(torch.from_numpy(self.gates[task][layer])[None])[0].numpy().astype(np.uint8)
        top, left, height, width = self.windows[layer].box
        rows = _token_index(size[0], top, height, dominant.shape[0])
        cols = _token_index(size[1], left, width, dominant.shape[1])
        return dominant[rows[:, None], cols[None, :]]


def _token_index(pixels: int, start: float, extent: float, tokens: int) -> np.ndarray:
    """The token under the centre of each of `pixels` pixels spread over [start, start + extent) tokens."""
    centres = start + (np.arange(pixels) + 0.5) * (extent / pixels)
    return np.clip(np.floor(centres).astype(np.int64), 0, tokens - 1)


def routing_view(config, gates, tasks: list[str], canvas, resized, offset) -> RoutingView:
    """The routing report of a forward on one image (`gates`, batch of one) -> its `RoutingView`.

    `canvas`, `resized` and `offset` are the processor's canvas (h, w), the image's size on it and its top-left
    corner there (`processor.geometry`).
    """
    layer_names, candidate_names = list(config.layer_names), [list(names) for names in config.candidate_names]
    check_routing_report(gates, layer_names, candidate_names)
    windows = [token_window(tuple(next(iter(layer.values())).shape[1:3]), canvas, resized, offset) for layer in gates]
    view_gates = {
        task: [
            np.ascontiguousarray(layer[task][0].float().cpu().numpy()[slice(*window.rows), slice(*window.cols)])
            for layer, window in zip(gates, windows)
        ]
        for task in tasks
    }
    return RoutingView(layer_names, candidate_names, list(tasks), view_gates, windows)


@dataclass
class ExpertsState:
    """What one session keeps between a run and the Experts tab's controls: the image reduced to at most
    `EXPERTS_MAP_SIDE` px and stored as JPEG, the gates of its tokens and the depth range (tens to hundreds of
    kilobytes whatever the image size; never the task maps)."""

    image_jpeg: bytes
    routing: RoutingView
    depth_range: Optional[tuple[float, float]] = None

    @classmethod
    def from_prediction(
        cls, image: np.ndarray, routing: RoutingView, depth: Optional[np.ndarray] = None
    ) -> "ExpertsState":
        picture = Image.fromarray(image)
        scale = EXPERTS_MAP_SIDE / max(picture.size)
        if scale < 1.0:
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        return cls(buffer.getvalue(), routing, None if depth is None else depth_range(depth))

    @property
    def image(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.image_jpeg)).convert("RGB"))

    @property
    def nbytes(self) -> int:
        return len(self.image_jpeg) + self.routing.nbytes


def _hex(color) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color))


def candidate_color_map(names: list[str]) -> dict[str, str]:
    """Legend colours of routing candidates: entries 1.. of the label palette (entry 0 is black)."""
    return {name: _hex(color) for name, color in zip(names, label_palette(len(names) + 1)[1:])}


def all_candidate_names(routing: RoutingView) -> list[str]:
    """Every candidate name of every layer, once, in order of first appearance (the colours follow this order)."""
    return list(dict.fromkeys(name for names in routing.candidate_names for name in names))


def dominant_overlay(state: ExpertsState, task: str, layer: int, opacity: float):
    """(image, [(mask, candidate name)]) for an annotated image: where each candidate has the largest weight."""
    names = state.routing.candidate_names[layer]
    image = state.image
    dominant = state.routing.dominant_map(task, layer, image.shape[:2])
    return image, [((dominant == k) * opacity, name) for k, name in enumerate(names) if (dominant == k).any()]


def dominant_label(routing: RoutingView, task_title: str, layer: int) -> str:
    """Title of the dominant-candidate map."""
    return f"Dominant candidate: {task_title}, {routing.layer_names[layer]}"


def candidates_note(routing: RoutingView, layer: int) -> str:
    """The sentence above the map: which candidates it compares (the memory too, when the layer has one)."""
    names = routing.candidate_names[layer]
    return (
        f"The map shows, at each pixel, which of the {len(names)} candidates of {routing.layer_names[layer]} has the "
        f"largest gate weight: {', '.join(names)}."
    )


def plot_routing(routing: RoutingView, task: str, layer: int, task_titles: Optional[dict] = None) -> Figure:
    """Left: for `task`, each candidate's mean gate weight per layer (stacked bars). Right: at `layer`, the mean
    weight of every candidate for every task (a heat map; rows are tasks)."""
    titles = task_titles or {}
    colors = candidate_color_map(all_candidate_names(routing))
    num_layers = routing.num_layers
    figure = Figure(figsize=(9.0, 1.8 + 0.55 * max(num_layers, len(routing.tasks))), layout="constrained")
    bars, heat = figure.subplots(1, 2)
    rows = np.arange(num_layers)[::-1]
    shown = set()
    for row, each_layer in zip(rows, range(num_layers)):
        left = 0.0
        for name, weight in zip(routing.candidate_names[each_layer], routing.mean_weights(task, each_layer)):
            label = None if name in shown else name
            shown.add(name)
            bars.barh(row, weight, left=left, color=colors[name], label=label, edgecolor="white", height=0.7)
            left += weight
    bars.set_yticks(rows, routing.layer_names)
    bars.set_xlim(0, 1)
    bars.set_xlabel("mean gate weight over the image")
    bars.set_title(f"{titles.get(task, task)}, per layer", fontsize=10)
    bars.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(len(shown), 5), fontsize=8, frameon=False)

    names = routing.candidate_names[layer]
    table = np.stack([routing.mean_weights(other, layer) for other in routing.tasks])
    image = heat.imshow(table, vmin=0.0, vmax=max(float(table.max()), 1e-6), cmap="viridis", aspect="auto")
    heat.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=8)
    heat.set_yticks(np.arange(len(routing.tasks)), [titles.get(t, t) for t in routing.tasks], fontsize=8)
    heat.set_title(f"Every task\n{routing.layer_names[layer]}", fontsize=10)
    figure.colorbar(image, ax=heat, shrink=0.8)
    return figure
