"""Dense multi-task benchmark metrics as an `evaluate` metric module, loadable offline by path.

```python
import evaluate
from modeling_taskexpert.evaluation import multitask_dense_metric_path

metric = evaluate.load(multitask_dense_metric_path(), tasks=["semseg", "depth"], num_classes={"semseg": 40},
                       dataset="nyud")
metric.add_batch(predictions=[{"semseg": semseg_ids, "depth": depth_m}], references=[{"semseg": ..., "depth": ...}])
results = metric.compute()
```

Each example is a dict task -> (H, W) map ((3, H, W) for normals) following the package's tensor
conventions; the keyword arguments of `evaluate.load` are those of `DenseMultiTaskEvaluator`.
Examples are stored by `evaluate` as nested lists, which is slow for large maps: for full-size
benchmark runs, use `DenseMultiTaskEvaluator` (or `python -m modeling_taskexpert.evaluation`).
"""

import inspect

import datasets
import evaluate
import numpy as np

from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator
from modeling_taskexpert.task_definitions import TASKS

_DESCRIPTION = """\
The metrics of the dense multi-task benchmark protocol (PASCAL-Context, NYUD-v2): mIoU for semantic
and human part segmentation, maxF for saliency, angular errors for surface normals, RMSE and
related errors for depth, odsF for boundaries, and the multi-task gain delta_m, pooled over all
pixels of all examples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of dicts task -> post-processed prediction of one image (class ids, probabilities
        in [0, 1], unit normals (3, H, W), depth in metres).
    references: list of dicts task -> label of one image, with 255 for ignored pixels.
Returns:
    dict "<task>/<metric>" -> value (%, degrees or metres), as `DenseMultiTaskEvaluator.compute`.
"""

_CITATION = """\
@inproceedings{ye2023taskexpert,
  title={TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial Mixture-of-Experts},
  author={Ye, Hanrong and Xu, Dan},
  booktitle={ICCV},
  year={2023}
}
"""


def _map_feature(task: str):
    value = datasets.Value("int64" if TASKS[task].kind.name == "segmentation" else "float32")
    feature = datasets.Sequence(datasets.Sequence(value))
    return datasets.Sequence(feature) if TASKS[task].label_channels else feature


class MultitaskDenseMetric(evaluate.Metric):
    """`evaluate` wrapper of `DenseMultiTaskEvaluator`; construction arguments are the evaluator's."""

    def __init__(self, tasks=None, **kwargs):
        # Arguments of evaluate's own constructor stay with it; the rest configure the evaluator.
        evaluate_keys = inspect.signature(evaluate.EvaluationModule.__init__).parameters
        evaluator_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key not in evaluate_keys}
        if not tasks:
            raise ValueError("Pass the tasks to evaluate: evaluate.load(path, tasks=[...], num_classes={...}, ...).")
        # Build once now so that a bad setting fails at load time rather than at compute time.
        DenseMultiTaskEvaluator(tasks=tasks, **evaluator_kwargs)
        self.tasks = list(tasks)
        self.evaluator_kwargs = evaluator_kwargs
        super().__init__(**kwargs)

    def _info(self):
        features = {task: _map_feature(task) for task in self.tasks}
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": dict(features), "references": dict(features)}),
        )

    def _compute(self, predictions, references):
        evaluator = DenseMultiTaskEvaluator(tasks=self.tasks, **self.evaluator_kwargs)
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            try:
                evaluator.update(
                    {task: np.asarray(prediction[task])[None] for task in self.tasks},
                    {task: np.asarray(reference[task])[None] for task in self.tasks},
                )
            except (ValueError, TypeError) as error:
                raise type(error)(f"Example {index}: {error}") from None
        return evaluator.compute(sync=False)
