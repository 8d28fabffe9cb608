"""What every dense multi-task model type of this package (TaskExpert, Mod-Squad) shares: the base class
`DenseMultiTaskPreTrainedModel` (class attributes, generic initialisation, task selection, decoding and losses), the
input check, the depth output activation, the routing-report helpers, safetensors-only loading, and writing the
pipeline code beside a remote-code checkpoint."""

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple, logging

from .dense_heads import DenseTaskHead, ImageLevelHead
from .dense_losses import dense_task_losses
from .loss_weighting import LossWeighting, weighted_sum
from .task_definitions import PIPELINE_TASK

logger = logging.get_logger(__name__)

# The pipeline's remote code, copied beside the weights by `save_pretrained`. It is not imported here because it
# needs PIL, which a transformers + torch environment may lack.
PIPELINE_FILES = ("pipeline_dense_multitask.py", "visualization_dense_multitask.py")
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {
        "impl": "pipeline_dense_multitask.MultiTaskDensePredictionPipeline",
        "pt": ["AutoModel"],
        "type": "image",
    }
}


def resolve_tasks(model_tasks: list[str], tasks: Optional[list[str]]) -> list[str]:
    """The requested `tasks` in the model's order (all of `model_tasks` for None); a clear error for names the model
    does not predict."""
    if tasks is None:
        return list(model_tasks)
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [task for task in tasks if task not in model_tasks]
    if unknown or not tasks:
        raise ValueError(f"Unknown task(s) {unknown or tasks}; this model predicts {list(model_tasks)}.")
    return [task for task in model_tasks if task in tasks]


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int, patch_size: int) -> None:
    """Raise a ValueError unless `pixel_values` is a float (B, num_channels, H, W) tensor with H and W positive
    multiples of `patch_size`."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}.")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must have {num_channels} channels (RGB), got shape {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a float tensor (normalised image), got {pixel_values.dtype}.")
    height, width = pixel_values.shape[-2:]
    if height % patch_size or width % patch_size or height < patch_size or width < patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not a positive multiple of the patch size {patch_size}; pad or resize it "
            f"(DenseMultiTaskImageProcessor does this)."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Routing report: `gates` of a forward with `output_gates=True`, read with `config.layer_names` and
# `config.candidate_names`. One entry per routing layer (network order), each a dict task -> (batch, h, w, K_l) weights
# of the layer's K_l candidates per token ((batch, 1, 1, K_l) for image-level gates; 0 for candidates a sparse router
# did not select). Everything that displays or tabulates routing reads it through these helpers.
# ---------------------------------------------------------------------------------------------------------------------
Gates = tuple[dict[str, torch.Tensor], ...]


def check_routing_report(gates: Gates, layer_names: list[str], candidate_names: list[list[str]]) -> None:
    """Raise a ValueError unless `gates` has one entry per name of `layer_names` and every entry's last dimension
    matches that layer's `candidate_names`."""
    if len(gates) != len(layer_names) or len(candidate_names) != len(layer_names):
        raise ValueError(
            f"The routing report has {len(gates)} layers of gates, {len(layer_names)} layer names and "
            f"{len(candidate_names)} candidate lists; they must agree."
        )
    for name, layer, candidates in zip(layer_names, gates, candidate_names):
        for task, weights in layer.items():
            if weights.dim() != 4 or weights.shape[-1] != len(candidates):
                raise ValueError(
                    f"gates of layer {name!r}, task {task!r} have shape {tuple(weights.shape)}; expected "
                    f"(batch, h, w, {len(candidates)}) for the candidates {candidates}."
                )


def _reduce(per_token: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Mean over the token grid (and the batch unless `per_sample`) of (batch, h, w, K) values."""
    return per_token.float().mean(dim=(1, 2) if per_sample else (0, 1, 2))


def mean_candidate_weights(gates: Gates, per_sample: bool = False) -> dict[str, list[torch.Tensor]]:
    """Per task, per layer: the mean weight of every candidate over tokens and images, (K_l,) (or (batch, K_l) with
    `per_sample`). For gates that sum to 1 per token each vector sums to 1."""
    tasks = list(gates[0]) if gates else []
    return {task: [_reduce(layer[task], per_sample) for layer in gates] for task in tasks}


def selection_shares(gates: Gates, per_sample: bool = False) -> dict[str, list[torch.Tensor]]:
    """Per task, per layer: each candidate's share of the selections, a selection being a (token, candidate) pair
    with a positive weight; (K_l,) summing to 1 (or (batch, K_l)). For a sparse top-k router this is the fraction of
    the task's token slots routed to each expert; dense gates select every candidate, so the shares are uniform."""
    shares = {}
    for task in list(gates[0]) if gates else []:
        per_layer = []
        for layer in gates:
            selected = (layer[task] > 0).float()
            counts = selected.sum(dim=(1, 2) if per_sample else (0, 1, 2))
            per_layer.append(counts / counts.sum(dim=-1, keepdim=True).clamp_min(1))
        shares[task] = per_layer
    return shares


def dominant_candidates(layer_gates: torch.Tensor, exclude: tuple[int, ...] = ()) -> torch.Tensor:
    """(batch, h, w, K) gates of one layer and task -> (batch, h, w) int64 index of the candidate with the largest
    weight per token (the first on ties), leaving out the candidate indices in `exclude` (negative ones count from
    the end: `exclude=(-1,)` leaves out TaskExpert's memory)."""
    weights = layer_gates.float()
    if exclude:
        num_candidates = weights.shape[-1]
        if any(not -num_candidates <= index < num_candidates for index in exclude):
            raise ValueError(f"exclude={exclude} names a candidate outside 0..{num_candidates - 1}.")
        left_out = sorted({index % num_candidates for index in exclude})
        if len(left_out) == num_candidates:
            raise ValueError(f"exclude={exclude} leaves none of the {num_candidates} candidates.")
        mask = torch.zeros(num_candidates, dtype=torch.bool, device=weights.device)
        mask[left_out] = True
        weights = weights.masked_fill(mask, float("-inf"))
    return weights.argmax(dim=-1)


def top_candidate_shares(
    gates: Gates, exclude: tuple[int, ...] = (), per_sample: bool = False
) -> dict[str, list[torch.Tensor]]:
    """Per task, per layer: the fraction of tokens whose dominant candidate (see `dominant_candidates`) is each
    candidate; (K_l,) summing to 1 (or (batch, K_l)). Excluded candidates get 0."""
    shares = {}
    for task in list(gates[0]) if gates else []:
        per_layer = []
        for layer in gates:
            weights = layer[task]
            one_hot = F.one_hot(dominant_candidates(weights, exclude), weights.shape[-1]).float()
            per_layer.append(_reduce(one_hot, per_sample))
        shares[task] = per_layer
    return shares


def routing_summary(gates: Gates, layer_names: list[str], candidate_names: list[list[str]]) -> dict:
    """A JSON-ready table of the routing of one batch: `{"layers": [...], "candidates": [[...], ...], "tasks": {task:
    {"mean_weight": [[...] per layer], "selection_share": [...], "top_share": [...]}}}` (see the helpers above)."""
    check_routing_report(gates, layer_names, candidate_names)
    statistics = {
        "mean_weight": mean_candidate_weights(gates),
        "selection_share": selection_shares(gates),
        "top_share": top_candidate_shares(gates),
    }
    tasks = list(gates[0]) if gates else []
    return {
        "layers": list(layer_names),
        "candidates": [list(names) for names in candidate_names],
        "tasks": {
            task: {key: [values.tolist() for values in per_task[task]] for key, per_task in statistics.items()}
            for task in tasks
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# The task order, recorded with the weights: per-task parameters are stacked by position in `config.tasks`.
# ---------------------------------------------------------------------------------------------------------------------
TASK_ORDER_METADATA_KEY = "dense_multitask_tasks"
_WEIGHTS_NAME, _WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


def _weights_files(folder: Path) -> list[Path]:
    index = folder / _WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / shard for shard in shards]
    return [folder / _WEIGHTS_NAME] if (folder / _WEIGHTS_NAME).is_file() else []


def add_safetensors_metadata(path, metadata: dict[str, str]) -> None:
    """Add string entries to the `__metadata__` of a safetensors file's header, rewriting the file through a
    temporary copy (the tensor bytes are streamed, never held in memory) that replaces it atomically."""
    path = Path(path)
    with open(path, "rb") as source:
        header_size = int.from_bytes(source.read(8), "little")
        header = json.loads(source.read(header_size))
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep the tensor data 8-byte aligned, as safetensors writes it
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as target:
                target.write(len(encoded).to_bytes(8, "little"))
                target.write(encoded)
                shutil.copyfileobj(source, target, 16 * 1024 * 1024)
            os.chmod(temporary, path.stat().st_mode & 0o777)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def record_task_order(folder, tasks) -> None:
    """Write `tasks` (the order of the per-task weights) into the header of every weights file of `folder`."""
    for path in _weights_files(Path(folder)):
        add_safetensors_metadata(path, {TASK_ORDER_METADATA_KEY: json.dumps(list(tasks))})


def read_task_order(source: str, hub_kwargs: Optional[dict] = None) -> Optional[list[str]]:
    """The task order recorded in the weights of a local folder or (cached) Hub repository; None when none is
    recorded (weights saved before it was) or the file cannot be found."""
    from safetensors import safe_open

    hub_kwargs = hub_kwargs or {}
    folder = Path(source) / (hub_kwargs.get("subfolder") or "")
    files = _weights_files(folder) if folder.is_dir() else []
    if not files and not folder.is_dir():
        from transformers.utils import cached_file

        options = {key: hub_kwargs[key] for key in ("cache_dir", "revision", "token", "subfolder") if key in hub_kwargs}
        for name in (_WEIGHTS_NAME, _WEIGHTS_INDEX_NAME):
            resolved = cached_file(
                source, name, local_files_only=True, _raise_exceptions_for_missing_entries=False, **options
            )
            if resolved is not None:
                files = _weights_files(Path(resolved).parent)
                break
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as weights:
        recorded = (weights.metadata() or {}).get(TASK_ORDER_METADATA_KEY)
    return None if recorded is None else list(json.loads(recorded))


class RemotePipelineSaveMixin:
    """Mixin for `PreTrainedModel` subclasses: when the class is registered for remote code, `save_pretrained` also
    declares and copies the pipeline so that `pipeline(..., trust_remote_code=True)` works from the saved folder."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        pipeline_files = self._pipeline_files() if self._auto_class is not None else {}
        if pipeline_files:
            self.config.custom_pipelines = CUSTOM_PIPELINES
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            record_task_order(save_directory, self.config.tasks)
        for name, source in pipeline_files.items():
            shutil.copyfile(source, Path(save_directory) / name)

    def _pipeline_files(self) -> dict[str, Path]:
        """Where the pipeline's files are: beside this module (the package, or a remote-code module folder that has
        them), else in the folder or Hub repository the model was loaded from (a model loaded through remote code:
        transformers copies only the files the model imports, and the pipeline is not one). Empty, with a warning,
        when they cannot be found: the saved folder then declares no pipeline rather than one it cannot run."""
        here = Path(__file__).parent
        if all((here / name).is_file() for name in PIPELINE_FILES):
            return {name: here / name for name in PIPELINE_FILES}
        origin = str(getattr(self, "name_or_path", "") or "")
        found = {}
        for name in PIPELINE_FILES:
            if origin and Path(origin, name).is_file():
                found[name] = Path(origin, name)
                continue
            try:
                from transformers.utils import cached_file

                resolved = cached_file(origin, name, _raise_exceptions_for_missing_entries=False) if origin else None
            except (OSError, ValueError):
                resolved = None
            if resolved is not None:
                found[name] = Path(resolved)
        if len(found) != len(PIPELINE_FILES):
            logger.warning(
                f"The pipeline files {list(PIPELINE_FILES)} were not found beside the model code or in {origin!r}; "
                "the saved folder will not declare the multi-task-dense-prediction pipeline."
            )
            return {}
        return found


def _other_tasks_message(source: str, tasks: list, recorded: list) -> str:
    return (
        f"The config of {source} names the tasks {tasks}, but its weights were saved for {recorded}. Use the config "
        "saved with the weights, or pass allow_missing_weights=True (and ignore_mismatched_sizes=True when the task "
        "count differs) to start new task heads."
    )


def check_model_folder(source) -> None:
    """Refuse, saying so, a model source that names a local folder which does not exist: an absolute or relative path
    (`/x`, `./x`, `~/x`), one of more than two parts, or one whose first part is an existing local folder (transformers
    would call it a malformed repository id). Anything else may be a Hub id (`namespace/name`)."""
    text = str(source)
    if Path(text).expanduser().exists():
        return
    parts = text.split("/")
    if text.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir()):
        raise OSError(f"The model folder {text} does not exist (a Hub model id has the form 'namespace/name').")


class OfflinePushMixin:
    """Mixin for `PreTrainedModel` subclasses: `push_to_hub` in offline mode fails at once with a plain message
    instead of a network error from deep inside the upload."""

    def push_to_hub(self, *args, **kwargs):
        from huggingface_hub import is_offline_mode

        if is_offline_mode():
            raise ConnectionError(
                "Cannot push to the Hub: the Hub is in offline mode (HF_HUB_OFFLINE=1), so it cannot be reached. "
                "Unset HF_HUB_OFFLINE, check the network and log in (`hf auth login`), or save the model locally "
                "with save_pretrained."
            )
        return super().push_to_hub(*args, **kwargs)


class SafetensorsOnlyLoadMixin:
    """Mixin for `PreTrainedModel` subclasses: `from_pretrained` reads weights from safetensors files only, and only
    complete ones.

    Unpickling a `.bin`/`.pt` checkpoint can run arbitrary code, so such checkpoints are refused with an explanation
    instead of being loaded (transformers falls back to them by default), and a damaged safetensors file is reported
    with its name rather than as a bare decoder error.

    A weights file saved by this very class for the same tasks that lacks tensors is refused, naming them (a
    truncated or damaged file: transformers would initialise them at random and only log it, giving a model that
    silently predicts noise); `allow_missing_weights=True`, or a list of key prefixes that may be missing
    (`allow_missing_weights=["heads.depth."]`), accepts it. Anything else keeps transformers' contract: a base model's
    weights in the dense-prediction class, another task set, or no weights at all initialise the missing parts with
    `_init_weights` and report them (`output_loading_info=True`).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing_weights=False, **kwargs):
        source = str(pretrained_model_name_or_path)
        if isinstance(allow_missing_weights, str):
            allow_missing_weights = [allow_missing_weights]
        if not isinstance(allow_missing_weights, bool) and not (
            isinstance(allow_missing_weights, (list, tuple)) and all(isinstance(p, str) for p in allow_missing_weights)
        ):
            raise TypeError(
                "`allow_missing_weights` must be a bool or a list of key prefixes, got "
                f"{type(allow_missing_weights).__name__}."
            )
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = cls._load_safetensors_only(pretrained_model_name_or_path, *model_args, **kwargs)
        except RuntimeError as error:  # e.g. per-task weights of another task count: say so when that is the cause
            cls._refuse_other_tasks(source, kwargs, error)
            raise
        model = cls._match_task_order(model, source, kwargs, allow_missing_weights)
        broken = [
            name
            for name, value in model.state_dict().items()
            if value.is_floating_point() and not torch.isfinite(value).all()
        ]
        if broken:  # checked once here: otherwise every map is NaN with no word why
            shown = ", ".join(broken[:8]) + (f", ... ({len(broken) - 8} more)" if len(broken) > 8 else "")
            logger.warning(
                f"The weights of {source} hold NaN or infinite values in {len(broken)} tensor(s): {shown}. The model's "
                "outputs will be NaN; the checkpoint is damaged or comes from a diverged training run."
            )
        missing = sorted(loading_info["missing_keys"])
        if allow_missing_weights is not True and cls._is_own_checkpoint(model, source, kwargs):
            prefixes = tuple(allow_missing_weights or ())
            refused = [key for key in missing if not key.startswith(prefixes)] if prefixes else missing
            if refused:
                shown = ", ".join(refused[:8]) + (f", ... ({len(refused) - 8} more)" if len(refused) > 8 else "")
                raise OSError(
                    f"The weights of {source} lack {len(refused)} tensor(s) of {cls.__name__}: {shown}. They would be "
                    "left randomly initialised, so the checkpoint is incomplete or belongs to another configuration. "
                    "If that is intended (e.g. new task heads before fine-tuning), pass allow_missing_weights=True or "
                    "a list of key prefixes that may be missing."
                )
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _is_own_checkpoint(cls, model, source: str, kwargs: dict) -> bool:
        """Whether the weights were saved by this very architecture for the same tasks (their config names the class,
        and the task order recorded with the weights, when there is one, has the model's tasks). Only then do missing
        tensors mean a damaged or truncated file; a base model's weights loaded into the dense-prediction class, new
        tasks, or `from_pretrained(None, config=..., state_dict={})` get transformers' contract instead: the missing
        parts are initialised by `_init_weights` and reported."""
        if cls.__name__ not in (getattr(model.config, "architectures", None) or []):
            return False
        recorded = read_task_order(source, kwargs) if source not in ("None", "") else None
        return recorded is None or sorted(recorded) == sorted(model.config.tasks)

    @classmethod
    def _refuse_other_tasks(cls, source: str, kwargs: dict, error: Exception) -> None:
        """Raise a clear OSError when loading failed because the config names other tasks than the weights."""
        recorded = read_task_order(source, kwargs)
        config = kwargs.get("config")
        if recorded is None or config is None and not Path(source, "config.json").is_file():
            return
        try:
            tasks = (
                list(config.tasks)
                if config is not None
                else json.loads(Path(source, "config.json").read_text())["tasks"]
            )
        except (OSError, ValueError, KeyError, AttributeError):
            return
        tasks = kwargs.get("tasks", tasks)
        if sorted(tasks) != sorted(recorded):
            raise OSError(_other_tasks_message(source, tasks, recorded)) from error

    @classmethod
    def _match_task_order(cls, model, source: str, kwargs: dict, allow_missing_weights):
        """Per-task weights are stacked in the order of `config.tasks`, which is recorded in the weights file when it
        is saved. A config that lists the same tasks in another order (a hand-edited `config.json`) is mapped by name:
        the model is rebuilt in the recorded order, so every output is what was saved. A config with other tasks is
        refused unless missing weights are allowed (new heads for fine-tuning). Weights saved before the order was
        recorded load in config order, as they always did."""
        recorded = read_task_order(source, kwargs)
        tasks = list(model.config.tasks)
        if recorded is None or recorded == tasks:
            return model
        if sorted(recorded) != sorted(tasks):
            if allow_missing_weights is not False:
                return model
            raise OSError(_other_tasks_message(source, tasks, recorded))
        logger.warning(
            f"The config of {source} lists the tasks {tasks}; the weights were saved in the order {recorded}. The "
            "tasks are matched by name (the model uses the saved order)."
        )
        config = copy.deepcopy(model.config)
        config.tasks = recorded
        rebuilt = cls(config).to(device=model.device, dtype=model.dtype)
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        return rebuilt.train(model.training)

    @classmethod
    def _load_safetensors_only(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        source = str(pretrained_model_name_or_path)
        if pretrained_model_name_or_path is not None:
            check_model_folder(source)
        refusal = (
            f"{cls.__name__} loads weights only from safetensors files: pickle checkpoints (pytorch_model.bin, .pt) "
            "are refused because loading them can run arbitrary code. If you trust the file, convert it with "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`."
        )
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"use_safetensors=False is not supported. {refusal}")
        kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            local = Path(source) / "model.safetensors"
            name = str(local) if local.is_file() else f"the safetensors weights of {source}"
            raise OSError(
                f"{name} is damaged or truncated and cannot be read ({error}); save or download it again."
            ) from error
        except OSError as error:
            if "no file named" not in str(error) and "does not appear to have a file named" not in str(error):
                raise  # not a missing weights file (e.g. a network error): transformers' message says it best
            pickles = sorted(p.name for p in Path(source).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f" It holds {', '.join(pickles)}." if pickles else ""
            raise OSError(
                f"{source} has no model.safetensors (or model.safetensors.index.json).{found} {refusal}"
            ) from error


@dataclass
class DenseMultiTaskModelOutput(ModelOutput):
    """
    Output of a trunk (`TaskExpertModel`, `ModSquadModel`): what the dense heads decode. Batch first, like every
    transformers output.

    Args:
        task_features (`torch.FloatTensor` of shape `(batch, num_tasks, channels, h, w)`):
            Per requested task (in the order of `tasks`), the feature map its head decodes.
        tasks (`tuple[str]`):
            The tasks of `task_features`, in order.
        aux_losses (`dict[str, torch.FloatTensor]`, *optional*):
            Unweighted auxiliary terms of this batch (Mod-Squad: its routing terms; TaskExpert: none in the trunk).
        gates (`tuple[dict[str, torch.FloatTensor]]`, *optional*):
            The routing report: per routing layer (`config.layer_names`), per task, the gate of every candidate
            (`config.candidate_names`) for every patch token, `(batch, h, w, num_candidates)` (`(batch, 1, 1, ...)`
            for image-level gates). Returned with `output_gates=True`.
        hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            The trunk's hidden states, batch first; each model's docstring gives their layout. Returned with
            `output_hidden_states=True`.
    """

    task_features: Optional[torch.FloatTensor] = None
    tasks: Optional[tuple[str, ...]] = None
    aux_losses: Optional[dict[str, torch.FloatTensor]] = None
    gates: Optional[tuple[dict[str, torch.FloatTensor], ...]] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None


@dataclass
class DenseMultiTaskOutput(ModelOutput):
    """
    Output of every `*ForDensePrediction` model of this package.

    Args:
        loss (`torch.FloatTensor`, *optional*):
            The weighted task losses (the `loss_weighting` given to `forward`, else the config's `loss_weights`) plus
            `aux_loss`, when `labels` are given.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*):
            Unweighted loss of every task that had labels.
        aux_loss (`torch.FloatTensor`, *optional*):
            The weighted auxiliary terms included in `loss`: the sum of the model's auxiliary weights (TaskExpert:
            `gate_balance_loss_weight`; Mod-Squad: `mutual_information_loss_weight`, `cv_loss_weight`,
            `switch_loss_weight`, `z_loss_weight`) times the matching `aux_losses`, over the terms with a positive
            weight; None when there is none (Mod-Squad: also when the pass ran fewer than `config.aux_loss_min_tasks`
            tasks, as in its reference).
        aux_losses (`dict[str, torch.FloatTensor]`, *optional*):
            Unweighted auxiliary terms: TaskExpert's `"gate_balance"` (with `labels` and dynamic gating), Mod-Squad's
            routing terms `"mutual_information"`, `"cv"`, `"switch"`, `"z"` (always).
        logits (`dict[str, torch.FloatTensor]`):
            Per task, raw predictions at the input resolution, `(batch, channels, height, width)` (`(batch, classes)`
            for image-level tasks): class logits for segmentation, one logit for saliency and boundaries,
            unnormalised xyz for normals, metres for depth.
        gates (`tuple[dict[str, torch.FloatTensor]]`, *optional*):
            As in [`DenseMultiTaskModelOutput`].
        hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            As in [`DenseMultiTaskModelOutput`].
    """

    loss: Optional[torch.FloatTensor] = None
    task_losses: Optional[dict[str, torch.FloatTensor]] = None
    aux_loss: Optional[torch.FloatTensor] = None
    aux_losses: Optional[dict[str, torch.FloatTensor]] = None
    logits: Optional[dict[str, torch.FloatTensor]] = None
    gates: Optional[tuple[dict[str, torch.FloatTensor], ...]] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None


@dataclass
class DenseDecoding:
    """What `decode_and_loss` returns: the fields every `*ForDensePrediction` output starts with."""

    logits: dict[str, torch.Tensor]
    loss: Optional[torch.Tensor] = None
    task_losses: Optional[dict[str, torch.Tensor]] = None
    aux_loss: Optional[torch.Tensor] = None


class DenseMultiTaskPreTrainedModel(
    OfflinePushMixin, SafetensorsOnlyLoadMixin, RemotePipelineSaveMixin, PreTrainedModel
):
    """Base class of every dense multi-task model of this package (TaskExpert, Mod-Squad): what transformers needs to
    know about an image model, the generic weight initialisation, task selection, and the dense-prediction end (one
    `DenseTaskHead` per task, the depth activation, the weighted task and auxiliary losses).

    A model type sets `config_class`, `base_model_prefix` and `_no_split_modules`, initialises its own modules in
    `_init_weights` and calls `super()._init_weights(module)` for the others. Its `*ForDensePrediction` model builds
    `self.heads` with `build_task_heads`, names the weights of its auxiliary losses in `aux_loss_weights` and
    provides its trunk in `trunk_outputs`; `forward` (task resolution, heads, loss, return type) is this class's.
    The config is a `DenseMultiTaskConfig`.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        """Generic modules: truncated-normal linear and conv weights with zero biases, unit/zero norm affines (and
        fresh running statistics for batch norms)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)

    # ----------------------------------------------------------------------------------------------------------------
    def resolve_tasks(self, tasks: Optional[list[str]]) -> list[str]:
        """The requested tasks in config order (all for None); a clear error for names the model does not predict."""
        return resolve_tasks(self.config.tasks, tasks)

    def check_label_tasks(self, labels: Optional[dict]) -> None:
        if labels is not None:
            unknown = [task for task in labels if task not in self.config.tasks]
            if unknown:
                raise ValueError(
                    f"labels name task(s) {unknown} that this model does not predict ({self.config.tasks})."
                )

    # ----------------------------------------------------------------------------------------------------------------
    # The forward of every `*ForDensePrediction` model
    # ----------------------------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[dict[str, torch.Tensor]] = None,
        tasks: Optional[list[str]] = None,
        output_gates: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        loss_weighting: Optional[LossWeighting] = None,
        return_dict: Optional[bool] = None,
    ) -> DenseMultiTaskOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
                Normalised images; height and width multiples of the patch size (see
                [`DenseMultiTaskImageProcessor`]).
            labels (`dict[str, torch.Tensor]`, *optional*):
                Per task, labels following `task_definitions` (ignore value 255; a sample without a label for a task
                is all-255 and adds no loss). Tasks without labels get no loss.
            tasks (`list[str]`, *optional*):
                Run only these tasks (default: all tasks of the config).
            output_gates (`bool`, *optional*):
                Return the routing report (`gates`); defaults to `config.output_gates`.
            output_hidden_states (`bool`, *optional*):
                Return the trunk's hidden states; defaults to `config.output_hidden_states`.
            loss_weighting ([`LossWeighting`], *optional*):
                How the task losses make `loss` (e.g. `build_loss_weighting("uncertainty", ...)`, as `train.py`
                passes it); defaults to the config's fixed `loss_weights`.
            return_dict (`bool`, *optional*):
                Return a [`DenseMultiTaskOutput`] instead of a tuple; defaults to `config.return_dict`.
        """
        output_gates = self.config.output_gates if output_gates is None else output_gates
        tasks = self.resolve_tasks(tasks)
        self.check_label_tasks(labels)
        trunk = self.trunk_outputs(pixel_values, tasks, output_gates, output_hidden_states, labels is not None)
        decoded = self.decode_and_loss(
            trunk.task_features,
            tasks,
            tuple(pixel_values.shape[-2:]),
            labels=labels,
            aux_losses=self.aux_losses_in_loss(trunk, tasks),
            loss_weighting=loss_weighting,
        )
        return DenseMultiTaskOutput(
            loss=decoded.loss,
            task_losses=decoded.task_losses,
            aux_loss=decoded.aux_loss,
            aux_losses=trunk.aux_losses,
            logits=decoded.logits,
            gates=trunk.gates if output_gates else None,
            hidden_states=trunk.hidden_states,
        )

    def trunk_outputs(
        self,
        pixel_values: torch.Tensor,
        tasks: list[str],
        output_gates: bool,
        output_hidden_states: Optional[bool],
        with_labels: bool,
    ) -> DenseMultiTaskModelOutput:
        """The model type's trunk on `tasks`: task feature maps, gates and auxiliary terms (`with_labels`: the pass
        computes a loss)."""
        raise NotImplementedError(f"{type(self).__name__} must provide its trunk (`trunk_outputs`).")

    def aux_losses_in_loss(self, trunk: DenseMultiTaskModelOutput, tasks: list[str]) -> Optional[dict]:
        """The auxiliary terms that join the loss of this pass (all the trunk reports, unless a model type says
        otherwise)."""
        return trunk.aux_losses

    # ----------------------------------------------------------------------------------------------------------------
    # Dense-prediction end
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of every auxiliary loss term the base model reports in `aux_losses` (terms not named here, or with
        weight 0, are reported but not added to `loss`)."""
        return {}

    def build_task_heads(self, in_channels: int) -> nn.ModuleDict:
        config = self.config
        return nn.ModuleDict(
            {
                task: ImageLevelHead(in_channels, spec.head_channels)
                if spec.kind.image_level
                else DenseTaskHead(in_channels, config.head_hidden_size, spec.head_channels, config.head_norm)
                for task, spec in config.task_specs.items()
            }
        )

    def decode_tasks(
        self, task_features: torch.Tensor, tasks: list[str], size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Task feature maps (B, T, C, h, w), in the order of `tasks` -> logits per task at `size`."""
        specs = self.config.task_specs
        return {
            task: specs[task].kind.activate(self.heads[task](task_features[:, i], size), specs[task], self.config)
            for i, task in enumerate(tasks)
        }

    def weighted_task_losses(
        self, logits: dict, labels: dict, loss_weighting: Optional[LossWeighting] = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(unweighted loss per task with labels, their combination by `loss_weighting`, by default the config's
        fixed `loss_weights`)."""
        task_losses = dense_task_losses(logits, labels, self.config.task_specs, self.config)
        if not task_losses:  # labels for none of the tasks run: nothing to weight
            return task_losses, next(iter(logits.values())).new_zeros(())
        if loss_weighting is None:  # the config's fixed weights, as `FixedWeighting` applies them
            return task_losses, weighted_sum(task_losses, self.config.loss_weights)
        return task_losses, loss_weighting(task_losses)

    def decode_and_loss(
        self,
        task_features: torch.Tensor,
        tasks: list[str],
        image_size: tuple[int, int],
        labels: Optional[dict[str, torch.Tensor]] = None,
        aux_losses: Optional[dict[str, torch.Tensor]] = None,
        loss_weighting: Optional[LossWeighting] = None,
    ) -> DenseDecoding:
        """The end of every `*ForDensePrediction.forward`: logits of `tasks` at `image_size` from the task feature maps
        (B, T', C, h, w) and, with `labels`, the unweighted task losses and the total loss
        `loss_weighting(task_losses) + aux_loss` (by default `sum_t loss_weights[t] * task_loss_t + aux_loss`), where `aux_loss = sum_n aux_loss_weights[n] * aux_losses[n]`
        over the terms with a positive weight (None when there is none)."""
        logits = self.decode_tasks(task_features, tasks, image_size)
        if labels is None:
            return DenseDecoding(logits=logits)
        task_losses, loss = self.weighted_task_losses(logits, labels, loss_weighting)
        aux_loss = None
        for name, weight in self.aux_loss_weights.items():
            if weight > 0 and aux_losses is not None and name in aux_losses:
                term = weight * aux_losses[name]
                aux_loss = term if aux_loss is None else aux_loss + term
        if aux_loss is not None:
            loss = loss + aux_loss
        return DenseDecoding(logits=logits, loss=loss, task_losses=task_losses, aux_loss=aux_loss)
