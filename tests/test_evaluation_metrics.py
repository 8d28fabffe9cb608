"""Pixel metrics of the evaluator against hand-computed cases and direct numpy formulas."""

import math

import numpy as np
import pytest
import torch

from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator

IGNORE = 255


def evaluate_one(task, prediction, label, **kwargs):
    evaluator = DenseMultiTaskEvaluator(tasks=[task], **kwargs)
    evaluator.update({task: torch.as_tensor(prediction)}, {task: torch.as_tensor(label)})
    return evaluator.compute()


# ----------------------------------------------------------------------------------------------- segmentation


def test_semseg_hand_computed_with_ignore_and_absent_class():
    label = [[[0, 0, 1], [1, IGNORE, 0]]]
    prediction = [[[0, 1, 1], [1, 0, 0]]]
    results = evaluate_one(
        "semseg", prediction, label, num_classes={"semseg": 3}, class_names={"semseg": ["a", "b", "c"]}
    )
    # class a: TP 2, FN 1 -> 2/3; class b: TP 2, FP 1 -> 2/3; class c absent everywhere -> 0, still averaged.
    assert results["semseg/IoU/a"] == pytest.approx(200 / 3)
    assert results["semseg/IoU/b"] == pytest.approx(200 / 3)
    assert results["semseg/IoU/c"] == 0
    assert results["semseg/mIoU"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3 * 100)
    assert results["semseg/pixel_accuracy"] == pytest.approx(80.0)


def test_semseg_matches_direct_numpy_per_class_counts():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (3, 17, 23))
    label[rng.random(label.shape) < 0.2] = IGNORE
    prediction = rng.integers(0, 5, label.shape)
    results = evaluate_one("semseg", prediction, label, num_classes={"semseg": 5})
    valid = label != IGNORE
    expected = []
    for c in range(5):
        tp = np.sum((label == c) & (prediction == c) & valid)
        fp = np.sum((label != c) & (prediction == c) & valid)
        fn = np.sum((label == c) & (prediction != c) & valid)
        expected.append(tp / max(tp + fp + fn, 1e-8))
        assert results[f"semseg/IoU/{c}"] == pytest.approx(100 * expected[-1])
    assert results["semseg/mIoU"] == pytest.approx(100 * np.mean(expected))


def test_human_parts_only_counts_samples_with_parts():
    rng = np.random.default_rng(1)
    with_parts = rng.integers(0, 3, (1, 8, 8))
    background_only = np.zeros((1, 8, 8), dtype=np.int64)
    background_only[0, :2] = IGNORE
    predictions = rng.integers(0, 3, (2, 8, 8))
    both = evaluate_one(
        "human_parts", predictions, np.concatenate([with_parts, background_only]), num_classes={"human_parts": 3}
    )
    first = evaluate_one("human_parts", predictions[:1], with_parts, num_classes={"human_parts": 3})
    assert both == first


# ----------------------------------------------------------------------------------------------- saliency


def test_saliency_hand_computed_standard_and_reference():
    # labels 1, 1, 0 with probabilities 0.95, 0.2, 0.9.
    label = [[[1.0, 1.0, 0.0]]]
    prediction = [[[0.95, 0.2, 0.9]]]
    results = evaluate_one("saliency", prediction, label, dataset="synthetic")

    def f(p, r):
        return 1.3 * p * r / (0.3 * p + r)

    # standard: t <= 0.2 all positive; 0.2 < t <= 0.9 the 0.95 and 0.9 pixels; t = 0.95 only the 0.95 pixel.
    assert results["saliency/maxF_standard"] == pytest.approx(100 * max(f(2 / 3, 1), f(0.5, 0.5), f(1, 0.5)))
    # reference: sigmoid -> 0.7211, 0.5498, 0.7109; t <= 0.5 all positive, t = 0.55..0.7 two pixels, t >= 0.75 none.
    assert results["saliency/maxF_reference"] == pytest.approx(100 * f(2 / 3, 1))
    assert results["saliency/maxF"] == results["saliency/maxF_standard"]  # synthetic -> standard mode by default
    # mIoU: best pooled foreground IoU over the standard thresholds: 2/3 at t <= 0.2.
    assert results["saliency/mIoU"] == pytest.approx(200 / 3)


def _numpy_maxf(probability, label, transform):
    valid = label != IGNORE
    score = transform(probability[valid].astype(np.float32))
    positive = label[valid] == 1
    best = 0.0
    for k in range(1, 20):
        threshold = np.float32(0.05 * k)
        predicted = score >= threshold
        tp = np.sum(predicted & positive)
        precision = tp / predicted.sum() if predicted.sum() else np.nan
        recall = tp / positive.sum()
        f = 1.3 * precision * recall / (0.3 * precision + recall)
        best = max(best, 0.0 if np.isnan(f) else f)
    return 100 * best


@pytest.mark.parametrize("mode", ["standard", "reference"])
def test_saliency_maxf_matches_numpy(mode):
    rng = np.random.default_rng(2)
    label = (rng.random((2, 20, 30)) < 0.4).astype(np.float32)
    label[:, :3] = IGNORE
    prediction = np.clip(label * 0.5 + rng.random(label.shape) * 0.6, 0, 1).astype(np.float32)
    results = evaluate_one("saliency", prediction, label, saliency_maxf_mode=mode)
    transform = (lambda p: p) if mode == "standard" else (lambda p: 1 / (1 + np.exp(-p)))
    assert results["saliency/maxF"] == pytest.approx(_numpy_maxf(prediction, label, transform), abs=1e-9)


def test_saliency_mode_defaults_follow_the_dataset():
    assert DenseMultiTaskEvaluator(["saliency"], dataset="pascal-context").settings["saliency_maxf_mode"] == "reference"
    assert DenseMultiTaskEvaluator(["saliency"], dataset="synthetic").settings["saliency_maxf_mode"] == "standard"


# ----------------------------------------------------------------------------------------------- normals


def test_normals_hand_computed():
    s = 1 / math.sqrt(2)
    # pixels: 90 degrees, 0 degrees, 45 degrees, ignored.
    prediction = np.array([[1, 0, 0], [1, 0, 0], [s, s, 0], [0, 0, 1]], dtype=np.float32).T.reshape(1, 3, 1, 4)
    label = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0], [IGNORE] * 3], dtype=np.float32).T.reshape(1, 3, 1, 4)
    results = evaluate_one("normals", prediction, label)
    assert results["normals/mean"] == pytest.approx(45.0, abs=1e-5)
    assert results["normals/median"] == pytest.approx(45.0, abs=0.005 + 1e-9)
    assert results["normals/rmse"] == pytest.approx(math.sqrt((90**2 + 45**2) / 3), abs=1e-4)
    assert results["normals/within_11.25"] == pytest.approx(100 / 3)
    assert results["normals/within_30"] == pytest.approx(100 / 3)


def test_normals_match_numpy_arccos_formula():
    rng = np.random.default_rng(3)
    label = rng.normal(size=(2, 3, 15, 21)).astype(np.float32)
    label /= np.linalg.norm(label, axis=1, keepdims=True)
    prediction = label + rng.normal(scale=0.4, size=label.shape).astype(np.float32)
    prediction /= np.linalg.norm(prediction, axis=1, keepdims=True)
    label[:, :, :4] = IGNORE
    results = evaluate_one("normals", prediction, label)
    valid = (label != IGNORE).all(axis=1)
    cosine = np.clip(np.sum(prediction.astype(np.float64) * label, axis=1)[valid], -1, 1)
    angles = np.degrees(np.arccos(cosine))
    assert results["normals/mean"] == pytest.approx(angles.mean(), rel=1e-6)
    assert results["normals/median"] == pytest.approx(np.median(angles), abs=0.01)
    for limit in (11.25, 22.5, 30):
        assert results[f"normals/within_{limit:g}"] == pytest.approx(100 * np.mean(angles < limit))


# ----------------------------------------------------------------------------------------------- depth


def test_depth_hand_computed():
    label = np.array([[[1.0, 2.0, IGNORE, 0.0]]], dtype=np.float32)  # ignored and invalid (0) pixels drop out
    prediction = np.array([[[2.0, 2.0, 5.0, 5.0]]], dtype=np.float32)
    results = evaluate_one("depth", prediction, label)
    assert results["depth/RMSE"] == pytest.approx(math.sqrt(0.5))
    assert results["depth/abs_rel"] == pytest.approx(0.5)
    assert results["depth/log10"] == pytest.approx(math.log10(2) / 2)
    assert results["depth/delta_1"] == pytest.approx(50.0)
    assert results["depth/delta_3"] == pytest.approx(50.0)  # ratio 2 > 1.25^3


def test_depth_is_pooled_over_pixels_and_matches_numpy():
    rng = np.random.default_rng(4)
    label = (rng.random((3, 12, 16)) * 9 + 0.5).astype(np.float32)
    label[0, :6] = IGNORE  # images with different valid counts: pooled != mean of per-image RMSE
    prediction = np.clip(label + rng.normal(scale=0.8, size=label.shape), -0.5, None).astype(np.float32)
    results = evaluate_one("depth", prediction, label)
    valid = label != IGNORE
    g = label[valid].astype(np.float64)
    p = prediction[valid].astype(np.float64)
    p = np.where(p <= 0, 1e-9, p)
    assert results["depth/RMSE"] == pytest.approx(np.sqrt(np.mean((g - p) ** 2)), rel=1e-9)
    assert results["depth/abs_rel"] == pytest.approx(np.mean(np.abs(g - p) / g), rel=1e-9)
    assert results["depth/log10"] == pytest.approx(np.mean(np.abs(np.log10(g) - np.log10(p))), rel=1e-9)
    assert results["depth/delta_1"] == pytest.approx(100 * np.mean(np.maximum(g / p, p / g) < 1.25))
    per_image = [np.sqrt(np.mean((label[i][valid[i]] - prediction[i][valid[i]]) ** 2)) for i in range(3)]
    assert results["depth/RMSE"] != pytest.approx(np.mean(per_image), rel=1e-3)
