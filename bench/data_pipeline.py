"""Samples per second of the training data pipeline against the tiny model's training-step rate."""

import tempfile
from pathlib import Path

from torch.utils.data import DataLoader

from .measure import interleaved_times, summarize
from .models import build_model, load_config, random_labels, random_pixels, train_step
from .plan import BenchPlan, SuiteContext
from .formatting import ratio, table

KEY = "data_pipeline"
TITLE = "Data pipeline vs training step"


def measure(context: SuiteContext) -> dict:
    return data_pipeline(context.plan)


def data_pipeline(plan: BenchPlan) -> dict:
    """Samples per second of the training data pipeline (synthetic dataset, protocol train transforms, collate)
    with 0 and 2 workers, against the tiny model's training-step rate at the same batch size and image size."""
    from modeling_taskexpert.data import (
        build_transforms,
        collate_dense_batch,
        generate_synthetic_dataset,
        read_dataset_metadata,
        load_multitask_dataset,
    )

    with tempfile.TemporaryDirectory(prefix="taskexpert-bench-") as scratch:
        folder = Path(scratch) / "synthetic"
        generate_synthetic_dataset(
            folder, train_size=plan.data_samples, val_size=1, image_size=plan.data_image_size, num_workers=1
        )
        metadata = read_dataset_metadata(folder)
        dataset = load_multitask_dataset(folder, "train", cache_dir=str(Path(scratch) / "cache"))
        dataset = dataset.with_transform(build_transforms(metadata, train=True, seed=0))

        def epoch(workers: int):
            loader = DataLoader(
                dataset, batch_size=plan.data_batch, shuffle=True, num_workers=workers, collate_fn=collate_dense_batch
            )
            return lambda: sum(len(batch["ids"]) for batch in loader)

        calls = {f"{workers}_workers": epoch(workers) for workers in plan.data_workers}
        times = interleaved_times(calls, plan.train_budget_s, plan.min_rounds, max_rounds=5)
    loader_rates = {name: summarize(values, plan.data_samples) for name, values in times.items()}

    config = load_config(plan.memory_setting.preset, tasks=list(metadata["tasks"]), task_id2label=_id2label(metadata))
    model = build_model(config)
    pixels = random_pixels(plan.data_batch, plan.data_image_size)
    labels = random_labels(config, plan.data_batch, plan.data_image_size)
    step_times = interleaved_times(
        {"train_step": train_step(model, pixels, labels)}, plan.small_budget_s, plan.min_rounds
    )
    train_rate = summarize(step_times["train_step"], plan.data_batch)
    most_workers = f"{max(plan.data_workers)}_workers"
    return {
        "samples": plan.data_samples,
        "image_size": plan.data_image_size,
        "batch": plan.data_batch,
        "loader": loader_rates,
        "train_step": train_rate,
        "loader_vs_train_rate": {
            name: rate["items_per_s"] / train_rate["items_per_s"] for name, rate in loader_rates.items()
        },
        "target_workers": most_workers,
    }


def _id2label(metadata: dict) -> dict:
    return {task: info["id2label"] for task, info in metadata["tasks"].items() if info.get("id2label")}


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _data_text(section))]


def _data_text(data: dict) -> str:
    rows = [[name.replace("_", " "), f"{rate['items_per_s']:.1f}", ratio(data["loader_vs_train_rate"][name])]
            for name, rate in data["loader"].items()]  # fmt: skip
    rows.append(["tiny model train step", f"{data['train_step']['items_per_s']:.1f}", "1.00×"])
    return "\n\n".join(
        [
            f"A synthetic dataset of {data['samples']} images at {data['image_size']} px is generated for the run; the "
            f"DataLoader applies the protocol's training transforms and the collate at batch {data['batch']} (one full "
            "epoch per round, worker start-up included); the tiny model's training step runs at the same batch and size.",
            table(["", "samples/s (context)", "ratio to the train step"], rows),
        ]
    )
