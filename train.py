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
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

import modeling_taskexpert  # noqa: F401 - registers the model types with the Auto classes
from modeling_taskexpert.evaluation.trivial_baselines import recorded_baseline
from modeling_taskexpert.training import (
    CheckpointError,
    RecipeError,
    load_checkpoint,
    parse_command_line,
    recipe_fingerprint,
)
from modeling_taskexpert.training.run import (
    LossWindow,
    TrainingError,
    build_accelerator,
    build_data,
    build_evaluators,
    build_model,
    build_model_config,
    build_optimizer,
    build_recipe_loss_weighting,
    checkpoint,
    evaluate,
    final_model,
    open_training_log,
    push_folder,
    read_metadata,
    save_final_model,
    take_output_dir,
)

# The chance bar of the synthetic benchmark (modeling_taskexpert/evaluation/trivial_baselines.py), shown in the card of a
# model evaluated on the data it was measured on.
RECORDED_CHANCE_BASELINE = Path(__file__).resolve().parent / "bench" / "trivial_baselines.json"


def main(argv=None) -> dict:
    started = time.perf_counter()
    recipe = parse_command_line(argv)
    fingerprint, fingerprint_fields = recipe_fingerprint(recipe)
    accelerator = build_accelerator(recipe)

    # ---- model, loss, evaluation, output folder and data ----------------------------------------------------
    metadata = read_metadata(recipe)
    config = build_model_config(recipe, metadata)
    weighting = build_recipe_loss_weighting(recipe, config)
    evaluator, final_evaluator = build_evaluators(recipe, metadata, config)
    model = build_model(recipe, config)
    output_lock, found = take_output_dir(recipe, accelerator, model, fingerprint, fingerprint_fields)
    data = build_data(recipe, metadata, config, accelerator)

    # ---- optimisation ---------------------------------------------------------------------------------------
    parameters = list(model.parameters()) + list(weighting.parameters())
    optimizer, scheduler = build_optimizer(recipe, parameters)
    model, optimizer = data.prepare(accelerator, model, optimizer)
    weighting = weighting.to(accelerator.device)

    # ---- resume ---------------------------------------------------------------------------------------------
    completed_steps, last_checkpoint = 0, None
    if found is not None:
        last_checkpoint, state = found
        load_checkpoint(accelerator, last_checkpoint, state, scheduler, weighting, warn=accelerator.print)
        completed_steps = state["step"]
        accelerator.print(f"Resumed from {last_checkpoint} at step {completed_steps}.")
    log = open_training_log(recipe, accelerator, resume_step=completed_steps if found else None)
    steps_per_epoch = data.steps_per_epoch(accelerator)
    num_parameters = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"Training {config.model_type} ({num_parameters / 1e6:.2f} M parameters) on {data.num_train_samples} samples"
        f"{' (streamed)' if recipe.streaming else ''}, tasks {list(config.tasks)}, {accelerator.num_processes} "
        f"process(es), {recipe.max_steps} steps."
    )

    # ---- the loop -------------------------------------------------------------------------------------------
    progress = tqdm(
        total=recipe.max_steps, initial=completed_steps, desc="Training", disable=not accelerator.is_local_main_process
    )
    window = LossWindow(recipe, accelerator, log)
    epoch = completed_steps // steps_per_epoch
    skip_batches = (completed_steps % steps_per_epoch) * recipe.gradient_accumulation_steps
    model.train()
    while completed_steps < recipe.max_steps:
        for batch in data.epoch_batches(epoch, skip_batches, accelerator):
            with accelerator.accumulate(model):
                # The model combines its task losses with the recipe's weighting: its loss is the one minimised.
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"], loss_weighting=weighting)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients:
                    weighting.synchronize_gradients(accelerator)
                    if recipe.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(parameters, recipe.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window.add(outputs, completed_steps + 1, last_checkpoint)  # stops the run at a non-finite loss
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            completed_steps += 1
            window.steps += 1
            progress.update(1)
            if completed_steps % recipe.logging_steps == 0 or completed_steps == recipe.max_steps:
                window.write(completed_steps, epoch, scheduler.get_last_lr()[0], weighting, progress)
            if recipe.eval_steps and completed_steps % recipe.eval_steps == 0 and completed_steps < recipe.max_steps:
                evaluate(model, data.eval_loader, evaluator, accelerator, log, completed_steps)
            if recipe.save_steps and completed_steps % recipe.save_steps == 0:
                last_checkpoint = checkpoint(accelerator, recipe, completed_steps, epoch, fingerprint,
                                             fingerprint_fields, scheduler, weighting)  # fmt: skip
            if completed_steps >= recipe.max_steps:
                break
        epoch += 1
        skip_batches = 0
    progress.close()

    # ---- final evaluation, the saved model, the upload ------------------------------------------------------
    try:
        metrics = evaluate(model, data.eval_loader, final_evaluator, accelerator, log, completed_steps)
    finally:
        final_evaluator.close()
    trained = final_model(accelerator, model, config)
    if accelerator.is_main_process:
        chance = recorded_baseline(RECORDED_CHANCE_BASELINE, metadata, len(data.eval_dataset))
        save_final_model(trained, data.processor, recipe, metrics, metadata, chance_baseline=chance)
        log.log({"kind": "end", "step": completed_steps, "runtime_seconds": time.perf_counter() - started,
                 "num_eval_samples": len(data.eval_dataset), "chance_baseline": chance})  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if recipe.push_to_hub and accelerator.is_main_process:
        push_folder(recipe)
    if output_lock is not None:
        output_lock.close()  # the folder is free for the next run
    return metrics


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
