"""What the report measures on the trained models and the data: parameters and FLOPs of a model, its routing on
validation images (through the routing report shared by both model types), and how far the single-task models'
augmentations are paired with the multi-task models'."""

import contextlib
import functools
import json
from pathlib import Path
from typing import Optional

import torch

from modeling_taskexpert.dense_model_utils import routing_summary

from .paths import REPO_ROOT

GATE_IMAGES = 8  # validation images whose routing is averaged for the usage figures
PAIRING_SAMPLES = 200  # training samples whose augmentations are compared (measure.augmentation_pairing)


def resolve_dataset(dataset: str) -> str:
    """A recipe's dataset folder, relative to the repository root when it is one of its folders."""
    return dataset if Path(dataset).is_absolute() or not (REPO_ROOT / dataset).exists() else str(REPO_ROOT / dataset)


def load_model(folder: Path):
    from modeling_taskexpert.loading import load_dense_model

    return load_dense_model(folder).eval()


def _metadata(dataset: str) -> dict:
    from modeling_taskexpert.data import read_dataset_metadata

    return read_dataset_metadata(resolve_dataset(dataset))


def model_cost(run: dict, dataset: str) -> dict:
    """Parameters and FLOPs of one forward pass of one image at the evaluation size of `dataset` (the study's, recorded
    by the runner; a run's `recipe.yaml` names its dataset without the machine's path), all tasks."""
    from bench.measure import count_flops

    model = load_model(run["folder"])
    height, width = _metadata(dataset)["eval_size"]
    pixel_values = torch.zeros(1, 3, height, width)
    with torch.no_grad():
        flops = count_flops(lambda: model(pixel_values=pixel_values))
    return {"parameters": sum(p.numel() for p in model.parameters()), "flops": flops, "eval_size": [height, width]}


def _validation_pixels(run: dict, dataset: str, count: int) -> torch.Tensor:
    from modeling_taskexpert.data import build_transforms, load_multitask_dataset

    split = load_multitask_dataset(resolve_dataset(dataset), "validation")
    split = split.select(range(min(count, len(split)))).with_transform(
        build_transforms(_metadata(dataset), train=False, tasks=run["tasks"])
    )
    return torch.stack([sample["pixel_values"] for sample in split])


def routing_usage(run: dict, dataset: str, count: int = GATE_IMAGES) -> Optional[dict]:
    """The routing summary (`dense_model_utils.routing_summary`: per task and routing layer, the mean weight, the
    selection share and the top share of every candidate) of the run's model on `count` validation images; None for
    a model without routing layers."""
    model = load_model(run["folder"])
    with torch.no_grad():
        gates = model(pixel_values=_validation_pixels(run, dataset, count), output_gates=True).gates
    if not gates:
        return None
    return routing_summary(gates, model.config.layer_names, model.config.candidate_names)


def augmentation_pairing(dataset: str, tasks: list[str], seed: int = 0, samples: int = PAIRING_SAMPLES) -> dict:
    """How many of the first `samples` training samples (epoch 0) a single-task model of each task sees augmented
    exactly as a model of `tasks` does. The protocol's crop check reads the semseg labels, which a model without
    semseg does not load, so its crop differs wherever the check rejected a crop."""
    from modeling_taskexpert.data import build_transforms, read_dataset_metadata, load_multitask_dataset

    dataset = resolve_dataset(dataset)
    metadata = read_dataset_metadata(dataset)
    split = load_multitask_dataset(dataset, "train")
    split = split.select(range(min(samples, len(split))))
    reference = split.with_transform(build_transforms(metadata, train=True, tasks=tasks, seed=seed))
    reference_pixels = [reference[index]["pixel_values"] for index in range(len(split))]
    identical = {}
    for task in tasks:
        single = split.with_transform(build_transforms(metadata, train=True, tasks=[task], seed=seed))
        identical[task] = sum(
            torch.equal(single[index]["pixel_values"], reference_pixels[index]) for index in range(len(split))
        )
    return {"samples": len(split), "seed": seed, "identical": identical}


# The published recipes of the real benchmarks whose cost the GPU guide of the report estimates.
GPU_RECIPES = ("pascal-context-vits", "pascal-context-vitb", "pascal-context-vitl", "nyud-vitl")


def recipe_cost(name: str) -> dict:
    """Parameters and FLOPs of one forward pass of one image at the evaluation size of a real-benchmark recipe
    (`hub_configs/NAME.yaml`): its model config with the tasks and classes of its dataset's source description, built
    on the meta device (no weights, no download), plus the recipe's optimisation settings. Counted once per process
    (the recipes do not change while it runs); each call gets its own copy."""
    return json.loads(_recipe_cost(name))


@functools.lru_cache(maxsize=None)
def _recipe_cost(name: str) -> str:
    from transformers import AutoConfig, AutoModel

    from bench.measure import count_flops
    from modeling_taskexpert.data import SOURCES
    from modeling_taskexpert.training import load_recipe

    with contextlib.chdir(REPO_ROOT):  # recipes name their files relative to the repository root
        recipe = load_recipe(f"hub_configs/{name}.yaml")
        settings = json.loads(Path(recipe.model_config).read_text())
    source = SOURCES[Path(recipe.dataset).name]
    settings.update({key: value for key, value in recipe.model_overrides.items() if key != "backbone_checkpoint"})
    settings["tasks"] = list(recipe.tasks or source.tasks)
    settings["task_id2label"] = {
        task: dict(enumerate(names)) for task, names in source.class_names.items() if task in settings["tasks"]
    }
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.for_model(**settings))
    height, width = source.eval_size
    pixel_values = torch.zeros(1, 3, height, width, device="meta")
    with torch.no_grad():
        flops = count_flops(lambda: model(pixel_values=pixel_values))
    return json.dumps({
        "recipe": name, "dataset": source.name, "tasks": settings["tasks"], "eval_size": [height, width],
        "boundary_tolerance": source.boundary_tolerance, "parameters": sum(p.numel() for p in model.parameters()),
        "flops": flops, "optimizer": recipe.optimizer, "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay, "max_steps": recipe.max_steps, "batch": recipe.per_device_train_batch_size,
        "max_grad_norm": recipe.max_grad_norm, "mixed_precision": recipe.mixed_precision,
        "backbone_checkpoint": recipe.model_overrides.get("backbone_checkpoint"),
    })  # fmt: skip
