"""Taskonomy (data/taskonomy.py, the kinds it uses): conversion from a raw-layout fixture made here (every task's
file type, a missing file, a split CSV), the decoded values against the reference's formulas computed here, pairing
by view, the flip rule, the reference metrics on hand-computed cases, and training runs of the recipes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from modeling_taskexpert.data import load_multitask_dataset, read_dataset_metadata
from modeling_taskexpert.data.labels import decode_label
from modeling_taskexpert.data.taskonomy import TASK_KINDS, TASKS, convert_taskonomy
from modeling_taskexpert.data.transforms import build_transforms, collate_dense_batch, flip_horizontal
from modeling_taskexpert.evaluation.metrics import build_meters
from modeling_taskexpert.task_definitions import make_task_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = (12, 16)  # raw views (height, width); the geometry resizes them to 256
BUILDINGS = {"alpha": "train", "bravo": "val", "charlie": "test", "woodbine": "train"}
VIEWS = [(0, 0), (0, 1), (3, 2)]  # (point, view) of every building
MISSING = ("alpha", 0, 1, "edge_texture")  # one missing file: later views must keep their own labels


def _raw_arrays(rng: np.random.Generator) -> dict:
    """Every task's raw array as the release stores it (dtype and channels)."""
    h, w = SIZE
    u16 = lambda high: rng.integers(0, high, (h, w), dtype=np.uint16)  # noqa: E731
    depth = u16(20000)
    depth[0, :3] = 65535  # no depth
    return {
        "rgb": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "depth_euclidean": depth, "depth_zbuffer": u16(30000),
        "edge_occlusion": u16(1200), "edge_texture": u16(9000), "keypoints2d": u16(600), "keypoints3d": u16(65535),
        "normal": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "principal_curvature": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "reshading": rng.integers(0, 256, (h, w), dtype=np.uint8),
        "segment_unsup2d": rng.integers(0, 256, (h, w), dtype=np.uint8),
        "segment_unsup25d": rng.integers(0, 256, (h, w), dtype=np.uint8),
        "class_object": rng.dirichlet(np.ones(1000)).astype(np.float32),
        "class_scene": rng.dirichlet(np.ones(365)).astype(np.float32),
    }  # fmt: skip


@pytest.fixture(scope="module")
def taskonomy_raw(tmp_path_factory):
    """A raw Taskonomy layout: 4 buildings x 3 views x 14 domains, one file missing, the split CSVs."""
    root = tmp_path_factory.mktemp("taskonomy-raw")
    rng = np.random.default_rng(0)
    raw = {}
    for building in BUILDINGS:
        for point, view in VIEWS:
            arrays = _raw_arrays(rng)
            raw[(building, point, view)] = arrays
            for task, array in arrays.items():
                if (building, point, view, task) == MISSING:
                    continue
                folder = root / task / "taskonomy" / building
                folder.mkdir(parents=True, exist_ok=True)
                stem = f"point_{point}_view_{view}_domain_{task}"
                if array.ndim == 1:
                    np.save(folder / f"{stem}.npy", array)
                else:
                    Image.fromarray(array).save(folder / f"{stem}.png")
    (root / "splits_taskonomy").mkdir()
    for size in ("tiny", "medium"):
        rows = ["building,train,val,test"] + [
            f"{b},{int(s == 'train')},{int(s == 'val')},{int(s == 'test')}" for b, s in BUILDINGS.items()
        ]
        (root / "splits_taskonomy" / f"train_val_test_{size}.csv").write_text("\n".join(rows) + "\n")
    return root, raw


@pytest.fixture(scope="module")
def converted(taskonomy_raw, tmp_path_factory):
    root, raw = taskonomy_raw
    return convert_taskonomy(root, tmp_path_factory.mktemp("taskonomy") / "data", num_workers=0), raw


def expected_values(task: str, array: np.ndarray) -> np.ndarray:
    """The reference's scaling, written out here from its formulas."""
    x = array.astype(np.float64)
    unit = lambda high: np.clip(x, 0, high) / high * 2 - 1  # noqa: E731
    if task in ("normal", "reshading", "segment_unsup2d", "segment_unsup25d"):
        return unit(255.0)
    if task == "keypoints2d":
        return unit(0.005 * 2**16)
    if task == "keypoints3d":
        return unit(2.0**16)
    if task == "edge_texture":
        return unit(0.08 * 2**16)
    if task == "edge_occlusion":
        return np.clip(ndimage.gaussian_filter(x / (0.00625 * 2**16) * 2 - 1, sigma=4), -1, 1)
    if task in ("depth_euclidean", "depth_zbuffer"):
        return np.log(1 + x) / np.log(2**16)
    if task == "principal_curvature":
        return (x[..., :2] - np.array([123.572, 120.1])) / np.array([31.922, 21.658])
    raise AssertionError(task)


def test_converted_values_equal_the_reference_formulas_and_pairing_is_by_view(converted):
    folder, raw = converted
    metadata = read_dataset_metadata(folder)
    assert list(metadata["tasks"]) == list(TASKS) and metadata["geometry"] == {"kind": "resize_crop", "resize": 256}
    assert metadata["splits"] == {"train": 6, "validation": 3}  # alpha + bravo (train and val), charlie; no woodbine
    assert metadata["train_size"] == metadata["eval_size"] == [224, 224]
    specs = {task: make_task_spec(task, TASK_KINDS[task]) for task in TASKS}
    for split in ("train", "validation"):
        for row in load_multitask_dataset(folder, split):
            building, rest = row["id"].split("__")
            point, view = (int(v) for v in rest.replace("point_", "").split("_view_"))
            arrays = raw[(building, point, view)]
            assert np.array_equal(np.asarray(row["image"]), arrays["rgb"])
            for task in TASKS:
                if (building, point, view, task) == MISSING:
                    assert row[task] is None
                    continue
                if task.startswith("class_"):
                    np.testing.assert_array_equal(np.asarray(row[task], np.float32), arrays[task])
                    continue
                stored = np.asarray(row[task])
                channels = 3 if task in ("normal", "principal_curvature") else 1
                assert np.array_equal(stored.reshape(*SIZE, -1)[..., :channels], arrays[task].reshape(*SIZE, -1)), task
                decoded = decode_label(specs[task], row[task])
                expected = expected_values(task, arrays[task]).reshape(*SIZE, -1)
                np.testing.assert_allclose(decoded, expected, atol=2e-6, rtol=0, err_msg=task)
    card = (folder / "README.md").read_text()
    assert "| edge_texture | alpha | 1 |" in card and "woodbine" in card


def test_the_flip_negates_the_x_of_normals_only():
    specs = {task: make_task_spec(task, TASK_KINDS[task]) for task in ("normal", "principal_curvature")}
    rng = np.random.default_rng(1)
    labels = {"normal": rng.uniform(-1, 1, (4, 5, 3)).astype(np.float32),
              "principal_curvature": rng.normal(size=(4, 5, 2)).astype(np.float32)}  # fmt: skip
    _, flipped = flip_horizontal(np.zeros((4, 5, 3), np.float32), labels, specs)
    np.testing.assert_array_equal(flipped["normal"][..., 0], -labels["normal"][:, ::-1, 0])
    np.testing.assert_array_equal(flipped["normal"][..., 1:], labels["normal"][:, ::-1, 1:])
    np.testing.assert_array_equal(flipped["principal_curvature"], labels["principal_curvature"][:, ::-1])


def test_the_protocol_geometry_resizes_crops_and_keeps_image_labels(converted):
    folder, raw = converted
    metadata = read_dataset_metadata(folder)
    for train in (True, False):
        transform = build_transforms(metadata, train=train, seed=0)
        dataset = load_multitask_dataset(folder, "train").with_transform(transform)
        batch = collate_dense_batch([dataset[i] for i in range(3)], transform.task_specs)
        assert batch["pixel_values"].shape == (3, 3, 224, 224)
        assert batch["labels"]["class_scene"].shape == (3, 365)
        assert batch["labels"]["normal"].shape == (3, 3, 224, 224)
        assert torch.isnan(batch["labels"]["edge_texture"][1]).all()  # the missing file: no label, not a shift
    # Evaluation: the centred 224 crop of the bilinear 256 resize, exactly.
    transform = build_transforms(metadata, train=False)
    sample = load_multitask_dataset(folder, "validation").with_transform(transform)[0]
    image = raw[("charlie", 0, 0)]["rgb"].astype(np.float32)
    from modeling_taskexpert.data.transforms import IMAGE_MEAN, IMAGE_STD, resize_bilinear

    expected = (resize_bilinear(image, (256, 256))[16:240, 16:240] / 255.0 - IMAGE_MEAN) / IMAGE_STD
    np.testing.assert_allclose(sample["pixel_values"].numpy().transpose(1, 2, 0), expected, atol=1e-4)


def test_reference_metrics_on_hand_computed_cases():
    depth = make_task_spec("depth_euclidean", TASK_KINDS["depth_euclidean"])
    meter = build_meters(depth)["depth_euclidean"]
    raw_label = np.array([512.0, 4096.0, 65535.0])  # 1 m, 8 m, no depth
    raw_prediction = np.array([1024.0, 4096.0, 100.0])
    scale = lambda d: np.log1p(d) / np.log(2**16)  # noqa: E731
    label = torch.tensor(scale(raw_label), dtype=torch.float64).view(1, 1, 1, 3)
    prediction = torch.tensor(scale(raw_prediction), dtype=torch.float64).view(1, 1, 1, 3)
    meter.update(prediction, label)
    results = meter.summarise(meter.state)

    def reference_space(v):
        d = np.exp(v * np.log(2**16)) - 1
        return np.clip(((np.log(d) / 11.09 - 0.64) / 0.18 + 1) / 2 * 80, 1, 80)

    expected = math.sqrt(np.mean((reference_space(scale(raw_prediction)) - reference_space(scale(raw_label))) ** 2))
    assert results["RMSE_reference"] == pytest.approx(expected, rel=1e-9)
    assert results["RMSE_m"] == pytest.approx(math.sqrt(((1024 - 512) / 512) ** 2 / 2), rel=1e-6)  # 1 m off, 0 m off
    assert results["MAE"] == pytest.approx(np.mean(np.abs(scale(raw_prediction) - scale(raw_label))), rel=1e-9)
    assert depth.primary_metric_key == "depth_euclidean/RMSE_reference"

    curvature = make_task_spec("principal_curvature", TASK_KINDS["principal_curvature"])
    meter = build_meters(curvature)["principal_curvature"]
    meter.update(torch.tensor([[[[1.0]], [[3.0]]]]), torch.tensor([[[[0.0]], [[1.0]]]]))
    assert meter.summarise(meter.state)["MSE"] == pytest.approx((1 + 4) / 2)

    scene = make_task_spec("class_scene", {"kind": "image_classification", "num_classes": 3})
    meter = build_meters(scene)["class_scene"]
    labels = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [float("nan")] * 3, [0.2, 0.5, 0.3]])
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [9.0, 0.0, 0.0], [0.0, 0.1, 0.2]])
    meter.update(scores, labels)
    assert meter.summarise(meter.state) == {"top1": pytest.approx(100 / 3)}  # right, wrong, (no label), wrong


def test_the_converter_command_refuses_what_it_cannot_convert(taskonomy_raw, tmp_path, capsys):
    from modeling_taskexpert.data.__main__ import main

    root, _ = taskonomy_raw
    command = ["taskonomy", "--raw-dir", str(root), "--num-workers", "0", "--output-dir"]
    assert main([*command, str(tmp_path / "a"), "--tasks", "class_sky"]) == 2
    assert "Unknown Taskonomy task(s) ['class_sky']" in capsys.readouterr().err
    assert main([*command, str(tmp_path / "b"), "--split-size", "full"]) == 2
    assert "train_val_test_full.csv" in capsys.readouterr().err
    assert main([*command, str(tmp_path / "c"), "--buildings", "zulu"]) == 2
    assert "No view of the train split" in capsys.readouterr().err
    # A subset: two tasks, one building per split, one view each (the command as a user runs it).
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_taskexpert.data", *command, str(tmp_path / "d"), "--tasks", "normal",
         "class_scene", "--buildings", "alpha", "charlie", "--max-views-per-building", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    metadata = read_dataset_metadata(tmp_path / "d")
    assert list(metadata["tasks"]) == ["class_scene", "normal"] and metadata["splits"] == {"train": 1, "validation": 1}
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_the_modsquad_taskonomy_recipe_trains_all_13_tasks(converted, tmp_path):
    folder, _ = converted
    command = [
        sys.executable, "train.py", "--config", "hub_configs/modsquad-taskonomy-vitb.yaml", "--dataset", str(folder),
        "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--warmup_steps", "0", "--eval_steps", "0",
        "--save_steps", "0", "--logging_steps", "1", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "1", "--max_eval_samples", "1", "--num_workers", "0", "--crop_size", "[32, 32]",
        "--mixed_precision", "no",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("class_object/top1", "class_scene/top1", "depth_euclidean/RMSE_reference", "depth_euclidean/RMSE_m",
                "principal_curvature/MSE", "normal/MAE", "edge_occlusion/MAE", "segment_unsup25d/MAE"):  # fmt: skip
        assert key in metrics and math.isfinite(metrics[key]), key
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    train = [record for record in log if record["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(record["loss"]) for record in train)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tasks"] == list(TASKS) and config["model_type"] == "modsquad"


@pytest.mark.slow
def test_the_synthetic_taskonomy_style_trains_the_tiny_modsquad_recipe_offline(tmp_path):
    data = tmp_path / "synthetic-taskonomy"
    generate = [sys.executable, "-m", "modeling_taskexpert.data", "synthetic", "--style", "taskonomy", "--output-dir",
                str(data), "--train-size", "8", "--val-size", "4", "--image-size", "64", "--num-workers", "0"]  # fmt: skip
    completed = subprocess.run(generate, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metadata = read_dataset_metadata(data)
    assert list(metadata["tasks"]) == list(TASKS) and metadata["train_size"] == [56, 56]
    assert metadata["tasks"]["class_scene"]["num_classes"] == 4
    from training_runs import ACCELERATE

    # Through accelerate launch, as the docs give the command.
    command = [
        ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "train.py", "--config", "hub_configs/modsquad-synthetic-taskonomy-tiny.yaml", "--dataset",
        str(data), "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--warmup_steps", "0", "--eval_steps",
        "0", "--save_steps", "0", "--logging_steps", "1", "--per_device_train_batch_size", "4", "--num_workers", "0",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    specs = {task: make_task_spec(task, declaration) for task, declaration in
             ((t, {k: v for k, v in d.items() if k != "id2label"}) for t, d in metadata["tasks"].items())}  # fmt: skip
    for task, spec in specs.items():
        assert math.isfinite(metrics[spec.primary_metric_key]), task
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len([record for record in log if record["kind"] == "train"]) == 3


def test_image_level_and_taskonomy_tasks_through_the_processor_pipeline_and_the_space(tmp_path):
    """A model with an image-level task and Taskonomy's regressions: predictions of every kind through the image
    processor, the pipeline (with its renderings) and the Space's inference and rendering."""
    sys.path.append(str(REPO_ROOT / "space_app"))
    from conftest import tiny_config
    from transformers import pipeline

    import inference
    import model_loading
    import rendering
    from modeling_taskexpert import MultiTaskDensePredictionPipeline, TaskExpertForDensePrediction
    from modeling_taskexpert import DenseMultiTaskImageProcessor

    tasks = ["class_scene", "normal", "depth_euclidean", "principal_curvature"]
    kinds = {task: {**TASK_KINDS[task]} for task in tasks}
    kinds["class_scene"]["num_classes"] = 4
    names = {0: "room", 1: "hall", 2: "kitchen", 3: "bath"}
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(
        tiny_config(tasks=tasks, task_kinds=kinds, task_id2label={"class_scene": names})
    )
    model.save_pretrained(tmp_path / "model")
    DenseMultiTaskImageProcessor(size=64, size_divisor=8).save_pretrained(tmp_path / "model")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)

    pipe = pipeline("multi-task-dense-prediction", model=str(tmp_path / "model"),
                    pipeline_class=MultiTaskDensePredictionPipeline)  # fmt: skip
    result = pipe(Image.fromarray(rgb))
    assert result["class_scene"]["prediction"].shape == (4,)
    assert result["normal"]["prediction"].shape == (3, 40, 56)  # regressions keep their channel axis
    assert result["depth_euclidean"]["prediction"].shape == (1, 40, 56)
    assert result["principal_curvature"]["prediction"].shape == (2, 40, 56)
    bars = np.asarray(result["class_scene"]["image"])
    assert bars.shape[0] == 4 * 16 and (bars != 255).any()  # one bar per class (four), drawn

    demo = model_loading.load_demo_model(str(tmp_path / "model"))
    prediction = inference.predict(demo, rgb)
    with torch.no_grad():
        expected = model(demo.processor(rgb)["pixel_values"]).logits["class_scene"][0].numpy()
    np.testing.assert_allclose(prediction.predictions["class_scene"], expected, atol=1e-6)
    for task in tasks:
        shown = rendering.render_task(prediction.predictions[task], task, rgb, demo.model.config)
        assert np.asarray(shown).ndim == 3
        assert rendering.task_legend(demo.model.config.task_specs[task]) is not None
    assert "4 class scores" in rendering.task_legend(demo.model.config.task_specs["class_scene"])
