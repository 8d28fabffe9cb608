"""Multi-task gain Δm over single-task baselines (protocol section 4.2).

Δm = (100 / T) Σ_i (-1)^{l_i} (M_i - S_i) / S_i, in %, with M_i the multi-task model's main metric
of task i, S_i the single-task baseline's, and l_i = 1 for lower-is-better metrics (normals mean
angular error, depth RMSE). A positive Δm means the multi-task model is better on average.
"""

import json
import os
from typing import Optional, Sequence, Union

from ..task_definitions import check_task_name

# Main metric of each task and whether higher is better.
PRIMARY_METRICS = {
    "semseg": ("semseg/mIoU", True),
    "human_parts": ("human_parts/mIoU", True),
    "saliency": ("saliency/maxF", True),
    "edge": ("edge/odsF", True),
    "normals": ("normals/mean", False),
    "depth": ("depth/RMSE", False),
}
# Result key of the approximate boundary mode, used for Δm when the exact one was not computed.
APPROXIMATE_EDGE_METRIC = "edge/odsF_approx"


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


def _primary_key(task: str, results: dict, baselines: Optional[dict] = None) -> tuple[str, bool]:
    """The main metric key of `task`. Boundaries: the exact scorer's odsF, or the approximate one's when the exact
    one is missing from the results (or, given baselines, from the baselines while both have the approximate one)."""
    key, higher_is_better = PRIMARY_METRICS[task]
    if task == "edge" and APPROXIMATE_EDGE_METRIC in results:
        exact_missing = key not in results or (baselines is not None and key not in baselines)
        if exact_missing and (baselines is None or APPROXIMATE_EDGE_METRIC in baselines):
            key = APPROXIMATE_EDGE_METRIC
    return key, higher_is_better


def compute_delta_m(
    results: dict[str, float],
    baselines: Union[dict, str, os.PathLike],
    tasks: Optional[Sequence[str]] = None,
) -> float:
    """Δm in % of `results` against `baselines` over `tasks` (default: every task with a main metric in results).

    Both mappings use the evaluator's keys; the baseline must give the same key as the results
    (e.g. "edge/odsF_approx" is only compared with an approximate baseline). Boundaries use the exact scorer's
    odsF when both sides have it, else the approximate one's.
    """
    baselines = load_baselines(baselines)
    if tasks is None:
        tasks = [task for task in PRIMARY_METRICS if _primary_key(task, results)[0] in results]
    if not tasks:
        raise ValueError("compute_delta_m needs at least one task with a main metric in the results.")
    total = 0.0
    for task in tasks:
        check_task_name(task)
        key, higher_is_better = _primary_key(task, results, baselines)
        if key not in results:
            raise ValueError(f"The results have no {key!r}, the main metric of task {task!r}, needed for Δm.")
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
