"""The pieces `train.py` puts together, so that its `main` reads top to bottom: the accelerator, the model config and
model, the evaluators, the output folder, the data (map-style or streamed: the one place that differs), the
optimiser, the running loss window, the final model and the upload."""

import dataclasses
import errno
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, send_to_device, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader

from ..data import (
    build_transforms,
    collate_dense_batch,
    dataset_task_specs,
    load_multitask_dataset,
    read_dataset_metadata,
)
from ..data.streaming import StreamingSamples, batches_per_epoch, epoch_batches
from ..evaluation import BoundaryEvaluationError, DenseMultiTaskEvaluator, evaluate_model
from ..file_utils import give_default_permissions, write_json_atomic
from ..image_processing_dense_multitask import DenseMultiTaskImageProcessor, load_rgb_image
from ..loss_weighting import LossWeighting, build_loss_weighting
from .checkpoints import CheckpointWriteError, resolve_checkpoint, save_checkpoint
from .provenance import STAGING_PREFIX, claim_output_dir, lock_output_dir, write_provenance
from .recipe import RecipeError, TrainingRecipe
from .reporting import JsonLinesLogger, build_model_card, plot_training_curves, write_example_maps

# Model config fields that train.py sets itself: the recipe's `tasks`, the dataset's task kinds and class names.
FIELDS_SET_BY_TRAINING = ("tasks", "task_id2label", "task_kinds")
SHARDED_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED)
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Files of the output folder that are never uploaded to the Hub: resumable state (optimiser moments, random
# generators) and hidden temporary files.
HUB_IGNORE_PATTERNS = ["checkpoints/*", ".*", "**/.*"]


class TrainingError(RuntimeError):
    """Training cannot go on (for instance the loss is no longer finite); the message names the step and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Before training: the accelerator, checks, the model config, model, evaluators and the output folder
# ---------------------------------------------------------------------------------------------------------------------
def build_accelerator(recipe: TrainingRecipe) -> Accelerator:
    """The run's Accelerator (gloo on a CPU-only machine, so that CPU data-parallel works), with a notice for what the
    machine cannot do as asked (fp16 without a GPU, FSDP/DeepSpeed without GPUs)."""
    mixed_precision, notices = recipe.mixed_precision, []
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        notices.append("`mixed_precision: fp16` needs a GPU; this CPU run computes in float32 (bf16 is the mixed "
                       "precision that CPUs support).")  # fmt: skip
        mixed_precision = "no"
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # CPU data-parallel needs gloo, which `cpu=True` selects
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        log_with=[t for t in recipe.report_to if _tracker_installed(t)] or None,
        project_dir=recipe.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
    )
    sharding = {"FSDP": os.environ.get("ACCELERATE_USE_FSDP"), "DeepSpeed": os.environ.get("ACCELERATE_USE_DEEPSPEED")}
    for name, flag in sharding.items():
        if str(flag).lower() in ("1", "true") and accelerator.distributed_type not in SHARDED_TYPES:
            notices.append(f"the launch configuration asks for {name}, which Accelerate runs on GPUs only; this run is "
                           f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es).")  # fmt: skip
    for notice in notices:
        accelerator.print(f"Notice: {notice}")
    if recipe.push_to_hub and accelerator.is_main_process:
        check_hub_access(recipe)
    return accelerator


def check_hub_access(recipe: TrainingRecipe) -> None:
    """`--push_to_hub` must be possible before training starts: online, with a token that can write."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise RecipeError(
            "--push_to_hub was requested but the Hub is offline (HF_HUB_OFFLINE=1); unset it or drop --push_to_hub."
        )
    try:
        HfApi().whoami()
    except Exception as error:  # no token, no network, or a revoked token: all mean the upload would fail later
        raise RecipeError(
            f"--push_to_hub: cannot reach the Hub as a logged-in user ({type(error).__name__}: {error})."
        ) from None


def read_metadata(recipe: TrainingRecipe) -> dict:
    try:
        return read_dataset_metadata(recipe.dataset)
    except (ValueError, OSError) as error:  # missing folder, unreachable Hub id, damaged metadata
        raise RecipeError(f"Recipe field `dataset`: {error}") from None


def valid_model_config_keys(model_type: str) -> set[str]:
    """Fields a config of `model_type` understands: the arguments of its class and of its bases (down to
    `PretrainedConfig`)."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_class = CONFIG_MAPPING[model_type]
    keys = set()
    for cls in config_class.__mro__[: config_class.__mro__.index(PretrainedConfig) + 1]:
        if "__init__" not in vars(cls):
            continue
        keys.update(name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                    if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL))  # fmt: skip
    keys.update(PretrainedConfig().to_dict())
    keys.update(getattr(config_class, "attribute_map", {}))
    return keys - {"model_type", "transformers_version", "_name_or_path"}


def build_model_config(recipe: TrainingRecipe, metadata: dict):
    """The model config of the recipe, with the tasks and class names of the dataset."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        settings = json.loads(Path(recipe.model_config).read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(f"Model config {recipe.model_config} is not valid JSON: {error}") from None
    if not isinstance(settings, dict) or "model_type" not in settings:
        raise RecipeError(f"Model config {recipe.model_config} has no 'model_type'.")
    if settings["model_type"] not in CONFIG_MAPPING:
        raise RecipeError(f"Model config {recipe.model_config}: unknown model_type {settings['model_type']!r}.")
    valid = valid_model_config_keys(settings["model_type"])
    for source, values in (
        (f"model config {recipe.model_config}", settings),
        ("recipe field `model_overrides`", recipe.model_overrides),
    ):
        unknown = sorted(set(values) - valid - {"model_type"})
        if unknown:
            raise RecipeError(
                f"Unknown key(s) {unknown} in the {source}: not fields of {settings['model_type']} configs. "
                f"Valid keys: {', '.join(sorted(valid - set(FIELDS_SET_BY_TRAINING)))}."
            )
    for name in FIELDS_SET_BY_TRAINING:
        if name in recipe.model_overrides:
            raise RecipeError(
                f"`model_overrides` cannot set `{name}`: train.py sets it (the recipe field `tasks` chooses the tasks; "
                "class names come from the dataset)."
            )
    settings.update(recipe.model_overrides)
    available = dataset_task_specs(metadata)
    tasks = recipe.tasks or list(available)
    missing = [task for task in tasks if task not in available]
    if missing:
        raise RecipeError(f"Recipe tasks {missing} are not in dataset {recipe.dataset!r}, which has {list(available)}.")
    # The dataset declares its tasks: their kinds and parameters, and the class names of segmentation tasks.
    settings["tasks"] = tasks
    settings["task_kinds"] = {task: available[task].declaration() for task in tasks}
    settings["task_id2label"] = {
        task: dict(enumerate(available[task].class_names)) for task in tasks if available[task].class_names is not None
    }
    try:
        return AutoConfig.for_model(**settings)
    except (ValueError, TypeError, KeyError) as error:
        raise RecipeError(
            f"Model config {recipe.model_config} with `model_overrides` {recipe.model_overrides}: {error}"
        ) from None


def build_recipe_loss_weighting(recipe: TrainingRecipe, config) -> LossWeighting:
    """The recipe's loss weighting over the config's tasks, starting from its `loss_weights`."""
    try:
        return build_loss_weighting(
            recipe.loss_weighting, list(config.tasks), config.loss_weights, recipe.dwa_temperature, recipe.dwa_window
        )
    except ValueError as error:
        raise RecipeError(f"Loss weighting of model config {recipe.model_config}: {error}") from None


def build_evaluators(recipe: TrainingRecipe, metadata: dict, config) -> tuple:
    """(evaluator of the evaluations during training, evaluator of the final one), built before training so that a
    boundary scorer that cannot run fails now, not after training."""
    tasks = list(config.tasks)
    try:
        evaluator = DenseMultiTaskEvaluator.from_metadata(
            metadata, tasks=tasks, boundary_mode=recipe.boundary_mode,
            single_task_baselines=recipe.single_task_baselines,
        )  # fmt: skip
        has_boundaries = any(config.task_specs[task].kind.name == "boundary" for task in tasks)
        if list(recipe.final_boundary_modes) == [recipe.boundary_mode] or not has_boundaries:
            return evaluator, evaluator
        final_evaluator = DenseMultiTaskEvaluator.from_metadata(
            metadata, tasks=tasks, boundary_mode=recipe.final_boundary_modes,
            boundary_workers=recipe.boundary_workers, single_task_baselines=recipe.single_task_baselines,
        )  # fmt: skip
        return evaluator, final_evaluator
    except BoundaryEvaluationError as error:
        raise RecipeError(f"{error} (recipe fields `boundary_mode` / `final_boundary_modes`)") from None
    except (ValueError, OSError) as error:
        raise RecipeError(f"Evaluation settings of the recipe: {error}") from None


def build_model(recipe: TrainingRecipe, config):
    """The model to train. Seeded right before it is built, backbone first: its initial weights depend on the seed
    alone, so every variant of a study's seed starts from the same backbone (data order and augmentations have
    their own seeded generators)."""
    from transformers import AutoModel

    set_seed(recipe.seed)
    model = AutoModel.from_config(config)
    if getattr(config, "backbone_checkpoint", None):
        model.load_pretrained_backbone()
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def check_output_dir(output_dir: str, min_free_bytes: int) -> None:
    """Fail before any training time is spent when the output folder is not writable or the disk is nearly full."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as error:
        raise RecipeError(f"Output folder {output_dir!r} is not writable: {error}") from None
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise RecipeError(
            f"Only {free / 2**20:.0f} MiB free under {output_dir!r}; this run needs about {min_free_bytes / 2**20:.0f} MiB "
            "for its checkpoints and final model."
        )


def take_output_dir(recipe: TrainingRecipe, accelerator, model, fingerprint: str, fingerprint_fields: dict) -> tuple:
    """Lock the output folder (main process, until the run ends: one run per folder), then find this recipe's
    checkpoint to resume, or claim a folder that is not another run's. Returns (lock or None, (checkpoint, state) or
    None)."""
    lock = None
    if accelerator.is_main_process:
        num_parameters = sum(p.numel() for p in model.parameters())
        check_output_dir(recipe.output_dir, min_free_bytes=num_parameters * 4 * 3 * (recipe.save_total_limit + 2))
        lock = lock_output_dir(recipe.output_dir)
    accelerator.wait_for_everyone()
    found = resolve_checkpoint(recipe.output_dir, recipe.resume_from_checkpoint, fingerprint, fingerprint_fields,
                               warn=accelerator.print)  # fmt: skip
    if found is None:
        if recipe.resume_from_checkpoint == "latest":
            accelerator.print(f"No checkpoint under {recipe.output_dir}; starting from scratch.")
        claim_output_dir(recipe.output_dir, fingerprint, recipe.overwrite_output_dir, accelerator)
    if accelerator.is_main_process:
        write_provenance(recipe.output_dir, fingerprint, resumed_at_step=found[1]["step"] if found else None)
    return lock, found


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, task_specs: dict) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, num_workers=num_workers,
        collate_fn=partial(collate_dense_batch, task_specs=task_specs), persistent_workers=False,
    )  # fmt: skip


@dataclasses.dataclass
class TrainingData:
    """The run's processor, datasets and loaders. Whether the training split is streamed (`datasets`
    IterableDataset, this process's share, data/streaming.py) or map-style is decided here and nowhere else."""

    recipe: TrainingRecipe
    processor: DenseMultiTaskImageProcessor
    train_transform: Any
    train_dataset: Any
    train_loader: DataLoader
    eval_dataset: Any
    eval_loader: DataLoader
    num_train_samples: int

    def prepare(self, accelerator, model, optimizer) -> tuple:
        """accelerate's `prepare` of the model, optimiser and loaders (a streamed training split is already split
        across processes: its loader is not prepared, which would shard it again)."""
        if self.recipe.streaming:
            model, optimizer, self.eval_loader = accelerator.prepare(model, optimizer, self.eval_loader)
        else:
            model, optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
                model, optimizer, self.train_loader, self.eval_loader
            )
        return model, optimizer

    def steps_per_epoch(self, accelerator) -> int:
        """Optimiser steps per epoch, the same on every process (after `prepare`)."""
        recipe = self.recipe
        if recipe.streaming:
            loader_batches = batches_per_epoch(
                self.num_train_samples, accelerator.num_processes, recipe.per_device_train_batch_size
            )
        else:
            loader_batches = len(self.train_loader)
        steps = loader_batches // recipe.gradient_accumulation_steps
        if steps == 0:
            raise RecipeError(
                f"The training split has too few samples for one step ({self.num_train_samples} samples, batch "
                f"{recipe.per_device_train_batch_size} x {accelerator.num_processes} processes x "
                f"{recipe.gradient_accumulation_steps} accumulation)."
            )
        return steps

    def epoch_batches(self, epoch: int, skip_batches: int, accelerator) -> Iterable[dict]:
        """The training batches of `epoch`, after the first `skip_batches` (a resume within the epoch)."""
        self.train_transform.set_epoch(epoch)  # augmentations are a function of (seed, epoch, sample id)
        if self.recipe.streaming:
            self.train_dataset.set_epoch(epoch)  # the shuffle of the stream
            total = self.steps_per_epoch(accelerator) * self.recipe.gradient_accumulation_steps
            return (
                send_to_device(batch, accelerator.device)
                for batch in epoch_batches(self.train_loader, total, skip_batches)
            )
        self.train_loader.set_epoch(epoch)
        return accelerator.skip_first_batches(self.train_loader, skip_batches) if skip_batches else self.train_loader


def build_data(recipe: TrainingRecipe, metadata: dict, config, accelerator) -> TrainingData:
    tasks = list(config.tasks)
    eval_size = tuple(metadata["eval_size"])
    processor = DenseMultiTaskImageProcessor(
        size={"height": eval_size[0], "width": eval_size[1]}, size_divisor=config.patch_size
    )
    train_transform = build_transforms(metadata, train=True, tasks=tasks, size=recipe.crop_size, seed=recipe.seed)
    if recipe.streaming:  # this process's share of the stream, shuffled per epoch
        train_dataset = StreamingSamples(
            load_multitask_dataset(recipe.dataset, "train", streaming=True), train_transform,
            accelerator.process_index, accelerator.num_processes, recipe.seed, recipe.shuffle_buffer_size,
        )  # fmt: skip
    else:
        train_dataset = load_multitask_dataset(recipe.dataset, "train").with_transform(train_transform)
    eval_dataset = load_multitask_dataset(recipe.dataset, "validation")
    if recipe.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(recipe.max_eval_samples, len(eval_dataset))))
    eval_dataset = eval_dataset.with_transform(build_transforms(metadata, train=False, tasks=tasks))
    specs = train_transform.task_specs
    return TrainingData(
        recipe=recipe,
        processor=processor,
        train_transform=train_transform,
        train_dataset=train_dataset,
        train_loader=make_loader(
            train_dataset, recipe.per_device_train_batch_size, not recipe.streaming, recipe.num_workers, specs
        ),
        eval_dataset=eval_dataset,
        eval_loader=make_loader(eval_dataset, recipe.per_device_eval_batch_size, False, recipe.num_workers, specs),
        num_train_samples=metadata["splits"]["train"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Optimisation, logging, evaluation and checkpoints during the loop
# ---------------------------------------------------------------------------------------------------------------------
def build_optimizer(recipe: TrainingRecipe, parameters: list) -> tuple:
    """(optimiser, learning-rate schedule). The schedule is stepped by hand once per optimiser step (a prepared
    scheduler would step once per process)."""
    from .schedules import lr_factor

    optimizer = OPTIMIZERS[recipe.optimizer](
        parameters, lr=recipe.learning_rate, betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_epsilon,
        weight_decay=recipe.weight_decay,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(recipe.lr_schedule, recipe.warmup_steps, recipe.max_steps, recipe.poly_power)
    )
    return optimizer, scheduler


def open_training_log(recipe: TrainingRecipe, accelerator, resume_step: Optional[int]) -> Optional[JsonLinesLogger]:
    """The run's `train_log.jsonl` (main process; None elsewhere), cut back to `resume_step` when resuming, with
    `recipe.yaml` beside it; the trackers are started on every process."""
    from .recipe import dump_recipe

    log = None
    if accelerator.is_main_process:
        try:
            log = JsonLinesLogger(Path(recipe.output_dir) / "train_log.jsonl", resume_step=resume_step)
        except ValueError as error:  # a damaged log (a torn last line is dropped with a warning)
            raise RecipeError(f"Cannot resume in {recipe.output_dir}: {error}") from None
        dump_recipe(recipe, Path(recipe.output_dir) / "recipe.yaml")
    accelerator.init_trackers("taskexpert", config=_scalar_items(recipe.to_dict()))
    return log


class LossWindow:
    """The losses of the steps since the last log line, averaged over processes; stops the run at the first
    non-finite value."""

    def __init__(self, recipe: TrainingRecipe, accelerator, log: Optional[JsonLinesLogger]):
        self.recipe, self.accelerator, self.log = recipe, accelerator, log
        self.running: dict = {}
        self.started, self.steps = time.perf_counter(), 0

    def add(self, outputs, step: int, last_checkpoint) -> None:
        """This micro-batch's total loss and its parts (task losses, unweighted auxiliary terms such as Mod-Squad's
        mutual information)."""
        parts = {**outputs.task_losses, **(outputs.aux_losses or {})}
        names = ["loss"] + [f"loss/{name}" for name in parts]
        values = torch.stack([outputs.loss.detach().float()] + [value.detach().float() for value in parts.values()])
        averages = dict(zip(names, self.accelerator.reduce(values, reduction="mean").tolist()))
        stop_if_not_finite(averages, step, last_checkpoint)
        for name, value in averages.items():
            self.running[name] = self.running.get(name, 0.0) + value
        self.running["count"] = self.running.get("count", 0) + 1

    def write(self, step: int, epoch: int, lr: float, weighting: LossWeighting, progress) -> None:
        """One log line for the window (log file, trackers, progress bar), then a new window."""
        recipe, accelerator = self.recipe, self.accelerator
        elapsed = time.perf_counter() - self.started
        record = {key: value / self.running["count"] for key, value in self.running.items() if key != "count"}
        images = (self.steps * recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
                  * accelerator.num_processes)  # fmt: skip
        record.update(step=step, kind="train", lr=lr, epoch=epoch, world_size=accelerator.num_processes,
                      images_per_second=images / max(elapsed, 1e-9))  # fmt: skip
        record.update(weighting.describe())
        progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_second']:.1f}")
        accelerator.log({k: v for k, v in record.items() if k != "kind"}, step=step)
        if self.log is not None:
            self.log.log(record)
        self.running, self.started, self.steps = {}, time.perf_counter(), 0


def stop_if_not_finite(values: dict, step: int, last_checkpoint) -> None:
    """Stop at once when the loss is NaN or infinite: every later step would only spread it through the weights.
    `values` are averages over the processes, so every process stops at the same step."""
    if all(math.isfinite(value) for value in values.values()):
        return
    bad = [
        f"{name.removeprefix('loss/')}: {value}"
        for name, value in values.items()
        if name != "loss" and not math.isfinite(value)
    ]
    where = f"the loss is not finite ({', '.join(bad)})" if bad else f"the total loss is not finite ({values['loss']})"
    resume = (f"The last good checkpoint is {last_checkpoint}." if last_checkpoint is not None
              else "No checkpoint was written before it (see `save_steps`).")  # fmt: skip
    raise TrainingError(
        f"Training stopped at step {step}: {where}. {resume} Nothing after it was saved. Lower the learning rate, or "
        "check the labels and loss weights of the task(s) named."
    )


def evaluate(model, eval_loader, evaluator, accelerator, log, step: int) -> dict:
    """Evaluate, print a summary, log it; the full metrics are returned."""
    metrics = evaluate_model(model, eval_loader, evaluator, accelerator=accelerator)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "/IoU/" not in k}
    accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(summary.items())))
    accelerator.log({f"eval/{k}": v for k, v in summary.items()}, step=step)
    if log is not None:
        log.log({"step": step, "kind": "eval", **summary})
    return metrics


def checkpoint(accelerator, recipe, step: int, epoch: int, fingerprint: str, fields: dict, scheduler, weighting):
    """Save a resumable checkpoint; a failed write stops the run (the message says why)."""
    try:
        return save_checkpoint(accelerator, recipe.output_dir, step,
                               {"epoch": epoch, "recipe_sha256": fingerprint, "recipe": fields},
                               recipe.save_total_limit, scheduler, weighting)  # fmt: skip
    except CheckpointWriteError as error:
        raise TrainingError(str(error)) from None


# ---------------------------------------------------------------------------------------------------------------------
# After training: the saved model and the upload
# ---------------------------------------------------------------------------------------------------------------------
def final_model(accelerator, model, config):
    """The trained model as an ordinary one (main process; None elsewhere). Sharded training (FSDP2, DeepSpeed)
    gathers the full weights (a collective, so every process calls this) into a fresh model; otherwise the trained
    model itself."""
    from transformers import AutoModel

    sharded = accelerator.distributed_type in SHARDED_TYPES
    full_state = accelerator.get_state_dict(model) if sharded else None
    if not accelerator.is_main_process:
        return None
    if not sharded:
        return accelerator.unwrap_model(model)
    gathered = AutoModel.from_config(config)
    gathered.load_state_dict(full_state)
    return gathered.eval()


def save_final_model(model, processor, recipe, metrics: dict, metadata: dict, chance_baseline=None) -> None:
    """Model, processor, remote code, example maps, card, curves and metrics, each written to a temporary name first
    (metrics.json last: its presence marks a finished run); every file gets the user's normal permissions."""
    output_dir = Path(recipe.output_dir)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=STAGING_PREFIX))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        plot_training_curves(output_dir / "train_log.jsonl", staging / "training_curves.png", model.config.task_specs)
        example = load_rgb_image(load_multitask_dataset(recipe.dataset, "validation")[0]["image"])
        example_maps = write_example_maps(model, processor, example, staging)
        name = recipe.hub_model_id or output_dir.name
        card = build_model_card(model.config, recipe, metrics, metadata, name, chance_baseline=chance_baseline,
                                example_maps=example_maps)  # fmt: skip
        (staging / "README.md").write_text(card)
        for item in staging.iterdir():
            give_default_permissions(item)
            if item.is_dir() and (output_dir / item.name).is_dir():  # a folder (examples/) replaces its old copy
                shutil.rmtree(output_dir / item.name)
            os.replace(item, output_dir / item.name)
    except SafetensorError as error:  # safetensors reports a full disk in an exception of its own
        if "os error 28" not in str(error) and "No space left" not in str(error):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json_atomic(output_dir / "metrics.json", metrics, sort_keys=True)


def push_folder(recipe) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(recipe.hub_model_id, private=recipe.hub_private, exist_ok=True)
    api.upload_folder(
        repo_id=recipe.hub_model_id, folder_path=recipe.output_dir, commit_message="Upload model trained with train.py",
        ignore_patterns=HUB_IGNORE_PATTERNS,
    )  # fmt: skip
    print(f"Pushed {recipe.output_dir} to https://huggingface.co/{recipe.hub_model_id}")


def _tracker_installed(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "trackio": "trackio"}.get(name)
    if module is None:
        raise RecipeError(f"Unknown tracker {name!r} in `report_to`; supported: tensorboard, trackio.")
    return importlib.util.find_spec(module) is not None


def _scalar_items(values: dict) -> dict:
    """Trackers accept scalars and strings only."""
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in values.items() if v is not None
    }
