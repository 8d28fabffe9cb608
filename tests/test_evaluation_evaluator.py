"""DenseMultiTaskEvaluator: accumulation invariance, metadata, Δm, and errors on bad input."""

import json

import pytest
import torch

from modeling_taskexpert.evaluation import (
    DenseMultiTaskEvaluator,
    EmptyEvaluationError,
    compute_delta_m,
)

IGNORE = 255
ALL_TASKS = ["semseg", "human_parts", "saliency", "normals", "edge", "depth"]
NUM_CLASSES = {"semseg": 4, "human_parts": 3}


def make_batch(batch, height=24, width=28, seed=0):
    """Random labels (with ignored pixels) and correlated predictions for every task."""
    g = torch.Generator().manual_seed(seed)
    labels = {
        "semseg": torch.randint(0, 4, (batch, height, width), generator=g),
        "human_parts": torch.randint(0, 3, (batch, height, width), generator=g),
        "saliency": (torch.rand(batch, height, width, generator=g) < 0.4).float(),
        "normals": torch.nn.functional.normalize(torch.randn(batch, 3, height, width, generator=g), dim=1),
        "edge": torch.zeros(batch, height, width),
        "depth": torch.rand(batch, height, width, generator=g) * 8 + 0.5,
    }
    labels["edge"][:, height // 2, 4:-4] = 1
    for task in ("semseg", "saliency", "depth"):
        labels[task][:, :3] = IGNORE
    labels["normals"][:, :, :, :2] = IGNORE
    predictions = {
        "semseg": torch.where(torch.rand(batch, height, width, generator=g) < 0.6, labels["semseg"] % 4, 0),
        "human_parts": torch.randint(0, 3, (batch, height, width), generator=g),
        "saliency": (labels["saliency"].clamp(max=1) * 0.5 + torch.rand(batch, height, width, generator=g) * 0.5),
        "normals": torch.nn.functional.normalize(
            labels["normals"] + torch.randn(batch, 3, height, width, generator=g), dim=1
        ),
        "edge": torch.rand(batch, height, width, generator=g) * 0.3 + labels["edge"] * 0.6,
        "depth": labels["depth"].clamp(max=9) + torch.randn(batch, height, width, generator=g),
    }
    return predictions, labels


def subset(batch, index):
    return {task: value[index] for task, value in batch.items()}


def make_evaluator(**kwargs):
    kwargs.setdefault("boundary_mode", "approximate")
    return DenseMultiTaskEvaluator(ALL_TASKS, num_classes=NUM_CLASSES, boundary_tolerance=0.02, **kwargs)


@pytest.mark.parametrize("boundary_mode", ["approximate", "exact"])
def test_results_do_not_depend_on_batching_or_order(boundary_mode):
    predictions, labels = make_batch(6)
    whole = make_evaluator(boundary_mode=boundary_mode)
    whole.update(predictions, labels)
    expected = whole.compute()

    pieces = make_evaluator(boundary_mode=boundary_mode)
    for index in ([5, 0], [3], [1, 4, 2]):
        pieces.update(subset(predictions, index), subset(labels, index))
    results = pieces.compute()
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_both_boundary_scorers_at_once_each_under_its_own_key():
    """boundary_mode=[exact, approximate] scores the same predictions with each scorer (in background workers here):
    the keys name the scorer and the values equal the single-scorer runs."""
    predictions, labels = make_batch(3)
    both = make_evaluator(boundary_mode=["exact", "approximate"], boundary_workers=1)
    both.update(predictions, labels)
    assert sum(meter.pending_images for meter in both.meters.values() if hasattr(meter, "pending_images")) > 0
    both.flush(progress=True)
    results = both.compute()
    both.close()
    assert both.settings["boundary_mode"] == ["exact", "approximate"]
    for mode, keys in (
        ("exact", ("edge/odsF", "edge/oisF")),
        ("approximate", ("edge/odsF_approx", "edge/oisF_approx")),
    ):
        single = make_evaluator(boundary_mode=mode)
        single.update(predictions, labels)
        expected = single.compute()
        assert all(key in expected for key in keys)
        for key, value in expected.items():
            assert results[key] == value, key
    with pytest.raises(ValueError, match="boundary_mode"):
        make_evaluator(boundary_mode=["exact", "exact"])


def test_delta_m_uses_the_boundary_scorer_both_sides_have():
    results = {"edge/odsF": 40.0, "edge/odsF_approx": 50.0}
    assert compute_delta_m(results, {"edge/odsF": 20.0, "edge/odsF_approx": 100.0}) == pytest.approx(100.0)
    assert compute_delta_m(results, {"edge/odsF_approx": 25.0}) == pytest.approx(100.0)  # approximate-only baselines
    with pytest.raises(ValueError, match="baselines have no 'edge/odsF'"):
        compute_delta_m({"edge/odsF": 40.0}, {"edge/odsF_approx": 25.0})


def test_compute_does_not_change_the_state_and_reset_forgets():
    predictions, labels = make_batch(2)
    evaluator = make_evaluator()
    evaluator.update(predictions, labels)
    first = evaluator.compute()
    assert evaluator.compute() == first
    evaluator.reset()
    with pytest.raises(EmptyEvaluationError, match="before any sample"):
        evaluator.compute()


def test_numpy_inputs_and_extra_prediction_tasks():
    predictions, labels = make_batch(2)
    evaluator = DenseMultiTaskEvaluator(["semseg", "depth"], num_classes={"semseg": 4})
    evaluator.update(
        {task: value.numpy() for task, value in predictions.items()},
        {t: labels[t].numpy() for t in ("semseg", "depth")},
    )
    reference = DenseMultiTaskEvaluator(["semseg", "depth"], num_classes={"semseg": 4})
    reference.update(predictions, labels)
    assert evaluator.compute() == reference.compute()


def test_from_metadata():
    metadata = {
        "name": "nyud",
        "tasks": {"semseg": {"id2label": {"0": "wall", "1": "floor"}}, "depth": {}, "edge": {}},
        "boundary_tolerance": 0.011,
        "train_size": [8, 8], "eval_size": [8, 8], "splits": {"train": 1, "validation": 1},
    }  # fmt: skip
    evaluator = DenseMultiTaskEvaluator.from_metadata(metadata, tasks=["semseg", "depth"])
    assert evaluator.tasks == ["semseg", "depth"]
    evaluator.update(
        {"semseg": torch.tensor([[[0, 1]]]), "depth": torch.tensor([[[1.0, 2.0]]])},
        {"semseg": torch.tensor([[[0, 0]]]), "depth": torch.tensor([[[1.0, 2.0]]])},
    )
    results = evaluator.compute()
    assert results["semseg/IoU/wall"] == pytest.approx(50.0) and results["semseg/IoU/floor"] == 0.0
    assert DenseMultiTaskEvaluator.from_metadata(metadata).settings["boundary_tolerance"] == 0.011
    with pytest.raises(ValueError, match="'saliency' is not in the dataset 'nyud'"):
        DenseMultiTaskEvaluator.from_metadata(metadata, tasks=["saliency"])


# ----------------------------------------------------------------------------------------------- delta_m


def test_delta_m_signs_hand_computed():
    results = {"semseg/mIoU": 50.0, "depth/RMSE": 0.5, "normals/mean": 20.0}
    baselines = {"semseg/mIoU": 40.0, "depth/RMSE": 0.6, "normals/mean": 18.0}
    # semseg +25 %; depth lower is better: -(0.5 - 0.6) / 0.6 = +16.67 %; normals -(20 - 18) / 18 = -11.11 %.
    expected = (25.0 + 100 / 6 - 100 / 9) / 3
    assert compute_delta_m(results, baselines) == pytest.approx(expected)
    assert compute_delta_m(results, baselines, tasks=["depth"]) == pytest.approx(100 / 6)


def test_delta_m_from_json_file_and_in_the_evaluator(tmp_path):
    predictions, labels = make_batch(2)
    evaluator = DenseMultiTaskEvaluator(["semseg", "depth"], num_classes={"semseg": 4})
    evaluator.update(predictions, labels)
    results = evaluator.compute()
    baselines = {"semseg/mIoU": results["semseg/mIoU"] / 2, "depth/RMSE": results["depth/RMSE"] * 2}
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps({"metrics": baselines, "settings": {}}))  # the command line's output format
    with_baselines = DenseMultiTaskEvaluator(["semseg", "depth"], num_classes={"semseg": 4}, single_task_baselines=path)
    with_baselines.update(predictions, labels)
    # semseg is twice its baseline (+100 %), depth half of it (+50 %).
    assert with_baselines.compute()["multi_task/delta_m"] == pytest.approx(75.0)


def test_delta_m_errors(tmp_path):
    with pytest.raises(ValueError, match="baselines have no 'depth/RMSE'"):
        compute_delta_m({"semseg/mIoU": 1.0, "depth/RMSE": 1.0}, {"semseg/mIoU": 1.0})
    with pytest.raises(ValueError, match="positive number"):
        compute_delta_m({"semseg/mIoU": 1.0}, {"semseg/mIoU": 0})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_delta_m({"semseg/mIoU": 1.0}, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        compute_delta_m({"semseg/mIoU": 1.0}, tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------- errors


def test_shape_mismatch_is_reported():
    evaluator = DenseMultiTaskEvaluator(["depth"])
    with pytest.raises(ValueError, match=r"'depth': prediction shape \(1, 4, 4\) differs from label shape \(1, 4, 5\)"):
        evaluator.update({"depth": torch.ones(1, 4, 4)}, {"depth": torch.ones(1, 4, 5)})
    with pytest.raises(ValueError, match=r"normals.*\(B, 3, H, W\)"):
        DenseMultiTaskEvaluator(["normals"]).update({"normals": torch.ones(1, 4, 4)}, {"normals": torch.ones(1, 4, 4)})


def test_dtype_mismatch_is_reported():
    evaluator = DenseMultiTaskEvaluator(["semseg"], num_classes={"semseg": 3})
    with pytest.raises(TypeError, match="must hold integer class ids, got torch.float32"):
        evaluator.update({"semseg": torch.zeros(1, 2, 2)}, {"semseg": torch.zeros(1, 2, 2, dtype=torch.long)})
    with pytest.raises(TypeError, match="'depth' must be a floating-point tensor"):
        DenseMultiTaskEvaluator(["depth"]).update(
            {"depth": torch.ones(1, 2, 2, dtype=torch.long)}, {"depth": torch.ones(1, 2, 2)}
        )


def test_nan_prediction_names_the_sample():
    prediction = torch.ones(3, 2, 2)
    prediction[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"prediction of task 'depth' holds NaN.*sample 2"):
        DenseMultiTaskEvaluator(["depth"]).update({"depth": prediction}, {"depth": torch.ones(3, 2, 2)})


def test_out_of_range_values_are_reported():
    with pytest.raises(ValueError, match=r"label of task 'semseg' holds 7 in sample 0.*\[0, 3\) or 255"):
        DenseMultiTaskEvaluator(["semseg"], num_classes={"semseg": 3}).update(
            {"semseg": torch.zeros(1, 2, 2, dtype=torch.long)}, {"semseg": torch.full((1, 2, 2), 7)}
        )
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\].*not logits"):
        DenseMultiTaskEvaluator(["saliency"]).update(
            {"saliency": torch.full((1, 2, 2), 3.0)}, {"saliency": torch.ones(1, 2, 2)}
        )


def test_empty_and_missing_input():
    evaluator = DenseMultiTaskEvaluator(["depth"])
    with pytest.raises(ValueError, match="batch is empty"):
        evaluator.update({"depth": torch.ones(0, 2, 2)}, {"depth": torch.ones(0, 2, 2)})
    with pytest.raises(ValueError, match="predictions has no entry for task 'depth'"):
        evaluator.update({"semseg": torch.ones(1, 2, 2)}, {"depth": torch.ones(1, 2, 2)})
    with pytest.raises(EmptyEvaluationError, match="before any sample"):
        evaluator.compute()
    evaluator.update({"depth": torch.ones(1, 2, 2)}, {"depth": torch.full((1, 2, 2), 255.0)})
    with pytest.raises(EmptyEvaluationError, match="No valid depth"):
        evaluator.compute()


def test_bad_configuration():
    with pytest.raises(ValueError, match="needs num_classes\\['semseg'\\]"):
        DenseMultiTaskEvaluator(["semseg"])
    with pytest.raises(ValueError, match="'segmentation' is not a preset task"):
        DenseMultiTaskEvaluator(["segmentation"])
    with pytest.raises(ValueError, match="boundary_mode"):
        DenseMultiTaskEvaluator(["depth"], boundary_mode="fast")
    with pytest.raises(ValueError, match="saliency_maxf_mode"):
        DenseMultiTaskEvaluator(["saliency"], saliency_maxf_mode="sigmoid")


def test_the_earlier_argument_names_are_read_for_one_release():
    """`edge_mode` / `edge_workers` became `boundary_mode` / `boundary_workers`: code written for the previous release
    still runs, with a FutureWarning naming the new name; unknown arguments are still refused."""
    predictions, labels = make_batch(2)
    with pytest.warns(FutureWarning, match="`edge_mode` is now called `boundary_mode`"):
        earlier = make_evaluator(edge_mode="approximate")
    assert earlier.boundary_mode == "approximate"
    current = make_evaluator(boundary_mode="approximate")
    for evaluator in (earlier, current):
        evaluator.update(predictions, labels)
    assert earlier.compute() == current.compute()
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['boundary_mod'\]"):
        make_evaluator(boundary_mod="approximate")
