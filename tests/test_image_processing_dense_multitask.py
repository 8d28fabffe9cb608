"""DenseMultiTaskImageProcessor against transformers' image-processor conventions (the checks of ImageProcessingTestMixin,
written here for this processor), its per-call overrides and their validation, and `load_rgb_image`, the one image
loader of the package (bit depth, transparency, EXIF orientation, channel layouts, the pixel cap before decoding)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers import AutoImageProcessor
from transformers.testing_utils import check_json_file_has_correct_format

import modeling_taskexpert  # noqa: F401  (registers the processor with AutoImageProcessor)
from modeling_taskexpert.image_processing_dense_multitask import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DenseMultiTaskImageProcessor,
    load_rgb_image,
    logits_to_predictions,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PROCESSOR_DICT = {
    "size": {"height": 32, "width": 48},
    "resize_mode": "fit",
    "resample": int(Image.BICUBIC),
    "do_normalize": True,
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.25, 0.3],
    "size_divisor": 8,
    "do_resize": True,
    "do_convert_rgb": True,
    "max_image_pixels": 1_000_000,
}


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Channels-last uint8 images of different sizes (like the mixin's `prepare_image_inputs`)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(10, 60)), int(rng.integers(10, 60)), 3), dtype=np.uint8)
            for _ in range(count)]  # fmt: skip


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Serialisation (ImageProcessingTestMixin: to_json_string, to_json_file, save/load, Auto class, init, from_dict)
# ---------------------------------------------------------------------------------------------------------------
def test_to_json_string_holds_every_field():
    serialised = json.loads(DenseMultiTaskImageProcessor(**PROCESSOR_DICT).to_json_string())
    for key, value in PROCESSOR_DICT.items():
        assert serialised[key] == value, key
    assert serialised["image_processor_type"] == "DenseMultiTaskImageProcessor"


def test_to_json_file_round_trip(tmp_path):
    first = DenseMultiTaskImageProcessor(**PROCESSOR_DICT)
    first.to_json_file(tmp_path / "processor.json")
    second = DenseMultiTaskImageProcessor.from_json_file(tmp_path / "processor.json")
    assert second.to_dict() == first.to_dict()


@pytest.mark.parametrize("loader", [DenseMultiTaskImageProcessor, AutoImageProcessor])
def test_save_and_load_pretrained(tmp_path, loader):
    first = DenseMultiTaskImageProcessor(**PROCESSOR_DICT)
    saved = first.save_pretrained(tmp_path)[0]
    check_json_file_has_correct_format(saved)
    second = loader.from_pretrained(tmp_path)
    assert type(second) is DenseMultiTaskImageProcessor and second.to_dict() == first.to_dict()
    image = random_images(1)[0]
    assert torch.equal(second(image)["pixel_values"], first(image)["pixel_values"])


def test_init_without_parameters_gives_the_documented_defaults():
    processor = DenseMultiTaskImageProcessor()
    assert processor.size == {"height": 512, "width": 512} and processor.resize_mode == "shrink"
    assert processor.size_divisor == 16 and processor.do_resize and processor.do_normalize and processor.do_convert_rgb
    assert processor.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 50_000_000
    assert processor.resample == int(Image.BILINEAR)


def test_no_pixel_limit_survives_a_round_trip(tmp_path):
    # transformers' to_dict drops None fields unless the class default is not None: the class keeps one.
    DenseMultiTaskImageProcessor(max_image_pixels=None).save_pretrained(tmp_path)
    assert DenseMultiTaskImageProcessor.from_pretrained(tmp_path).max_image_pixels is None


def test_from_dict_and_from_pretrained_with_kwargs(tmp_path):
    processor = DenseMultiTaskImageProcessor.from_dict(PROCESSOR_DICT)
    assert processor.size == {"height": 32, "width": 48}
    processor = DenseMultiTaskImageProcessor.from_dict(
        PROCESSOR_DICT, size=40, resize_mode="shrink", max_image_pixels=None
    )
    assert processor.size == {"height": 40, "width": 40} and processor.resize_mode == "shrink"
    assert processor.max_image_pixels is None
    DenseMultiTaskImageProcessor(**PROCESSOR_DICT).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, size={"height": 16, "width": 24}, size_divisor=4)
    assert loaded.size == {"height": 16, "width": 24} and loaded.size_divisor == 4
    # Every field goes through __init__ (the processor's `valid_kwargs`), so a bad one is refused, not just set.
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        DenseMultiTaskImageProcessor.from_dict(PROCESSOR_DICT, resize_mode="crop")
    with pytest.raises(ValueError, match="size_divisor must be a positive integer"):
        AutoImageProcessor.from_pretrained(tmp_path, size_divisor=0)


def test_sizes_are_normalised_like_transformers():
    assert DenseMultiTaskImageProcessor(size=64).size == {"height": 64, "width": 64}
    assert DenseMultiTaskImageProcessor(size=(32, 64)).size == {"height": 32, "width": 64}
    assert DenseMultiTaskImageProcessor(size=[48, 16]).size == {"height": 48, "width": 16}


# ---------------------------------------------------------------------------------------------------------------
# Inputs: PIL, numpy, torch; single and batched; channels first and last (test_call_pil/numpy/pytorch/4_channels)
# ---------------------------------------------------------------------------------------------------------------
def test_pil_numpy_and_torch_inputs_give_the_same_pixels_single_and_batched():
    processor = DenseMultiTaskImageProcessor(size={"height": 64, "width": 64}, size_divisor=8)
    images = random_images(3)
    as_numpy = processor(images)["pixel_values"]
    assert as_numpy.shape == (3, 3, 64, 64) and as_numpy.dtype == torch.float32
    as_pil = processor([Image.fromarray(image) for image in images])["pixel_values"]
    as_torch_chw = processor([torch.from_numpy(image).permute(2, 0, 1) for image in images])["pixel_values"]
    as_numpy_chw = processor([image.transpose(2, 0, 1) for image in images])["pixel_values"]
    for other in (as_pil, as_torch_chw, as_numpy_chw):
        assert torch.equal(other, as_numpy)
    for index, image in enumerate(images):  # one image alone gives the same as inside a batch
        single = processor(image)["pixel_values"]
        assert single.shape == (1, 3, 64, 64) and torch.equal(single[0], as_numpy[index])
    same_size = random_images(1)[0]
    batch = np.stack([same_size, same_size[::-1]])  # a 4-D array is a batch
    assert torch.equal(processor(batch)["pixel_values"], processor(list(batch))["pixel_values"])
    assert torch.equal(
        processor(torch.from_numpy(batch).permute(0, 3, 1, 2))["pixel_values"], processor(batch)["pixel_values"]
    )


def test_four_channels_with_input_data_format_and_scalar_mean_std():
    # The mixin's 4-channel call; this processor composites the 4th channel (alpha) on white, so 3 channels come out.
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    rgba = np.random.default_rng(2).integers(0, 256, (20, 24, 4), dtype=np.uint8)
    pixels = processor(rgba, input_data_format="channels_last", image_mean=0.0, image_std=1.0)["pixel_values"]
    alpha = rgba[..., 3:] / 255.0
    expected = np.floor(rgba[..., :3] * alpha + 255 * (1 - alpha) + 0.5) / 255.0
    top, left = (32 - 20) // 2, (32 - 24) // 2
    np.testing.assert_allclose(
        pixels[0, :, top : top + 20, left : left + 24].numpy(), expected.transpose(2, 0, 1), atol=1e-6
    )
    chw = processor(rgba.transpose(2, 0, 1), input_data_format="channels_first", image_mean=0.0, image_std=1.0)
    assert torch.equal(chw["pixel_values"], pixels)


def test_ambiguous_layouts_follow_the_input_type_unless_told():
    image = np.random.default_rng(3).integers(0, 256, (3, 4, 3), dtype=np.uint8)  # 3x4 RGB or 4x3 RGB?
    assert load_rgb_image(image).shape == (3, 4, 3)  # arrays: channels last, as PIL gives them
    assert load_rgb_image(torch.from_numpy(image)).shape == (4, 3, 3)  # tensors: channels first, as torch has them
    assert load_rgb_image(image, input_data_format="channels_first").shape == (4, 3, 3)
    assert load_rgb_image(torch.from_numpy(image), input_data_format="channels_last").shape == (3, 4, 3)
    with pytest.raises(ValueError, match="cannot tell the channel axis"):
        load_rgb_image(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(ValueError, match=r"expected 1, 3 or 4 channels \(channels_first\)"):
        load_rgb_image(np.zeros((5, 6, 3), np.uint8), input_data_format="channels_first")


def test_return_tensors_and_casting():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    image = random_images(1)[0]
    as_numpy = processor(image, return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (1, 3, 32, 32)
    assert isinstance(processor(image, return_tensors=None)["pixel_values"], np.ndarray)
    np.testing.assert_array_equal(as_numpy, processor(image)["pixel_values"].numpy())
    half = processor(image, return_tensors="pt").to(torch.float16)
    assert half["pixel_values"].dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------
# Per-call overrides
# ---------------------------------------------------------------------------------------------------------------
def test_per_call_overrides_apply_to_that_call_only():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    before = processor.to_dict()
    image = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    raw = processor(image, do_normalize=False, size={"height": 24, "width": 40})["pixel_values"]
    assert raw.shape == (1, 3, 24, 40)
    top, left = (24 - 20) // 2, (40 - 30) // 2
    np.testing.assert_allclose(
        raw[0, :, top : top + 20, left : left + 30].numpy(), image.transpose(2, 0, 1) / 255.0, atol=1e-7
    )
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    custom = processor(image, image_mean=mean, image_std=std)["pixel_values"]
    expected = ((image.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)
    top, left = (32 - 20) // 2, (32 - 30) // 2
    np.testing.assert_allclose(custom[0, :, top : top + 20, left : left + 30].numpy(), expected, atol=1e-6)
    # resize_mode and resample per call: "fit" scales the 20x30 image up to 21x32 (round(20 * 32 / 30) = 21).
    fit = processor(image, resize_mode="fit", do_normalize=False)["pixel_values"][0]
    assert (fit[:, 5:26, :] != 0).any() and (fit[:, :5] == 0).all() and (fit[:, 26:] == 0).all()
    nearest = processor(image, resize_mode="fit", resample=int(Image.NEAREST), do_normalize=False)["pixel_values"][0]
    assert not torch.equal(nearest, fit)
    assert set(np.unique(np.round(nearest.numpy() * 255))) <= set(np.unique(image)) | {0}  # nearest copies pixels
    assert processor.to_dict() == before


def test_do_resize_false_never_resizes_and_do_convert_rgb_false_refuses_other_modes():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    large = np.zeros((40, 20, 3), np.uint8)
    assert processor(large)["pixel_values"].shape == (1, 3, 32, 32)  # shrunk by default
    with pytest.raises(ValueError, match="larger than the canvas 32x32 and do_resize=False"):
        processor(large, do_resize=False)
    gray = np.zeros((8, 8), np.uint8)
    assert processor(gray)["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"images\[0\]: has 1 channel\(s\) and do_convert_rgb=False"):
        processor(gray, do_convert_rgb=False)
    assert processor(np.zeros((8, 8, 3), np.uint8), do_convert_rgb=False)["pixel_values"].shape == (1, 3, 32, 32)


def test_max_image_pixels_per_call_and_as_a_field():
    image = np.zeros((100, 101, 3), np.uint8)
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8, max_image_pixels=10_000)
    with pytest.raises(ValueError, match=r"images\[0\]: 101x100 is 10,100 pixels, more than the limit of 10,000"):
        processor(image)
    assert processor(image, max_image_pixels=10_100)["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"do_normalise": False}, TypeError, "unexpected keyword argument 'do_normalise'"),
        ({"size": "large"}, ValueError, "size must be"),
        ({"size": {"shortest_edge": 32}}, ValueError, "canvas as {'height': h, 'width': w}"),
        ({"size": {"height": 0, "width": 32}}, ValueError, "positive integers"),
        ({"size": {"height": 30, "width": 32}}, ValueError, "multiples of size_divisor=8"),
        ({"size_divisor": 0}, ValueError, "size_divisor must be a positive integer"),
        ({"size_divisor": 2.5}, ValueError, "size_divisor must be a positive integer"),
        ({"resize_mode": "crop"}, ValueError, "resize_mode must be one of"),
        ({"resample": 99}, ValueError, "resample must be a PIL resampling filter"),
        ({"do_normalize": "yes"}, ValueError, "do_normalize must be True or False"),
        ({"do_resize": 1}, ValueError, "do_resize must be True or False"),
        ({"image_std": 0.0}, ValueError, "image_std must be positive"),
        ({"image_std": [1.0, 1.0]}, ValueError, "image_std must be 3 finite numbers"),
        ({"image_mean": [0.5, float("nan"), 0.5]}, ValueError, "image_mean must be 3 finite numbers"),
        ({"image_mean": "grey"}, ValueError, "image_mean must be a number or 3 numbers"),
        ({"max_image_pixels": 0}, ValueError, "max_image_pixels must be a positive integer"),
        ({"input_data_format": "hwc"}, ValueError, "input_data_format must be one of"),
        ({"return_tensors": "tf"}, ValueError, "return_tensors must be 'pt', 'np' or None"),
    ],
)
def test_bad_overrides_are_refused_with_the_field_named(overrides, error, message):
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    with pytest.raises(error, match=message.replace("(", r"\(").replace("{", r"\{").replace("[", r"\[")):
        processor(np.zeros((8, 8, 3), np.uint8), **overrides)


def test_bad_fields_are_refused_at_construction():
    with pytest.raises(ValueError, match="size_divisor must be a positive integer"):
        DenseMultiTaskImageProcessor(size_divisor=0)
    with pytest.raises(ValueError, match="multiples of size_divisor=16"):
        DenseMultiTaskImageProcessor(size={"height": 30, "width": 32})
    with pytest.raises(ValueError, match="image_std must be positive"):
        DenseMultiTaskImageProcessor(image_std=[0.2, 0.0, 0.2])


def test_unknown_constructor_arguments_are_reported(caplog):
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        DenseMultiTaskImageProcessor(do_normalise=False)
    finally:
        logging.disable_propagation()
    assert "ignoring unknown arguments ['do_normalise']" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------------
def test_post_processing_detaches_and_takes_tensor_target_sizes():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    weight = torch.ones(1, requires_grad=True)
    logits = {"depth": torch.rand(2, 1, 32, 32) * weight, "semseg": torch.randn(2, 3, 32, 32) * weight}
    results = processor.post_process_dense_predictions(
        {"logits": logits}, target_sizes=torch.tensor([[20, 10], [32, 32]])
    )
    assert results[0]["depth"].shape == (20, 10) and results[1]["semseg"].shape == (32, 32)
    assert not any(value.requires_grad for result in results for value in result.values())
    assert results[0]["depth"].numpy().dtype == np.float32  # the README's `.numpy()` works on a model in train mode
    unsized = processor.post_process_dense_predictions({"logits": logits})
    assert not unsized[0]["depth"].requires_grad and unsized[0]["depth"].shape == (32, 32)


def test_post_processing_with_the_preprocessing_overrides():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    pixels = processor(np.zeros((20, 10, 3), np.uint8), size={"height": 24, "width": 48})["pixel_values"]
    logits = {"depth": torch.ones(1, 1, *pixels.shape[-2:])}
    with pytest.raises(ValueError, match=r"not the canvas \(32, 32\)"):
        processor.post_process_dense_predictions({"logits": logits}, target_sizes=[(20, 10)])
    (result,) = processor.post_process_dense_predictions(
        {"logits": logits}, target_sizes=[(20, 10)], size={"height": 24, "width": 48}
    )
    assert result["depth"].shape == (20, 10)


@pytest.mark.parametrize("target_sizes", [[(0, 5)], [(5, 0)], [(-3, 5)], [(2.5, 5)], [(5,)], ["ab"], [None]], ids=str)
def test_bad_target_sizes_are_refused(target_sizes):
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    with pytest.raises(ValueError, match=r"target_sizes\[0\] must be the original \(height, width\)"):
        processor.post_process_dense_predictions(
            {"logits": {"depth": torch.zeros(1, 1, 32, 32)}}, target_sizes=target_sizes
        )
    with pytest.raises(ValueError, match="Got 2 target sizes for a batch of 1"):
        processor.post_process_dense_predictions(
            {"logits": {"depth": torch.zeros(1, 1, 32, 32)}}, target_sizes=[(4, 4)] * 2
        )


# ---------------------------------------------------------------------------------------------------------------
# load_rgb_image: one result whatever the form of the image
# ---------------------------------------------------------------------------------------------------------------
def all_forms(tmp_path, image: Image.Image, array: np.ndarray = None, suffix: str = "png", **save_options) -> dict:
    """The same image as a file path, an open file, a PIL image opened from the file, and (if given) an array."""
    path = tmp_path / f"image.{suffix}"
    image.save(path, **save_options)
    forms = {
        "path": load_rgb_image(str(path)),
        "pathlib": load_rgb_image(path),
        "file": load_rgb_image(io.BytesIO(path.read_bytes())),
        "pil": load_rgb_image(Image.open(path)),
    }
    if array is not None:
        forms["array"] = load_rgb_image(array)
    return forms


def assert_all_equal(forms: dict) -> np.ndarray:
    reference = forms["path"]
    for name, value in forms.items():
        assert value.dtype == np.uint8 and value.shape == reference.shape, name
        np.testing.assert_array_equal(value, reference, err_msg=name)
    return reference


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
    rgb = assert_all_equal(all_forms(tmp_path, Image.fromarray(values), array=values))
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # round(x / 257): 65535 -> 255, 32896 -> 128
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))
    assert (rgb == 255).mean() < 0.01  # a clip to 8 bits would turn nearly every pixel white
    dark = np.full((4, 4), 200, np.uint16)  # a dark 16-bit image stays dark (not read as 8-bit 200)
    assert (load_rgb_image(Image.fromarray(dark)) == 1).all()
    assert Image.fromarray(dark.astype(np.int32)).mode == "I"  # how PIL hands over some 16-bit files
    assert (load_rgb_image(Image.fromarray(dark.astype(np.int32))) == 1).all()
    assert (load_rgb_image(torch.from_numpy(values.astype(np.int32)).to(torch.uint16)) == rgb).all()


def test_transparency_is_composited_on_white(tmp_path):
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (16, 20, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 0)  # fully transparent -> white
    rgba[0, 1] = (200, 10, 10, 255)  # opaque -> itself
    rgba[0, 2] = (0, 0, 0, 128)  # half -> round(255 * 127 / 255) = 127
    rgb = assert_all_equal(all_forms(tmp_path, Image.fromarray(rgba), array=rgba))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [200, 10, 10]
    assert rgb[0, 2].tolist() == [127, 127, 127]
    gray_alpha = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    expected = np.floor(rgba[..., :1] * (rgba[..., 3:] / 255) + 255 * (1 - rgba[..., 3:] / 255) + 0.5)
    np.testing.assert_array_equal(load_rgb_image(gray_alpha), np.repeat(expected, 3, axis=2).astype(np.uint8))
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.info["transparency"] = 0  # palette index 0 is transparent
    assert load_rgb_image(palette).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_exif_orientation_is_applied_once(tmp_path):
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :10] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned; display rotated 90 degrees clockwise
    rgb = assert_all_equal(all_forms(tmp_path, Image.fromarray(array), exif=exif))
    np.testing.assert_array_equal(rgb, np.rot90(array, k=-1))  # 30x10, white on top
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(Image.open(tmp_path / "image.png"))  # already turned by the caller
    np.testing.assert_array_equal(load_rgb_image(upright), rgb)


def test_other_modes_and_dtypes():
    assert load_rgb_image(Image.new("CMYK", (3, 2), (0, 0, 0, 0))).tolist() == [[[255, 255, 255]] * 3] * 2
    assert (load_rgb_image(Image.new("1", (3, 2), 1)) == 255).all()
    floats = Image.fromarray(np.full((2, 3), 0.5, np.float32), mode="F")
    assert (load_rgb_image(floats) == 128).all()
    assert (load_rgb_image(torch.full((3, 2, 2), 0.5, dtype=torch.bfloat16)) == 128).all()
    assert (load_rgb_image(np.full((2, 2, 1), 7, np.uint8)) == 7).all()
    with pytest.raises(ValueError, match="a 32-bit integer image with values in"):
        load_rgb_image(Image.fromarray(np.array([[70000]], np.int32)))
    with pytest.raises(ValueError, match="unsupported dtype int64"):
        load_rgb_image(np.zeros((2, 2, 3), np.int64))
    with pytest.raises(ValueError, match=r"the image is empty \(\(0, 4, 3\)\)"):
        load_rgb_image(np.zeros((0, 4, 3), np.uint8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(bad):
    array = np.full((4, 4, 3), 0.5, np.float32)
    array[1, 2, 0] = bad
    for image in (array, torch.from_numpy(array).permute(2, 0, 1), Image.fromarray(array[..., 0], mode="F")):
        with pytest.raises(ValueError, match="contains NaN or infinite values"):
            load_rgb_image(image)


def test_the_pixel_cap_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    path.write_bytes(png_bytes(Image.new("L", (3000, 2000), 0)))  # 6 Mpx in a few kB
    assert path.stat().st_size < 50_000

    def refuse_decoding(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_decoding)
    for source in (str(path), io.BytesIO(path.read_bytes()), Image.open(path)):
        with pytest.raises(ValueError, match="3000x2000 is 6,000,000 pixels, more than the limit of 1,000,000"):
            load_rgb_image(source, max_pixels=1_000_000)
    processor = DenseMultiTaskImageProcessor(
        size={"height": 32, "width": 32}, size_divisor=8, max_image_pixels=5_999_999
    )
    with pytest.raises(ValueError, match=r"images\[0\]: 3000x2000 is 6,000,000 pixels"):
        processor(str(path))


def test_files_that_cannot_be_read_are_named(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(6).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(rgb)[:300])
    with pytest.raises(
        ValueError, match=r"truncated.png': the image cannot be decoded; the file is damaged or truncated"
    ):
        load_rgb_image(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(ValueError, match=r"notes.jpg': not an image file that can be read \(cannot identify"):
        load_rgb_image(text)
    with pytest.raises(ValueError, match=r"gone.png': no such file"):
        load_rgb_image(tmp_path / "gone.png")
    with pytest.raises(ValueError, match=r"photo: no such file '.*gone.png'"):
        load_rgb_image(tmp_path / "gone.png", name="photo")
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_rgb_image(tmp_path)
    with pytest.raises(
        ValueError, match="expected a file path, a PIL image, a numpy array or a torch tensor, got dict"
    ):
        load_rgb_image({"image": 1})


# ---------------------------------------------------------------------------------------------------------------------
# The protocol's evaluation transform, post-processing and prediction conventions
# ---------------------------------------------------------------------------------------------------------------------
PROTOCOL_MEAN = np.array([0.485, 0.456, 0.406])
PROTOCOL_STD = np.array([0.229, 0.224, 0.225])


def test_preprocess_pads_centred_and_normalises_like_the_protocol():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 48}, size_divisor=8)
    image = np.random.default_rng(0).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    pixels = processor(image)["pixel_values"]
    assert pixels.shape == (1, 3, 32, 48)
    top, left = (32 - 21) // 2, (48 - 30) // 2  # floor(delta / 2), as the protocol
    expected = ((image / 255.0 - PROTOCOL_MEAN) / PROTOCOL_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(pixels[0, :, top : top + 21, left : left + 30].numpy(), expected, atol=1e-5)
    # Padding is 0 after normalisation.
    mask = torch.ones(32, 48, dtype=torch.bool)
    mask[top : top + 21, left : left + 30] = False
    assert (pixels[0][:, mask] == 0).all()


def test_shrink_resizes_only_large_images_and_geometry_round_trips():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
    assert processor.geometry((20, 10)) == (1.0, (20, 10), (6, 11))
    scale, resized, offset = processor.geometry((64, 128))
    assert scale == 0.25 and resized == (16, 32) and offset == (8, 0)
    fit = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8, resize_mode="fit")
    assert fit.geometry((8, 16)) == (2.0, (16, 32), (8, 0))
    strict = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8, resize_mode="none")
    with pytest.raises(ValueError, match="larger than the canvas"):
        strict.geometry((40, 10))


def test_post_process_crops_padding_and_restores_original_size():
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
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
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
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
    assert (load_rgb_image(gray) == 100).all() and load_rgb_image(gray).shape == (4, 5, 3)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white
    assert (load_rgb_image(rgba) == 255).all()
    sixteen = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert (load_rgb_image(sixteen) == 255).all()
    assert (load_rgb_image(np.full((2, 2, 3), 0.5, dtype=np.float32)) == 128).all()
    chw = torch.zeros(3, 6, 7, dtype=torch.uint8)
    assert load_rgb_image(chw).shape == (6, 7, 3)
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\]"):
        load_rgb_image(np.full((2, 2, 3), 200.0))
    with pytest.raises(ValueError, match="NaN"):
        load_rgb_image(np.full((2, 2, 3), np.nan))
    with pytest.raises(ValueError, match=r"images\[0\]: expected one image of shape"):
        DenseMultiTaskImageProcessor()([np.zeros((2, 2, 2, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="'not an image': no such file"):
        load_rgb_image("not an image")
    with pytest.raises(ValueError, match="expected a file path, a PIL image"):
        load_rgb_image(b"bytes")


def test_processor_save_and_load_round_trip(tmp_path):
    processor = DenseMultiTaskImageProcessor(size={"height": 64, "width": 96}, resize_mode="fit", size_divisor=8)
    processor.save_pretrained(tmp_path)
    loaded = DenseMultiTaskImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == {"height": 64, "width": 96} and loaded.resize_mode == "fit"
    image = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    with pytest.raises(ValueError, match="multiples of size_divisor"):
        DenseMultiTaskImageProcessor(size={"height": 30, "width": 32})


def test_an_untrusted_processor_config_cannot_ask_for_a_huge_canvas(tmp_path):
    """Round-3 probe: a preprocessor_config.json with a 100000x100000 canvas was accepted and every call tried to
    allocate about 112 GiB. The canvas is bounded like images, when the config is read."""
    import json

    DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["size"] = {"height": 100_000, "width": 100_000}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"canvas of 10,000,000,000 pixels, more than the limit of 50,000,000"):
        DenseMultiTaskImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="more than the limit of 1,000"):
        DenseMultiTaskImageProcessor(size={"height": 64, "width": 64}, size_divisor=8, max_image_pixels=1000)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_png_transparency_chunk_is_composited_on_white(mode, tmp_path):
    """Round-3 probe: gray and RGB PNGs with a tRNS chunk (one colour marked transparent) kept that colour (black
    here) where every other transparent image is composited on white."""
    from modeling_taskexpert.image_processing_dense_multitask import load_rgb_image

    black = 0 if mode == "L" else (0, 0, 0)
    image = Image.new(mode, (4, 2), black)
    image.putpixel((0, 0), 200 if mode == "L" else (200, 10, 10))
    image.save(tmp_path / "t.png", transparency=black)
    rgb = load_rgb_image(str(tmp_path / "t.png"))
    assert (rgb[0, 1] == 255).all() and (rgb[1, 3] == 255).all()  # the transparent colour is white
    assert tuple(rgb[0, 0]) == ((200, 200, 200) if mode == "L" else (200, 10, 10))


def test_files_and_code_naming_the_earlier_taskexpert_names_keep_working(tmp_path):
    """The processor, pipeline and colour maps serve every model type under neutral names; a
    `preprocessor_config.json` written under the earlier name (with its remote-code `auto_map`) loads with the installed
    class, without a remote-code prompt, and the earlier module names still import."""
    from modeling_taskexpert import pipeline_dense_multitask, pipeline_taskexpert, visualization_taskexpert
    from modeling_taskexpert.image_processing_taskexpert import TaskExpertImageProcessor

    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 48}, size_divisor=16)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DenseMultiTaskImageProcessor"
    saved["image_processor_type"] = "TaskExpertImageProcessor"
    saved["auto_map"] = {"AutoImageProcessor": "image_processing_taskexpert.TaskExpertImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "taskexpert"}))
    loaded = AutoImageProcessor.from_pretrained(tmp_path)  # no trust_remote_code: the installed class answers
    assert isinstance(loaded, DenseMultiTaskImageProcessor)
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(loaded(image, return_tensors="pt")["pixel_values"], expected)
    assert torch.equal(
        TaskExpertImageProcessor(**processor.to_dict())(image, return_tensors="pt")["pixel_values"], expected
    )
    assert (
        pipeline_taskexpert.MultiTaskDensePredictionPipeline
        is pipeline_dense_multitask.MultiTaskDensePredictionPipeline
    )
    assert callable(visualization_taskexpert.visualize_prediction)
