"""What every model config of this package shares: `DenseMultiTaskConfig`, the base class holding the task and head
fields with their defaults and validation, and the type and range checks of fields.

Each check raises a ValueError that names the field, what was expected and what was given, so that a hand-edited
`config.json` (`"use_memory": "yes"`, `"mmoe_layers": 2`, `"num_experts": "8"`, a NaN loss weight) is refused when the
config is built, before any module is, instead of failing deep inside the model or training silently wrong. A config
applies them in `validate_architecture`, called at the end of `__init__`.
"""

import math
from collections.abc import Iterable
from typing import Any, Optional

from transformers import PretrainedConfig

from .task_definitions import (
    PRESET_CLASS_NAMES,
    PRESET_TASKS,
    PROTOCOL_LOSS_WEIGHTS,
    TaskSpec,
    check_task_name,
    make_task_spec,
    task_specs_of,
)

DEFAULT_TASKS = ["semseg", "human_parts", "saliency", "normals", "edge"]
# Options of the dense heads every model type shares.
HEAD_CHOICES = {"head_norm": ("group", "batch", "none"), "depth_activation": ("none", "softplus", "exp")}


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def is_integer(value: Any) -> bool:
    """An int that is not a bool (JSON `true` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{field}` must be true or false, got {_shown(value)}.")


def check_int(
    field: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None, allow_none: bool = False
) -> None:
    """An integer in [minimum, maximum] (bounds optional), or None when `allow_none`."""
    if value is None and allow_none:
        return
    in_range = is_integer(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not in_range:
        if minimum == 1 and maximum is None:
            expected = "a positive integer"
        elif maximum is None:
            expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        else:
            expected = f"an integer in {minimum if minimum is not None else '-inf'}..{maximum}"
        raise ValueError(f"`{field}` must be {expected}{' or null' if allow_none else ''}, got {_shown(value)}.")


def check_number(
    field: str,
    value: Any,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    *,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
) -> None:
    """A finite real number (not a string, not a bool, not NaN or inf) within the given bounds."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"`{field}` must be a finite number, got {_shown(value)}.")
    low_ok = minimum is None or (value > minimum if min_exclusive else value >= minimum)
    high_ok = maximum is None or (value < maximum if max_exclusive else value <= maximum)
    if not (low_ok and high_ok):
        low = "(-inf" if minimum is None else f"{'(' if min_exclusive else '['}{minimum}"
        high = "inf)" if maximum is None else f"{maximum}{')' if max_exclusive else ']'}"
        raise ValueError(f"`{field}` must be in {low}, {high}, got {value!r}.")


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{field}` must be one of {choices}, got {_shown(value)}.")


def check_optional_str(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{field}` must be a string or null, got {_shown(value)}.")


def check_int_list(
    field: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None, allow_none: bool = False
) -> None:
    """A list (or tuple) of integers in [minimum, maximum]; a bare number is refused (`mmoe_layers: 2`)."""
    if value is None and allow_none:
        return
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"`{field}` must be a list of integers{' or null' if allow_none else ''}, got {_shown(value)}."
        )
    for entry in value:
        if not is_integer(entry):
            raise ValueError(f"`{field}` must be a list of integers; entry {_shown(entry)} is not one.")
        if (minimum is not None and entry < minimum) or (maximum is not None and entry > maximum):
            raise ValueError(
                f"`{field}` entry {entry!r} is out of range: expected {minimum if minimum is not None else '-inf'}.."
                f"{maximum if maximum is not None else 'inf'}."
            )


def as_list(value: Any) -> Any:
    """`list(value)` for a list or tuple; anything else unchanged, so that the field's check can name it (list(2)
    would fail with a bare TypeError, list("ab") would split a string into letters)."""
    return list(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------------------------------
# Task fields
# ---------------------------------------------------------------------------------------------------------------------
def resolve_task_settings(tasks: Any, task_id2label: Any, loss_weights: Any, task_kinds: Any = None) -> tuple:
    """The task fields of a model config with their defaults filled in: `tasks` (the five PASCAL-Context tasks),
    `task_kinds` (every task's declaration `{"kind": ..., parameter: value}`; presets for the protocol's task names),
    `task_id2label` (PASCAL names for the preset segmentation tasks present; integer ids, as JSON turns them into
    strings) and `loss_weights` (the protocol's weights for its tasks, 1 for others, overridden by the given ones).
    Validation comes later, in `validate_task_settings`: a value of the wrong type is kept as given so that it is
    named there."""
    tasks = DEFAULT_TASKS if tasks is None else as_list(tasks)
    task_names = tasks if isinstance(tasks, list) and all(isinstance(t, str) for t in tasks) else []
    if task_kinds is None:
        task_kinds = {}
    if isinstance(task_kinds, dict):
        resolved = {}
        for task in task_names:
            declared = task_kinds.get(task, PRESET_TASKS.get(task))  # None for an undeclared new task: named later
            resolved[task] = dict(declared) if isinstance(declared, dict) else declared
        resolved.update({task: value for task, value in task_kinds.items() if task not in resolved})
        task_kinds = resolved
    if task_id2label is None:
        task_id2label = {
            t: dict(enumerate(PRESET_CLASS_NAMES[t]))
            for t in task_names
            if t in PRESET_CLASS_NAMES and isinstance(task_kinds, dict) and task_kinds.get(t) == PRESET_TASKS[t]
        }
    if isinstance(task_id2label, dict):
        task_id2label = {task: _label_map(labels) for task, labels in task_id2label.items()}
    if loss_weights is None:
        loss_weights = {}
    if isinstance(loss_weights, dict):
        for task in loss_weights:
            check_task_name(task, where="task in `loss_weights`")
            if task not in task_names and task not in PRESET_TASKS:  # a typo, not a weight for a later subset
                raise ValueError(f"Unknown task in `loss_weights` {task!r}: the tasks are {task_names}.")
        weights = {**PROTOCOL_LOSS_WEIGHTS, **loss_weights}
        # Numbers become floats; anything else is kept for `validate_task_settings` to name.
        loss_weights = {task: _as_float(weights.get(task, 1.0)) for task in task_names}
    return tasks, task_id2label, loss_weights, task_kinds


def primary_id2label(tasks: Any, task_id2label: Any, kwargs: dict) -> None:
    """Give transformers' `id2label` a meaning: the class names of the first segmentation task, unless the config's
    own `id2label` / `num_labels` were given (as in a saved `config.json`). Every task's classes are in
    `task_id2label`; this one is for tools that read the standard field."""
    if "id2label" in kwargs or "num_labels" in kwargs or not isinstance(task_id2label, dict):
        return
    first = next((task for task in tasks or [] if isinstance(task_id2label.get(task), dict)), None)
    if first is not None:
        kwargs["id2label"] = dict(task_id2label[first])


def _label_map(labels: Any) -> Any:
    """{id: name} with integer ids ("3" from JSON -> 3) and string names; other values kept for validation."""
    if not isinstance(labels, dict):
        return labels
    return {(int(i) if isinstance(i, str) and i.lstrip("-").isdigit() else i): str(name) for i, name in labels.items()}


def _as_float(value: Any) -> Any:
    return float(value) if is_number(value) else value


def validate_task_settings(
    tasks: Any, task_id2label: Any, loss_weights: Any, boundary_positive_weight: Any, task_kinds: Any = None
) -> None:
    """The task fields every model config shares; raise a ValueError naming the field and what was expected."""
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(task, str) for task in tasks):
        raise ValueError(f"`tasks` must be a list of task names, got {tasks!r}.")
    if not tasks:
        raise ValueError("`tasks` must name at least one task.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"`tasks` has duplicates: {tasks}.")
    if not isinstance(task_id2label, dict):
        raise ValueError(f"`task_id2label` must map task names to {{id: class name}}, got {_shown(task_id2label)}.")
    for task, labels in task_id2label.items():
        if not isinstance(labels, dict) or not all(is_integer(i) for i in labels):
            raise ValueError(f"`task_id2label[{task!r}]` must map integer ids to class names, got {labels!r}.")
    task_kinds = {} if task_kinds is None else task_kinds
    if not isinstance(task_kinds, dict):
        raise ValueError(f"`task_kinds` must map task names to declarations, got {_shown(task_kinds)}.")
    for task in tasks:
        check_task_name(task, where="task in `tasks`")
        try:
            spec = make_task_spec(task, task_kinds.get(task), task_id2label.get(task))
        except ValueError as error:
            raise ValueError(f"`task_kinds` / `task_id2label`: {error}") from None
        if spec.kind.name == "segmentation" and task not in task_id2label:
            raise ValueError(f"Segmentation task {task!r} needs `task_id2label[{task!r}]` with at least 2 classes.")
    for field, values in (("task_kinds", task_kinds), ("task_id2label", task_id2label)):
        for task in values:
            if task not in tasks:
                raise ValueError(f"`{field}` names {task!r}, which is not in `tasks` {tasks}.")
    check_number("boundary_positive_weight", boundary_positive_weight, 0.0, 1.0, min_exclusive=True, max_exclusive=True)
    if not isinstance(loss_weights, dict):
        raise ValueError(f"`loss_weights` must map task names to weights, got {_shown(loss_weights)}.")
    for task, weight in loss_weights.items():
        check_number(f"loss_weights[{task!r}]", weight, minimum=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# The base config
# ---------------------------------------------------------------------------------------------------------------------
class DenseMultiTaskConfig(PretrainedConfig):
    r"""
    Base of every model config of this package: the tasks a model predicts, its light dense heads and their losses.
    A model type's config adds the fields of its trunk and extends `validate_architecture`.

    Args:
        tasks (`list[str]`, *optional*, defaults to the five PASCAL-Context tasks):
            Names of the tasks predicted by the model, in the order of its per-task weights (the order is also
            recorded in the saved weights, and a config listing the same tasks in another order is mapped by name
            when loading).
        task_id2label (`dict[str, dict[int, str]]`, *optional*):
            Class names of every segmentation task; the number of output channels of those heads is the number of
            names. Defaults to the PASCAL-Context names for the preset tasks `semseg` and `human_parts`.
        task_kinds (`dict[str, dict]`, *optional*):
            The kind and parameters of every task, `{name: {"kind": ..., parameter: value}}` (see
            `task_definitions`: `segmentation`, `saliency`, `boundary`, `normals`, `depth`, `regression`,
            `image_classification`). The protocol's task names are presets and need no entry; any other name needs
            one, e.g. `{"elevation": {"kind": "regression", "channels": 1, "value_range": [0, 50], "unit": "m"}}`.
            Filled in for every task when the config is built.
        head_hidden_size (`int`, *optional*, defaults to 256):
            Channels of the light per-task heads.
        head_norm (`str`, *optional*, defaults to `"group"`):
            Normalisation in the heads: `"group"` (batch-size independent), `"batch"` or `"none"`. *(interpretation)*
        depth_activation (`str`, *optional*, defaults to `"none"`):
            Output activation of the depth head. The protocol uses the raw output and clamps it at 0 when
            post-processing (`"none"`); `"softplus"` and `"exp"` make it positive by construction.
        loss_weights (`dict[str, float]`, *optional*):
            Weight of each task loss in the total; defaults to the benchmark protocol's weights.
        boundary_positive_weight (`float`, *optional*, defaults to 0.95):
            Weight of boundary pixels in the weighted binary cross-entropy of `boundary` tasks (non-boundary pixels
            get 1 minus it). Called `edge_positive_weight` before; a config.json with that name still loads.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of the weights.
        output_gates (`bool`, *optional*, defaults to `False`):
            Whether `forward` returns the routing report (`gates`) when its `output_gates` argument is not given.

    Every model type offers the routing report's names as two derived (not saved) attributes: `layer_names`, one
    name per routing layer, and `candidate_names`, per routing layer the names of the gate's candidates in gate order.
    """

    tasks: list[str]
    task_id2label: dict[str, dict[int, str]]
    task_kinds: dict[str, dict]
    head_hidden_size: int
    head_norm: str
    depth_activation: str
    loss_weights: dict[str, float]
    boundary_positive_weight: float
    initializer_range: float
    output_gates: bool

    def __init__(
        self,
        tasks: Optional[list[str]] = None,
        task_id2label: Optional[dict[str, dict[int, str]]] = None,
        task_kinds: Optional[dict[str, dict]] = None,
        head_hidden_size: int = 256,
        head_norm: str = "group",
        depth_activation: str = "none",
        loss_weights: Optional[dict[str, float]] = None,
        boundary_positive_weight: float = 0.95,
        initializer_range: float = 0.02,
        output_gates: bool = False,
        **kwargs,
    ):
        if "edge_positive_weight" in kwargs:  # a config.json written before the rename
            if boundary_positive_weight != 0.95:
                raise ValueError("The config gives both `edge_positive_weight` and `boundary_positive_weight`.")
            boundary_positive_weight = kwargs.pop("edge_positive_weight")
        self.tasks, self.task_id2label, self.loss_weights, self.task_kinds = resolve_task_settings(
            tasks, task_id2label, loss_weights, task_kinds
        )
        self.head_hidden_size = head_hidden_size
        self.head_norm = head_norm
        self.depth_activation = depth_activation
        self.boundary_positive_weight = boundary_positive_weight
        self.initializer_range = initializer_range
        self.output_gates = output_gates
        primary_id2label(self.tasks, self.task_id2label, kwargs)
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Check every field; raise a ValueError naming the field and what was expected. A model type's config
        checks its own fields, then calls this."""
        validate_task_settings(
            self.tasks, self.task_id2label, self.loss_weights, self.boundary_positive_weight, self.task_kinds
        )
        for field, choices in HEAD_CHOICES.items():
            check_choice(field, getattr(self, field), choices)
        check_int("head_hidden_size", self.head_hidden_size, minimum=1)
        check_bool("output_gates", self.output_gates)
        check_number("initializer_range", self.initializer_range, minimum=0.0)

    def num_labels_of(self, task: str) -> Optional[int]:
        """Number of classes of a segmentation task, None for other tasks."""
        return len(self.task_id2label[task]) if task in self.task_id2label else None

    @property
    def task_specs(self) -> dict[str, TaskSpec]:
        """Every task as a `TaskSpec` (kind, parameters, class names), in config order."""
        return task_specs_of(self)
