"""space_app/inference.py: one image through the model, the maps, the routing on the image's tokens, the raw arrays."""

import numpy as np
import pytest
import torch
from conftest import ALL_TASKS
from PIL import Image
from space_support import CANVAS, PATCH, make_model_folder, random_image

import inference
import model_loading


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return model_loading.load_demo_model(str(make_model_folder(tmp_path_factory.mktemp("space") / "model")))


def reference_gates(demo_model, rgb: np.ndarray) -> tuple:
    """Gates of the model for `rgb`, computed directly (not through the app)."""
    pixel_values = demo_model.processor(rgb)["pixel_values"]
    with torch.no_grad():
        return demo_model.model(pixel_values, output_gates=True).gates


def test_predict_all_tasks_follows_the_conventions(demo_model):
    rgb = random_image(40, 56)
    prediction = inference.predict(demo_model, rgb)
    assert list(prediction.predictions) == ALL_TASKS
    p = prediction.predictions
    for task in ("semseg", "human_parts"):
        assert p[task].shape == (40, 56) and p[task].min() >= 0 and p[task].max() < 3
    assert p["normals"].shape == (3, 40, 56)
    np.testing.assert_allclose(np.linalg.norm(p["normals"], axis=0), 1.0, atol=1e-5)
    assert (p["depth"] >= 0).all() and ((p["saliency"] >= 0) & (p["saliency"] <= 1)).all()
    assert prediction.seconds > 0
    np.testing.assert_array_equal(prediction.image, rgb)
    # 56 px wide on a 64 px canvas: kept at its size and padded.
    assert prediction.resized == (40, 56) and prediction.canvas == (64, 64)
    assert (
        prediction.model_view()
        == "The model saw the image at its own size, 56×40 on its 64×64 canvas, padded around it."
    )


def test_model_view_names_shrinking_and_enlarging(demo_model, monkeypatch):
    prediction = inference.predict(demo_model, random_image(128, 96))
    assert prediction.model_view() == "The model saw the image shrunk to 48×64 on its 64×64 canvas, padded around it."
    monkeypatch.setattr(demo_model.processor, "resize_mode", "fit")
    prediction = inference.predict(demo_model, random_image(32, 32))
    assert prediction.model_view() == "The model saw the image enlarged to 64×64 on its 64×64 canvas."


def test_routing_of_an_image_that_fills_the_canvas(demo_model):
    """No padding: pixel (i, j) lies in token (i // 8, j // 8); the mean weight is the plain mean of the tokens."""
    rgb = random_image(CANVAS, CANVAS, seed=1)
    prediction = inference.predict(demo_model, rgb, ["depth", "semseg"])
    gates = reference_gates(demo_model, rgb)
    routing = prediction.routing
    assert routing.tasks == ["semseg", "depth"] and routing.num_layers == len(gates) == 2
    assert routing.candidate_names == [["expert 0", "expert 1", "expert 2", "memory"]] * 2
    for task in ("semseg", "depth"):
        for layer, layer_gates in enumerate(gates):
            tokens = layer_gates[task][0].numpy()  # (8, 8, E + 1)
            expected_map = np.repeat(np.repeat(tokens.argmax(-1), PATCH, 0), PATCH, 1)
            np.testing.assert_array_equal(routing.dominant_map(task, layer, (CANVAS, CANVAS)), expected_map)
            np.testing.assert_allclose(routing.mean_weights(task, layer), tokens.mean(axis=(0, 1)), rtol=1e-5)
            np.testing.assert_allclose(routing.mean_weights(task, layer).sum(), 1.0, rtol=1e-5)
    # The maps are not trivially constant.
    assert len(np.unique(routing.dominant_map("semseg", 0, (CANVAS, CANVAS)))) > 1


def test_routing_leaves_the_padding_out(demo_model):
    """A 32x64 image is padded to 64x64 with 16 rows above: only token rows 2..5 cover it."""
    rgb = random_image(32, CANVAS, seed=2)
    routing = inference.predict(demo_model, rgb, ["saliency"]).routing
    tokens = reference_gates(demo_model, rgb)[1]["saliency"][0].numpy()[2:6]
    np.testing.assert_allclose(routing.mean_weights("saliency", 1), tokens.mean(axis=(0, 1)), rtol=1e-5)
    expected_map = np.repeat(np.repeat(tokens.argmax(-1), PATCH, 0), PATCH, 1)
    np.testing.assert_array_equal(routing.dominant_map("saliency", 1, (32, CANVAS)), expected_map)


def test_routing_weights_partly_covered_tokens_by_their_share(demo_model):
    """A 20x64 image sits at rows 22..41 of the canvas: token rows 2 (2 of 8 rows), 3, 4 (whole) and 5 (2 rows)."""
    rgb = random_image(20, CANVAS, seed=3)
    routing = inference.predict(demo_model, rgb, ["edge"]).routing
    tokens = reference_gates(demo_model, rgb)[0]["edge"][0].numpy()
    rows = np.array([2, 8, 8, 2], dtype=np.float64)
    expected = (tokens[2:6] * rows[:, None, None]).sum(axis=(0, 1)) / (rows.sum() * tokens.shape[1])
    np.testing.assert_allclose(routing.mean_weights("edge", 0), expected, rtol=1e-5)


def test_task_selection(demo_model):
    prediction = inference.predict(demo_model, random_image(16, 16), ["depth", "semseg"])
    assert list(prediction.predictions) == ["semseg", "depth"] == prediction.routing.tasks
    with pytest.raises(ValueError, match="Unknown task\\(s\\) \\['sky'\\]; this model predicts"):
        inference.predict(demo_model, random_image(16, 16), ["sky"])
    with pytest.raises(ValueError, match="Choose at least one task"):
        inference.predict(demo_model, random_image(16, 16), [])


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (9, 3)])
def test_images_under_ten_pixels_work(demo_model, tmp_path, size):
    path = tmp_path / "tiny.png"
    Image.fromarray(random_image(*size)).save(path)
    prediction = inference.predict(demo_model, str(path))
    assert all(value.shape[-2:] == size for value in prediction.predictions.values())
    assert prediction.routing.dominant_map("semseg", 0, size).shape == size
    assert np.isfinite(prediction.routing.mean_weights("depth", 1)).all()


def test_npz_round_trip(demo_model, tmp_path):
    prediction = inference.predict(demo_model, random_image(24, 40), ["normals", "edge"])
    path = inference.save_npz(prediction, tmp_path / "out")
    assert path.suffix == ".npz" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    with np.load(path) as arrays:  # no pickles: names are plain string arrays
        assert set(arrays.files) == {
            "image", "normals", "edge", "layer_names", "candidate_names/0", "candidate_names/1",
            "dominant_candidate/normals", "dominant_candidate/edge", "mean_weight/normals/0", "mean_weight/normals/1",
            "mean_weight/edge/0", "mean_weight/edge/1",
        }  # fmt: skip
        np.testing.assert_array_equal(arrays["normals"], prediction.predictions["normals"])
        assert list(arrays["candidate_names/1"]) == ["expert 0", "expert 1", "expert 2", "memory"]
        assert arrays["dominant_candidate/edge"].shape == (2, 24, 40)
        np.testing.assert_array_equal(
            arrays["dominant_candidate/edge"][1], prediction.routing.dominant_map("edge", 1, (24, 40))
        )
        np.testing.assert_allclose(arrays["mean_weight/edge/0"], prediction.routing.mean_weights("edge", 0))
