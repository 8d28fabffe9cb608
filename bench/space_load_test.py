"""Bounded load test of the Space: many concurrent `predict` calls on 127.0.0.1 against a tiny random model.

    python bench/space_load_test.py --requests 100 --clients 10 --report docs/reliability.md

The app runs in its own process (so its peak memory is its own), on a free local port, with a tiny random TaskExpert
saved to a temporary folder. `--clients` threads, each with its own `gradio_client.Client`, share `--requests`
ordinary requests (random images of a few sizes), plus `--oversized` uploads that must be refused cleanly: files
above the upload limit and images above the pixel limit. Everything stops after `--time_limit` seconds; a request
still unanswered then counts as failed. The results (requests, failures, p50/p95 latency, peak server memory, the
machine) are printed as JSON and, with `--report`, written into the marked section of that Markdown file.
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT_START = "<!-- space-load-test:start -->"
REPORT_END = "<!-- space-load-test:end -->"
IMAGE_SIDES = ((96, 128), (256, 256), (300, 200))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_app():
    """Import space_app/app.py (a Space folder, not a package) once; gradio needs it in `sys.modules`."""
    import importlib.util

    name = "taskexpert_space_app"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "space_app" / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def save_tiny_model(folder: Path) -> Path:
    """A small random TaskExpert (ViT with 4 layers of width 64, all six tasks) and a 128 px processor canvas."""
    import torch

    from modeling_taskexpert import TaskExpertConfig, TaskExpertForDensePrediction, TaskExpertImageProcessor

    torch.manual_seed(0)
    config = TaskExpertConfig(
        backbone_config={"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                         "intermediate_size": 128, "image_size": 128, "patch_size": 16},
        tasks=["semseg", "human_parts", "saliency", "normals", "edge", "depth"],
        task_id2label={"semseg": {0: "floor", 1: "wall", 2: "box"}, "human_parts": {0: "background", 1: "person"}},
        mmoe_layers=[2, 4], num_experts=3, expert_hidden_size=32, head_hidden_size=32,
    )  # fmt: skip
    TaskExpertForDensePrediction(config).eval().save_pretrained(folder)
    TaskExpertImageProcessor(size={"height": 128, "width": 128}, size_divisor=16).save_pretrained(folder)
    return folder


def serve(model_folder: str, port: int) -> None:
    """The server process: build the demo and serve it until killed."""
    app = load_app()
    demo = app.build_demo(model_folder)
    app.launch(demo, server_name="127.0.0.1", server_port=port, quiet=True)


def wait_until_up(url: str, server: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"The Space exited during start-up with code {server.returncode}.")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"The Space did not answer within {timeout:.0f} s.")


class PeakMemory(threading.Thread):
    """Samples the resident memory of a process (and its children) until stopped; keeps the peak in bytes."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.is_set():
            try:
                processes = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in processes))
            except psutil.Error:
                pass
            self.stopped.wait(self.interval)


def write_inputs(folder: Path, max_upload_mb: int, max_pixels: int) -> tuple[list[Path], list[Path]]:
    """Ordinary test images, and uploads the Space must refuse (too many bytes; too many pixels)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for index, (height, width) in enumerate(IMAGE_SIDES):
        path = folder / f"image_{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(path)
    too_large = folder / "too_large.png"
    too_large.write_bytes(rng.integers(0, 256, (max_upload_mb + 1) * 2**20, dtype=np.uint8).tobytes())
    side = int(max_pixels**0.5) + 100
    too_many_pixels = folder / "too_many_pixels.png"
    Image.new("L", (side, side), 0).save(too_many_pixels, compress_level=9)
    return images, [too_large, too_many_pixels]


def run_load_test(requests: int, clients: int, oversized: int, time_limit: float) -> dict:
    from gradio_client import Client, handle_file

    app = load_app()
    tasks = ["semseg", "human_parts", "saliency", "normals", "edge", "depth"]
    with tempfile.TemporaryDirectory(prefix="space-load-") as temporary:
        folder = Path(temporary)
        model_folder = save_tiny_model(folder / "model")
        images, refused_inputs = write_inputs(folder, app.MAX_UPLOAD_MB, app.MAX_INPUT_PIXELS)
        port = free_port()
        env = dict(os.environ, GRADIO_TEMP_DIR=str(folder / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
                   HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))  # fmt: skip
        log = open(folder / "server.log", "wb")  # a file, not a pipe: a chatty server never blocks on it
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(model_folder), "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_until_up(url, server, timeout=120)
            memory = PeakMemory(server.pid)
            memory.start()
            local = threading.local()
            deadline = time.monotonic() + time_limit

            def client() -> Client:
                if not hasattr(local, "client"):
                    local.client = Client(url, verbose=False)
                return local.client

            def ordinary(index: int) -> tuple[str, float, str]:
                if time.monotonic() > deadline:
                    return "failed", 0.0, "not started before the time limit"
                started = time.perf_counter()
                try:
                    status, *_ = client().predict(handle_file(str(images[index % len(images)])), tasks, api_name="/predict")
                except Exception as error:  # any failure of an ordinary request is what this test counts
                    return "failed", time.perf_counter() - started, f"{type(error).__name__}: {error}"
                ok = f"{len(tasks)} task(s)" in status
                return ("ok" if ok else "failed"), time.perf_counter() - started, "" if ok else status

            def refused(index: int) -> tuple[str, float, str]:
                started = time.perf_counter()
                try:
                    client().predict(handle_file(str(refused_inputs[index % len(refused_inputs)])), tasks, api_name="/predict")
                except Exception as error:  # the expected outcome: a clear refusal, not an answer
                    message = str(error).splitlines()[0].replace(f"{folder}{os.sep}", "")  # no local paths in reports
                    return "refused", time.perf_counter() - started, message[:200]
                return "accepted", time.perf_counter() - started, "an oversized upload was answered"

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                jobs = [pool.submit(ordinary, i) for i in range(requests)]
                jobs += [pool.submit(refused, i) for i in range(oversized)]
                done, pending = wait(jobs, timeout=time_limit + 60)
                for job in pending:
                    job.cancel()
            elapsed = time.perf_counter() - started
            # Ordinary requests are answered after the refusals' tally too: the server must still be serving.
            healthy = ordinary(0)[0] == "ok"
            memory.stopped.set()
            memory.join()
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()

        outcomes = [job.result() for job in jobs[:requests] if job in done]
        refusals = [job.result() for job in jobs[requests:] if job in done]
        latencies = np.array([seconds for kind, seconds, _ in outcomes if kind == "ok"])
        failures = requests - sum(kind == "ok" for kind, _, _ in outcomes)
        return {
            "requests": requests,
            "clients": clients,
            "failures": failures,
            "failure_examples": sorted({reason for kind, _, reason in outcomes if kind != "ok"})[:3],
            "oversized_uploads": oversized,
            "oversized_refused": sum(kind == "refused" for kind, _, _ in refusals),
            "refusal_messages": sorted({reason for kind, _, reason in refusals if kind == "refused"}),
            "served_after_load": healthy,
            "latency_p50_s": float(np.percentile(latencies, 50)) if latencies.size else None,
            "latency_p95_s": float(np.percentile(latencies, 95)) if latencies.size else None,
            "throughput_rps": float(latencies.size / elapsed) if elapsed > 0 else None,
            "wall_s": elapsed,
            "peak_rss_mib": memory.peak / 2**20,
            "image_sizes": [f"{w}x{h}" for h, w in IMAGE_SIDES],
            "queue": {"max_size": app.MAX_QUEUE_SIZE, "concurrency": 1},
            "machine": machine_summary(),
        }


def machine_summary() -> dict:
    import gradio
    import psutil
    import torch
    import transformers

    return {
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gradio": gradio.__version__,
    }


def render_report(results: dict) -> str:
    machine = results["machine"]
    p50, p95 = results["latency_p50_s"], results["latency_p95_s"]
    lines = [
        REPORT_START,
        f"Run with `python bench/space_load_test.py --requests {results['requests']} --clients {results['clients']} "
        f"--oversized {results['oversized_uploads']}` on {machine['cpu_cores']} CPU cores, {machine['ram_gib']} GiB RAM, "
        f"{machine['os']}, Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"gradio {machine['gradio']}; a tiny random TaskExpert (128 px canvas, six tasks), images of "
        f"{', '.join(results['image_sizes'])} px.",
        "",
        "| requests | concurrent clients | failed | p50 latency | p95 latency | throughput | peak server RSS | oversized uploads refused |",
        "|---|---|---|---|---|---|---|---|",
        f"| {results['requests']} | {results['clients']} | {results['failures']} | "
        f"{p50:.2f} s | {p95:.2f} s | {results['throughput_rps']:.2f} req/s | {results['peak_rss_mib']:.0f} MiB | "
        f"{results['oversized_refused']} of {results['oversized_uploads']} |"
        if p50 is not None
        else f"| {results['requests']} | {results['clients']} | {results['failures']} | – | – | – | – | – |",
        "",
        "Refusal messages: " + "; ".join(f"“{m}”" for m in results["refusal_messages"]) + ".",
        REPORT_END,
    ]
    return "\n".join(lines)


def write_report(path: Path, results: dict) -> None:
    """Replace the marked section of `path` (append it if absent), writing a temporary file and renaming it."""
    text = path.read_text() if path.exists() else ""
    section = render_report(results)
    if REPORT_START in text and REPORT_END in text:
        head, rest = text.split(REPORT_START, 1)
        text = head + section + rest.split(REPORT_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="ordinary predict requests")
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients")
    parser.add_argument("--oversized", type=int, default=4, help="uploads over the byte or pixel limit")
    parser.add_argument("--time_limit", type=float, default=600.0, help="seconds for all requests")
    parser.add_argument("--report", type=Path, help="Markdown file whose load-test section is replaced")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return {}
    for name in ("requests", "clients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    results = run_load_test(args.requests, args.clients, args.oversized, args.time_limit)
    print(json.dumps(results, indent=2))
    if args.report:
        write_report(args.report, results)
    return results


if __name__ == "__main__":
    main()
