"""Reliability: the bad-input corpus (tests/bad_inputs.py) through the processor, pipeline, Space, model loading,
configs, converters, datasets, evaluator and train.py; safetensors-only loading; checkpoints and the output folder."""

import json
import shutil

import numpy as np
import pytest
import torch
from bad_inputs import build_image_corpus
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file
from raw_datasets import write_png
from space_support import make_model_folder
from transformers import AutoConfig, AutoModel, pipeline

from modeling_taskexpert import (
    PIPELINE_TASK,
    MultiTaskDensePredictionPipeline,
    TaskExpertForDensePrediction,
    DenseMultiTaskImageProcessor,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_image_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("reliability") / "model")


@pytest.fixture(scope="module")
def pipe(model_folder):
    return pipeline(PIPELINE_TASK, model=str(model_folder), pipeline_class=MultiTaskDensePredictionPipeline)


CASES = ["truncated.jpg", "truncated.png", "empty.png", "text_as_image.jpg", "one_pixel.png", "huge_10000x10000.png",
         "gray.png", "rgba.png", "cmyk.jpg", "gray16.png", "huge_9000x9000.png", "gray16_gradient.png",
         "rgba_transparent.png", "exif_rotated.jpg", "nan_float.tif"]  # fmt: skip
# What a refusal must say, per file: the reason in words a user understands.
REASONS = {"truncated.jpg": "truncated", "truncated.png": "truncated", "empty.png": "cannot identify",
           "text_as_image.jpg": "cannot identify", "huge_10000x10000.png": "100,000,000 pixels", "huge_9000x9000.png": "81,000,000 pixels",
           "nan_float.tif": "contains NaN or infinite values"}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_pipeline_answers_every_corpus_file(pipe, corpus, name):
    case = corpus[name]
    if case.accept:
        result = pipe(str(case.path))
        assert result["semseg"]["prediction"].shape == case.size
        assert result["normals"]["prediction"].shape == (3, *case.size)
        assert np.isfinite(result["depth"]["prediction"]).all()
    else:
        with pytest.raises(ValueError) as raised:
            pipe(str(case.path))
        assert REASONS[name] in str(raised.value)
        assert name in str(raised.value) or "pixels" in str(raised.value)


@pytest.mark.parametrize("name", CASES)
def test_processor_answers_every_decodable_corpus_file(corpus, name):
    case = corpus[name]
    processor = DenseMultiTaskImageProcessor(size={"height": 64, "width": 64}, size_divisor=8)
    try:
        image = Image.open(case.path)
    except OSError:  # PIL itself refuses to open it (zero bytes, text): nothing reaches the processor
        assert not case.accept
        return
    good = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    if case.accept:
        pixels = processor([good, image])["pixel_values"]
        assert pixels.shape == (2, 3, 64, 64) and torch.isfinite(pixels).all()
    else:  # the error names which image of the list is bad
        with pytest.raises(ValueError, match=rf"^images\[1\]: .*{REASONS[name]}"):
            processor([good, image])


def test_processor_refuses_a_huge_array_before_copying_it():
    processor = DenseMultiTaskImageProcessor(size={"height": 64, "width": 64}, size_divisor=8, max_image_pixels=10_000)
    with pytest.raises(ValueError, match=r"images\[0\]: 101x100 is 10,100 pixels.*max_image_pixels"):
        processor(np.zeros((100, 101, 3), np.uint8))
    assert processor(np.zeros((100, 100, 3), np.uint8))["pixel_values"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize("name", CASES)
def test_space_answers_every_corpus_file(corpus, name):
    import model_loading  # space_app/ (conftest puts it on the import path)

    case = corpus[name]
    if case.accept:
        rgb, _ = model_loading.load_image(str(case.path))
        assert rgb.shape == (*case.size, 3) and rgb.dtype == np.uint8
    else:
        # The Space names the upload (by its name only, never a server path) and the reason.
        reason = (
            rf"“{name}”(: the image cannot be decoded|: the image contains NaN| is not an image| is \d+×\d+ pixels)"
        )
        with pytest.raises(ValueError, match=reason) as raised:
            model_loading.load_image(str(case.path))
        assert str(case.path.parent) not in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors only, damaged files named
# ---------------------------------------------------------------------------------------------------------------
def test_pickle_checkpoint_is_refused_with_an_explanation(model_folder, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(model_folder / "config.json", folder)
    state = TaskExpertForDensePrediction(tiny_config()).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    for load in (AutoModel.from_pretrained, TaskExpertForDensePrediction.from_pretrained):
        with pytest.raises(OSError, match=r"holds pytorch_model.bin\..*only from safetensors.*arbitrary code"):
            load(folder)
    with pytest.raises(ValueError, match="use_safetensors=False is not supported"):
        AutoModel.from_pretrained(model_folder, use_safetensors=False)


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_missing_or_truncated_weights_are_named(model_folder, tmp_path, damage):
    folder = tmp_path / damage
    shutil.copytree(model_folder, folder)
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    if damage == "missing":
        weights.unlink()
        expected = r"has no model.safetensors"
    else:
        weights.write_bytes(b"" if damage == "empty" else content[: len(content) // 2])
        expected = r"model.safetensors is damaged or truncated"
    with pytest.raises(OSError, match=expected) as raised:
        AutoModel.from_pretrained(folder)
    assert str(folder) in str(raised.value)


def test_space_reports_a_pickle_checkpoint_as_unavailable(model_folder, tmp_path):
    import model_loading as app  # space_app/model_loading.py

    folder = tmp_path / "pickled"
    shutil.copytree(model_folder, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(app.ModelUnavailable, match="pickle checkpoints .* are refused"):
        app.load_demo_model(str(folder))


def test_the_evaluation_cli_never_trusts_remote_code_by_default():
    from modeling_taskexpert.evaluation.__main__ import build_parser

    action = {a.dest: a for a in build_parser()._actions}["trust_remote_code"]
    assert action.default is False


@pytest.mark.parametrize(
    "field, value, message",
    [("num_experts", "three", "`num_experts` must be a positive integer, got 'three'"),
     ("tasks", ["flow"], "'flow' is not one of the preset tasks"),
     ("mmoe_layers", [99], "`mmoe_layers` entry 99 is out of range"),
     ("backbone_config", "vit", "`backbone_config` must be a PretrainedConfig or a dict")],
)  # fmt: skip
def test_config_files_are_validated_before_any_module_is_built(model_folder, tmp_path, field, value, message):
    settings = json.loads((model_folder / "config.json").read_text())
    settings[field] = value
    (tmp_path / "config.json").write_text(json.dumps(settings))
    shutil.copy(model_folder / "model.safetensors", tmp_path)
    with pytest.raises((ValueError, TypeError), match=message):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises((ValueError, TypeError), match=message):
        AutoModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Raw data, datasets, the evaluator
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, expected",
    [("truncated_image", r"images/0002\.png \(sample '0002'\): cannot read the image file .*truncated"),
     ("zero_byte_label", r"segmentation/0002\.png \(sample '0002'\): cannot read the semseg file"),
     ("label_wrong_size", r"segmentation/0002\.png \(sample '0002'\): size \(3, 3\) differs from the image's \(10, 8\)"),
     ("label_16_bit", r"segmentation/0002\.png \(sample '0002'\): .*expected an 8-bit"),
     ("inf_depth", r"depth/0002\.npy \(sample '0002'\): .*finite")],
)  # fmt: skip
def test_converter_names_the_file_and_sample(nyud_raw, tmp_path, damage, expected):
    from modeling_taskexpert.data import DatasetConversionError, convert_nyud

    raw_dir, root, _ = nyud_raw
    if damage == "truncated_image":
        content = (root / "images" / "0002.png").read_bytes()
        (root / "images" / "0002.png").write_bytes(content[: len(content) // 2])
    elif damage == "zero_byte_label":
        (root / "segmentation" / "0002.png").write_bytes(b"")
    elif damage == "label_wrong_size":
        write_png(root / "segmentation" / "0002.png", np.zeros((3, 3), np.uint8))
    elif damage == "label_16_bit":
        Image.fromarray(np.zeros((10, 8), np.uint16)).save(root / "segmentation" / "0002.png")
    else:
        np.save(root / "depth" / "0002.npy", np.full((10, 8), np.inf, np.float32))
    with pytest.raises(DatasetConversionError, match=expected):
        convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    assert not (tmp_path / "out").exists()


def test_dataset_with_a_missing_split_or_a_wrong_column(synthetic_dataset, tmp_path):
    import pyarrow.parquet as pq

    from modeling_taskexpert.data import METADATA_FILENAME, load_multitask_dataset

    missing = tmp_path / "missing_split"
    shutil.copytree(synthetic_dataset, missing)
    metadata = json.loads((missing / METADATA_FILENAME).read_text())
    del metadata["splits"]["validation"]
    (missing / METADATA_FILENAME).write_text(json.dumps(metadata))
    for shard in (missing / "data").glob("validation-*"):
        shard.unlink()
    with pytest.raises(
        ValueError, match=r"missing_split: the dataset has no 'validation' split \(it has \['train'\]\)"
    ):
        load_multitask_dataset(missing, "validation")

    renamed = tmp_path / "wrong_column"
    shutil.copytree(synthetic_dataset, renamed)
    for shard in (renamed / "data").glob("train-*"):
        table = pq.read_table(shard)
        pq.write_table(table.rename_columns(["depth_m" if c == "depth" else c for c in table.column_names]), shard)
    with pytest.raises(Exception, match=r"wrong_column") as raised:
        load_multitask_dataset(renamed, "train")
    assert "depth" in str(raised.value)


def test_evaluator_names_the_sample_with_nan_or_inf(generator):
    from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator

    evaluator = DenseMultiTaskEvaluator(tasks=["depth", "normals"])
    depth = torch.rand(3, 4, 4, generator=generator) + 1
    normals = torch.nn.functional.normalize(torch.randn(3, 3, 4, 4, generator=generator), dim=1)
    bad_depth = depth.clone()
    bad_depth[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"label of task 'depth' holds NaN or infinite values \(sample 2"):
        evaluator.update({"depth": depth, "normals": normals}, {"depth": bad_depth, "normals": normals})
    bad_normals = normals.clone()
    bad_normals[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"prediction of task 'normals' holds NaN or infinite values \(sample 1"):
        evaluator.update({"depth": depth, "normals": bad_normals}, {"depth": depth, "normals": normals})
    with pytest.raises(TypeError, match="segmentation task 'semseg' must hold integer class ids, got torch.float32"):
        DenseMultiTaskEvaluator(tasks=["semseg"], num_classes={"semseg": 3}).update(
            {"semseg": torch.zeros(1, 4, 4, dtype=torch.long)}, {"semseg": torch.zeros(1, 4, 4)}
        )


# ---------------------------------------------------------------------------------------------------------------
# Training: recipes, the output folder, interrupted checkpoint writes
# ---------------------------------------------------------------------------------------------------------------
def test_recipe_with_an_unknown_key_or_a_wrong_type_is_refused(tmp_path):
    from modeling_taskexpert.training import RecipeError, parse_command_line

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: somewhere\nlearnig_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"Unknown recipe field 'learnig_rate' in .*recipe.yaml"):
        parse_command_line(["--config", str(recipe)])
    recipe.write_text("dataset: somewhere\nmax_steps: many\n")
    with pytest.raises(RecipeError, match="max_steps"):
        parse_command_line(["--config", str(recipe)])


def test_output_folder_problems_are_reported_before_training(tmp_path):
    from modeling_taskexpert.training import RecipeError, run

    # Disk full is simulated by asking for more free space than any disk has.
    with pytest.raises(RecipeError, match=r"MiB free under .*needs about 1073741824 MiB"):
        run.check_output_dir(str(tmp_path / "out"), min_free_bytes=2**50)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RecipeError, match="is not writable"):
        run.check_output_dir(str(blocker / "out"), min_free_bytes=0)
    run.check_output_dir(str(tmp_path / "fine"), min_free_bytes=1)
    assert list((tmp_path / "fine").iterdir()) == []  # the write probe leaves nothing behind
