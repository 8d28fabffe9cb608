"""space_app/model_loading.py: which model the Space serves, what it says about its training data, and image loading."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ALL_TASKS
from PIL import Image
from space_support import make_model_folder, random_image

import model_loading
from experiments.paths import STUDY_BEST_MODEL_DIR
from modeling_taskexpert import TaskExpertForDensePrediction


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("space") / "model")


@pytest.fixture
def repo_root(tmp_path, monkeypatch):
    """An empty repository root, with the real `pyproject.toml` (which configures the default models)."""
    monkeypatch.delenv(model_loading.MODEL_ENV_VAR, raising=False)
    monkeypatch.setattr(model_loading, "REPO_ROOT", tmp_path)
    shutil.copy(model_loading.SPACE_DIR.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "outputs").mkdir()
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Which model
# ---------------------------------------------------------------------------------------------------------------
def test_loads_the_folder_from_the_environment_variable(model_folder, monkeypatch):
    monkeypatch.setenv(model_loading.MODEL_ENV_VAR, str(model_folder))
    loaded = model_loading.load_demo_model()
    assert isinstance(loaded.model, TaskExpertForDensePrediction)
    assert loaded.tasks == ALL_TASKS and loaded.source == str(model_folder)
    assert loaded.canvas == (64, 64)
    info = loaded.describe()
    for fact in ("semantic segmentation", "monocular depth", "taskexpert", "M parameters", "2 layers of 4 candidates"):
        assert fact in info, (fact, info)


def test_default_model_is_the_study_best_when_there_else_the_make_train_one(model_folder, repo_root):
    # One configuration (pyproject.toml): the folder the study writes to is the one the Space serves first.
    assert model_loading.study_best_model_dir() == STUDY_BEST_MODEL_DIR
    fallback = model_loading.default_models()["fallback_model"]
    assert (
        fallback
        == yaml.safe_load((model_loading.SPACE_DIR.parent / "hub_configs" / "synthetic-tiny.yaml").read_text())[
            "output_dir"
        ]
    )
    (repo_root / fallback).symlink_to(model_folder)
    assert model_loading.load_demo_model().source == str(repo_root / fallback)
    best = repo_root / STUDY_BEST_MODEL_DIR
    best.mkdir(parents=True)  # a folder without a finished model (no config.json) is passed over
    assert model_loading.load_demo_model().source == str(repo_root / fallback)
    best.rmdir()
    best.symlink_to(model_folder)
    assert model_loading.load_demo_model().source == str(best)


def test_a_relative_model_folder_is_read_from_the_repository_root(
    model_folder, repo_root, monkeypatch, tmp_path_factory
):
    (repo_root / "outputs" / "mine").symlink_to(model_folder)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # not where the app runs from
    monkeypatch.setenv(model_loading.MODEL_ENV_VAR, "outputs/mine")
    assert model_loading.load_demo_model().source == str(repo_root / "outputs" / "mine")
    monkeypatch.setenv(model_loading.MODEL_ENV_VAR, "./outputs/missing")
    with pytest.raises(model_loading.ModelUnavailable, match="relative folders are read from the repository root"):
        model_loading.load_demo_model()


def test_missing_default_model_says_how_to_get_one(repo_root):
    with pytest.raises(model_loading.ModelUnavailable, match="make train") as raised:
        model_loading.load_demo_model()
    assert model_loading.default_models()["fallback_model"] in str(raised.value)
    assert STUDY_BEST_MODEL_DIR in str(raised.value)
    (repo_root / "pyproject.toml").unlink()  # outside the repository nothing is configured: a model must be named
    with pytest.raises(model_loading.ModelUnavailable, match="No model is named and none is configured"):
        model_loading.load_demo_model()


@pytest.mark.parametrize(
    "source, message",
    [
        ("{tmp}/no-such-folder", "does not exist"),
        ("someone/no-such-model", "Could not load the model `someone/no-such-model`"),  # offline Hub id
        ("{tmp}", "holds no model yet (no `config.json`"),  # e.g. while training runs
    ],
)
def test_unloadable_models_give_a_clear_message(tmp_path, source, message):
    with pytest.raises(model_loading.ModelUnavailable, match="make train") as raised:
        model_loading.load_demo_model(source.format(tmp=tmp_path))
    assert message in str(raised.value)


def test_a_config_without_model_type_is_named_not_prompted(model_folder, tmp_path):
    import json
    import shutil

    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(model_loading.ModelUnavailable, match="has no `model_type`"):
        model_loading.load_demo_model(str(folder))


# ---------------------------------------------------------------------------------------------------------------
# What it was trained on
# ---------------------------------------------------------------------------------------------------------------
def write_card(folder: Path, front_matter: dict) -> None:
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(front_matter)}---\n# A model\n")


def test_training_data_comes_from_the_card_then_the_recipe(tmp_path):
    assert model_loading.read_training_data(tmp_path) == model_loading.TrainingData(name=None)
    (tmp_path / "recipe.yaml").write_text("dataset: data/synthetic\nmax_steps: 10\n")
    assert model_loading.read_training_data(tmp_path) == model_loading.TrainingData("synthetic", synthetic=True)
    index = [{"name": "m", "results": [{"task": {"type": "image-segmentation"},
                                        "dataset": {"name": "pascal-context", "type": "someone/pascal-context"}}]}]  # fmt: skip
    write_card(tmp_path, {"model-index": index})
    data = model_loading.read_training_data(tmp_path)
    assert data == model_loading.TrainingData("pascal-context") and data.title == "PASCAL-Context"
    write_card(tmp_path, {"datasets": ["someone/nyud-v2-multitask"]})
    assert model_loading.read_training_data(tmp_path).name == "nyud"
    write_card(tmp_path, {"datasets": ["someone/street-scenes"]})
    assert model_loading.read_training_data(tmp_path).title == "someone/street-scenes"
    (tmp_path / "README.md").write_text("---\n: not yaml [\n---\n")  # unreadable: the recipe still answers
    assert model_loading.read_training_data(tmp_path).synthetic


def test_limitations_say_what_the_model_was_trained_on_and_its_canvas(model_folder):
    loaded = model_loading.load_demo_model(str(model_folder))
    text = loaded.limitations()  # no card, no recipe
    assert "not recorded" in text and "64×64 px canvas" in text
    loaded.training_data = model_loading.TrainingData("synthetic", synthetic=True)
    text = loaded.limitations()
    assert "trained on synthetic scenes only" in text and "Real photos give meaningless maps" in text
    assert "PASCAL-Context" in text and f"{model_loading.MODEL_ENV_VAR}=" in text and "64×64 px canvas" in text
    loaded.training_data = model_loading.TrainingData("pascal-context")
    assert loaded.limitations().startswith("**Trained on PASCAL-Context.**")


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------
def test_16_bit_grayscale_is_scaled_to_8_bit_rgb(tmp_path):
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    rgb, notes = model_loading.load_image(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 255], [128, 1]])
    assert (rgb == rgb[..., :1]).all()
    assert any("16-bit" in note for note in notes), notes


def test_rgba_is_composited_on_white_and_grayscale_replicated(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[1, 2] = (10, 20, 30, 0)  # transparent: white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    rgb, notes = model_loading.load_image(tmp_path / "alpha.png")
    assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[1, 2]) == (255, 255, 255)
    assert any("transparent" in note for note in notes), notes
    gray, notes = model_loading.load_image(Image.fromarray(np.array([[7, 200]], dtype=np.uint8), mode="L"))
    np.testing.assert_array_equal(gray, [[[7, 7, 7], [200, 200, 200]]])
    assert any("grayscale" in note for note in notes)
    rgb, notes = model_loading.load_image(random_image(5, 4))
    assert rgb.shape == (5, 4, 3) and notes == []


def test_large_images_are_shrunk_with_a_note():
    rgb, notes = model_loading.load_image(random_image(150, 300), max_side=100)
    assert rgb.shape == (50, 100, 3)
    assert notes == ["Resized from 300×150 to 100×50 pixels (this demo's limit is 100 px per side)."]


def test_bad_files_are_refused_with_a_plain_text_message(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(ValueError, match=r"“notes.png” is not an image this demo can read; upload a PNG") as raised:
        model_loading.load_image(fake)
    assert "`" not in str(raised.value)  # shown as written in toasts and API errors: no Markdown
    Image.fromarray(random_image(40, 50)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match=r"“photo.png” is .* MB; this demo accepts images up to"):
        model_loading.load_image(tmp_path / "photo.png", max_bytes=100)
    with pytest.raises(ValueError, match=r"“photo.png” is 50×40 pixels; this demo accepts up to 1,000 pixels"):
        model_loading.load_image(tmp_path / "photo.png", max_pixels=1000)
    with pytest.raises(ValueError, match="does not exist"):
        model_loading.load_image(tmp_path / "gone.png")


def test_images_go_through_the_package_loader_the_same_way_from_a_file_or_pil(tmp_path):
    """EXIF orientation is applied, as the processor and the pipeline apply it (one loader for all of them)."""
    from modeling_taskexpert.image_processing_dense_multitask import load_rgb_image

    pixels = random_image(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    from_file, notes = model_loading.load_image(tmp_path / "rotated.png")
    assert from_file.shape == (10, 6, 3) and notes == []
    np.testing.assert_array_equal(from_file, load_rgb_image(str(tmp_path / "rotated.png")))
    from_pil, _ = model_loading.load_image(Image.open(tmp_path / "rotated.png"))
    np.testing.assert_array_equal(from_pil, from_file)


def test_a_truncated_file_is_named_without_the_server_path(tmp_path):
    Image.fromarray(random_image(64, 64)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match="“cut.png”: the image cannot be decoded; the file is damaged or truncated"
    ) as raised:
        model_loading.load_image(tmp_path / "cut.png")
    assert str(tmp_path) not in str(raised.value)


@pytest.mark.parametrize("dataset, title, synthetic", [("synthetic", "the package's synthetic benchmark", True),
                                                        ("pascal-context", "PASCAL-Context", False)])  # fmt: skip
def test_the_card_train_py_writes_names_the_training_data(tmp_path, dataset, title, synthetic):
    """The card `train.py` writes (modeling_taskexpert.training) is what the page reads first."""
    from conftest import tiny_config

    from modeling_taskexpert.training import build_model_card, load_recipe

    recipe = load_recipe("hub_configs/synthetic-tiny.yaml", {"dataset": str(tmp_path / "data" / dataset)})
    metadata = {"name": dataset, "eval_size": [64, 64], "train_size": [64, 64], "splits": {"train": 8, "validation": 4}}
    card = build_model_card(tiny_config(), recipe, {"semseg/mIoU": 40.0, "depth/RMSE": 1.0}, metadata, "tiny")
    (tmp_path / "README.md").write_text(card)
    data = model_loading.read_training_data(tmp_path)
    assert (data.name, data.title, data.synthetic) == (dataset, title, synthetic)
