"""Evaluation of dense multi-task models with the benchmark's metrics, in Python.

`DenseMultiTaskEvaluator` streams the protocol's metrics (mIoU, saliency maxF, normals angular
errors, depth RMSE, boundary odsF) and the multi-task gain Δm over batches and processes;
`evaluate_model` runs a model over a dataloader with it; the command line is
`python -m modeling_taskexpert.evaluation --help`; the same metrics are an `evaluate` module
loadable offline with `evaluate.load(multitask_dense_metric_path(), tasks=[...], ...)`.
"""

import os

from .boundary import BOUNDARY_THRESHOLDS, BoundaryEvaluationError, BoundaryTimeLimitError, boundary_counts, edge_nms
from .delta_m import PRIMARY_METRICS, compute_delta_m, load_baselines
from .evaluator import DenseMultiTaskEvaluator, sum_across_processes
from .loop import evaluate_model
from .metrics import EmptyEvaluationError


def multitask_dense_metric_path() -> str:
    """Folder of the `evaluate` metric module, for `evaluate.load(path, ...)` without the Hub."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "multitask_dense_metric")


__all__ = [
    "BOUNDARY_THRESHOLDS",
    "PRIMARY_METRICS",
    "BoundaryEvaluationError",
    "BoundaryTimeLimitError",
    "DenseMultiTaskEvaluator",
    "EmptyEvaluationError",
    "boundary_counts",
    "compute_delta_m",
    "edge_nms",
    "evaluate_model",
    "load_baselines",
    "multitask_dense_metric_path",
    "sum_across_processes",
]
