"""Load test of the Space: do memory and the temporary folder stay flat over many sessions, and is everything
cleaned up when the server is stopped with SIGTERM?

    python bench/space_load_test.py --sessions 300 --clients 20 --requests_per_client 5 \\
        --report docs/reliability.md --figure docs/figures/space_load_test.png

The app runs in its own process (`--serve`), on a free port of 127.0.0.1, with a tiny random TaskExpert saved to a
temporary folder (or `--model`), and its own temporary folder (`TMPDIR`, with Gradio's cache inside it). Phases:

1. `--sessions` sequential sessions, each a new `gradio_client.Client` sending one image that no earlier request
   sent (so no cached file can be reused); after each, the server's resident memory (with its children) and the
   size of its temporary folder are recorded.
2. `--clients` concurrent clients sending `--requests_per_client` such images each (sampled every second).
3. Inputs the app must refuse cleanly: uploads above the upload limit and above the pixel limit, and a bare path
   sent through the API instead of a file.
4. SIGTERM: the server must exit by itself and leave no file in its temporary folder.

The results are printed as JSON; `--report` replaces the marked section of a Markdown file with a table, `--figure`
draws the memory and folder-size curves. The app's resource limits can be changed for a run with the environment
variables of `resources.ResourceLimits` (they are passed to the server).
"""

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = REPO_ROOT / "space_app"
REPORT_START = "<!-- space-load-test:start -->"
REPORT_END = "<!-- space-load-test:end -->"
TASKS = ["semseg", "human_parts", "saliency", "normals", "edge", "depth"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_model(folder: Path) -> Path:
    """A small random TaskExpert (ViT with 4 layers of width 64, all six tasks) and a 128 px processor canvas."""
    import torch

    from modeling_taskexpert import TaskExpertConfig, TaskExpertForDensePrediction, DenseMultiTaskImageProcessor

    torch.manual_seed(0)
    config = TaskExpertConfig(
        backbone_config={"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                         "intermediate_size": 128, "image_size": 128, "patch_size": 16},
        tasks=TASKS,
        task_id2label={"semseg": {0: "floor", 1: "wall", 2: "box"}, "human_parts": {0: "background", 1: "person"}},
        mmoe_layers=[2, 4], num_experts=3, expert_hidden_size=32, head_hidden_size=32,
    )  # fmt: skip
    TaskExpertForDensePrediction(config).eval().save_pretrained(folder)
    DenseMultiTaskImageProcessor(size={"height": 128, "width": 128}, size_divisor=16).save_pretrained(folder)
    return folder


def scene_image(seed: int, side: int) -> np.ndarray:
    """A distinct, photo-like (smooth, so PNG-compressible) RGB image for every seed: a gradient and a few boxes."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, side)
    start, stop = rng.uniform(0, 255, (2, 3))
    image = start + (stop - start) * ramp[None, :, None] * ramp[:, None, None].clip(0.2)
    image = np.broadcast_to(image, (side, side, 3)).copy()
    for _ in range(6):
        top, left = rng.integers(0, side - side // 8, 2)
        height, width = rng.integers(side // 16, side // 3, 2)
        image[top : top + height, left : left + width] = rng.uniform(0, 255, 3)
    return image.astype(np.uint8)


def serve(model_folder: str, port: int) -> None:
    """The server process: the app on 127.0.0.1:`port` until SIGTERM (or Ctrl-C)."""
    sys.path.insert(0, str(SPACE_DIR))
    import app

    app.serve(model_folder, server_name="127.0.0.1", server_port=port, quiet=True)


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


def server_rss(pid: int) -> int:
    """Resident memory of a process and its children, in bytes."""
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def folder_usage(folder: Path) -> tuple[int, int]:
    """(bytes, files) under `folder`."""
    total, count = 0, 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
                count += 1
            except FileNotFoundError:
                pass
    return total, count


class Sampler(threading.Thread):
    """Every `interval` seconds: (requests done, server RSS, temporary-folder bytes and files)."""

    def __init__(self, pid: int, folder: Path, done, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.folder, self.done, self.interval = pid, folder, done, interval
        self.samples = []
        self.stopped = threading.Event()

    def sample(self) -> dict:
        size, files = folder_usage(self.folder)
        row = {
            "requests": self.done(),
            "rss_mib": server_rss(self.pid) / 2**20,
            "temp_mib": size / 2**20,
            "temp_files": files,
        }
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()


def write_refused_inputs(folder: Path, max_upload_mb: int, max_pixels: int) -> list[Path]:
    """Uploads the Space must refuse: too many bytes; too many pixels."""
    from PIL import Image

    too_large = folder / "too_large.png"
    too_large.write_bytes(
        np.random.default_rng(0).integers(0, 256, (max_upload_mb + 1) * 2**20, dtype=np.uint8).tobytes()
    )
    side = int(max_pixels**0.5) + 100
    too_many_pixels = folder / "too_many_pixels.png"
    Image.new("L", (side, side), 0).save(too_many_pixels, compress_level=9)
    return [too_large, too_many_pixels]


def run_load_test(
    sessions: int,
    clients: int,
    requests_per_client: int,
    image_side: int,
    model: str = None,
    time_limit: float = 3600.0,
) -> dict:
    from gradio_client import Client, handle_file
    from PIL import Image

    sys.path.insert(0, str(SPACE_DIR))
    from model_loading import MAX_INPUT_PIXELS, MAX_UPLOAD_MB
    from resources import ResourceLimits

    with tempfile.TemporaryDirectory(prefix="space-load-") as work:
        work = Path(work)
        server_temp = work / "server-tmp"
        server_temp.mkdir()
        inputs = work / "inputs"
        inputs.mkdir()
        model_folder = model or str(save_tiny_model(work / "model"))
        port = free_port()
        # The server's temporary folder: `serve` makes its cache folder there (GRADIO_TEMP_DIR unset, as on a Space).
        env = {key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}
        env.update(TMPDIR=str(server_temp), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        log_path = work / "server.log"
        with open(log_path, "wb") as log:  # a file, not a pipe: a chatty server never blocks on it
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve", model_folder, "--port", str(port)],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + time_limit
        completed = [0]
        lock = threading.Lock()
        latencies, failures = [], []

        def one_request(index: int, client=None) -> None:
            if time.monotonic() > deadline:
                failures.append("not started before the time limit")
                return
            path = inputs / f"image_{index}.png"
            Image.fromarray(scene_image(index, image_side)).save(path)
            started = time.perf_counter()
            own_client = client is None
            try:
                client = client or Client(url, verbose=False)
                status, *_ = client.predict(handle_file(str(path)), TASKS, api_name="/predict")
                ok = f"{len(TASKS)} task(s)" in status
                if not ok:
                    failures.append(status[:200])
            except Exception as error:  # any failure of an ordinary request is what this test counts
                ok = False
                failures.append(f"{type(error).__name__}: {str(error)[:200]}")
            finally:
                path.unlink(missing_ok=True)
                if own_client and client is not None:
                    client.close()  # the session ends, as when a browser tab closes
            with lock:
                completed[0] += 1
                if ok:
                    latencies.append(time.perf_counter() - started)

        try:
            wait_until_up(url, server, timeout=180)
            sampler = Sampler(server.pid, server_temp, lambda: completed[0])
            sampler.sample()
            start = time.perf_counter()
            for index in range(sessions):  # phase 1: one new session per request
                one_request(index)
                sampler.sample()
            sequential_end = len(sampler.samples)
            sampler.start()  # phase 2: concurrent clients, sampled every second

            def client_job(client_index: int) -> None:
                client = Client(url, verbose=False)
                for k in range(requests_per_client):
                    one_request(sessions + client_index * requests_per_client + k, client)
                client.close()

            if clients:
                with ThreadPoolExecutor(max_workers=clients) as pool:
                    list(pool.map(client_job, range(clients)))
            sampler.stopped.set()
            sampler.join()
            sampler.sample()
            elapsed = time.perf_counter() - start

            refusals = []  # phase 3: refused inputs
            client = Client(url, verbose=False)
            for path in [*write_refused_inputs(inputs, MAX_UPLOAD_MB, MAX_INPUT_PIXELS), "photo.jpg"]:
                try:
                    client.predict(
                        handle_file(str(path)) if isinstance(path, Path) else path, TASKS, api_name="/predict"
                    )
                    refusals.append({"input": Path(path).name, "refused": False, "message": "answered"})
                except Exception as error:
                    message = str(error).splitlines()[0].replace(f"{work}{os.sep}", "")  # no local paths in reports
                    refusals.append({"input": Path(path).name, "refused": True, "message": message[:300]})
            answered = len(latencies)
            one_request(10**6, client)
            served_after_refusals = len(latencies) == answered + 1
            client.close()
        finally:
            shutdown_started = time.perf_counter()
            server.send_signal(signal.SIGTERM)  # phase 4: the server must stop by itself and clean up
            try:
                exit_code = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_code = f"killed after 60 s ({server.wait()})"
            shutdown_seconds = time.perf_counter() - shutdown_started
        leftover_bytes, leftover_files = folder_usage(server_temp)
        log_text = log_path.read_text(errors="replace")
        leftovers = sorted(str(p.relative_to(server_temp)) for p in server_temp.rglob("*") if p.is_file())

    samples = sampler.samples
    lat = np.array(latencies)
    return {
        "sessions": sessions,
        "clients": clients,
        "requests_per_client": requests_per_client,
        "image_side": image_side,
        "requests": sessions + clients * requests_per_client,
        "failures": len(failures),
        "failure_examples": sorted(set(failures))[:3],
        "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p95_s": float(np.percentile(lat, 95)) if lat.size else None,
        "wall_s": elapsed,
        "sequential": samples[:sequential_end],
        "concurrent": samples[sequential_end:],
        "refusals": refusals,
        "served_after_refusals": served_after_refusals,
        "shutdown": {
            "exit_code": exit_code,
            "seconds": shutdown_seconds,
            "leftover_files": leftover_files,
            "leftover_bytes": leftover_bytes,
            "leftover_examples": leftovers[:5],
        },  # fmt: skip
        "tracebacks_in_log": log_text.count("Traceback"),
        "server_log": log_text,
        "limits": vars(ResourceLimits.from_env()),
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


def plot(results: dict, path: Path) -> None:
    """Server RSS and temporary-folder size against the number of requests answered, both phases."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6), layout="constrained")
    memory, disk = figure.subplots(1, 2)
    boundary = results["sessions"]
    for samples, label, style in ((results["sequential"], "sequential sessions", "-"),
                                  (results["concurrent"], f"{results['clients']} concurrent clients", "-")):  # fmt: skip
        if not samples:
            continue
        x = [row["requests"] for row in samples]
        memory.plot(x, [row["rss_mib"] for row in samples], style, label=label)
        disk.plot(x, [row["temp_mib"] for row in samples], style, label=label)
    limits = results["limits"]
    disk.axhline(limits["cache_max_mb"] * 2**20 / 2**20, color="grey", linestyle="--", linewidth=1, label="size budget")
    for axes, ylabel in ((memory, "server RSS (MiB)"), (disk, "temporary folder (MiB)")):
        axes.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel("requests answered")
        axes.set_ylabel(ylabel)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=8, frameon=False, loc="lower right")
    memory.set_title("Memory", fontsize=10)
    disk.set_title(f"Temporary folder ({results['image_side']}² px images, 6 tasks)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def render_report(results: dict, figure: Path = None, report: Path = None) -> str:
    machine, seq, conc = results["machine"], results["sequential"], results["concurrent"]
    shutdown = results["shutdown"]
    command = (
        f"python bench/space_load_test.py --sessions {results['sessions']} --clients {results['clients']} "
        f"--requests_per_client {results['requests_per_client']} --image_side {results['image_side']}"
    )
    lines = [
        REPORT_START,
        f"Run with `{command}` on {machine['cpu_cores']} CPU cores, {machine['ram_gib']} GiB RAM, {machine['os']}, "
        f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, gradio "
        f"{machine['gradio']}; a tiny random TaskExpert (128 px canvas, six tasks); every request a different "
        f"{results['image_side']}×{results['image_side']} image; the app's default limits "
        f"(state expiry {results['limits']['state_ttl_s']:.0f} s, {results['limits']['max_sessions']} sessions, cache "
        f"budget {results['limits']['cache_max_mb']:.0f} MB, file age {results['limits']['cache_max_age_s']:.0f} s).",
        "",
    ]
    if figure is not None:
        target = os.path.relpath(figure, report.parent) if report is not None else str(figure)
        lines += [f"![Server memory and temporary folder during the load test]({target})", ""]
    lines += ["| after | server RSS | temporary folder | files |", "|---|---|---|---|"]
    marks = sorted({1, 10, 30, 100, 200, len(seq) - 1} & set(range(len(seq))))
    for index in marks:
        row = seq[index]
        lines.append(
            f"| {row['requests']} sequential sessions | {row['rss_mib']:.0f} MiB | {row['temp_mib']:.0f} MiB | {row['temp_files']} |"
        )
    if conc:
        peak_rss = max(row["rss_mib"] for row in conc)
        peak_temp = max(row["temp_mib"] for row in conc)
        last = conc[-1]
        lines.append(
            f"| + {results['clients']} clients × {results['requests_per_client']} requests (peak) | {peak_rss:.0f} MiB | "
            f"{peak_temp:.0f} MiB | {max(row['temp_files'] for row in conc)} |"
        )
        lines.append(
            f"| end of the concurrent phase | {last['rss_mib']:.0f} MiB | {last['temp_mib']:.0f} MiB | {last['temp_files']} |"
        )
    lines.append(
        f"| SIGTERM (exit code {shutdown['exit_code']}, {shutdown['seconds']:.1f} s) | – | "
        f"{shutdown['leftover_bytes'] / 2**20:.0f} MiB | {shutdown['leftover_files']} |"
    )
    p50, p95 = results["latency_p50_s"], results["latency_p95_s"]
    lines += [
        "",
        f"{results['requests']} requests, {results['failures']} failed; latency p50 "
        f"{p50:.2f} s, p95 {p95:.2f} s; tracebacks in the server log: {results['tracebacks_in_log']}."
        if p50 is not None
        else f"{results['requests']} requests, {results['failures']} failed.",
        "Refused as they should be: "
        + "; ".join(f"{r['input']} → “{r['message']}”" for r in results["refusals"] if r["refused"])
        + ".",
        REPORT_END,
    ]
    return "\n".join(lines)


def write_report(path: Path, results: dict, figure: Path = None) -> None:
    """Replace the marked section of `path` (append it if absent), atomically."""
    from modeling_taskexpert.file_utils import write_text_atomic

    text = path.read_text() if path.exists() else ""
    section = render_report(results, figure, path)
    if REPORT_START in text and REPORT_END in text:
        head, rest = text.split(REPORT_START, 1)
        text = head + section + rest.split(REPORT_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text_atomic(path, text)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300, help="sequential sessions, one request each")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients of the second phase")
    parser.add_argument("--requests_per_client", type=int, default=5, help="requests of each concurrent client")
    parser.add_argument("--image_side", type=int, default=1024, help="side of the square test images, in pixels")
    parser.add_argument("--model", help="a model folder to serve instead of a tiny random TaskExpert")
    parser.add_argument("--time_limit", type=float, default=3600.0, help="seconds before requests stop starting")
    parser.add_argument("--report", type=Path, help="Markdown file whose load-test section is replaced")
    parser.add_argument("--figure", type=Path, help="where to draw the memory and folder-size curves (PNG)")
    parser.add_argument("--json", type=Path, help="where to write the full results")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return {}
    for name in ("sessions", "requests_per_client", "image_side"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.clients < 0:
        parser.error("--clients must be 0 (no concurrent phase) or more")
    results = run_load_test(
        args.sessions, args.clients, args.requests_per_client, args.image_side, args.model, args.time_limit
    )
    print(
        json.dumps({k: v for k, v in results.items() if k not in ("sequential", "concurrent", "server_log")}, indent=2)
    )
    if args.json:
        from modeling_taskexpert.file_utils import write_json_atomic

        write_json_atomic(args.json, results)
    if args.figure:
        plot(results, args.figure)
    if args.report:
        write_report(args.report, results, args.figure)
    return results


if __name__ == "__main__":
    main()
