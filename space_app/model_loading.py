"""Loading: which model the Space serves, what it was trained on, and the images users send it.

Nothing here knows about Gradio: the page (`app.py`) shows what these functions return and turns their ValueErrors
and `ModelUnavailable` into messages.
"""

import json
import os
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor

import modeling_taskexpert  # noqa: F401  (registers the model types with the Auto classes)
from modeling_taskexpert.file_utils import looks_like_repo_id
from modeling_taskexpert.image_processing_dense_multitask import DEFAULT_MAX_IMAGE_PIXELS, load_rgb_image
from modeling_taskexpert.loading import load_dense_model

SPACE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SPACE_DIR.parent
MODEL_ENV_VAR = "TASKEXPERT_MODEL"
# Written by `python -m space_app.bundle` into a Space repository: the model the bundle serves unless
# `TASKEXPERT_MODEL` (a Space variable) names another ({"model": folder relative to this file's folder, or Hub id}).
SETTINGS_FILE = SPACE_DIR / "space_settings.json"
# The repository's configuration of the models served when none is named (`[tool.taskexpert.space]`).
PROJECT_FILE = "pyproject.toml"
EXAMPLES_DIR = SPACE_DIR / "examples"

MAX_UPLOAD_MB = 20
# Images with more pixels are refused before decoding (the package's default cap): decoding alone would take seconds
# and gigabytes.
MAX_INPUT_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
# Images with a longer side are shrunk to it before inference (with a note on the page); the outputs are
# full-resolution maps of every task, so this bounds the time and memory of one request.
MAX_IMAGE_SIDE = 1024
SUPPORTED_FORMATS = "PNG, JPEG, WebP, BMP, TIFF or GIF"

_MODE_NAMES = {
    "1": "black-and-white", "L": "grayscale", "LA": "grayscale + alpha", "P": "palette", "PA": "palette + alpha",
    "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV", "I": "32-bit integer",
    "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale", "F": "floating-point",
}  # fmt: skip
# Dataset names (the `name` of the dataset metadata, or the dataset folder/id of the recipe) -> how to call them.
_KNOWN_DATASETS = {
    "synthetic": "the package's synthetic benchmark",
    "pascal-context": "PASCAL-Context",
    "nyud": "NYUD-v2",
}


def default_models() -> dict[str, str]:
    """`{"best_model": ..., "fallback_model": ...}`, the folders (relative to the repository root) served when no
    model is named, from `[tool.taskexpert.space]` of the repository's `pyproject.toml`; empty outside the repository
    (a deployed Space names its model with `space_settings.json` or `TASKEXPERT_MODEL`)."""
    try:
        settings = tomllib.loads((REPO_ROOT / PROJECT_FILE).read_text())["tool"]["taskexpert"]["space"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return {}
    return {key: str(settings[key]) for key in ("best_model", "fallback_model") if settings.get(key)}


def study_best_model_dir() -> Optional[str]:
    """The folder the study copies its best model to (`best_model`), None outside the repository."""
    return default_models().get("best_model")


class ModelUnavailable(Exception):
    """No model could be loaded; the message (Markdown) tells the user how to get one."""


@dataclass(frozen=True)
class TrainingData:
    """What a model was trained on, as far as its folder says (model card, else `recipe.yaml`).

    Attributes:
        name: the dataset's name (`synthetic`, `pascal-context`, `nyud`, a Hub dataset id, ...), None if unrecorded.
        synthetic: whether that is the package's synthetic benchmark (rendered scenes, not photos).
    """

    name: Optional[str]
    synthetic: bool = False

    @property
    def title(self) -> str:
        if self.name is None:
            return "unrecorded data"
        return _KNOWN_DATASETS.get(self.name, self.name)


def read_training_data(folder: Optional[Path]) -> TrainingData:
    """The training data named by a model folder: the `datasets` or `model-index` entries of its card's front matter
    (`README.md`, written by `train.py`), else the `dataset` of its `recipe.yaml`. Unreadable files count as absent."""
    names = []
    if folder is not None:
        names += _card_dataset_names(folder / "README.md")
        names += _recipe_dataset_names(folder / "recipe.yaml")
    for name in names:
        key = _dataset_key(name)
        return TrainingData(name=key, synthetic=key == "synthetic")
    return TrainingData(name=None)


def _dataset_key(name: str) -> str:
    """A dataset name, folder or id -> the package's name for it when it is one of its datasets."""
    last = name.rstrip("/").split("/")[-1].lower()
    for key in _KNOWN_DATASETS:
        if key in last:
            return key
    return name


def _card_dataset_names(card: Path) -> list[str]:
    front_matter = _front_matter(card)
    names = [str(name) for name in front_matter.get("datasets") or [] if name]
    for entry in front_matter.get("model-index") or []:
        for result in (entry or {}).get("results") or []:
            dataset = (result or {}).get("dataset") or {}
            names += [str(dataset[key]) for key in ("name", "type") if dataset.get(key)]
    return names


def _front_matter(card: Path) -> dict:
    try:
        text = card.read_text(encoding="utf-8")
        if not text.startswith("---"):
            return {}
        data = yaml.safe_load(text.split("---", 2)[1])
    except (OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _recipe_dataset_names(recipe: Path) -> list[str]:
    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    dataset = data.get("dataset") if isinstance(data, dict) else None
    return [str(dataset)] if dataset else []


@dataclass
class DemoModel:
    """A loaded model with its image processor, where it came from and what it was trained on."""

    model: torch.nn.Module
    processor: object
    source: str
    training_data: TrainingData

    @property
    def config(self):
        return self.model.config

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def canvas(self) -> tuple[int, int]:
        """(height, width) of the input canvas every image is fitted onto."""
        return self.processor.size["height"], self.processor.size["width"]

    def describe(self) -> str:
        """Markdown summary of the model: source, type, size, tasks, routing layers."""
        layers, candidates = self.config.layer_names, self.config.candidate_names
        parameters = sum(parameter.numel() for parameter in self.model.parameters())
        tasks = ", ".join(spec.title for spec in self.config.task_specs.values())
        per_layer = "/".join(str(size) for size in sorted({len(names) for names in candidates}))
        return (
            f"**Model** `{self.source}` ({self.config.model_type}, {parameters / 1e6:.2f} M parameters) · **tasks**: "
            f"{tasks} · **routing**: {len(layers)} layers of {per_layer} candidates"
        )

    def limitations(self) -> str:
        """Markdown, shown above the results: what the model was trained on and on which canvas it sees images."""
        height, width = self.canvas
        canvas = (
            f"It sees every image on a **{width}×{height} px canvas**: larger images are shrunk to fit it, smaller "
            "ones are padded (the maps are resized back to your image)."
        )
        data = self.training_data
        if data.synthetic:
            return (
                "**This model was trained on synthetic scenes only** (rendered rooms with boxes, spheres, "
                "cylinders and figures: the package's synthetic benchmark). **Real photos give meaningless maps.** "
                "For photos, load a model trained on PASCAL-Context (recipes `hub_configs/pascal-context-*.yaml`): "
                f"set `{MODEL_ENV_VAR}=<model folder or Hub id>` and restart the app. {canvas}"
            )
        if data.name is None:
            return (
                "**What this model was trained on is not recorded** (its folder has no model card or recipe), so its "
                f"maps may mean nothing for your images. {canvas}"
            )
        return f"**Trained on {data.title}.** Images unlike that data give unreliable maps. {canvas}"


def bundled_model() -> Optional[str]:
    """The model named by `space_settings.json` (a Space bundle), None without that file."""
    if not SETTINGS_FILE.is_file():
        return None
    try:
        model = json.loads(SETTINGS_FILE.read_text()).get("model")
    except (ValueError, AttributeError):
        model = None
    if not isinstance(model, str) or not model:
        raise ModelUnavailable(f'`{SETTINGS_FILE.name}` must hold {{"model": "<folder or Hub id>"}}.')
    return model


def resolve_model_source(model_path: Optional[str] = None) -> tuple[str, bool]:
    """(source, is a local folder) of the model to serve: `model_path`, else `$TASKEXPERT_MODEL`, else the model of
    a Space bundle's `space_settings.json`, else the study's best synthetic TaskExpert when `make experiments` has
    written it, else the `make train` folder.

    Relative folders are read from the repository root (from the app's folder for the bundle's setting); a name that
    is no folder there and reads as `namespace/name` is a Hub id. Raises `ModelUnavailable` when the name is neither.
    """
    explicit = model_path or os.environ.get(MODEL_ENV_VAR)
    if explicit is None and (bundled := bundled_model()) is not None:
        path = SPACE_DIR / bundled
        if path.is_dir():
            return str(path), True
        if looks_like_repo_id(bundled):
            return bundled, False
        raise ModelUnavailable(
            f"`{SETTINGS_FILE.name}` names `{bundled}`, which is neither a folder here nor a Hub id."
        )
    if explicit is None:
        configured = default_models()
        best = configured.get("best_model")
        if best is not None and (REPO_ROOT / best / "config.json").is_file():
            return str(REPO_ROOT / best), True
        fallback = configured.get("fallback_model")
        if fallback is None:
            raise ModelUnavailable(f"No model is named and none is configured here. {_how_to_get_a_model()}")
        if not (REPO_ROOT / fallback).is_dir():
            raise ModelUnavailable(f"No trained model found at `{fallback}`. {_how_to_get_a_model()}")
        return str(REPO_ROOT / fallback), True
    path = Path(explicit).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    if path.is_dir():
        return str(path), True
    if looks_like_repo_id(explicit):
        return str(explicit), False
    raise ModelUnavailable(
        f"The model folder `{explicit}` does not exist (relative folders are read from the repository root, "
        f"`{REPO_ROOT}`). {_how_to_get_a_model()}"
    )


def _how_to_get_a_model() -> str:
    configured = default_models()
    best, fallback = configured.get("best_model"), configured.get("fallback_model")
    study = f" (or `make experiments` for the study's best model in `{best}`)" if best else ""
    train = (
        f"Run `make train` to train the tiny synthetic model into `{fallback}`{study}, or set" if fallback else "Set"
    )
    return f"{train} `{MODEL_ENV_VAR}` to a model folder or a Hub model id, then restart the app."


def load_demo_model(model_path: Optional[str] = None) -> DemoModel:
    """Load the model and its processor (see `resolve_model_source` for which).

    Only the model classes of the installed package are used (`load_dense_model`: a config without a known
    `model_type` is named, never met with transformers' remote-code prompt); remote code is never trusted. Raises
    `ModelUnavailable` with instructions when nothing can be loaded.
    """
    source, local = resolve_model_source(model_path)
    if local and not (Path(source) / "config.json").is_file():
        raise ModelUnavailable(
            f"The folder `{source}` holds no model yet (no `config.json`; `make train` writes it when training ends). "
            f"{_how_to_get_a_model()}"
        )
    try:
        model = load_dense_model(source).eval()
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailable(
            f"Could not load the model `{source}`: {reason} A local folder needs `config.json`, `model.safetensors` "
            "and `preprocessor_config.json`; a Hub id needs network access (or the files in the local cache). "
            f"{_how_to_get_a_model()}"
        ) from error
    folder = Path(source) if local else _cached_hub_folder(source)
    return DemoModel(model=model, processor=processor, source=source, training_data=read_training_data(folder))


def _cached_hub_folder(repo_id: str) -> Optional[Path]:
    """The local snapshot folder of a Hub model whose config is cached (it holds the card when that was fetched)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("README.md", "config.json"):
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return Path(cached).parent
    return None


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

    The pixels come from the package's image loader (`load_rgb_image`: EXIF orientation applied, 16-bit scaled,
    transparency composited on white, grayscale replicated); images whose longer side exceeds `max_side` are then
    shrunk to it. Files that are not images, larger than `max_bytes` or with more than `max_pixels` pixels (read from
    the header, before decoding) raise a ValueError that says so in plain text (it is shown in toasts and API errors
    as well as on the page) and never names a path of the server.
    """
    notes = []
    name = "The image"
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = f"“{path.name}”"
        if not path.is_file():
            raise ValueError(f"{name} does not exist.")
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(
                f"{name} is {size / 2**20:.1f} MB; this demo accepts images up to {max_bytes / 2**20:.0f} MB."
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                header = Image.open(path)  # reads the header only
        except Image.DecompressionBombError as error:
            raise ValueError(f"{name} has too many pixels; this demo accepts up to {max_pixels:,}.") from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"{name} is not an image this demo can read; upload a {SUPPORTED_FORMATS} file."
            ) from error
        with header:
            notes = _conversion_notes(header, name, max_pixels)
    elif isinstance(source, Image.Image):
        notes = _conversion_notes(source, name, max_pixels)
    elif isinstance(source, np.ndarray):
        if source.ndim >= 2 and source.shape[0] * source.shape[1] > max_pixels:
            raise ValueError(
                f"{name} is {source.shape[1]}×{source.shape[0]} pixels; this demo accepts up to {max_pixels:,}."
            )
    else:
        raise ValueError(f"Expected an image file, a PIL image or a numpy array, got {type(source).__name__}.")
    rgb = load_rgb_image(source, name=name, max_pixels=max_pixels)
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


def _conversion_notes(image: Image.Image, name: str, max_pixels: int) -> list[str]:
    """Check an (undecoded) image's pixel count; say what converting it to 8-bit RGB will change."""
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"{name} is {width}×{height} pixels; this demo accepts up to {max_pixels:,} pixels.")
    notes = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"The image has {image.n_frames} frames; the first one is used.")
    if image.mode != "RGB":
        converted = f"Converted the {_MODE_NAMES.get(image.mode, image.mode)} image to 8-bit RGB"
        has_alpha = "A" in image.mode or (image.mode == "P" and "transparency" in image.info)
        notes.append(converted + (" (transparent areas shown on white)." if has_alpha else "."))
    return notes
