"""space_app/rendering.py: task maps, their HTML legends (colour bars, the orientation sphere), the output components."""

import re
from pathlib import Path

import numpy as np
from conftest import tiny_config
from PIL import Image
from space_support import random_image

import rendering
from modeling_taskexpert.visualization_dense_multitask import colorize_scalar, normals_to_rgb


def test_segmentation_overlay_has_one_mask_per_present_class():
    image = random_image(2, 3)
    labels = np.array([[0, 2, 2], [0, 0, 2]])
    _, annotations = rendering.segmentation_overlay(image, labels, ["background", "head", "torso"])
    assert [name for _, name in annotations] == ["background", "torso"]
    mask = annotations[1][0]
    np.testing.assert_array_equal(mask > 0, labels == 2)
    assert 0.3 <= mask.max() <= 1.0  # translucent: the photo stays visible under the class colour
    _, annotations = rendering.segmentation_overlay(image, labels, ["background", "head", "torso"], skip=(0,))
    assert [name for _, name in annotations] == ["torso"]


def test_legend_colours_are_the_voc_palette():
    # PASCAL VOC colours: class 1 dark red, 2 dark green, 3 olive.
    assert rendering.class_color_map(["a", "b", "c", "d"]) == {
        "a": "#000000",
        "b": "#800000",
        "c": "#008000",
        "d": "#808000",
    }


def test_scalar_maps_are_the_image_alone_at_its_size():
    """Colour bars are not drawn into the image: the map is exactly the colour-mapped prediction."""
    depth = np.linspace(0.5, 4.25, 40 * 60, dtype=np.float32).reshape(40, 60)
    rendered = rendering.render_task(depth, "depth", random_image(40, 60), tiny_config())
    np.testing.assert_array_equal(rendered, colorize_scalar(depth, 0.5, 4.25))
    saliency = np.random.default_rng(0).random((3, 2))
    np.testing.assert_array_equal(
        rendering.render_task(saliency, "saliency", None, None), colorize_scalar(saliency, 0.0, 1.0)
    )


def test_an_empty_human_parts_map_says_so():
    config = tiny_config()
    assert rendering.empty_map_note(np.zeros((4, 4), np.int64), "human_parts", config) == (
        "nothing found: every pixel is background"
    )
    assert rendering.empty_map_note(np.ones((4, 4), np.int64), "human_parts", config) is None
    assert rendering.empty_map_note(np.zeros((4, 4), np.int64), "semseg", config) is None  # class 0 is painted there


def test_colour_bar_legends_are_text_with_the_colour_map_as_a_gradient():
    legend = rendering.task_legend("depth", (0.5, 4.25))
    assert re.findall(r"<span>([^<]*)</span>", legend) == ["0.50 m", "depth, near to far", "4.25 m"]
    stops = re.findall(r"#[0-9a-f]{6}", legend)
    assert stops[0] == "#{:02x}{:02x}{:02x}".format(*colorize_scalar(np.array([0.0]), 0.0, 1.0)[0])
    assert stops[-1] == "#{:02x}{:02x}{:02x}".format(*colorize_scalar(np.array([1.0]), 0.0, 1.0)[0])
    assert re.findall(r"<span>([^<]*)</span>", rendering.task_legend("edge")) == ["0", "boundary probability", "1"]
    assert rendering.task_legend("semseg") is None  # the annotated image lists the classes
    assert "&lt;b&gt;" in rendering.colorbar_legend("<b>", "1", "x")  # text is escaped


def test_orientation_sphere_colours_each_point_by_its_normal():
    sphere = rendering.orientation_sphere(65)
    assert sphere.shape == (65, 65, 4)
    centre, right, top = sphere[32, 32], sphere[32, 63], sphere[1, 32]
    np.testing.assert_array_equal(centre[:3], normals_to_rgb(np.array([0.0, 0.0, 1.0]).reshape(3, 1, 1))[0, 0])
    assert right[0] > 240 and abs(int(right[2]) - 128) < 40  # facing right: red
    assert top[1] > 240 and abs(int(top[2]) - 128) < 40  # facing up: green
    assert sphere[0, 0, 3] == 0 and centre[3] == 255  # transparent outside the disc
    assert "orientation sphere" in rendering.task_legend(
        "normals"
    ) and "data:image/png;base64," in rendering.task_legend("normals")


def test_output_images_are_written_once_and_never_rewritten(tmp_path):
    """Concurrent requests with identical maps share one cache file: a second save must not rewrite it (a client
    could be downloading it), and a new file appears complete or not at all (no partial name left behind)."""
    rgb = random_image(20, 30)
    first = Path(rendering.save_png_once(rgb, tmp_path))
    inode, content = first.stat().st_ino, first.read_bytes()
    second = Path(rendering.save_png_once(Image.fromarray(rgb), tmp_path))
    assert second == first and second.stat().st_ino == inode and second.read_bytes() == content
    np.testing.assert_array_equal(np.asarray(Image.open(first)), rgb)
    assert [path.name for path in first.parent.iterdir()] == ["image.png"]
    other = Path(rendering.save_png_once(random_image(20, 30, seed=1), tmp_path))
    assert other.parent != first.parent


def test_output_components_serve_the_maps_through_write_once_files(tmp_path, monkeypatch):
    rgb = random_image(16, 24)
    image_output = rendering.ImageOutput(format="png")
    monkeypatch.setattr(image_output, "GRADIO_CACHE", str(tmp_path))
    data = image_output.postprocess(rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(data.path)), rgb)
    assert Path(data.path).parent.parent == tmp_path

    labels = np.zeros((16, 24), dtype=np.int64)
    labels[4:10, 5:20] = 2
    overlay = rendering.AnnotatedImageOutput(format="png", color_map={"cat": "#102030"})
    monkeypatch.setattr(overlay, "GRADIO_CACHE", str(tmp_path))
    data = overlay.postprocess(rendering.segmentation_overlay(rgb, labels, ["background", "x", "cat"]))
    np.testing.assert_array_equal(np.asarray(Image.open(data.image.path)), rgb)
    assert [annotation.label for annotation in data.annotations] == ["background", "cat"]
    mask = np.asarray(Image.open(data.annotations[1].image.path))  # RGBA: the class colour where the class is
    assert mask.shape == (16, 24, 4)
    np.testing.assert_array_equal(mask[5, 6], [0x10, 0x20, 0x30, int(rendering.OVERLAY_OPACITY * 255)])
    assert (mask[labels != 2] == 0).all()
