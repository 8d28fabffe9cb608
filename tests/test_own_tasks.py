"""Bring your own tasks, end to end, with no edit to the package: a folder of image and label files for three tasks
whose names exist nowhere in the package (`roads`, `elevation`, `contours`) is converted by the folder command,
trained with `accelerate launch train.py` on 2 processes, evaluated, saved, reloaded through remote code in an
environment of only torch, transformers, numpy and pillow (no package), run through the pipeline there, and through
the Space's predict function."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import training_runs
from own_tasks import ROAD_CLASSES, write_own_task_folder
from PIL import Image

from modeling_taskexpert.data import load_multitask_dataset, read_dataset_metadata
from modeling_taskexpert.data.folder import FolderLayoutError, convert_folder
from modeling_taskexpert.data.writer import DatasetConversionError

OWN_TASKS = ["roads", "elevation", "contours"]
RECIPES = {"taskexpert": "hub_configs/synthetic-tiny.yaml", "modsquad": "hub_configs/modsquad-synthetic-tiny.yaml"}


@pytest.fixture(scope="module")
def own_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    raw = write_own_task_folder(root / "raw")
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_taskexpert.data", "folder", "--input-dir", str(raw), "--output-dir",
         str(root / "data"), "--num-workers", "0"],
        cwd=training_runs.REPO, env=training_runs.training_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Wrote" in completed.stdout
    return root / "data"


def test_the_folder_command_writes_the_declared_tasks_with_their_values(own_dataset, tmp_path):
    metadata = read_dataset_metadata(own_dataset)
    assert list(metadata["tasks"]) == OWN_TASKS
    assert metadata["tasks"]["roads"]["id2label"] == {str(i): name for i, name in enumerate(ROAD_CLASSES)}
    assert metadata["tasks"]["elevation"]["unit"] == "m" and metadata["tasks"]["contours"]["kind"] == "boundary"
    row = load_multitask_dataset(own_dataset, "train", cache_dir=str(tmp_path / "cache"))[0]
    from own_tasks import scene

    sample = scene(int(row["id"].split("_")[1]))
    np.testing.assert_array_equal(np.asarray(row["roads"]), sample["roads"])
    np.testing.assert_array_equal(np.asarray(row["contours"]), sample["contours"] // 255)  # 0/255 masks -> 0/1
    elevation = np.load(__import__("io").BytesIO(row["elevation"]), allow_pickle=False)[..., 0]
    np.testing.assert_allclose(elevation, sample["elevation"] * 0.01, rtol=1e-6)  # centimetres * scale -> metres
    card = (own_dataset / "README.md").read_text()
    assert "| `elevation` | elevation: dense regression (regression) |" in card and "0 background, 1 road" in card


def test_the_folder_command_refuses_files_that_do_not_fit_their_kind(tmp_path):
    raw = write_own_task_folder(tmp_path / "raw", train=2, validation=1)
    tasks_yaml = (raw / "tasks.yaml").read_text()
    (raw / "tasks.yaml").write_text(tasks_yaml.replace("positive_value: 255", "positive_value: 1"))
    # 0/255 masks read with the default positive_value 1: every positive would be "ignore".
    with pytest.raises(DatasetConversionError, match="column 'contours': no pixel of any sample is 1"):
        convert_folder(raw, tmp_path / "out", num_workers=0)
    (raw / "tasks.yaml").write_text(tasks_yaml)
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(raw / "contours" / "train" / "tile_0001.png")
    with pytest.raises(
        DatasetConversionError, match="tile_0001.png .*values must be 0, 255 \\(positive\\), found \\[128\\]"
    ):
        convert_folder(raw, tmp_path / "out", num_workers=0)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(raw / "contours" / "train" / "tile_0001.png")
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(raw / "roads" / "train" / "tile_0000.png")
    with pytest.raises(DatasetConversionError, match="tile_0000.png \\(sample 'tile_0000'\\).*found \\[7\\]"):
        convert_folder(raw, tmp_path / "out", num_workers=0)
    (raw / "roads" / "train" / "stray.png").write_bytes(b"")
    with pytest.raises(FolderLayoutError, match="\\['stray'\\] pair no image"):
        convert_folder(raw, tmp_path / "out", num_workers=0)
    (raw / "tasks.yaml").write_text(tasks_yaml.replace("kind: regression", "kind: heights"))
    with pytest.raises(FolderLayoutError, match="task 'elevation' needs `kind:` one of"):
        convert_folder(raw, tmp_path / "out", num_workers=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["taskexpert", "modsquad"])
def test_own_tasks_train_evaluate_reload_and_serve_without_touching_the_package(own_dataset, model_type, tmp_path):
    output = tmp_path / "model"
    command = training_runs.train_command(own_dataset, output, "--max_steps", "4", "--save_steps", "4", processes=2)
    command[command.index("--config") + 1] = str(training_runs.REPO / RECIPES[model_type])
    command += ["--boundary_mode", "approximate", "--final_boundary_modes", "[approximate]"]
    completed = training_runs.run(command)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert {record["world_size"] for record in training_runs.train_records(output)} == {2}
    metrics = json.loads((output / "metrics.json").read_text())
    assert {"roads/mIoU", "roads/IoU/lane", "elevation/MAE", "elevation/RMSE", "contours/odsF_approx"} <= set(metrics)
    config = json.loads((output / "config.json").read_text())
    assert config["tasks"] == OWN_TASKS and config["task_kinds"]["elevation"]["value_range"] == [0.0, 50.0]
    card = (output / "README.md").read_text()
    assert "Mean absolute error (m)" in card and "name: Road and Lane Segmentation" in card
    assert "name: Elevation (Dense Regression)" in card and "](examples/elevation.png)" in card

    # The evaluation command line scores the saved model exactly as the end of training did.
    evaluated = subprocess.run(
        [sys.executable, "-m", "modeling_taskexpert.evaluation", "--model", str(output), "--dataset", str(own_dataset),
         "--output", str(tmp_path / "eval.json"), "--boundary-mode", "approximate", "--no-progress", "--cpu"],
        cwd=training_runs.REPO, env=training_runs.training_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rescored = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert rescored == pytest.approx(metrics)

    # Remote code in the environment of a transformers user (torch, transformers, numpy, pillow; not this package):
    # model, processor, pipeline.
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from transformers import AutoImageProcessor, AutoModel, pipeline
        model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__
        processor = AutoImageProcessor.from_pretrained({str(output)!r}, trust_remote_code=True)
        image = np.asarray(__import__("PIL.Image").Image.open({str(own_dataset.parent / "raw/images/validation/tile_1000.jpg")!r}))
        with torch.no_grad():
            out = model(**processor(image, return_tensors="pt"))
        maps = processor.post_process_dense_predictions(out, target_sizes=[image.shape[:2]], task_specs=model.config)[0]
        assert maps["roads"].shape == (32, 32) and int(maps["roads"].max()) < 3
        assert maps["elevation"].shape == (1, 32, 32) and 0 <= float(maps["elevation"].min()) <= float(maps["elevation"].max()) <= 50
        assert maps["contours"].shape == (32, 32) and 0 <= float(maps["contours"].min()) <= 1
        result = pipeline("multi-task-dense-prediction", model={str(output)!r}, trust_remote_code=True)(image)
        assert sorted(result) == ["contours", "elevation", "roads"], sorted(result)
        assert all(entry["image"].size == (32, 32) for entry in result.values())
        print("REMOTE-OK")
        """
    )
    from clean_environment import clean_python

    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    remote = subprocess.run([str(clean_python()), "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert remote.returncode == 0 and "REMOTE-OK" in remote.stdout, remote.stderr[-3000:]

    # The Space's predict function and renderers: every task by its declared name, with its kind's legend.
    from inference import predict
    from model_loading import load_demo_model
    from rendering import render_task, task_legend, task_title

    demo_model = load_demo_model(str(output))
    image = own_dataset.parent / "raw/images/validation/tile_1001.jpg"
    prediction = predict(demo_model, str(image))
    assert sorted(prediction.predictions) == sorted(OWN_TASKS)
    annotated, masks = render_task(prediction.predictions["roads"], "roads", prediction.image, demo_model.config)
    assert {name for _, name in masks} <= set(ROAD_CLASSES)
    assert render_task(prediction.predictions["elevation"], "elevation", prediction.image, demo_model.config).shape == (
        32, 32, 3,
    )  # fmt: skip
    specs = demo_model.config.task_specs
    assert "0 m" in task_legend(specs["elevation"]) and "50 m" in task_legend(specs["elevation"])
    assert "boundary probability (contours)" in task_legend(specs["contours"])
    assert task_title(specs["elevation"]) == "elevation" and task_title(specs["roads"]) == "Road and lane segmentation"
    assert "elevation" in demo_model.describe()
