"""Multi-task gain Δm over single-task baselines (protocol section 4.2).

Δm = (100 / T) Σ_i (-1)^{l_i} (M_i - S_i) / S_i, in %, with M_i the multi-task model's primary metric
of task i, S_i the single-task baseline's, and l_i = 1 for lower-is-better metrics (normals mean
angular error, depth RMSE). A positive Δm means the multi-task model is better on average.
"""

import json
import os
from typing import Mapping, Optional, Sequence, Union

from ..task_definitions import TASKS, TaskSpec

# Main metric of each preset task and whether higher is better (derived from the task kinds).
PRIMARY_METRICS = {task: (spec.primary_metric_key, spec.kind.higher_is_better) for task, spec in TASKS.items()}
# Suffix of the approximate boundary scorer's key, used for Δm when the exact one was not computed.
APPROXIMATE_SUFFIX = "_approx"
APPROXIMATE_EDGE_METRIC = "edge/odsF" + APPROXIMATE_SUFFIX


def load_baselines(baselines: Union[dict, str, os.PathLike]) -> dict[str, float]:
    """Baseline metrics from a dict or a JSON file, keyed like the evaluator's results ("semseg/mIoU").

    A JSON file may hold that mapping directly or be the output of the evaluation command line (whose
    metrics sit under "metrics"), so the results of single-task models can be used as they are.
    """
    source = "single_task_baselines"
    if isinstance(baselines, (str, os.PathLike)):
        source = os.fspath(baselines)
        try:
            with open(baselines, encoding="utf-8") as handle:
                baselines = json.load(handle)
        except FileNotFoundError:
            raise FileNotFoundError(f"Single-task baseline file {source!r} does not exist.") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"Single-task baseline file {source!r} is not valid JSON: {error}.") from None
    if isinstance(baselines, dict) and isinstance(baselines.get("metrics"), dict):
        baselines = baselines["metrics"]
    if not isinstance(baselines, dict):
        raise ValueError(
            f"{source} must map metric keys such as 'semseg/mIoU' to numbers, got {type(baselines).__name__}."
        )
    return baselines


def _primary_key(spec: TaskSpec, results: dict, baselines: Optional[dict] = None) -> tuple[str, bool]:
    """The primary metric key of a task. Boundaries: the exact scorer's odsF, or the approximate one's when the exact
    one is missing from the results (or, given baselines, from the baselines while both have the approximate one)."""
    key, higher_is_better = spec.primary_metric_key, spec.kind.higher_is_better
    approximate = key + APPROXIMATE_SUFFIX
    if spec.kind.name == "boundary" and approximate in results:
        exact_missing = key not in results or (baselines is not None and key not in baselines)
        if exact_missing and (baselines is None or approximate in baselines):
            key = approximate
    return key, higher_is_better


def compute_delta_m(
    results: dict[str, float],
    baselines: Union[dict, str, os.PathLike],
    tasks: Optional[Union[Sequence[str], Mapping[str, TaskSpec]]] = None,
) -> float:
    """Δm in % of `results` against `baselines` over `tasks` (default: every preset task with a primary metric in
    results). `tasks` are preset task names or a {task: TaskSpec} mapping (any task: its kind gives the primary metric
    and its direction).

    Both mappings use the evaluator's keys; the baseline must give the same key as the results
    (e.g. "edge/odsF_approx" is only compared with an approximate baseline). Boundaries use the exact scorer's
    odsF when both sides have it, else the approximate one's.
    """
    baselines = load_baselines(baselines)
    if tasks is None:
        tasks = {task: spec for task, spec in TASKS.items() if _primary_key(spec, results)[0] in results}
    elif not isinstance(tasks, Mapping):
        for task in tasks:
            if task not in TASKS:
                raise ValueError(
                    f"Task {task!r} is not a preset task ({', '.join(TASKS)}); pass the tasks as {{task: TaskSpec}}."
                )
        tasks = {task: TASKS[task] for task in tasks}
    if not tasks:
        raise ValueError("compute_delta_m needs at least one task with a primary metric in the results.")
    total = 0.0
    for task, spec in tasks.items():
        key, higher_is_better = _primary_key(spec, results, baselines)
        if key not in results:
            raise ValueError(f"The results have no {key!r}, the primary metric of task {task!r}, needed for Δm.")
        if key not in baselines:
            raise ValueError(
                f"The single-task baselines have no {key!r} (task {task!r}); "
                f"they give: {sorted(baselines) or 'nothing'}."
            )
        baseline = baselines[key]
        if not isinstance(baseline, (int, float)) or isinstance(baseline, bool) or not baseline > 0:
            raise ValueError(f"The single-task baseline {key!r} must be a positive number, got {baseline!r}.")
        relative = (results[key] - baseline) / baseline
        total += relative if higher_is_better else -relative
    return 100.0 * total / len(tasks)
