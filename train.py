"""Train a dense multi-task model (TaskExpert, Mod-Squad) with Accelerate.

    accelerate launch train.py --config hub_configs/synthetic-tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 train.py --config hub_configs/pascal-context-vitl.yaml --max_steps 40000
    accelerate launch train.py --config ... --resume_from_checkpoint latest
    accelerate launch train.py --config ... --push_to_hub --hub_model_id user/taskexpert-pascal

Any recipe field (see `modeling_taskexpert/training/recipe.py`) can be overridden with `--field value`. The run
writes to `output_dir`: `provenance.json` (code, versions and the recipe's fingerprint), `checkpoints/step_*`
(resumable state; never pushed to the Hub), `train_log.jsonl`, and at the end the model (safetensors, config,
processor, remote code), `README.md` (model card with a model-index), `metrics.json`, `training_curves.png` and
`recipe.yaml`. A folder holding another run's checkpoints or model is refused unless `--overwrite_output_dir`.

Exit status: 0 on success, 2 when the recipe, the data or the output folder is refused before training starts, 1 when
training fails while running (for instance a non-finite loss, which stops the run at once).
"""

import errno
import json
from functools import partial
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, send_to_device
from accelerate.utils import set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel

import modeling_taskexpert  # noqa: F401 - registers the model types with the Auto classes
from modeling_taskexpert import TaskExpertImageProcessor
from modeling_taskexpert.image_processing_taskexpert import load_rgb_image
from modeling_taskexpert.data import (
    build_transforms,
    collate_dense_batch,
    dataset_task_specs,
    load_multitask_dataset,
    read_dataset_metadata,
)
from modeling_taskexpert.data.streaming import StreamingSamples, batches_per_epoch, epoch_batches
from modeling_taskexpert.evaluation import BoundaryEvaluationError, DenseMultiTaskEvaluator, evaluate_model
from modeling_taskexpert.evaluation.trivial_baselines import recorded_baseline
from modeling_taskexpert.file_utils import give_default_permissions, write_json_atomic
from modeling_taskexpert.training import (
    CheckpointError,
    CheckpointWriteError,
    JsonLinesLogger,
    LossWeighting,
    STAGING_PREFIX,
    RecipeError,
    build_model_card,
    claim_output_dir,
    dump_recipe,
    load_checkpoint,
    lock_output_dir,
    parse_command_line,
    plot_training_curves,
    lr_factor,
    recipe_fingerprint,
    resolve_checkpoint,
    save_checkpoint,
    write_example_maps,
    write_provenance,
)

# The chance bar of the synthetic benchmark (modeling_taskexpert/evaluation/trivial_baselines.py), shown in the card of a
# model evaluated on the data it was measured on.
RECORDED_CHANCE_BASELINE = Path(__file__).resolve().parent / "bench" / "trivial_baselines.json"
# Files of the output folder that are never uploaded to the Hub: resumable state (optimiser moments, random
# generators) and hidden temporary files.
HUB_IGNORE_PATTERNS = ["checkpoints/*", ".*", "**/.*"]


class TrainingError(RuntimeError):
    """Training cannot go on (for instance the loss is no longer finite); the message names the step and what to do."""


# Model config fields that train.py sets itself: the recipe's `tasks`, the dataset's task kinds and class names.
FIELDS_SET_BY_TRAINING = ("tasks", "task_id2label", "task_kinds")
SHARDED_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def valid_model_config_keys(model_type: str) -> set[str]:
    """Fields a config of `model_type` understands: its own arguments and those of `PretrainedConfig`."""
    import inspect

    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_class = CONFIG_MAPPING[model_type]
    keys = set()
    for cls in (config_class, PretrainedConfig):
        keys.update(name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                    if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL))  # fmt: skip
    keys.update(PretrainedConfig().to_dict())
    keys.update(getattr(config_class, "attribute_map", {}))
    return keys - {"model_type", "transformers_version", "_name_or_path"}


def build_model_config(recipe, metadata):
    """The model config of the recipe, with the tasks and class names of the dataset."""
    from transformers import CONFIG_MAPPING

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


def check_hub_access(recipe) -> None:
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


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, task_specs: dict) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, num_workers=num_workers,
        collate_fn=partial(collate_dense_batch, task_specs=task_specs), persistent_workers=False,
    )  # fmt: skip


def main(argv=None) -> dict:
    started = time.perf_counter()
    recipe = parse_command_line(argv)
    fingerprint, fingerprint_fields = recipe_fingerprint(recipe)
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

    # ---- data and model ------------------------------------------------------------------------------------
    try:
        metadata = read_dataset_metadata(recipe.dataset)
    except (ValueError, OSError) as error:  # missing folder, unreachable Hub id, damaged metadata
        raise RecipeError(f"Recipe field `dataset`: {error}") from None
    config = build_model_config(recipe, metadata)
    tasks = list(config.tasks)
    try:
        weighting = LossWeighting(
            tasks, config.loss_weights, recipe.loss_weighting, recipe.dwa_temperature, recipe.dwa_window
        )
    except ValueError as error:
        raise RecipeError(f"Loss weighting of model config {recipe.model_config}: {error}") from None
    try:  # built now so that a scorer that cannot run fails before training, not after it
        evaluator = DenseMultiTaskEvaluator.from_metadata(
            metadata, tasks=tasks, edge_mode=recipe.edge_mode, single_task_baselines=recipe.single_task_baselines
        )
        final_evaluator = evaluator
        has_boundaries = any(config.task_specs[task].kind.name == "boundary" for task in tasks)
        if list(recipe.final_edge_modes) != [recipe.edge_mode] and has_boundaries:
            final_evaluator = DenseMultiTaskEvaluator.from_metadata(
                metadata, tasks=tasks, edge_mode=recipe.final_edge_modes, edge_workers=recipe.edge_workers,
                single_task_baselines=recipe.single_task_baselines,
            )  # fmt: skip
    except BoundaryEvaluationError as error:
        raise RecipeError(f"{error} (recipe fields `edge_mode` / `final_edge_modes`)") from None
    except (ValueError, OSError) as error:
        raise RecipeError(f"Evaluation settings of the recipe: {error}") from None
    # Seeded right before the model is built, whose backbone comes first: its initial weights depend on the seed
    # alone, so every variant of a study's seed starts from the same backbone (data order and augmentations have
    # their own seeded generators).
    set_seed(recipe.seed)
    model = AutoModel.from_config(config)
    if getattr(config, "backbone_checkpoint", None):
        model.load_pretrained_backbone()
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    num_parameters = sum(p.numel() for p in model.parameters())
    output_lock = None  # held by the main process until the run ends: one run per output folder
    if accelerator.is_main_process:
        check_output_dir(recipe.output_dir, min_free_bytes=num_parameters * 4 * 3 * (recipe.save_total_limit + 2))
        output_lock = lock_output_dir(recipe.output_dir)
    accelerator.wait_for_everyone()

    # ---- whose output folder: resume our own checkpoint, or start afresh in a folder that is not another run's ----
    found = resolve_checkpoint(recipe.output_dir, recipe.resume_from_checkpoint, fingerprint, fingerprint_fields,
                               warn=accelerator.print)  # fmt: skip
    if found is None:
        if recipe.resume_from_checkpoint == "latest":
            accelerator.print(f"No checkpoint under {recipe.output_dir}; starting from scratch.")
        claim_output_dir(recipe.output_dir, fingerprint, recipe.overwrite_output_dir, accelerator)
    if accelerator.is_main_process:
        write_provenance(recipe.output_dir, fingerprint, resumed_at_step=found[1]["step"] if found else None)

    eval_size = tuple(metadata["eval_size"])
    processor = TaskExpertImageProcessor(
        size={"height": eval_size[0], "width": eval_size[1]}, size_divisor=config.patch_size
    )
    train_transform = build_transforms(metadata, train=True, tasks=tasks, size=recipe.crop_size, seed=recipe.seed)
    if recipe.streaming:  # this process's share of the stream, shuffled per epoch (data/streaming.py)
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
    train_loader = make_loader(
        train_dataset, recipe.per_device_train_batch_size, not recipe.streaming, recipe.num_workers, specs
    )
    eval_loader = make_loader(eval_dataset, recipe.per_device_eval_batch_size, False, recipe.num_workers, specs)

    # ---- optimisation --------------------------------------------------------------------------------------
    parameters = list(model.parameters()) + list(weighting.parameters())
    betas = (recipe.adam_beta1, recipe.adam_beta2)
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(
            parameters, lr=recipe.learning_rate, betas=betas, eps=recipe.adam_epsilon, weight_decay=recipe.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(
            parameters, lr=recipe.learning_rate, betas=betas, eps=recipe.adam_epsilon, weight_decay=recipe.weight_decay
        )
    # Stepped by hand once per optimiser step (a prepared scheduler would step once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(recipe.lr_schedule, recipe.warmup_steps, recipe.max_steps, recipe.poly_power)
    )

    if recipe.streaming:  # the stream is split across processes already: the loader is not prepared (sharded again)
        model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    weighting = weighting.to(accelerator.device)

    # ---- resume --------------------------------------------------------------------------------------------
    completed_steps, last_checkpoint = 0, None
    if found is not None:
        last_checkpoint, state = found
        load_checkpoint(accelerator, last_checkpoint, state, scheduler, weighting, warn=accelerator.print)
        completed_steps = state["step"]
        accelerator.print(f"Resumed from {last_checkpoint} at step {completed_steps}.")
    log = None
    if accelerator.is_main_process:
        try:
            log = JsonLinesLogger(
                Path(recipe.output_dir) / "train_log.jsonl", resume_step=completed_steps if found else None
            )
        except ValueError as error:  # a damaged log (a torn last line is dropped with a warning)
            raise RecipeError(f"Cannot resume in {recipe.output_dir}: {error}") from None
    if accelerator.is_main_process:
        dump_recipe(recipe, Path(recipe.output_dir) / "recipe.yaml")
    accelerator.init_trackers("taskexpert", config=_scalar_items(recipe.to_dict()))

    num_train_samples = metadata["splits"]["train"]
    if recipe.streaming:  # the same number of batches on every process (data/streaming.py)
        loader_batches = batches_per_epoch(
            num_train_samples, accelerator.num_processes, recipe.per_device_train_batch_size
        )
    else:
        loader_batches = len(train_loader)
    steps_per_epoch = loader_batches // recipe.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise RecipeError(
            f"The training split has too few samples for one step ({num_train_samples} samples, batch "
            f"{recipe.per_device_train_batch_size} x {accelerator.num_processes} processes x {recipe.gradient_accumulation_steps} accumulation)."
        )
    accelerator.print(
        f"Training {config.model_type} ({num_parameters / 1e6:.2f} M parameters) on {num_train_samples} samples"
        f"{' (streamed)' if recipe.streaming else ''}, tasks {tasks}, {accelerator.num_processes} process(es), "
        f"{recipe.max_steps} steps."
    )

    # ---- the loop ------------------------------------------------------------------------------------------
    metrics: dict = {}
    progress = tqdm(
        total=recipe.max_steps, initial=completed_steps, desc="Training", disable=not accelerator.is_local_main_process
    )
    running, window_start, window_steps = {}, time.perf_counter(), 0
    epoch = completed_steps // steps_per_epoch
    skip_batches = (completed_steps % steps_per_epoch) * recipe.gradient_accumulation_steps
    model.train()
    while completed_steps < recipe.max_steps:
        train_transform.set_epoch(epoch)  # augmentations are a function of (seed, epoch, sample id)
        if recipe.streaming:
            train_dataset.set_epoch(epoch)  # the shuffle of the stream
            batches = (send_to_device(batch, accelerator.device)
                       for batch in epoch_batches(train_loader, steps_per_epoch * recipe.gradient_accumulation_steps,
                                                  skip_batches))  # fmt: skip
        else:
            train_loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                loss = weighting(outputs.task_losses)
                if outputs.aux_loss is not None:
                    loss = loss + outputs.aux_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    weighting.synchronize_gradients(accelerator)
                    if recipe.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(parameters, recipe.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            values = _accumulate(
                running, loss, {**outputs.task_losses, **(getattr(outputs, "aux_losses", None) or {})}, accelerator
            )
            _stop_if_not_finite(values, completed_steps + 1, last_checkpoint)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            completed_steps += 1
            window_steps += 1
            progress.update(1)

            if completed_steps % recipe.logging_steps == 0 or completed_steps == recipe.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {key: value / running["count"] for key, value in running.items() if key != "count"}
                record.update(step=completed_steps, kind="train", lr=scheduler.get_last_lr()[0], epoch=epoch,
                              world_size=accelerator.num_processes,
                              images_per_second=window_steps * recipe.per_device_train_batch_size
                              * recipe.gradient_accumulation_steps * accelerator.num_processes / max(elapsed, 1e-9))  # fmt: skip
                record.update(weighting.describe())
                progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_second']:.1f}")
                accelerator.log({k: v for k, v in record.items() if k != "kind"}, step=completed_steps)
                if log is not None:
                    log.log(record)
                running, window_start, window_steps = {}, time.perf_counter(), 0

            if recipe.eval_steps and completed_steps % recipe.eval_steps == 0 and completed_steps < recipe.max_steps:
                metrics = _evaluate(model, eval_loader, evaluator, accelerator, log, completed_steps)
            if recipe.save_steps and completed_steps % recipe.save_steps == 0:
                try:
                    last_checkpoint = save_checkpoint(
                        accelerator, recipe.output_dir, completed_steps,
                        {"epoch": epoch, "recipe_sha256": fingerprint, "recipe": fingerprint_fields},
                        recipe.save_total_limit, scheduler, weighting,
                    )  # fmt: skip
                except CheckpointWriteError as error:
                    raise TrainingError(str(error)) from None
            if completed_steps >= recipe.max_steps:
                break
        epoch += 1
        skip_batches = 0
    progress.close()

    # ---- final evaluation and the saved model --------------------------------------------------------------
    try:
        metrics = _evaluate(model, eval_loader, final_evaluator, accelerator, log, completed_steps)
    finally:
        final_evaluator.close()
    # Sharded training (FSDP2, DeepSpeed): the full weights are gathered (a collective) into an ordinary model, which
    # the main process saves unsharded; otherwise the trained model itself is saved.
    sharded = accelerator.distributed_type in SHARDED_TYPES
    full_state = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model)
        if sharded:
            final_model = AutoModel.from_config(config)
            final_model.load_state_dict(full_state)
            final_model.eval()
        chance = recorded_baseline(RECORDED_CHANCE_BASELINE, metadata, len(eval_dataset))
        save_final_model(final_model, processor, recipe, metrics, metadata, chance_baseline=chance)
        log.log({"kind": "end", "step": completed_steps, "runtime_seconds": time.perf_counter() - started,
                 "num_eval_samples": len(eval_dataset), "chance_baseline": chance})  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if recipe.push_to_hub and accelerator.is_main_process:
        push_folder(recipe)
    if output_lock is not None:
        output_lock.close()  # the folder is free for the next run
    return metrics


def _accumulate(running: dict, loss: torch.Tensor, parts: dict, accelerator) -> dict:
    """Add this micro-batch's total loss and its parts (task losses, unweighted auxiliary terms such as Mod-Squad's
    mutual information), averaged over processes, to the running window; return those averages."""
    names = ["loss"] + [f"loss/{name}" for name in parts]
    values = torch.stack([loss.detach().float()] + [value.detach().float() for value in parts.values()])
    values = accelerator.reduce(values, reduction="mean")
    averages = dict(zip(names, values.tolist()))
    for name, value in averages.items():
        running[name] = running.get(name, 0.0) + value
    running["count"] = running.get("count", 0) + 1
    return averages


def _stop_if_not_finite(values: dict, step: int, last_checkpoint) -> None:
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


def _evaluate(model, eval_loader, evaluator, accelerator, log, step: int) -> dict:
    metrics = evaluate_model(model, eval_loader, evaluator, accelerator=accelerator)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "/IoU/" not in k}
    accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(summary.items())))
    accelerator.log({f"eval/{k}": v for k, v in summary.items()}, step=step)
    if log is not None:
        log.log({"step": step, "kind": "eval", **summary})
    return metrics


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


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, CheckpointError) as error:  # refused before training started
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:  # failed while running
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # a write of the run failed: a full disk, a quota, a file system turned read-only
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(
            f"train.py: cannot write {error.filename or 'to the output folder'}: {error.strerror}. The checkpoints "
            "written before are intact (a final model is only ever written whole): free space, then continue with "
            "--resume_from_checkpoint latest.",
            file=sys.stderr,
        )
        sys.exit(1)
