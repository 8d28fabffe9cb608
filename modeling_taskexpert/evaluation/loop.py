"""The evaluation loop shared by the command line and the training script."""

from typing import Any

import torch
from tqdm.auto import tqdm

from .evaluator import DenseMultiTaskEvaluator


def _real_sample_count(accelerator, batch_size: int) -> int:
    """How many samples of this process's current batch are real, not padding added by the sampler.

    With several processes, accelerate completes the last round of batches with samples from the
    start of the dataset so every process gets a batch of the same size; `gather_for_metrics` then
    keeps the first `remainder` samples of the batches concatenated in process order. The same
    rule, applied to this process's slice of that concatenation, gives its real samples.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return batch_size
    state = accelerator.gradient_state
    if not state.end_of_dataloader or state.remainder <= 0:
        return batch_size
    return max(0, min(batch_size, state.remainder - accelerator.process_index * batch_size))


def _take(batch: Any, count: int) -> Any:
    """The first `count` samples of a (nested) batch of tensors and lists."""
    if isinstance(batch, dict):
        return {key: _take(value, count) for key, value in batch.items()}
    if isinstance(batch, (torch.Tensor, list, tuple)):
        return batch[:count]
    return batch


@torch.no_grad()
def evaluate_model(
    model,
    dataloader,
    evaluator: DenseMultiTaskEvaluator,
    accelerator=None,
    progress: bool = True,
) -> dict[str, float]:
    """Run `model` over `dataloader` and return `evaluator`'s metrics (summed over all processes).

    Args:
        model: a TaskExpert-style model: `model(pixel_values=..., tasks=[...]).logits` is a dict task ->
            (B, C, H, W) logits at input resolution.
        dataloader: yields collated batches (`collate_dense_batch`); with `accelerator`, the prepared
            dataloader of this process.
        evaluator: receives the post-processed predictions; it is reset first, so the result covers
            exactly this pass over the data.
        accelerator: an `accelerate.Accelerator` for data-parallel evaluation. Each process adds only its
            own real samples (the duplicates that even out the last batch are dropped) and the states
            are summed across processes in `evaluator.compute()`.
        progress: show a progress bar (on the main process only).

    The model is put in eval mode for the pass and restored to its previous mode afterwards.
    """
    from ..image_processing_dense_multitask import logits_to_predictions

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    show_progress = progress and (accelerator is None or accelerator.is_local_main_process)
    was_training = model.training
    model.eval()
    evaluator.reset()
    try:
        for batch in tqdm(dataloader, desc="Evaluating", disable=not show_progress):
            # Every process runs the forward pass, even on a padding-only batch: a wrapped (DDP) model
            # may synchronise buffers inside it.
            outputs = model(pixel_values=batch["pixel_values"].to(device), tasks=evaluator.tasks)
            predictions = logits_to_predictions(
                {task: outputs.logits[task] for task in evaluator.tasks}, evaluator.task_specs
            )
            count = _real_sample_count(accelerator, len(batch["pixel_values"]))
            if count == 0:
                continue
            if count < len(batch["pixel_values"]):
                batch, predictions = _take(batch, count), _take(predictions, count)
            evaluator.update(predictions, batch["labels"], meta=batch)
    finally:
        model.train(was_training)
    evaluator.flush(progress=show_progress)  # boundary images still being scored in the background
    return evaluator.compute()
