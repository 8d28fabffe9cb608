"""The chance bar (`modeling_taskexpert/evaluation/trivial_baselines.py`): constant predictors scored by the
evaluator, and a recorded bar used only for the data it was measured on."""

import json

import numpy as np
import pytest

from modeling_taskexpert.data import build_transforms, read_dataset_metadata, load_multitask_dataset
from modeling_taskexpert.evaluation.trivial_baselines import main, recorded_baseline, trivial_baseline_metrics


def test_constant_predictors_match_a_hand_computation(synthetic_dataset):
    result = trivial_baseline_metrics(str(synthetic_dataset), boundary_mode="approximate")
    metadata = read_dataset_metadata(synthetic_dataset)
    data = load_multitask_dataset(synthetic_dataset, "validation").with_transform(
        build_transforms(metadata, train=False)
    )
    semseg = np.concatenate([np.asarray(data[i]["labels"]["semseg"]).ravel() for i in range(len(data))])
    depth = np.concatenate([np.asarray(data[i]["labels"]["depth"]).ravel() for i in range(len(data))])
    semseg, depth = semseg[semseg != 255], depth[depth != 255]
    # Most frequent class everywhere: its IoU is its pixel share, every other class scores 0.
    counts = np.bincount(semseg, minlength=len(metadata["tasks"]["semseg"]["id2label"]))
    assert result["metrics"]["semseg/mIoU"] == pytest.approx(100 * counts.max() / counts.sum() / len(counts), rel=1e-6)
    # Mean depth everywhere: the RMSE is the standard deviation of the depths.
    assert result["metrics"]["depth/RMSE"] == pytest.approx(float(np.std(depth.astype(np.float64))), rel=1e-4)
    assert "edge/odsF_approx" in result["metrics"] and "edge/odsF" not in result["metrics"]
    assert result["dataset"] == {"name": "synthetic", "eval_size": metadata["eval_size"],
                                 "boundary_tolerance": metadata["boundary_tolerance"], "splits": metadata["splits"],
                                 "num_samples": len(data)}  # fmt: skip


def test_recorded_bar_is_used_only_for_the_same_data(synthetic_dataset, tmp_path):
    path = tmp_path / "bar.json"
    recorded = main(["--dataset", str(synthetic_dataset), "--output", str(path)])
    assert {"edge/odsF", "edge/odsF_approx"} <= set(recorded["metrics"])  # both scorers by default
    metadata = read_dataset_metadata(synthetic_dataset)
    size = recorded["dataset"]["num_samples"]
    assert recorded_baseline(path, metadata, size) == json.loads(path.read_text())["metrics"]
    assert recorded_baseline(path, metadata, size - 1) is None  # a subset (max_eval_samples) is other data
    assert recorded_baseline(path, {**metadata, "eval_size": [32, 32]}, size) is None
    assert recorded_baseline(tmp_path / "missing.json", metadata, size) is None
