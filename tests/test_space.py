"""The Space demo's plain functions: model loading, image loading and limits, inference, gate maps, rendering."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALL_TASKS, tiny_config
from PIL import Image

from bench.space_load_test import load_app as load_app_module  # space_app/app.py, imported once
from modeling_taskexpert import TaskExpertForDensePrediction, TaskExpertImageProcessor
from modeling_taskexpert.visualization_taskexpert import colorize_scalar

REPO_ROOT = Path(__file__).resolve().parent.parent
CANVAS = 64
PATCH = 8  # tiny_config's ViT patch size


def make_model_folder(folder: Path) -> Path:
    """A tiny random TaskExpert with non-uniform gates and a 64x64 processor canvas, saved like `make train` does."""
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(tiny_config()).eval()
    for layer in model.taskexpert.mmoe_layers:  # zero-initialised gates would make every expert map constant
        torch.nn.init.normal_(layer.gates.token_weight, std=0.5)
    model.save_pretrained(folder)
    TaskExpertImageProcessor(size={"height": CANVAS, "width": CANVAS}, size_divisor=PATCH).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def app():
    return load_app_module()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("space") / "model")


@pytest.fixture(scope="module")
def demo_model(app, model_folder):
    return app.load_demo_model(str(model_folder))


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------------------------
def test_loads_the_folder_from_the_environment_variable(app, model_folder, monkeypatch):
    monkeypatch.setenv(app.MODEL_ENV_VAR, str(model_folder))
    loaded = app.load_demo_model()
    assert isinstance(loaded.model, TaskExpertForDensePrediction)
    assert loaded.tasks == ALL_TASKS and loaded.source == str(model_folder)
    info = loaded.describe()
    for fact in ("semantic segmentation", "monocular depth", "vit", "3 experts per layer", "memory", "64×64"):
        assert fact in info, fact
    assert loaded.layer_names() == ["MMoE 1 (after backbone layer 2)", "MMoE 2 (after backbone layer 4)"]


def test_default_model_is_the_study_best_when_there_else_the_make_train_one(app, model_folder, tmp_path, monkeypatch):
    monkeypatch.delenv(app.MODEL_ENV_VAR, raising=False)
    monkeypatch.setattr(app, "REPO_ROOT", tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / app.DEFAULT_MODEL).symlink_to(model_folder)
    assert app.load_demo_model().source == str(tmp_path / app.DEFAULT_MODEL)
    (tmp_path / app.BEST_MODEL).mkdir()  # a folder without a finished model (no config.json) is passed over
    assert app.load_demo_model().source == str(tmp_path / app.DEFAULT_MODEL)
    (tmp_path / app.BEST_MODEL).rmdir()
    (tmp_path / app.BEST_MODEL).symlink_to(model_folder)
    assert app.load_demo_model().source == str(tmp_path / app.BEST_MODEL)


def test_missing_default_model_says_how_to_get_one(app, tmp_path, monkeypatch):
    monkeypatch.delenv(app.MODEL_ENV_VAR, raising=False)
    monkeypatch.setattr(app, "REPO_ROOT", tmp_path)
    with pytest.raises(app.ModelUnavailable, match="make train") as raised:
        app.load_demo_model()
    assert app.DEFAULT_MODEL in str(raised.value)


@pytest.mark.parametrize(
    "source, message",
    [
        ("{tmp}/no-such-folder", "does not exist"),
        ("someone/no-such-model", "Could not load the model `someone/no-such-model`"),  # offline Hub id
        ("{tmp}", "holds no model yet (no `config.json`"),  # e.g. while training runs
    ],
)
def test_unloadable_models_give_a_clear_message(app, tmp_path, source, message):
    with pytest.raises(app.ModelUnavailable, match="make train") as raised:
        app.load_demo_model(source.format(tmp=tmp_path))
    assert message in str(raised.value)


def test_page_without_a_model_explains_and_disables_run(app, tmp_path):
    demo = app.build_demo(str(tmp_path / "missing"))
    components = demo.config["components"]
    texts = " ".join(str(c["props"].get("value")) for c in components if c["type"] == "markdown")
    assert "does not exist" in texts and "make train" in texts
    (run,) = [c for c in components if c["props"].get("elem_id") == "run"]
    assert run["props"]["interactive"] is False


# ---------------------------------------------------------------------------------------------------------------
# Image loading
# ---------------------------------------------------------------------------------------------------------------
def test_16_bit_grayscale_is_scaled_to_8_bit_rgb(app, tmp_path):
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    rgb, notes = app.load_image(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 255], [128, 1]])
    assert (rgb == rgb[..., :1]).all()
    assert any("16-bit" in note for note in notes), notes


def test_rgba_is_composited_on_white_and_grayscale_replicated(app, tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[1, 2] = (10, 20, 30, 0)  # transparent: white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    rgb, notes = app.load_image(tmp_path / "alpha.png")
    assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[1, 2]) == (255, 255, 255)
    assert any("transparent" in note for note in notes), notes
    gray, notes = app.load_image(Image.fromarray(np.array([[7, 200]], dtype=np.uint8), mode="L"))
    np.testing.assert_array_equal(gray, [[[7, 7, 7], [200, 200, 200]]])
    assert any("grayscale" in note for note in notes)
    rgb, notes = app.load_image(random_image(5, 4))
    assert rgb.shape == (5, 4, 3) and notes == []


def test_large_images_are_shrunk_with_a_note(app):
    rgb, notes = app.load_image(random_image(150, 300), max_side=100)
    assert rgb.shape == (50, 100, 3)
    assert notes == ["Resized from 300×150 to 100×50 pixels (this demo's limit is 100 px per side)."]


def test_bad_files_are_refused_with_a_message(app, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(ValueError, match=r"`notes.png` is not an image this demo can read; upload a PNG"):
        app.load_image(fake)
    Image.fromarray(random_image(40, 50)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match=r"`photo.png` is .* MB; this demo accepts images up to"):
        app.load_image(tmp_path / "photo.png", max_bytes=100)
    with pytest.raises(ValueError, match=r"`photo.png` is 50×40 pixels; this demo accepts up to 1,000 pixels"):
        app.load_image(tmp_path / "photo.png", max_pixels=1000)
    with pytest.raises(ValueError, match="does not exist"):
        app.load_image(tmp_path / "gone.png")


# ---------------------------------------------------------------------------------------------------------------
# Inference and gate maps
# ---------------------------------------------------------------------------------------------------------------
def reference_gates(demo_model, rgb: np.ndarray) -> tuple:
    """Gates of the model for `rgb`, computed directly (not through the app)."""
    pixel_values = demo_model.processor(rgb)["pixel_values"]
    with torch.no_grad():
        return demo_model.model(pixel_values, output_gates=True).gates


def test_predict_all_tasks_follows_the_conventions(app, demo_model):
    rgb = random_image(40, 56)
    prediction = app.predict(demo_model, rgb)
    assert list(prediction.predictions) == ALL_TASKS
    p = prediction.predictions
    for task in ("semseg", "human_parts"):
        assert p[task].shape == (40, 56) and p[task].min() >= 0 and p[task].max() < 3
    assert p["normals"].shape == (3, 40, 56)
    np.testing.assert_allclose(np.linalg.norm(p["normals"], axis=0), 1.0, atol=1e-5)
    assert (p["depth"] >= 0).all() and ((p["saliency"] >= 0) & (p["saliency"] <= 1)).all()
    assert prediction.seconds > 0 and prediction.has_memory
    np.testing.assert_array_equal(prediction.image, rgb)


def test_expert_maps_and_usage_of_an_image_that_fills_the_canvas(app, demo_model):
    """No padding: pixel (i, j) lies in token (i // 8, j // 8); usage is the plain mean of the token gates."""
    rgb = random_image(CANVAS, CANVAS, seed=1)
    prediction = app.predict(demo_model, rgb, ["depth", "semseg"])
    gates = reference_gates(demo_model, rgb)
    num_experts = demo_model.config.num_experts
    for task in ("semseg", "depth"):
        assert len(prediction.expert_maps[task]) == len(gates) == 2
        for layer, layer_gates in enumerate(gates):
            tokens = layer_gates[task][0].numpy()  # (8, 8, E + 1)
            expected_map = np.repeat(np.repeat(tokens[..., :num_experts].argmax(-1), PATCH, 0), PATCH, 1)
            np.testing.assert_array_equal(prediction.expert_maps[task][layer], expected_map)
            np.testing.assert_allclose(prediction.expert_usage[task][layer], tokens.mean(axis=(0, 1)), rtol=1e-5)
    # The maps are not trivially constant, and every layer's weights sum to 1 over experts + memory.
    assert len(np.unique(prediction.expert_maps["semseg"][0])) > 1
    np.testing.assert_allclose(prediction.expert_usage["semseg"].sum(axis=1), 1.0, rtol=1e-5)


def test_gate_maps_ignore_the_padding(app, demo_model):
    """A 32x64 image is padded to 64x64 with 16 rows above: only token rows 2..5 cover it."""
    rgb = random_image(32, CANVAS, seed=2)
    prediction = app.predict(demo_model, rgb, ["saliency"])
    tokens = reference_gates(demo_model, rgb)[1]["saliency"][0].numpy()[2:6]
    np.testing.assert_allclose(prediction.expert_usage["saliency"][1], tokens.mean(axis=(0, 1)), rtol=1e-5)
    expected_map = np.repeat(np.repeat(tokens[..., :-1].argmax(-1), PATCH, 0), PATCH, 1)
    np.testing.assert_array_equal(prediction.expert_maps["saliency"][1], expected_map)


def test_task_selection(app, demo_model):
    prediction = app.predict(demo_model, random_image(16, 16), ["depth", "semseg"])
    assert list(prediction.predictions) == ["semseg", "depth"] == list(prediction.expert_usage)
    with pytest.raises(ValueError, match="Unknown task\\(s\\) sky; this model predicts semseg"):
        app.predict(demo_model, random_image(16, 16), ["sky"])
    with pytest.raises(ValueError, match="Choose at least one task"):
        app.predict(demo_model, random_image(16, 16), [])


def test_npz_round_trip(app, demo_model, tmp_path):
    prediction = app.predict(demo_model, random_image(24, 40), ["normals", "edge"])
    path = app.save_npz(prediction, tmp_path / "out")
    assert path.suffix == ".npz" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    with np.load(path) as arrays:
        assert set(arrays.files) == {"image", "normals", "edge", "expert_map/normals", "expert_map/edge",
                                     "expert_usage/normals", "expert_usage/edge"}  # fmt: skip
        np.testing.assert_array_equal(arrays["normals"], prediction.predictions["normals"])
        np.testing.assert_array_equal(arrays["expert_map/edge"], np.stack(prediction.expert_maps["edge"]))
        assert arrays["expert_map/edge"].shape == (2, 24, 40)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------
def test_segmentation_overlay_has_one_mask_per_present_class(app):
    image = random_image(2, 3)
    labels = np.array([[0, 2, 2], [0, 0, 2]])
    _, annotations = app.segmentation_overlay(image, labels, ["background", "head", "torso"])
    assert [name for _, name in annotations] == ["background", "torso"]
    mask = annotations[1][0]
    np.testing.assert_array_equal(mask > 0, labels == 2)
    assert 0.3 <= mask.max() <= 1.0  # translucent: the photo stays visible under the class colour
    _, annotations = app.segmentation_overlay(image, labels, ["background", "head", "torso"], skip=(0,))
    assert [name for _, name in annotations] == ["torso"]


def test_legend_colours_are_the_voc_palette(app):
    # PASCAL VOC colours: class 1 dark red, 2 dark green, 3 olive.
    assert app.class_color_map(["a", "b", "c", "d"]) == {"a": "#000000", "b": "#800000", "c": "#008000", "d": "#808000"}
    assert app.expert_color_map(2) == {"expert 1": "#800000", "expert 2": "#008000"}


def test_depth_rendering_has_a_scale_from_min_to_max(app, demo_model):
    depth = np.linspace(0.5, 4.25, 40 * 60, dtype=np.float32).reshape(40, 60)
    rendered = app.render_task(depth, "depth", random_image(40, 60), demo_model.config)
    assert rendered.shape[0] > 40 and rendered.shape[1] == 60
    np.testing.assert_array_equal(rendered[:40], colorize_scalar(depth, 0.5, 4.25))
    # The colour bar runs from the colour of the minimum (left) to that of the maximum (right).
    legend = rendered[40:]
    bar_row = legend[np.flatnonzero((legend != 255).any(axis=(1, 2)))[0]]
    bar = bar_row[(bar_row != 255).any(axis=1)]
    low, high = colorize_scalar(np.array([0.0, 1.0]), 0.0, 1.0)
    np.testing.assert_array_equal(bar[0], low)
    np.testing.assert_array_equal(bar[-1], high)


def test_expert_plot_has_usage_bars_and_memory_panel(app, demo_model):
    prediction = app.predict(demo_model, random_image(32, 32), ["semseg", "edge"])
    figure = app.plot_expert_usage(prediction, "edge", demo_model.layer_names())
    bars, reliance = figure.axes
    # One bar per layer and candidate (3 experts + memory), widths = the usage.
    widths = np.array([patch.get_width() for patch in bars.patches]).reshape(4, 2).T
    np.testing.assert_allclose(widths, prediction.expert_usage["edge"], rtol=1e-6)
    lines = {line.get_label(): line.get_ydata() for line in reliance.lines}
    np.testing.assert_allclose(lines["semseg"], prediction.expert_usage["semseg"][:, -1], rtol=1e-6)


def test_mod_squad_models_show_their_routing_usage(app, tmp_path):
    """A Mod-Squad model reports gates like TaskExpert: the Experts tab shows each layer's mean gate per expert and
    the dominant expert per pixel."""
    from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction

    config = ModSquadConfig.from_json_file("hub_configs/models/modsquad-tiny.json")
    torch.manual_seed(0)
    model = ModSquadForDensePrediction(config).eval()
    for _, layer in model.modsquad.moe_layers:  # zero-initialised routers would give every token the same experts
        torch.nn.init.normal_(layer.router_weight, std=0.5)
    model.save_pretrained(tmp_path)
    TaskExpertImageProcessor(size={"height": 64, "width": 64}, size_divisor=config.patch_size).save_pretrained(tmp_path)
    demo_model = app.load_demo_model(str(tmp_path))
    image = random_image(64, 64)  # the canvas itself: no padding, so the means cover every token
    prediction = app.predict(demo_model, image, tasks=["semseg", "depth"])
    assert set(prediction.predictions) == {"semseg", "depth"} == set(prediction.expert_maps)
    pixel_values = demo_model.processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        gates = model(pixel_values, tasks=["semseg", "depth"], output_gates=True).gates
    for task in ("semseg", "depth"):
        expected = torch.stack([layer[task][0].mean(dim=(0, 1)) for layer in gates]).numpy()
        np.testing.assert_allclose(prediction.expert_usage[task], expected, atol=1e-6)
        assert (prediction.expert_usage[task].sum(-1) < 1).all()  # top-k probabilities, not renormalised
        assert len(prediction.expert_maps[task]) == len(config.layer_names)
    figure = app.plot_expert_usage(prediction, "semseg", demo_model.layer_names())
    assert figure.axes


def test_output_images_are_written_once_and_never_rewritten(app, tmp_path):
    """Concurrent requests with identical maps share one cache file: a second save must not rewrite it (a client
    could be downloading it), and a new file appears complete or not at all (no partial name left behind)."""
    rgb = random_image(20, 30)
    first = Path(app.save_png_once(rgb, tmp_path))
    inode, content = first.stat().st_ino, first.read_bytes()
    second = Path(app.save_png_once(Image.fromarray(rgb), tmp_path))
    assert second == first and second.stat().st_ino == inode and second.read_bytes() == content
    np.testing.assert_array_equal(np.asarray(Image.open(first)), rgb)
    assert [path.name for path in first.parent.iterdir()] == ["image.png"]
    other = Path(app.save_png_once(random_image(20, 30, seed=1), tmp_path))
    assert other.parent != first.parent


def test_output_components_serve_the_maps_through_write_once_files(app, tmp_path, monkeypatch):
    rgb = random_image(16, 24)
    image_output = app.ImageOutput(format="png")
    monkeypatch.setattr(image_output, "GRADIO_CACHE", str(tmp_path))
    data = image_output.postprocess(rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(data.path)), rgb)
    assert Path(data.path).parent.parent == tmp_path

    labels = np.zeros((16, 24), dtype=np.int64)
    labels[4:10, 5:20] = 2
    overlay = app.AnnotatedImageOutput(format="png", color_map={"cat": "#102030"})
    monkeypatch.setattr(overlay, "GRADIO_CACHE", str(tmp_path))
    data = overlay.postprocess(app.segmentation_overlay(rgb, labels, ["background", "x", "cat"]))
    np.testing.assert_array_equal(np.asarray(Image.open(data.image.path)), rgb)
    assert [annotation.label for annotation in data.annotations] == ["background", "cat"]
    mask = np.asarray(Image.open(data.annotations[1].image.path))  # RGBA: the class colour where the class is
    assert mask.shape == (16, 24, 4)
    np.testing.assert_array_equal(mask[5, 6], [0x10, 0x20, 0x30, int(app._OVERLAY_OPACITY * 255)])
    assert (mask[labels != 2] == 0).all()
