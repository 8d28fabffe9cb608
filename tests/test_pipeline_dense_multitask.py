"""The `multi-task-dense-prediction` pipeline: batching, every input form through the one image loader (identical
predictions for a path, an open PIL image and an array), small images, URLs, and its errors."""

import contextlib
import io
import time

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
    DenseMultiTaskImageProcessor,
)

CANVAS = 32


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(tiny_config()).eval()
    for layer in model.taskexpert.mmoe_layers:  # non-uniform gates, so that every input pixel matters
        torch.nn.init.normal_(layer.gates.token_weight, std=0.5)
    folder = tmp_path_factory.mktemp("pipeline") / "model"
    model.save_pretrained(folder)
    DenseMultiTaskImageProcessor(size={"height": CANVAS, "width": CANVAS}, size_divisor=8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(model_folder):
    return pipeline(PIPELINE_TASK, model=str(model_folder), pipeline_class=MultiTaskDensePredictionPipeline)


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_same_predictions(first: dict, second: dict) -> None:
    assert set(first) == set(second)
    for task in first:
        np.testing.assert_array_equal(first[task]["prediction"], second[task]["prediction"], err_msg=task)


def test_batch_size_two_gives_each_image_its_own_size_and_the_unbatched_result(pipe):
    a, b, c = random_rgb(20, 28, 1), random_rgb(30, 12, 2), random_rgb(40, 40, 3)  # c is shrunk to the canvas
    batched = pipe([a, b, c], batch_size=2)
    assert [result["semseg"]["prediction"].shape for result in batched] == [(20, 28), (30, 12), (40, 40)]
    assert [result["normals"]["prediction"].shape for result in batched] == [(3, 20, 28), (3, 30, 12), (3, 40, 40)]
    for image, result in zip((a, b, c), batched):
        alone = pipe(image)
        np.testing.assert_array_equal(result["semseg"]["prediction"], alone["semseg"]["prediction"])
        np.testing.assert_allclose(result["depth"]["prediction"], alone["depth"]["prediction"], rtol=1e-5, atol=1e-6)
        assert result["depth"]["image"].size == (image.shape[1], image.shape[0])


def test_every_input_form_gives_the_same_maps(pipe, tmp_path):
    array = random_rgb(18, 26, 4)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    reference = pipe(array)
    for other in (str(path), Image.open(path), torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array),
                  array.transpose(2, 0, 1)):  # fmt: skip
        assert_same_predictions(pipe(other), reference)


def test_a_chw_tensor_gives_a_map_of_the_image_size(pipe):
    result = pipe(torch.rand(3, 21, 17))
    assert result["semseg"]["prediction"].shape == (21, 17) and result["normals"]["prediction"].shape == (3, 21, 17)


def test_16_bit_rgba_and_exif_files_equal_their_decoded_forms(pipe, tmp_path):
    values = np.linspace(0, 65535, 20 * 24).astype(np.uint16).reshape(20, 24)
    Image.fromarray(values).save(tmp_path / "deep.png")
    from_file = pipe(str(tmp_path / "deep.png"))
    assert_same_predictions(from_file, pipe(Image.open(tmp_path / "deep.png")))
    assert_same_predictions(from_file, pipe(values))
    eight_bit = np.floor(values / 257.0 + 0.5).astype(np.uint8)
    assert_same_predictions(from_file, pipe(np.repeat(eight_bit[..., None], 3, axis=2)))
    # Before, the file went through a plain RGB conversion that clipped 16-bit values to white.
    assert not np.array_equal(
        from_file["depth"]["prediction"], pipe(np.full((20, 24, 3), 255, np.uint8))["depth"]["prediction"]
    )

    rgba = np.random.default_rng(5).integers(0, 256, (16, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert_same_predictions(pipe(str(tmp_path / "alpha.png")), pipe(rgba))

    exif = Image.Exif()
    exif[0x0112] = 6
    upright = random_rgb(14, 22, 6)
    Image.fromarray(np.rot90(upright, k=1).copy()).save(tmp_path / "turned.png", exif=exif)
    turned = pipe(str(tmp_path / "turned.png"))
    assert turned["semseg"]["prediction"].shape == (14, 22)
    assert_same_predictions(turned, pipe(upright))
    assert_same_predictions(turned, pipe(Image.open(tmp_path / "turned.png")))


@pytest.mark.parametrize("size", [(8, 8), (1, 1), (3, 50)])
def test_small_images_work(pipe, size):
    result = pipe(random_rgb(*size, 7))
    assert result["semseg"]["prediction"].shape == size and np.isfinite(result["depth"]["prediction"]).all()


def test_the_processor_pixel_cap_applies_before_decoding(model_folder, tmp_path):
    path = tmp_path / "large.png"
    Image.new("L", (400, 300)).save(path)
    capped = pipeline(PIPELINE_TASK, model=str(model_folder), pipeline_class=MultiTaskDensePredictionPipeline)
    capped.image_processor.max_image_pixels = 100_000
    with pytest.raises(ValueError, match=r"large.png': 400x300 is 120,000 pixels, more than the limit of 100,000"):
        capped(str(path))


@contextlib.contextmanager
def image_server(png: bytes):
    """A server on 127.0.0.1 (stopped on exit): /deep.png, /gone.png (404), /huge (announces 1 GB), /endless (a
    chunked body without end) and /drip (one byte every 0.2 s)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/deep.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/huge":
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 30))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
            elif self.path in ("/endless", "/drip"):
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"\0" * (64 * 1024) if self.path == "/endless" else b"\0"
                try:
                    for _ in range(2000 if self.path == "/endless" else 100):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                        if self.path == "/drip":
                            time.sleep(0.2)
                except OSError:  # the client gave up, as it should
                    pass
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_urls_are_downloaded_within_a_deadline_and_a_size_cap(pipe):
    values = np.linspace(0, 65535, 12 * 16).astype(np.uint16).reshape(12, 16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    with image_server(buffer.getvalue()) as address:
        assert_same_predictions(pipe(f"{address}/deep.png", timeout=5.0), pipe(values))  # read by the same loader
        with pytest.raises(ValueError, match=r"Cannot download the image '.*/gone.png'.*404"):
            pipe(f"{address}/gone.png")
        with pytest.raises(ValueError, match=r"/huge' is 1,073,741,824 bytes, more than the limit of"):
            pipe(f"{address}/huge")
        original = pipe.image_processor.max_image_pixels
        pipe.image_processor.max_image_pixels = 100_000  # a cap of 1.8 MB for the endless body
        try:
            with pytest.raises(ValueError, match=r"/endless' is larger than the limit of 1,848,576 bytes"):
                pipe(f"{address}/endless")
        finally:
            pipe.image_processor.max_image_pixels = original
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"/drip' took longer than 1 s"):
            pipe(f"{address}/drip", timeout=1.0)
        assert time.monotonic() - started < 10  # an overall deadline, not one per read


def test_errors_name_the_input(pipe, tmp_path):
    with pytest.raises(ValueError, match="Unknown arguments \\['top_k'\\]"):
        pipe(random_rgb(8, 8), top_k=3)
    with pytest.raises(ValueError, match="Unknown task"):
        pipe(random_rgb(8, 8), tasks=["flow"])
    with pytest.raises(ValueError, match=r"missing.png': no such file"):
        pipe(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        pipe(torch.full((3, 8, 8), float("nan")))


def test_pipeline_on_a_pil_image(tmp_path):
    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(tiny_config()).eval()
    processor = DenseMultiTaskImageProcessor(size={"height": 32, "width": 32}, size_divisor=8)
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
