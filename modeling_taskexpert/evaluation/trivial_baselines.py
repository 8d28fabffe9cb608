"""The "chance" bar: metrics of input-independent predictors on a dataset's validation split.

Each task gets the best constant prediction a model could learn without looking at the image: the most frequent
class everywhere (segmentation), the positive rate as a probability everywhere (saliency, boundaries), the mean
normal direction (normals), the mean depth (depth). A trained model is clearly better than chance when it beats these
on every task. The bar of the synthetic benchmark is recorded in `bench/trivial_baselines.json`, with the description
of the dataset it was measured on; `train.py` puts it in the model card of a model evaluated on that same data:

    python -m modeling_taskexpert.evaluation.trivial_baselines --dataset data/synthetic --output bench/trivial_baselines.json
"""

import argparse
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..data import build_transforms, collate_dense_batch, read_dataset_metadata, load_multitask_dataset
from ..file_utils import write_json_atomic
from ..task_definitions import IGNORE_INDEX
from .boundary import BOUNDARY_MODES
from .evaluator import DenseMultiTaskEvaluator

# Metadata fields that identify the data a recorded bar belongs to.
IDENTITY_FIELDS = ("name", "eval_size", "boundary_tolerance", "splits")


def label_statistics(loader, task_specs: dict) -> dict:
    """Per task, the statistic its constant predictor uses, from the validation labels."""
    sums = {task: None for task in task_specs}
    for batch in loader:
        for task, spec in task_specs.items():
            label = batch["labels"][task]
            kind = spec.kind.name
            if kind == "segmentation":
                valid = label[label != IGNORE_INDEX]
                counts = torch.bincount(valid, minlength=256)[:255].double()
                total = counts
            elif kind in ("normals", "regression"):  # a mean vector over the labelled pixels
                valid = spec.kind.valid_label_pixels(label)[:, None]
                total = torch.cat(
                    [torch.where(valid, label, 0).sum(dim=(0, 2, 3)).double(), valid.sum()[None].double()]
                )
            else:
                valid = label != IGNORE_INDEX
                total = torch.stack([label[valid].double().sum(), valid.sum().double()])
            sums[task] = total if sums[task] is None else sums[task] + total
    statistics = {}
    for task, value in sums.items():
        kind = task_specs[task].kind.name
        if kind == "segmentation":
            statistics[task] = int(value.argmax())
        elif kind == "normals":
            statistics[task] = F.normalize(value[:-1].float(), dim=0)
        elif kind == "regression":
            statistics[task] = (value[:-1] / value[-1]).float()
        else:
            statistics[task] = float(value[0] / value[1])
    return statistics


def constant_predictions(batch, statistics, task_specs: dict) -> dict:
    predictions = {}
    for task, value in statistics.items():
        label = batch["labels"][task]
        kind = task_specs[task].kind.name
        if kind == "segmentation":
            predictions[task] = torch.full_like(label, value)
        elif kind in ("normals", "regression"):
            predictions[task] = value.view(1, -1, 1, 1).expand_as(label).contiguous()
        else:
            predictions[task] = torch.full(label.shape, value, dtype=torch.float32)
    return predictions


def dataset_identity(metadata: dict, num_samples: int) -> dict:
    """What a recorded bar was measured on: the dataset's description and the number of validation samples scored."""
    return {**{key: metadata.get(key) for key in IDENTITY_FIELDS}, "num_samples": num_samples}


def trivial_baseline_metrics(dataset: str, boundary_mode=BOUNDARY_MODES) -> dict:
    """{"dataset": identity, "metrics": the constant predictors' metrics} on the validation split of `dataset`, with
    every boundary scorer of `boundary_mode` (both by default: the exact scorer's bar is far lower than the approximate
    one's, since it thins a constant map to a one-pixel grid before matching)."""
    metadata = read_dataset_metadata(dataset)
    transform = build_transforms(metadata, train=False)
    specs = transform.task_specs
    data = load_multitask_dataset(dataset, "validation").with_transform(transform)
    loader = DataLoader(data, batch_size=16, collate_fn=partial(collate_dense_batch, task_specs=specs))
    statistics = label_statistics(loader, specs)
    evaluator = DenseMultiTaskEvaluator.from_metadata(metadata, boundary_mode=boundary_mode)
    for batch in loader:
        evaluator.update(constant_predictions(batch, statistics, specs), batch["labels"], meta=batch)
    return {"dataset": dataset_identity(metadata, len(data)), "metrics": evaluator.compute(sync=False)}


def recorded_baseline(path, metadata: dict, num_samples: int) -> Optional[dict]:
    """The metrics of a recorded bar (a file written by this module) when it was measured on the same data as
    described by `metadata` and `num_samples`; None otherwise (or when there is no such file)."""
    import json

    try:
        recorded = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("dataset") != json.loads(
        json.dumps(dataset_identity(metadata, num_samples))
    ):
        return None
    return recorded.get("metrics")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m modeling_taskexpert.evaluation.trivial_baselines",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--dataset", default="data/synthetic")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = trivial_baseline_metrics(args.dataset)
    for key, value in sorted(result["metrics"].items()):
        if "/IoU/" not in key:
            print(f"{key:28s} {value:.4g}")
    if args.output:
        write_json_atomic(Path(args.output), result, sort_keys=True)
    return result


if __name__ == "__main__":
    main()
