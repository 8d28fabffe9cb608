"""space_app/app.py launched for real: the `predict` API through gradio_client, the sessions' state and files, and
the page in headless Chromium (the limitation banner, an error that stays in the page, the legends)."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ALL_TASKS
from PIL import Image
from space_support import REPO_ROOT, make_model_folder, running_space

import resources
from experts_tab import ExpertsState

pytestmark = pytest.mark.slow

EXAMPLE = REPO_ROOT / "space_app" / "examples" / "room_two_figures.jpg"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def gradio_temp(tmp_path_factory):
    """Gradio's files of this module's servers go to a folder of their own; a disconnected client is noticed within
    a second (Gradio's heartbeat, 15 s by default)."""
    folder = tmp_path_factory.mktemp("gradio")
    settings = {"GRADIO_TEMP_DIR": str(folder), "GRADIO_HEARTBEAT_INTERVAL": "1"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield folder
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The tiny model, with a card that says it was trained on the synthetic benchmark (as `train.py` writes)."""
    folder = make_model_folder(tmp_path_factory.mktemp("space-app") / "model")
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump({'datasets': ['synthetic']})}---\n# tiny\n")
    return folder


@pytest.fixture(scope="module")
def server(gradio_temp, model_folder):
    with running_space(model_folder) as (space, url):
        yield url


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


# ---------------------------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------------------------
def test_api_predicts_every_task(client):
    from gradio_client import handle_file

    outputs = output_paths(client.predict(handle_file(str(EXAMPLE)), ALL_TASKS, api_name="/predict"))
    assert "6 task(s)" in outputs["status"] and "256×256" in outputs["status"]
    assert "The model saw the image shrunk to 64×64 on its 64×64 canvas." in outputs["status"]
    for task in ALL_TASKS:
        with Image.open(image_path(outputs[task])) as image:
            assert image.format == "PNG", task
            assert image.size == (256, 256), (task, image.size)  # the map alone: legends are not drawn into it
    # Segmentation outputs carry one legend entry per class present, named from the config.
    assert {a["label"] for a in outputs["semseg"]["annotations"]} <= {"floor", "wall", "box"}
    with np.load(outputs["arrays"]) as arrays:
        assert arrays["depth"].shape == (256, 256) and arrays["normals"].shape == (3, 256, 256)
        assert arrays["dominant_candidate/semseg"].shape == (2, 256, 256)


def test_api_predicts_a_task_subset(client):
    from gradio_client import handle_file

    outputs = output_paths(client.predict(handle_file(str(EXAMPLE)), ["depth", "semseg"], api_name="/predict"))
    assert "2 task(s)" in outputs["status"]
    assert outputs["depth"] is not None and outputs["semseg"] is not None
    assert all(outputs[task] is None for task in ("human_parts", "saliency", "normals", "edge"))
    with np.load(outputs["arrays"]) as arrays:
        assert {"depth", "semseg"} <= set(arrays.files) and "saliency" not in arrays.files


def test_api_serves_images_under_ten_pixels(client, tmp_path):
    from gradio_client import handle_file

    Image.fromarray(np.full((5, 7, 3), 90, dtype=np.uint8)).save(tmp_path / "tiny.png")
    outputs = output_paths(client.predict(handle_file(str(tmp_path / "tiny.png")), ALL_TASKS, api_name="/predict"))
    assert "6 task(s)" in outputs["status"] and "7×5 image" in outputs["status"]
    with Image.open(image_path(outputs["depth"])) as image:
        assert image.size == (7, 5)


def test_user_mistakes_get_reasons_and_no_traceback_in_the_server_log(client, tmp_path, capfd):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture")
    with pytest.raises(AppError, match=r"“holiday.png” is not an image this demo can read; upload a PNG") as raised:
        client.predict(handle_file(str(fake)), ALL_TASKS, api_name="/predict")
    assert "`" not in str(raised.value)  # plain text where it is shown as written
    with pytest.raises(AppError, match=r"must be sent as a file, not as the text “photo.jpg”.*handle_file"):
        client.predict("photo.jpg", ALL_TASKS, api_name="/predict")  # a bare path: the app opens no server paths
    with pytest.raises(AppError, match="Upload an image or pick an example first"):
        client.predict(None, ALL_TASKS, api_name="/predict")
    with pytest.raises(AppError, match="Choose at least one task"):
        client.predict(handle_file(str(EXAMPLE)), [], api_name="/predict")
    with pytest.raises(AppError, match="Unknown task\\(s\\) sky; this model predicts semseg, human_parts"):
        client.predict(handle_file(str(EXAMPLE)), ["sky"], api_name="/predict")
    log = capfd.readouterr()
    assert "Traceback" not in log.out + log.err


def test_page_without_a_model_explains_and_refuses_plainly(gradio_temp, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    with running_space(tmp_path / "missing") as (space, url):
        components = space.blocks.config["components"]
        texts = " ".join(str(c["props"].get("value")) for c in components if c["type"] == "markdown")
        assert "does not exist" in texts and "make train" in texts
        (run,) = [c for c in components if c["props"].get("elem_id") == "run"]
        assert run["props"]["interactive"] is False
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="The model folder .*missing does not exist") as raised:
            client.predict(handle_file(str(EXAMPLE)), [], api_name="/predict")  # the model has no task to choose
        assert "`" not in str(raised.value)
        client.close()


# ---------------------------------------------------------------------------------------------------------------
# Sessions and files
# ---------------------------------------------------------------------------------------------------------------
def experts_states(space) -> int:
    """How many sessions hold an Experts state on the server."""
    sessions = space.blocks.state_holder.session_data.values()
    return sum(isinstance(value, ExpertsState) for session in sessions for value in session.state_data.values())


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def test_sessions_keep_little_and_let_it_go(gradio_temp, model_folder, tmp_path):
    """Each session's state is small, goes when its client disconnects or after the time limit, and at most
    `max_sessions` sessions are kept; every file the app created is gone once it stops (but the cached examples,
    which Gradio keeps for good: the cache folder may be shared; `serve` removes its own folder whole)."""
    from gradio_client import Client, handle_file

    limits = resources.ResourceLimits(state_ttl_s=8.0, max_sessions=2)
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(image)
    with running_space(model_folder, limits) as (space, url):
        clients = [Client(url, verbose=False) for _ in range(3)]
        for client in clients:
            client.predict(handle_file(str(image)), ALL_TASKS, api_name="/predict")
        assert len(space.blocks.state_holder.session_data) <= 2  # the oldest session was dropped
        assert 1 <= experts_states(space) <= 2
        sizes = [value.nbytes for session in space.blocks.state_holder.session_data.values()
                 for value in session.state_data.values() if isinstance(value, ExpertsState)]  # fmt: skip
        assert max(sizes) < 200_000  # a 400x300 image: the kept state is a small JPEG and the gates
        for client in clients:
            client.close()  # a finished API client, like a closed tab: its state goes (Gradio would keep it an hour)
        assert wait_for(lambda: experts_states(space) == 0)

        survivor = Client(url, verbose=False)
        survivor.predict(handle_file(str(image)), ["depth"], api_name="/predict")
        assert experts_states(space) == 1
        assert wait_for(lambda: experts_states(space) == 0)  # expired after 8 s, client still there
        kept = set().union(*(getattr(block, "keep_in_cache", set()) for block in space.blocks.blocks.values()))
        assert {Path(path).name for path in kept} <= {path.name for path in EXAMPLE.parent.iterdir()}  # examples only
        created = set().union(*space.blocks.temp_file_sets) - kept
        assert any(path.endswith(".npz") for path in created) and all(Path(path).exists() for path in created)
        survivor.close()
    assert not any(Path(path).exists() for path in created)


# ---------------------------------------------------------------------------------------------------------------
# The page in a browser
# ---------------------------------------------------------------------------------------------------------------
def element_is_not_blank(locator) -> float:
    """Standard deviation of the rendered element's pixels (0 for a blank, single-colour element)."""
    import io

    pixels = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("L"), dtype=np.float64)
    return float(pixels.std())


def test_browser_shows_limits_keeps_errors_and_explains_every_map(server, tmp_path):
    """Headless Chromium: the banner above the results; a bad upload leaves its error in the page with every task
    title in place; then a good image gives every map, with the normals' orientation sphere and readable colour bars;
    the Experts tab names tasks by title and says the memory is among the candidates."""
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (`make browser` does it; it needs apt and root)."
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the browser test
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    from rendering import task_title

    ARTIFACTS.mkdir(exist_ok=True)
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="domcontentloaded")
            expect(page.get_by_text("Multi-task dense prediction with mixtures of experts")).to_be_visible(
                timeout=30_000
            )
            banner = page.locator("#model-limits")
            expect(banner).to_contain_text("trained on synthetic scenes only")
            expect(banner).to_contain_text("Real photos give meaningless maps")
            expect(banner).to_contain_text("64×64 px canvas")
            assert banner.bounding_box()["y"] < page.locator("#status").bounding_box()["y"]  # above the results

            # An upload that is not an image: the error stays in the status box, titles stay, no literal backticks.
            page.locator("#input-image input[type=file]").set_input_files(str(fake))
            page.locator("#run").click()
            status = page.locator("#status")
            expect(status).to_contain_text("Error:", timeout=60_000)
            expect(status).to_contain_text("“notes.png” is not an image this demo can read")
            assert "`" not in status.inner_text()
            for task in ALL_TASKS:  # the labels stay visible (not covered by an error badge)
                expect(page.locator(f"#map-{task} [data-testid=block-label]")).to_be_visible()
                expect(page.locator(f"#map-{task} [data-testid=block-label]")).to_have_text(task_title(task))
            page.screenshot(path=str(ARTIFACTS / "space-error.png"), full_page=True)

            page.locator("#input-image button[aria-label='Remove Image']").first.click()
            page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE))
            expect(page.locator("#input-image img").first).to_be_visible(timeout=30_000)
            page.locator("#run").click()
            expect(status).to_contain_text("6 task(s)", timeout=60_000)
            expect(status).to_contain_text("on its 64×64 canvas")
            for task in ALL_TASKS:
                image = page.locator(f"#map-{task} img").first
                expect(image).to_be_visible(timeout=30_000)
                page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
                assert element_is_not_blank(image) > 5.0, task
                if task in ("semseg", "human_parts"):  # the photo plus at least one class overlay
                    assert page.locator(f"#map-{task} img").count() >= 2, task
            sphere = page.locator("#legend-normals img[alt='orientation sphere']")
            expect(sphere).to_be_visible()
            assert element_is_not_blank(sphere) > 5.0
            expect(page.locator("#legend-normals")).to_contain_text("Red grows with x (right)")
            depth_ends = page.locator("#legend-depth .ends span")
            expect(depth_ends.first).to_contain_text(" m")
            # Colour-bar labels are page text at a fixed size, whatever the size of the image.
            assert depth_ends.first.evaluate("e => getComputedStyle(e).fontSize") == "13px"
            page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)

            page.get_by_role("tab", name="Experts").click()
            expect(page.locator("#expert-task input")).to_have_value(task_title(ALL_TASKS[0]))
            expect(page.locator("#expert-note")).to_contain_text(
                "largest gate weight: expert 0, expert 1, expert 2, memory"
            )
            for element in ("#expert-map", "#expert-plot"):
                image = page.locator(f"{element} img").first
                expect(image).to_be_visible(timeout=30_000)
                assert element_is_not_blank(image) > 5.0, element
            expect(page.locator("#expert-map img.mask").first).to_be_visible()
            page.wait_for_function("() => [...document.querySelectorAll('#expert-map img')].every(i => i.complete)")
            page.screenshot(path=str(ARTIFACTS / "space-experts.png"), full_page=True)

            # Another image: the first image's maps go (never shown under another image), and Run is enabled again.
            page.get_by_role("tab", name="Task maps").click()
            page.locator("#input-image button[aria-label='Remove Image']").first.click()
            expect(status).to_contain_text("New image: press Run", timeout=30_000)
            for task in ALL_TASKS:
                expect(page.locator(f"#map-{task} img")).to_have_count(0, timeout=30_000)
            expect(page.locator("#run")).to_be_enabled()
        finally:
            browser.close()


def test_the_browser_install_explains_itself_where_apt_is_missing(tmp_path):
    """`make browser` on a machine without apt: a message, exit 0, nothing attempted (the browser test then skips)."""
    import subprocess

    script = REPO_ROOT / ".ci" / "install-browser"
    completed = subprocess.run(
        ["/bin/bash", str(script)], env={"PATH": str(tmp_path), "CHROMIUM": str(tmp_path / "no-chromium")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 0
    assert (
        "apt-get is not available, so chromium is not installed; the browser tests will be skipped" in completed.stderr
    )
    present = subprocess.run(["/bin/bash", str(script)], env={"PATH": str(tmp_path), "CHROMIUM": "/bin/bash"},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert present.returncode == 0 and present.stderr == ""  # already installed: nothing to do, nothing said
