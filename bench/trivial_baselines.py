"""The "chance" bar of `make train`: metrics of input-independent predictors on a dataset's validation split.

Each task gets the best constant prediction a model could learn without looking at the image: the most frequent
class everywhere (segmentation), the positive rate as a probability everywhere (saliency, boundaries), the mean
normal direction (normals), the mean depth (depth). A trained model is clearly better than chance when it beats these
on every task. Usage: `python bench/trivial_baselines.py --dataset data/synthetic [--output bench/trivial_baselines.json]`.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_taskexpert.data import build_transforms, collate_dense_batch, read_dataset_metadata, load_multitask_dataset  # noqa: E402
from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator  # noqa: E402
from modeling_taskexpert.task_definitions import IGNORE_INDEX, TASKS  # noqa: E402
from modeling_taskexpert.training import write_json_atomic  # noqa: E402


def label_statistics(loader, tasks) -> dict:
    """Per task, the statistic its constant predictor uses, from the validation labels."""
    sums = {task: None for task in tasks}
    for batch in loader:
        for task in tasks:
            label = batch["labels"][task]
            kind = TASKS[task].kind
            if kind == "segmentation":
                valid = label[label != IGNORE_INDEX]
                counts = torch.bincount(valid, minlength=256)[:255].double()
                sums[task] = counts if sums[task] is None else sums[task] + counts
            elif kind == "normals":
                valid = (label != IGNORE_INDEX).all(dim=1, keepdim=True)
                total = (label * valid).sum(dim=(0, 2, 3)).double()
                sums[task] = total if sums[task] is None else sums[task] + total
            else:
                valid = label != IGNORE_INDEX
                total = torch.stack([label[valid].double().sum(), valid.sum().double()])
                sums[task] = total if sums[task] is None else sums[task] + total
    statistics = {}
    for task, value in sums.items():
        kind = TASKS[task].kind
        if kind == "segmentation":
            statistics[task] = int(value.argmax())
        elif kind == "normals":
            statistics[task] = F.normalize(value.float(), dim=0)
        else:
            statistics[task] = float(value[0] / value[1])
    return statistics


def constant_predictions(batch, statistics) -> dict:
    predictions = {}
    for task, value in statistics.items():
        label = batch["labels"][task]
        if TASKS[task].kind == "segmentation":
            predictions[task] = torch.full_like(label, value)
        elif TASKS[task].kind == "normals":
            predictions[task] = value.view(1, 3, 1, 1).expand_as(label).contiguous()
        else:
            predictions[task] = torch.full(label.shape, value, dtype=torch.float32)
    return predictions


def trivial_baseline_metrics(dataset: str, edge_mode: str = "approximate") -> dict:
    metadata = read_dataset_metadata(dataset)
    tasks = [task for task in TASKS if task in metadata["tasks"]]
    data = load_multitask_dataset(dataset, "validation").with_transform(build_transforms(metadata, train=False, tasks=tasks))
    loader = DataLoader(data, batch_size=16, collate_fn=collate_dense_batch)
    statistics = label_statistics(loader, tasks)
    evaluator = DenseMultiTaskEvaluator.from_metadata(metadata, tasks=tasks, edge_mode=edge_mode)
    for batch in loader:
        evaluator.update(constant_predictions(batch, statistics), batch["labels"], meta=batch)
    return evaluator.compute()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="data/synthetic")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    metrics = trivial_baseline_metrics(args.dataset)
    for key in sorted(metrics):
        if "/IoU/" not in key:
            print(f"{key:28s} {metrics[key]:.4g}")
    if args.output:
        write_json_atomic(Path(args.output), metrics)
    return metrics


if __name__ == "__main__":
    main()
