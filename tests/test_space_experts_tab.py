"""space_app/experts_tab.py: the routing report on the image's tokens, the per-session state, the map and the plots."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from space_support import make_modsquad_folder, random_image

import experts_tab
import inference
import model_loading
from modeling_taskexpert.dense_model_utils import dominant_candidates, mean_candidate_weights

NAMES = SimpleNamespace(layer_names=["first", "second"], candidate_names=[["a", "b", "c"], ["a", "b", "memory"]])


def gates_of(*layers: np.ndarray) -> tuple:
    """The model's gate output for one image and one task ("t") from (h, w, K) arrays."""
    return tuple({"t": torch.from_numpy(layer)[None]} for layer in layers)


def test_routing_view_crops_the_padding_and_weights_tokens_by_their_share():
    rng = np.random.default_rng(0)
    first, second = rng.dirichlet(np.ones(3), (4, 4)), rng.dirichlet(np.ones(3), (4, 4))
    # Canvas 16x16 (4x4 tokens of 4 px); the image is 6 rows high, centred: canvas rows 5..10, token rows 1 (3 of
    # its 4 rows) and 2 (3 of 4 rows); full width.
    view = experts_tab.routing_view(NAMES, gates_of(first, second), ["t"], (16, 16), (6, 16), (5, 0))
    assert view.layer_names == ["first", "second"] and view.candidate_names[1] == ["a", "b", "memory"]
    assert view.windows[0].rows == (1, 3) and view.windows[0].cols == (0, 4)
    np.testing.assert_allclose(view.windows[0].coverage, np.full((2, 4), 0.75))
    np.testing.assert_allclose(view.mean_weights("t", 1), second[1:3].mean(axis=(0, 1)))
    # Drawn at 6x16 (one pixel per canvas pixel): rows 0..2 lie in token row 1, rows 3..5 in token row 2.
    dominant = view.dominant_map("t", 0, (6, 16))
    np.testing.assert_array_equal(dominant, np.repeat(np.repeat(first[1:3].argmax(-1), 3, 0), 4, 1))
    # Drawn smaller (3x8), each pixel shows the token under its centre.
    np.testing.assert_array_equal(view.dominant_map("t", 0, (3, 8)), dominant[1::2, 1::2])


def test_image_level_gates_give_one_token_over_the_image():
    weights = np.array([[[0.2, 0.5, 0.3]]])
    view = experts_tab.routing_view(NAMES, gates_of(weights, weights), ["t"], (16, 16), (6, 16), (5, 0))
    np.testing.assert_allclose(view.mean_weights("t", 0), [0.2, 0.5, 0.3])
    assert (view.dominant_map("t", 1, (6, 16)) == 1).all()


def test_image_and_token_level_layers_each_get_their_window():
    """Layers may report on different grids (here one token, then 4x4): each is placed on the image by itself."""
    image_level, tokens = np.array([[[0.1, 0.6, 0.3]]]), np.random.default_rng(3).dirichlet(np.ones(3), (4, 4))
    view = experts_tab.routing_view(NAMES, gates_of(image_level, tokens), ["t"], (16, 16), (8, 16), (4, 0))
    assert view.windows[0].rows == (0, 1) and view.windows[1].rows == (1, 3)
    np.testing.assert_allclose(view.mean_weights("t", 0), [0.1, 0.6, 0.3])
    np.testing.assert_allclose(view.mean_weights("t", 1), tokens[1:3].mean(axis=(0, 1)))


def test_gates_that_disagree_with_the_config_are_refused():
    with pytest.raises(ValueError, match="1 layers of gates, 2 layer names"):
        experts_tab.routing_view(NAMES, gates_of(np.ones((4, 4, 3))), ["t"], (16, 16), (16, 16), (0, 0))
    with pytest.raises(ValueError, match="expected \\(batch, h, w, 3\\) for the candidates"):
        experts_tab.routing_view(
            NAMES, gates_of(np.ones((4, 4, 3)), np.ones((4, 4, 2))), ["t"], (16, 16), (16, 16), (0, 0)
        )


def test_session_state_stays_small_for_large_images():
    """The state a session keeps is the reduced image (JPEG) and the gates, never the maps: ~57 MiB before."""
    rng = np.random.default_rng(0)
    gates = gates_of(rng.dirichlet(np.ones(5), (64, 64)), rng.dirichlet(np.ones(5), (64, 64)))
    names = SimpleNamespace(layer_names=["first", "second"], candidate_names=[list("abcde")] * 2)
    view = experts_tab.routing_view(names, gates, ["t"], (1024, 1024), (1024, 1024), (0, 0))
    image = np.repeat(np.linspace(0, 255, 1024, dtype=np.uint8)[None, :, None], 1024, 0).repeat(3, 2)
    state = experts_tab.ExpertsState.from_prediction(image, view, depth=np.full((1024, 1024), 2.0, np.float32))
    assert state.image.shape == (512, 512, 3) and state.depth_range == (2.0, 2.0)
    assert state.nbytes < 300_000, state.nbytes


def test_dominant_overlay_names_every_candidate_compared(tmp_path):
    rng = np.random.default_rng(1)
    view = experts_tab.routing_view(
        NAMES, gates_of(rng.dirichlet(np.ones(3), (4, 4)), rng.dirichlet(np.ones(3), (4, 4))), ["t"], (16, 16),
        (16, 16), (0, 0),
    )  # fmt: skip
    state = experts_tab.ExpertsState.from_prediction(random_image(16, 16), view)
    image, annotations = experts_tab.dominant_overlay(state, "t", 1, 0.7)
    dominant = view.dominant_map("t", 1, (16, 16))
    assert [name for _, name in annotations] == [NAMES.candidate_names[1][k] for k in np.unique(dominant)]
    for mask, name in annotations:
        np.testing.assert_array_equal(mask > 0, dominant == NAMES.candidate_names[1].index(name))
    assert experts_tab.dominant_label(view, "Depth", 1) == "Dominant candidate: Depth, second"
    assert experts_tab.candidates_note(view, 1).endswith(
        "3 candidates of second has the largest gate weight: a, b, memory."
    )
    assert experts_tab.candidate_color_map(["a", "memory"]) == {"a": "#800000", "memory": "#008000"}


@pytest.mark.parametrize("layer", [0, 1])
def test_routing_plots_show_the_mean_weights(layer):
    rng = np.random.default_rng(2)
    layers = [{task: torch.from_numpy(rng.dirichlet(np.ones(3), (1, 4, 4))) for task in ("t", "u")} for _ in range(2)]
    view = experts_tab.routing_view(NAMES, tuple(layers), ["t", "u"], (16, 16), (16, 16), (0, 0))
    figure = experts_tab.plot_routing(view, "u", layer, {"u": "Task U"})
    bars, heat = figure.axes[:2]
    # Every layer's bars whatever layer is chosen: "first" is the top row, its three bars, then the three of "second".
    widths = np.array([patch.get_width() for patch in bars.patches]).reshape(2, 3)
    np.testing.assert_allclose(widths, [view.mean_weights("u", 0), view.mean_weights("u", 1)], rtol=1e-6)
    assert [text.get_text() for text in bars.get_legend().get_texts()] == ["a", "b", "c", "memory"]
    # The heat map is the chosen layer's: rows are tasks, columns that layer's candidates.
    table = heat.images[0].get_array()
    np.testing.assert_allclose(table, [view.mean_weights("t", layer), view.mean_weights("u", layer)], rtol=1e-6)
    assert heat.get_title().endswith(NAMES.layer_names[layer])
    assert [label.get_text() for label in heat.get_xticklabels()] == NAMES.candidate_names[layer]
    assert bars.get_title().startswith("Task U")


def test_mod_squad_models_show_their_routing_through_the_same_report(tmp_path):
    """A Mod-Squad model reports its routing like TaskExpert (per layer, per task, the weights of that layer's
    experts, 0 for the ones a token does not use), and the Space shows it with the same code."""
    demo_model = model_loading.load_demo_model(str(make_modsquad_folder(tmp_path)))
    config = demo_model.config
    image = random_image(64, 64)  # the canvas itself: no padding, so the Space's means are plain token means
    prediction = inference.predict(demo_model, image, tasks=["semseg", "depth"])
    routing = prediction.routing
    assert set(prediction.predictions) == {"semseg", "depth"}
    assert routing.layer_names == list(config.layer_names)
    assert routing.candidate_names == [list(names) for names in config.candidate_names]
    with torch.no_grad():
        pixel_values = demo_model.processor(image, return_tensors="pt")["pixel_values"]
        gates = demo_model.model(pixel_values, tasks=["semseg", "depth"], output_gates=True).gates
    expected = mean_candidate_weights(gates)
    for layer in range(routing.num_layers):
        for task in ("semseg", "depth"):
            np.testing.assert_allclose(routing.mean_weights(task, layer), expected[task][layer].numpy(), rtol=1e-5)
        dominant = dominant_candidates(gates[layer]["semseg"])[0].numpy()
        np.testing.assert_array_equal(routing.dominant_map("semseg", layer, (8, 8)), dominant)  # one pixel per token
    assert experts_tab.plot_routing(routing, "semseg", 0).axes
