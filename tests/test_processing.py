"""Image processor, post-processing, pipeline and visualisation."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import pipeline

from modeling_taskexpert import (
    PIPELINE_TASK,
    MultiTaskDensePredictionPipeline,
    TaskExpertForDensePrediction,
    TaskExpertImageProcessor,
    logits_to_predictions,
)
from modeling_taskexpert.image_processing_taskexpert import to_rgb_array
from modeling_taskexpert.visualization_taskexpert import colorbar, colorize_labels, label_palette, visualize_prediction

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def test_preprocess_pads_centred_and_normalises_like_the_protocol():
    processor = TaskExpertImageProcessor(size={"height": 32, "width": 48}, size_divisor=8)
    image = np.random.default_rng(0).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    pixels = processor(image)["pixel_values"]
    assert pixels.shape == (1, 3, 32, 48)
    top, left = (32 - 21) // 2, (48 - 30) // 2  # floor(delta / 2), as the protocol
    expected = ((image / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(pixels[0, :, top : top + 21, left : left + 30].numpy(), expected, atol=1e-5)
    # Padding is 0 after normalisation.
    mask = torch.ones(32, 48, dtype=torch.bool)
    mask[top : top + 21, left : left + 30] = False
    assert (pixels[0][:, mask] == 0).all()


def test_shrink_resizes_only_large_images_and_geometry_round_trips():
    processor = TaskExpertImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    assert processor.geometry((20, 10)) == (1.0, (20, 10), (6, 11))
    scale, resized, offset = processor.geometry((64, 128))
    assert scale == 0.25 and resized == (16, 32) and offset == (8, 0)
    fit = TaskExpertImageProcessor(size={"height": 32, "width": 32}, size_divisor=8, resize_mode="fit")
    assert fit.geometry((8, 16)) == (2.0, (16, 32), (8, 0))
    strict = TaskExpertImageProcessor(size={"height": 32, "width": 32}, size_divisor=8, resize_mode="none")
    with pytest.raises(ValueError, match="larger than the canvas"):
        strict.geometry((40, 10))


def test_post_process_crops_padding_and_restores_original_size():
    processor = TaskExpertImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    # Logits built so that each pixel's class is known: class 1 inside the image region, 0 in the padding.
    scale, (h, w), (top, left) = processor.geometry((20, 10))
    semseg = torch.zeros(1, 2, 32, 32)
    semseg[0, 1, top : top + h, left : left + w] = 5.0
    depth = torch.full((1, 1, 32, 32), -1.0)
    depth[0, 0, top : top + h, left : left + w] = 3.0
    normals = torch.zeros(1, 3, 32, 32)
    normals[:, 2] = 2.0
    logits = {"semseg": semseg, "depth": depth, "normals": normals, "edge": torch.zeros(1, 1, 32, 32)}
    result = processor.post_process_dense_predictions({"logits": logits}, target_sizes=[(20, 10)])[0]
    assert result["semseg"].shape == (20, 10) and (result["semseg"] == 1).all()
    torch.testing.assert_close(result["depth"], torch.full((20, 10), 3.0))
    torch.testing.assert_close(result["normals"][2], torch.ones(20, 10))
    torch.testing.assert_close(result["edge"], torch.full((20, 10), 0.5))


def test_depth_is_rescaled_for_resized_images():
    processor = TaskExpertImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    logits = {"depth": torch.full((1, 1, 32, 32), 2.0)}
    (result,) = processor.post_process_dense_predictions({"logits": logits}, target_sizes=[(64, 64)])
    # The image was shrunk by 0.5: the model sees it twice as far, so the prediction is halved back.
    torch.testing.assert_close(result["depth"], torch.full((64, 64), 1.0))


def test_logits_to_predictions_follow_the_conventions():
    logits = {
        "semseg": torch.tensor([[[[0.0]], [[2.0]], [[1.0]]]]),
        "saliency": torch.tensor([[[[0.0]]]]),
        "normals": torch.tensor([[[[3.0]], [[0.0]], [[4.0]]]]),
        "depth": torch.tensor([[[[-2.0]]]]),
    }
    predictions = logits_to_predictions(logits)
    assert predictions["semseg"].tolist() == [[[1]]]
    assert predictions["saliency"].tolist() == [[[0.5]]]
    torch.testing.assert_close(predictions["normals"][0, :, 0, 0], torch.tensor([0.6, 0.0, 0.8]))
    assert predictions["depth"].tolist() == [[[0.0]]]


def test_image_conversions():
    gray = Image.fromarray(np.full((4, 5), 100, dtype=np.uint8), mode="L")
    assert (to_rgb_array(gray) == 100).all() and to_rgb_array(gray).shape == (4, 5, 3)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white
    assert (to_rgb_array(rgba) == 255).all()
    sixteen = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert (to_rgb_array(sixteen) == 255).all()
    assert (to_rgb_array(np.full((2, 2, 3), 0.5, dtype=np.float32)) == 128).all()
    chw = torch.zeros(3, 6, 7, dtype=torch.uint8)
    assert to_rgb_array(chw).shape == (6, 7, 3)
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\]"):
        to_rgb_array(np.full((2, 2, 3), 200.0))
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_array(np.full((2, 2, 3), np.nan))
    with pytest.raises(ValueError, match=r"images\[0\]: expected one image of shape"):
        TaskExpertImageProcessor()([np.zeros((2, 2, 2, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="image: no such file 'not an image'"):
        to_rgb_array("not an image")
    with pytest.raises(ValueError, match="expected a file path, a PIL image"):
        to_rgb_array(b"bytes")


def test_processor_save_and_load_round_trip(tmp_path):
    processor = TaskExpertImageProcessor(size={"height": 64, "width": 96}, resize_mode="fit", size_divisor=8)
    processor.save_pretrained(tmp_path)
    loaded = TaskExpertImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == {"height": 64, "width": 96} and loaded.resize_mode == "fit"
    image = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    with pytest.raises(ValueError, match="multiples of size_divisor"):
        TaskExpertImageProcessor(size={"height": 30, "width": 32})


def test_palette_and_visualisations():
    palette = label_palette(4)
    assert palette.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]  # the PASCAL VOC colours
    assert colorize_labels(np.array([[1, 9]]), 4).tolist() == [[[128, 0, 0], [0, 0, 0]]]
    heat = visualize_prediction("saliency", np.array([[0.0, 1.0]]))
    assert heat[0, 0].tolist() == [68, 1, 84] and heat[0, 1].tolist() == [253, 231, 37]
    normals = visualize_prediction("normals", np.array([[[0.0]], [[0.0]], [[1.0]]]))
    assert normals[0, 0].tolist() == [128, 128, 255]
    bar = colorbar(9, 2)
    assert bar.shape == (2, 9, 3) and bar[0, 0].tolist() == [68, 1, 84] and bar[1, -1].tolist() == [253, 231, 37]
    assert colorbar(1, 1).shape == (1, 1, 3)
    for length, thickness in ((0, 4), (-3, 4), (5, 0)):  # a legend for an image under a few pixels wide
        with pytest.raises(ValueError, match="colorbar needs a positive integer length and thickness"):
            colorbar(length, thickness)


def test_pipeline_on_a_pil_image(tmp_path):
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(tiny_config()).eval()
    processor = TaskExpertImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline(PIPELINE_TASK, model=str(tmp_path), pipeline_class=MultiTaskDensePredictionPipeline)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8))
    result = pipe(image, tasks=["semseg", "normals", "depth"])
    assert set(result) == {"semseg", "normals", "depth"}
    assert result["semseg"]["prediction"].shape == (20, 28)
    assert result["normals"]["prediction"].shape == (3, 20, 28)
    assert result["depth"]["image"].size == (28, 20) and result["depth"]["image"].mode == "RGB"
    # Same numbers as calling processor + model + post-processing by hand.
    with torch.no_grad():
        out = model(processor(image)["pixel_values"], tasks=["semseg"])
    expected = processor.post_process_dense_predictions(out, target_sizes=[(20, 28)])[0]["semseg"]
    np.testing.assert_array_equal(result["semseg"]["prediction"], expected.numpy())
    # A path works too.
    image.save(tmp_path / "image.png")
    assert pipe(str(tmp_path / "image.png"))["edge"]["prediction"].shape == (20, 28)
    with pytest.raises(ValueError, match="Unknown task"):
        pipe(image, tasks=["flow"])
