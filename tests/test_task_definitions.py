"""Task kinds and task specifications: declarations, their checks, each kind's loss, post-processing and label rules,
and the silent wrong results of the "tasks as data" issue, each now a clear error or the right result."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import make_labels, tiny_config
from modsquad_reference import tiny_modsquad_config
from pinned_outputs import METADATA as PINNED_METADATA
from pinned_outputs import machine as pinned_machine
from PIL import Image
from safetensors.torch import load_file

from modeling_taskexpert import ModSquadForDensePrediction, TaskExpertForDensePrediction
from modeling_taskexpert.data.labels import LabelError, decode_label, encode_label
from modeling_taskexpert.data.schema import dataset_task_specs
from modeling_taskexpert.data.transforms import DenseTransform, collate_dense_batch, flip_horizontal
from modeling_taskexpert.dense_losses import dense_task_losses
from modeling_taskexpert.dense_model_utils import read_task_order
from modeling_taskexpert.evaluation.metrics import NormalsMeter, RegressionMeter
from modeling_taskexpert.image_processing_dense_multitask import DenseMultiTaskImageProcessor, logits_to_predictions
from modeling_taskexpert.task_definitions import IGNORE_INDEX, KINDS, PRESET_TASKS, TASKS, make_task_spec

ELEVATION = {"kind": "regression", "channels": 2, "value_range": [-5.0, 50.0], "unit": "m", "negate_on_flip": [1]}
FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "saved_before_task_kinds"


# ---------------------------------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------------------------------
def test_presets_keep_the_protocol_facts():
    assert list(TASKS) == ["semseg", "human_parts", "saliency", "edge", "normals", "depth"]
    assert {task: spec.kind.name for task, spec in TASKS.items()} == {
        "semseg": "segmentation", "human_parts": "segmentation", "saliency": "saliency", "edge": "boundary",
        "normals": "normals", "depth": "depth",
    }  # fmt: skip
    assert TASKS["semseg"].num_classes == 21 and TASKS["human_parts"].class_names[0] == "background"
    assert [TASKS[t].head_channels for t in ("saliency", "edge", "normals", "depth")] == [1, 1, 3, 1]
    assert TASKS["normals"].negate_on_flip == (0,) and TASKS["depth"].scales_with_zoom
    assert TASKS["human_parts"].parameters["background_only_is_unlabelled"]
    assert [TASKS[t].primary_metric_key for t in TASKS] == [
        "semseg/mIoU", "human_parts/mIoU", "saliency/maxF", "edge/odsF", "normals/mean", "depth/RMSE",
    ]  # fmt: skip


def test_a_declaration_round_trips_and_bad_ones_name_the_task():
    spec = make_task_spec("elevation", ELEVATION)
    assert spec.head_channels == spec.label_channels == 2 and spec.unit == "m"
    assert make_task_spec("elevation", spec.declaration()) == spec
    assert make_task_spec("roads", {"kind": "segmentation"}, {"1": "road", "0": "ground"}).class_names == (
        "ground", "road",
    )  # fmt: skip
    for name, declaration, message in [
        ("lanes", None, "'lanes' is not one of the preset tasks"),
        ("lanes", {"kind": "lines"}, "kind 'lines'; the kinds are"),
        ("h", {"kind": "regression"}, "needs `value_range"),
        ("h", {"kind": "regression", "value_range": [1, 0]}, "finite low < high"),
        ("h", {"kind": "regression", "value_range": [0, 1], "colour": 3}, r"unknown parameter\(s\) \['colour'\]"),
        ("h", {"kind": "regression", "value_range": [0, 1], "negate_on_flip": [1]}, "channel indices 0..0"),
        ("d", {"kind": "depth", "max_depth": -1}, "`max_depth`"),
        ("e", {"kind": "boundary", "tolerance": 2}, "`tolerance`"),
        ("s", {"kind": "segmentation"}, "at least 2 classes"),
        ("a b", {"kind": "saliency"}, "Invalid task"),
        ("n", {"kind": "regression", "value_range": [0, 1], "loss": "cosine"}, "cosine loss needs at least 2"),
        ("h", {"kind": "regression", "value_range": [0, 1], "primary_metric": "RMSE_m"}, "`primary_metric` must be"),
        ("h", {"kind": "regression", "value_range": [0, 1], "metric_transforms": ["x"]}, "unknown `metric_transforms`"),
        ("h", {"kind": "regression", "value_range": [0, 1], "decode": [{"op": "fft"}]}, "decode step 0 .* no known"),
        (
            "h",
            {"kind": "regression", "value_range": [0, 1], "decode": [{"op": "linear", "from": [0, 0], "to": [0, 1]}]},
            "`from` and `to` must be",
        ),
        ("c", {"kind": "image_classification"}, "needs `num_classes`"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_task_spec(name, declaration)
    with pytest.raises(ValueError, match="only segmentation, image_classification tasks have class names"):
        make_task_spec("d", {"kind": "depth"}, ["a", "b"])


def test_dataset_metadata_written_before_task_kinds_reads_as_presets():
    legacy = {"tasks": {"semseg": {"id2label": {"0": "floor", "1": "wall"}}, "depth": {}}}
    specs = dataset_task_specs(legacy)
    assert specs["semseg"].class_names == ("floor", "wall") and specs["depth"].kind is KINDS["depth"]
    with pytest.raises(ValueError, match="'roads' is not a preset task .* has no 'kind'"):
        dataset_task_specs({"tasks": {"roads": {"id2label": {"0": "a", "1": "b"}}}})


def test_a_config_declares_new_tasks_and_round_trips_through_json():
    config = tiny_config(
        tasks=["roads", "elevation", "depth"],
        task_id2label={"roads": {0: "ground", 1: "road", 2: "lane"}},
        task_kinds={"roads": {"kind": "segmentation"}, "elevation": ELEVATION},
    )
    assert config.task_kinds["depth"] == PRESET_TASKS["depth"]  # filled in
    assert config.loss_weights == {"roads": 1.0, "elevation": 1.0, "depth": 1.0}
    again = type(config).from_dict(json.loads(config.to_json_string()))
    assert again.task_specs == config.task_specs
    model = TaskExpertForDensePrediction(config).eval()
    logits = model(torch.randn(2, 3, 32, 32)).logits
    assert {task: tuple(value.shape) for task, value in logits.items()} == {
        "roads": (2, 3, 32, 32), "elevation": (2, 2, 32, 32), "depth": (2, 1, 32, 32),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Each kind's loss, post-processing and label rules against hand computations
# ---------------------------------------------------------------------------------------------------------------------
def test_regression_loss_metric_and_post_processing_by_hand():
    spec = make_task_spec("elevation", {**ELEVATION, "channels": 1, "negate_on_flip": []})
    logits = torch.tensor([[[[1.0, 2.0], [3.0, 60.0]]]])
    labels = torch.tensor([[[[2.0, float("nan")], [1.0, 50.0]]]])
    loss = dense_task_losses({"elevation": logits}, {"elevation": labels}, {"elevation": spec})["elevation"]
    assert loss.item() == pytest.approx((1 + 2 + 10) / 3)  # NaN pixels carry no supervision
    squared = make_task_spec("e", {**ELEVATION, "channels": 1, "negate_on_flip": [], "loss": "l2"})
    assert dense_task_losses({"e": logits}, {"e": labels}, {"e": squared})["e"].item() == pytest.approx(35.0)
    prediction = logits_to_predictions({"elevation": logits}, {"elevation": spec})["elevation"]
    assert prediction.flatten().tolist() == [1.0, 2.0, 3.0, 50.0]  # clamped to the declared range
    meter = RegressionMeter("elevation")
    meter.update(prediction, labels)
    results = meter.summarise(meter.state)
    assert results["MAE"] == pytest.approx((1 + 2 + 0) / 3) and results["RMSE"] == pytest.approx((5 / 3) ** 0.5)


def test_a_horizontal_flip_negates_the_declared_channels():
    spec = make_task_spec("flow", ELEVATION)
    label = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    _, flipped = flip_horizontal(np.zeros((2, 3, 3)), {"flow": label}, {"flow": spec})
    np.testing.assert_array_equal(flipped["flow"][..., 0], label[:, ::-1, 0])
    np.testing.assert_array_equal(flipped["flow"][..., 1], -label[:, ::-1, 1])


def test_missing_labels_are_filled_with_the_kind_s_unsupervised_value():
    spec = make_task_spec("elevation", ELEVATION)
    present = {"pixel_values": torch.zeros(3, 4, 4), "labels": {"elevation": torch.ones(2, 4, 4)}, "id": "a",
               "original_size": (4, 4), "pad_offset": (0, 0)}  # fmt: skip
    absent = {**present, "labels": {"elevation": None}, "id": "b"}
    batch = collate_dense_batch([present, absent], task_specs={"elevation": spec})
    assert torch.isnan(batch["labels"]["elevation"][1]).all() and (batch["labels"]["elevation"][0] == 1).all()
    with pytest.raises(ValueError, match="'elevation' is not a preset; pass task_specs"):
        collate_dense_batch([absent])


# ---------------------------------------------------------------------------------------------------------------------
# The silent wrong results of the issue, one test each
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", ["taskexpert", "modsquad"])
def test_a_config_listing_the_tasks_in_another_order_is_mapped_by_name(build, tmp_path):
    torch.manual_seed(0)
    config = tiny_config() if build == "taskexpert" else tiny_modsquad_config()
    model_class = TaskExpertForDensePrediction if build == "taskexpert" else ModSquadForDensePrediction
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    assert read_task_order(str(tmp_path)) == list(config.tasks)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
    edited = json.loads((tmp_path / "config.json").read_text())
    edited["tasks"] = edited["tasks"][::-1]
    (tmp_path / "config.json").write_text(json.dumps(edited))
    loaded = model_class.from_pretrained(tmp_path)
    assert list(loaded.config.tasks) == list(config.tasks) and not loaded.training
    with torch.no_grad():
        logits = loaded(pixel_values).logits
    assert all(torch.equal(logits[task], expected[task]) for task in expected)
    dropped = edited["tasks"].pop(0)  # a config of other tasks than the weights'
    for field in ("task_kinds", "task_id2label", "loss_weights"):
        edited[field].pop(dropped, None)
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.raises(OSError, match="its weights were saved for"):
        model_class.from_pretrained(tmp_path)


@pytest.mark.parametrize("build", ["taskexpert", "modsquad"])
def test_models_saved_before_task_kinds_load_with_bit_identical_outputs(build):
    model_class = TaskExpertForDensePrediction if build == "taskexpert" else ModSquadForDensePrediction
    assert read_task_order(str(FIXTURE / build)) is None  # written before the order was recorded
    pinned = load_file(FIXTURE / "outputs.safetensors")
    model = model_class.from_pretrained(FIXTURE / build).eval()
    with torch.no_grad():
        logits = model(pinned["input"], output_gates=True).logits
    assert sorted(logits) == sorted(k.split("/")[-1] for k in pinned if k.startswith(f"{build}/"))
    # Bit for bit on a machine like the one that wrote the copy (the pinned outputs' machine); another CPU's kernels
    # round differently, so a tight tolerance applies there (as in test_pinned_outputs.py).
    exact = json.loads(PINNED_METADATA.read_text())["machine"] == pinned_machine()
    for task, value in logits.items():
        expected = pinned[f"{build}/logits/{task}"]
        if exact:
            assert torch.equal(value, expected), task
        else:
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=task)


def _png(array: np.ndarray, mode=None) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG" if array.dtype != np.float32 else "TIFF")
    return Image.open(io.BytesIO(buffer.getvalue()))


WHERE = "dataset 'x', train split, sample 's1', column 'c'"


def test_a_saliency_or_boundary_label_of_0_255_is_refused_for_a_whole_split(tmp_path):
    from modeling_taskexpert.data.writer import DatasetConversionError, write_dataset

    def make_row(split, sample_id):
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:5] = 255  # positives stored as 255, which means ignore
        return {"id": sample_id, "image": encode_label(TASKS["semseg"], np.zeros((8, 8), np.uint8)) | {},
                "saliency": encode_label(TASKS["saliency"], mask)}  # fmt: skip

    def finalize(split_sizes):
        raise AssertionError("never reached")

    with pytest.raises(DatasetConversionError, match="column 'saliency': no pixel of any sample is 1"):
        write_dataset(tmp_path / "d", {"train": ["a", "b"]}, make_row, ["saliency"], finalize, num_workers=0)
    assert not (tmp_path / "d").exists()


def test_a_16_bit_class_id_is_not_wrapped_modulo_256():
    spec = make_task_spec("roads", {"kind": "segmentation"}, ["a", "b", "c"])
    label = np.zeros((4, 4), np.uint16)
    label[0, 0] = 258  # read as 2 by an 8-bit conversion
    with pytest.raises(LabelError, match=f"{WHERE}: the 'roads' label .*found \\[258\\]"):
        decode_label(spec, _png(label), WHERE)
    label[0, 0] = 2
    assert decode_label(spec, _png(label), WHERE)[0, 0] == 2


def test_depth_in_millimetres_is_refused_on_read():
    millimetres = np.full((4, 4), 2500.0, np.float32)
    with pytest.raises(LabelError, match=f"{WHERE}: the 'depth' label .*looks like millimetres"):
        decode_label("depth", _png(millimetres, "F"), WHERE)


def test_a_saliency_label_of_2_is_refused():
    label = np.ones((4, 4), np.uint8) * 2
    with pytest.raises(
        LabelError, match=f"{WHERE}: the 'saliency' label .*values must be 0, 1 or 255 \\(ignore\\), found 2"
    ):
        decode_label("saliency", _png(label), WHERE)


def test_a_negative_depth_is_refused():
    label = np.full((4, 4), -1.0, np.float32)
    with pytest.raises(LabelError, match="depth values must be finite and >= 0"):
        decode_label("depth", _png(label, "F"), WHERE)


def test_a_class_id_beyond_the_class_count_names_the_sample_and_column():
    spec = make_task_spec("roads", {"kind": "segmentation"}, ["a", "b"])
    transform = DenseTransform({"roads": spec}, train=True, size=(8, 8), seed=0, source="dataset 'own'")
    row = {"id": "tile_7", "image": Image.new("RGB", (8, 8)), "roads": _png(np.full((8, 8), 5, np.uint8))}
    with pytest.raises(LabelError, match="dataset 'own', train split, sample 'tile_7', column 'roads'.*found \\[5\\]"):
        transform.transform_sample(row)


def test_a_zero_vector_normal_carries_no_supervision():
    prediction = torch.nn.functional.normalize(
        torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0)), dim=1
    )
    label = prediction.clone()
    label[0, :, 0, 0] = 0.0  # no normal there: neither scored as a 90 degree error nor trained towards
    meter = NormalsMeter("normals")
    meter.update(prediction, label)
    results = meter.summarise(meter.state)
    assert int(meter.state["count"]) == 3 and results["mean"] == pytest.approx(0.0, abs=1e-5)
    loss = dense_task_losses({"normals": prediction * 3}, {"normals": label})["normals"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_rgba_images_are_composited_on_white_in_training_as_at_inference():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.linspace(0, 255, 8, dtype=np.uint8)[None, :]
    transform = DenseTransform({}, train=False, size=(8, 8))
    sample = transform.transform_sample({"id": "a", "image": Image.fromarray(rgba, "RGBA")})
    processor = DenseMultiTaskImageProcessor(size={"height": 8, "width": 8}, size_divisor=8)
    expected = processor(Image.fromarray(rgba, "RGBA"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(sample["pixel_values"], expected, rtol=0, atol=1e-5)
    assert sample["pixel_values"][1, 0, 0] > 2.0  # a transparent pixel is white, not black


def test_every_kind_has_a_codec_and_a_meter():
    from modeling_taskexpert.data.labels import CODECS
    from modeling_taskexpert.evaluation.metrics import build_meters

    assert set(CODECS) == set(KINDS)
    for kind in KINDS:
        declaration = {"kind": kind, **({"value_range": [0, 1]} if kind == "regression" else {})}
        spec = make_task_spec(
            "t", declaration, ["a", "b"] if kind in ("segmentation", "image_classification") else None
        )
        assert build_meters(spec, boundary_tolerance=0.01, boundary_modes=("approximate",))
        assert spec.kind.unsupervised_value in (IGNORE_INDEX,) or np.isnan(spec.kind.unsupervised_value)


def test_labels_from_make_labels_give_the_same_losses_as_before_with_presets():
    """The losses of the preset tasks are the same function of logits and labels as before the kinds existed
    (pinned elsewhere bit for bit); here: a hand check of the boundary and saliency weighting."""
    generator = torch.Generator().manual_seed(0)
    labels = make_labels(1, 4, 4, generator)
    logits = {task: torch.zeros(1, TASKS[task].head_channels if task not in ("semseg", "human_parts") else 3, 4, 4)
              for task in labels}  # fmt: skip
    losses = dense_task_losses(logits, labels)
    positives = labels["edge"].mean().item()
    expected_edge = (0.95 * positives + 0.05 * (1 - positives)) * np.log(2)
    assert losses["edge"].item() == pytest.approx(expected_edge, rel=1e-6)
    assert losses["depth"].item() == pytest.approx(labels["depth"].mean().item(), rel=1e-6)
