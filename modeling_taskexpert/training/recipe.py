"""Training recipes: one dataclass, loaded from YAML, overridable from the command line."""

import argparse
import dataclasses
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Optional

import yaml

from ..evaluation.boundary import BOUNDARY_MODES
from ..file_utils import looks_like_repo_id, write_text_atomic
from .loss_weighting import STRATEGIES as LOSS_WEIGHTINGS
from .schedules import SCHEDULES

OPTIMIZERS = ("adamw", "adam")
MIXED_PRECISION = ("no", "bf16", "fp16")


class RecipeError(ValueError):
    """A recipe file or override that cannot be used; the message names the field and what was expected."""


@dataclass
class TrainingRecipe:
    """Everything a training run needs. Paths are relative to the working directory.

    Model
        model_config: JSON file of the model config (`hub_configs/models/*.json`), any registered model type.
        model_overrides: fields of the model config to change (e.g. `{num_experts: 4, use_memory: false}`).
        tasks: tasks to train (default: every task of the dataset that the model type supports).
    Data
        dataset: a dataset folder in the package's schema, or a Hub dataset id.
        crop_size: training crop [height, width] (default: the dataset's `train_size`).
        num_workers: DataLoader worker processes.
        max_eval_samples: evaluate on at most this many validation samples (default: all).
    Optimisation
        optimizer: "adamw" (decoupled weight decay) or "adam" (L2 penalty, as the protocol's reference code).
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon: optimiser settings.
        warmup_steps: linear warm-up steps, then poly decay lr = base (1 - t / T)^poly_power (a warm-up not shorter
            than `max_steps` becomes a tenth of the run, with a warning).
        poly_power: the exponent of the poly decay.
        streaming: read the training split as a stream (`datasets` IterableDataset, local folder or Hub id alike;
            see `data/streaming.py`) instead of preparing it; the validation split stays map-style.
        shuffle_buffer_size: the streamed split's shuffle buffer, in samples (0: the stored order).
        lr_schedule: "poly" (the protocol's, default) or "cosine" (after the warm-up, half a cosine down to 0 at
            `max_steps`; Mod-Squad's Taskonomy recipe).
        max_steps: optimiser steps in total (T).
        per_device_train_batch_size, per_device_eval_batch_size: samples per process and step.
        gradient_accumulation_steps: micro-batches per optimiser step.
        max_grad_norm: gradient clipping by global L2 norm (0 disables).
        mixed_precision: "no", "bf16" or "fp16".
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        loss_weighting: "fixed" (the model config's `loss_weights`), "uncertainty" (learned homoscedastic
            uncertainty, Kendall et al. 2018) or "dwa" (dynamic weight average, Liu et al. 2019).
        dwa_temperature, dwa_window: DWA temperature and the number of steps over which loss ratios are averaged.
        seed: seed of the model initialisation, the data order and the augmentations.
    Evaluation, checkpoints, output
        eval_steps: evaluate every N steps (0: only at the end).
        boundary_mode: boundary scorer of the evaluations during training, "approximate" (fast; reported as
            `edge/odsF_approx`) or "exact" (the protocol's; `edge/odsF`).
        final_boundary_modes: boundary scorers of the final evaluation, whose numbers go to `metrics.json` and the model
            card: a list of "approximate" and/or "exact" (default: approximate only; the exact one, the protocol's and
            the evaluation command line's default, costs about 1-3 s per 128x128 image and tens of seconds per
            full-size image on one core). "exact" needs `pyEdgeEval`.
        boundary_workers: background processes scoring boundaries in the final evaluation (0: in the main process).
        save_steps: checkpoint every N steps (0: never).
        save_total_limit: checkpoints kept.
        logging_steps: log the training loss every N steps.
        output_dir: where checkpoints, the final model, its card, curves and metrics go.
        overwrite_output_dir: start afresh in an `output_dir` that holds another run's checkpoints or model (they
            are deleted); without it, such a folder is refused.
        resume_from_checkpoint: None, "latest", or a checkpoint folder. The checkpoint must come from the same
            recipe (its fingerprint, `recipe_sha256` of `provenance.json`, is checked).
        report_to: trackers besides the JSON-lines log: "tensorboard", "trackio" (used when installed).
        single_task_baselines: JSON of single-task metrics for the multi-task gain (Delta m).
        push_to_hub, hub_model_id, hub_private: upload the final folder to the Hub.
    """

    model_config: str = "hub_configs/models/taskexpert-tiny.json"
    model_overrides: dict = field(default_factory=dict)
    tasks: Optional[list] = None
    dataset: str = "data/synthetic"
    crop_size: Optional[list] = None
    num_workers: int = 0
    max_eval_samples: Optional[int] = None
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    poly_power: float = 0.9
    lr_schedule: str = "poly"
    streaming: bool = False
    shuffle_buffer_size: int = 1000
    max_steps: int = 1000
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 10.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    loss_weighting: str = "fixed"
    dwa_temperature: float = 2.0
    dwa_window: int = 50
    seed: int = 0
    eval_steps: int = 0
    boundary_mode: str = "approximate"
    final_boundary_modes: list = field(default_factory=lambda: ["approximate"])
    boundary_workers: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    logging_steps: int = 10
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    resume_from_checkpoint: Optional[str] = None
    report_to: list = field(default_factory=list)
    single_task_baselines: Optional[str] = None
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = False

    def validate(self) -> "TrainingRecipe":
        """Check every field now, so that a bad value fails before any training time is spent."""
        choices = {"optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES, "loss_weighting": LOSS_WEIGHTINGS, "mixed_precision": MIXED_PRECISION,
                   "boundary_mode": BOUNDARY_MODES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RecipeError(f"Recipe field `{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        if not self.final_boundary_modes or any(mode not in BOUNDARY_MODES for mode in self.final_boundary_modes):
            raise RecipeError(
                f"Recipe field `final_boundary_modes` must list one or both of {BOUNDARY_MODES}, got {self.final_boundary_modes!r}."
            )
        positive = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "logging_steps", "save_total_limit", "dwa_window")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise RecipeError(f"Recipe field `{name}` must be >= 1, got {getattr(self, name)!r}.")
        for name in (
            "eval_steps",
            "save_steps",
            "warmup_steps",
            "num_workers",
            "seed",
            "boundary_workers",
            "shuffle_buffer_size",
        ):
            if getattr(self, name) < 0:
                raise RecipeError(f"Recipe field `{name}` must be >= 0, got {getattr(self, name)!r}.")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise RecipeError(
                f"Recipe field `max_eval_samples` must be >= 1 (or null for all), got {self.max_eval_samples!r}."
            )
        # Real-valued fields: (lowest allowed, whether the lowest itself is allowed, highest exclusive or None).
        ranges = {"learning_rate": (0.0, False, None), "weight_decay": (0.0, True, None), "adam_epsilon": (0.0, False, None),
                  "adam_beta1": (0.0, True, 1.0), "adam_beta2": (0.0, True, 1.0), "poly_power": (0.0, True, None),
                  "max_grad_norm": (0.0, True, None), "dwa_temperature": (0.0, False, None)}  # fmt: skip
        for name, (low, inclusive, high) in ranges.items():
            value = getattr(self, name)
            if (
                not math.isfinite(value)
                or value < low
                or (value == low and not inclusive)
                or (high is not None and value >= high)
            ):
                bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and < {high:g}" if high is not None else "")
                raise RecipeError(f"Recipe field `{name}` must be a finite number {bound}, got {value!r}.")
        if self.seed >= 2**32:
            raise RecipeError(f"Recipe field `seed` must be < 2**32 (numpy's limit), got {self.seed}.")
        if self.warmup_steps >= self.max_steps:
            # A short smoke run (`--max_steps 2`) of a recipe with a longer warm-up: scale the warm-up to the same
            # tenth of the run instead of refusing it, and say so.
            clamped = self.max_steps // 10
            warnings.warn(
                f"`warmup_steps` ({self.warmup_steps}) is not smaller than `max_steps` ({self.max_steps}); using "
                f"{clamped} warm-up steps (a tenth of the run).",
                stacklevel=2,
            )
            self.warmup_steps = clamped
        if self.crop_size is not None and (
            len(self.crop_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.crop_size)
        ):
            raise RecipeError(f"`crop_size` must be [height, width] in pixels (integers >= 1), got {self.crop_size!r}.")
        if self.tasks is not None and (not self.tasks or not all(isinstance(t, str) for t in self.tasks)):
            raise RecipeError(f"`tasks` must be a non-empty list of task names (or null for all), got {self.tasks!r}.")
        if not all(isinstance(t, str) for t in self.report_to):
            raise RecipeError(f"`report_to` must be a list of tracker names, got {self.report_to!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise RecipeError("`push_to_hub` needs `hub_model_id` (e.g. user/taskexpert-pascal).")
        if not Path(self.model_config).is_file():
            raise RecipeError(f"Recipe field `model_config`: no such file {self.model_config!r}.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(TrainingRecipe)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a value against the recipe field's type; strings from the command line are parsed as YAML."""
    fields = _field_types()
    if name not in fields:
        raise RecipeError(f"Unknown recipe field {name!r} in {source}. Valid fields: {', '.join(sorted(fields))}.")
    default = (
        fields[name].default if fields[name].default is not dataclasses.MISSING else fields[name].default_factory()
    )
    if isinstance(value, str) and not isinstance(default, str) and not (default is None and name in _STRING_OR_NONE):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise RecipeError(f"Recipe field `{name}` in {source}: cannot parse {value!r} ({error}).") from None
    if value is None:
        return None
    expected = type(default) if default is not None else _OPTIONAL_TYPES.get(name, str)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; Python's float() reads it as every user means it.
        try:
            value = float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise RecipeError(
            f"Recipe field `{name}` in {source} must be of type {expected.__name__}, got {type(value).__name__} ({value!r})."
        )
    return value


# Fields of the previous release under their new names (one name per concept: "boundary" for the task kind and its
# scorers). The old names are read, with a warning, for one release; then they will be refused.
RENAMED_FIELDS = {
    "edge_mode": "boundary_mode",
    "final_edge_modes": "final_boundary_modes",
    "edge_workers": "boundary_workers",
}


def current_field_name(name: str, source: str, given: Iterable[str] = ()) -> str:
    """The field's current name; an earlier name is accepted with a FutureWarning (given together with the current
    name in one place: refused)."""
    if name not in RENAMED_FIELDS:
        return name
    new = RENAMED_FIELDS[name]
    if new in given:
        raise RecipeError(f"{source} gives both `{name}` (the earlier name) and `{new}`; keep `{new}` only.")
    warnings.warn(
        f"Recipe field `{name}` in {source} is now called `{new}` (same values); the old name is read until the next "
        "release. Rename it.",
        FutureWarning,
        stacklevel=3,
    )
    return new


_STRING_OR_NONE = {"resume_from_checkpoint", "single_task_baselines", "hub_model_id"}
_OPTIONAL_TYPES = {"tasks": list, "crop_size": list, "max_eval_samples": int}


def _read_recipe_file(path: Path, seen: tuple = ()) -> dict[str, Any]:
    """Fields of a YAML recipe. A `base: other.yaml` key (relative to the file) inherits that recipe's fields;
    `model_overrides` mappings are merged, every other field is replaced."""
    if path.resolve() in seen:
        raise RecipeError(f"Recipe {path} inherits from itself through `base`.")
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"Recipe file not found: {path}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"Recipe file {path} is not valid YAML: {error}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"Recipe file {path} must hold a mapping of field: value, got {type(loaded).__name__}.")
    values: dict[str, Any] = {}
    base = loaded.pop("base", None)
    if base is not None:
        values = _read_recipe_file(path.parent / str(base), seen + (path.resolve(),))
    for key, value in loaded.items():
        key = current_field_name(key, str(path), loaded)
        value = _coerce(key, value, str(path))
        if key == "model_overrides" and isinstance(value, dict):
            value = {**values.get("model_overrides", {}), **value}
        values[key] = value
    return values


def load_recipe(path: Optional[str], overrides: Optional[dict] = None) -> TrainingRecipe:
    """Read a YAML recipe (or start from the defaults) and apply overrides; validate everything."""
    values: dict[str, Any] = _read_recipe_file(Path(path)) if path is not None else {}
    for key, value in (overrides or {}).items():
        key = current_field_name(key, "the command line", overrides)
        value = _coerce(key, value, "the command line")
        if key == "model_overrides" and isinstance(value, dict):
            value = {**values.get("model_overrides", {}), **value}
        values[key] = value
    return TrainingRecipe(**values).validate()


def field_help() -> dict[str, str]:
    """The documentation of every recipe field, from the `TrainingRecipe` docstring (a line `name[, name]: text`
    and its continuation lines)."""
    helps, current = {}, []
    for line in (TrainingRecipe.__doc__ or "").splitlines():
        stripped = line.strip()
        names, _, text = stripped.partition(": ")
        candidates = [name.strip() for name in names.split(",")] if text else []
        if (
            line.startswith(" " * 8)
            and not line.startswith(" " * 9)
            and candidates
            and all(name.isidentifier() for name in candidates)
        ):
            current = candidates
            for name in current:
                helps[name] = text
        elif line.startswith(" " * 12) and current:
            for name in current:
                helps[name] += " " + stripped
        else:
            current = []
    return helps


def build_parser() -> argparse.ArgumentParser:
    """The command line: `--config FILE` and one `--field value` option per recipe field, generated from the
    dataclass (type, default and documentation in `--help`). Values are parsed as YAML (`--tasks '[semseg, depth]'`)."""
    parser = argparse.ArgumentParser(
        description="Train a dense multi-task model. Any recipe field can be given as --field value; a bare flag "
        "means true (--push_to_hub).",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", default=None, help="YAML recipe (see hub_configs/); fields below override it")
    helps = field_help()
    for name, spec in _field_types().items():
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        kind = type(default).__name__ if default is not None else _OPTIONAL_TYPES.get(name, str).__name__
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(
            *flags, dest=name, nargs="?", const="true", metavar=kind.upper(),
            help=f"{helps.get(name, '')} (default: {default!r})".strip(),
        )  # fmt: skip
    return parser


def parse_command_line(argv: Optional[list[str]] = None) -> TrainingRecipe:
    """`--config FILE` plus any `--field value` (or `--field=value`) override."""
    parser = build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    argv, joined = list(sys.argv[1:] if argv is None else argv), []
    for index, token in enumerate(argv):  # `--field -1e-4`: a value that argparse would take for an option
        previous = argv[index - 1] if index else ""
        if previous in flags and token.startswith("-") and not token.startswith("--") and joined:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    known, rest = parser.parse_known_args(joined)
    overrides = {name: value for name, value in vars(known).items() if name != "config"}
    index = 0
    while index < len(rest):
        token = rest[index]
        if not token.startswith("--"):
            raise RecipeError(f"Unexpected argument {token!r}; overrides are written --field value.")
        name = token[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            index += 1
        elif index + 1 < len(rest) and not rest[index + 1].startswith("--"):
            value = rest[index + 1]
            index += 2
        else:
            value = "true"  # a bare flag, e.g. --push_to_hub
            index += 1
        overrides[name.replace("-", "_")] = value
    return load_recipe(known.config, overrides)


# Fields that describe this machine's run rather than the recipe: left out of the `recipe.yaml` that goes to the Hub.
LOCAL_FIELDS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_private", "report_to",
                "num_workers", "boundary_workers")  # fmt: skip
PATH_FIELDS = ("model_config", "dataset", "single_task_baselines")


def _portable_path(value: Optional[str]) -> Optional[str]:
    """A path as it can be published: Hub ids and relative paths as they are, an absolute path relative to the
    working directory when it lies below it, else only its last component (never a folder of this machine)."""
    if value is None or looks_like_repo_id(value):
        return value
    path = Path(value)
    if not path.is_absolute():
        return value if ".." not in path.parts else path.name
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


def hub_recipe(recipe: TrainingRecipe) -> dict:
    """The recipe as published with the model (`recipe.yaml`, the card): without this machine's run settings and
    without absolute paths."""
    values = {name: value for name, value in recipe.to_dict().items() if name not in LOCAL_FIELDS}
    for name in PATH_FIELDS:
        values[name] = _portable_path(values.get(name))
    return json.loads(json.dumps(values))


def dump_recipe(recipe: TrainingRecipe, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(hub_recipe(recipe), sort_keys=False))
