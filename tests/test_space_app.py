"""The Space demo launched for real: the `predict` API through gradio_client, and the page in headless Chromium."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_TASKS
from PIL import Image
from test_space import REPO_ROOT, load_app_module, make_model_folder

pytestmark = pytest.mark.slow

EXAMPLE = REPO_ROOT / "space_app" / "examples" / "room_two_figures.jpg"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a tiny model, served on 127.0.0.1 for the tests of this module and closed at the end."""
    folder = tmp_path_factory.mktemp("space-app")
    previous_temp = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    app = load_app_module()
    demo = app.build_demo(str(make_model_folder(folder / "model")))
    _, url, _ = app.launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()
        if previous_temp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous_temp


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def output_paths(result) -> dict:
    """Named outputs of one `predict` call: status, one value per task, the npz path."""
    status, *maps, arrays = result
    return {"status": status, **dict(zip(ALL_TASKS, maps)), "arrays": arrays}


def image_path(value) -> str:
    """The image file of an output: an Image gives a path, an AnnotatedImage a dict with the base image."""
    return value["image"] if isinstance(value, dict) else value


def test_api_predicts_every_task(client):
    from gradio_client import handle_file

    outputs = output_paths(client.predict(handle_file(str(EXAMPLE)), ALL_TASKS, api_name="/predict"))
    assert "6 task(s)" in outputs["status"] and "256×256" in outputs["status"]
    for task in ALL_TASKS:
        with Image.open(image_path(outputs[task])) as image:
            assert image.format == "PNG", task
            assert image.width == 256 and image.height >= 256, (task, image.size)
    # Segmentation outputs carry one legend entry per class present, named from the config.
    assert {a["label"] for a in outputs["semseg"]["annotations"]} <= {"floor", "wall", "box"}
    with np.load(outputs["arrays"]) as arrays:
        assert arrays["depth"].shape == (256, 256) and arrays["normals"].shape == (3, 256, 256)
        assert arrays["expert_map/semseg"].shape == (2, 256, 256)


def test_api_predicts_a_task_subset(client):
    from gradio_client import handle_file

    outputs = output_paths(client.predict(handle_file(str(EXAMPLE)), ["depth", "semseg"], api_name="/predict"))
    assert "2 task(s)" in outputs["status"]
    assert outputs["depth"] is not None and outputs["semseg"] is not None
    assert all(outputs[task] is None for task in ("human_parts", "saliency", "normals", "edge"))
    with np.load(outputs["arrays"]) as arrays:
        assert {"depth", "semseg"} <= set(arrays.files) and "saliency" not in arrays.files


def test_api_refuses_a_file_that_is_not_an_image(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture")
    with pytest.raises(AppError, match=r"`holiday.png` is not an image this demo can read; upload a PNG"):
        client.predict(handle_file(str(fake)), ALL_TASKS, api_name="/predict")


def element_is_not_blank(locator) -> float:
    """Standard deviation of the rendered element's pixels (0 for a blank, single-colour element)."""
    import io

    pixels = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("L"), dtype=np.float64)
    return float(pixels.std())


def test_browser_uploads_runs_and_shows_every_map(server):
    """Headless Chromium: upload an image, run, and check that every output image is there and not blank."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`make browser` does it).")
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="domcontentloaded")
            expect(page.get_by_text("TaskExpert: multi-task dense prediction")).to_be_visible(timeout=30_000)
            page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE))
            expect(page.locator("#input-image img").first).to_be_visible(timeout=30_000)
            page.locator("#run").click()
            expect(page.locator("#status")).to_contain_text("6 task(s)", timeout=60_000)
            for task in ALL_TASKS:
                image = page.locator(f"#map-{task} img").first
                expect(image).to_be_visible(timeout=30_000)
                page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
                assert element_is_not_blank(image) > 5.0, task
                if task in ("semseg", "human_parts"):  # the photo plus at least one class overlay
                    assert page.locator(f"#map-{task} img").count() >= 2, task
            page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)

            page.get_by_role("tab", name="Experts").click()
            for element in ("#expert-map", "#expert-plot"):
                image = page.locator(f"{element} img").first
                expect(image).to_be_visible(timeout=30_000)
                assert element_is_not_blank(image) > 5.0, element
            page.screenshot(path=str(ARTIFACTS / "space-experts.png"), full_page=True)
        finally:
            browser.close()
