"""The `evaluate` metric module: loads offline by path and agrees with DenseMultiTaskEvaluator."""

import numpy as np
import pytest
import torch

from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator, multitask_dense_metric_path

evaluate = pytest.importorskip("evaluate")

SETTINGS = {"num_classes": {"semseg": 3}, "boundary_tolerance": 0.05, "boundary_mode": "approximate"}


def examples(seed):
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(3, 10, 12)).astype(np.float32)
    edge = np.zeros((10, 12), dtype=np.float32)
    edge[5, 2:10] = 1
    reference = {"semseg": rng.integers(0, 3, (10, 12)), "normals": normals, "edge": edge}
    reference["semseg"][0] = 255
    prediction = {
        "semseg": rng.integers(0, 3, (10, 12)),
        "normals": normals + rng.normal(scale=0.3, size=normals.shape).astype(np.float32),
        "edge": np.clip(edge * 0.7 + rng.random((10, 12)) * 0.3, 0, 1).astype(np.float32),
    }
    return prediction, reference


def test_evaluate_load_by_path_matches_the_evaluator(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    metric = evaluate.load(
        multitask_dense_metric_path(),
        tasks=["semseg", "normals", "edge"],
        cache_dir=str(tmp_path / "cache"),
        **SETTINGS,
    )
    pairs = [examples(seed) for seed in range(3)]
    metric.add_batch(predictions=[p for p, _ in pairs[:2]], references=[r for _, r in pairs[:2]])
    metric.add(predictions=pairs[2][0], references=pairs[2][1])
    results = metric.compute()

    evaluator = DenseMultiTaskEvaluator(["semseg", "normals", "edge"], **SETTINGS)
    for prediction, reference in pairs:
        evaluator.update(
            {task: torch.as_tensor(value)[None] for task, value in prediction.items()},
            {task: torch.as_tensor(value)[None] for task, value in reference.items()},
        )
    expected = evaluator.compute()
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-6), key


def test_evaluate_load_rejects_bad_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    with pytest.raises(ValueError, match="needs num_classes"):
        evaluate.load(multitask_dense_metric_path(), tasks=["semseg"], cache_dir=str(tmp_path / "cache"))
