"""Helpers of the tests that launch `train.py`: the command line of a short run, running it, reading its log, and
killing a run with every process it started (not a test module; the training test files import it).

`accelerate launch --multi_gpu` runs the workers through torch's elastic agent, which starts each worker in a session
of its own: killing the launcher's process group leaves them running, training on into the same folder. So a kill
here stops the whole tree first (SIGSTOP, so nothing can fork meanwhile), then kills every process of it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
RUN_TIMEOUT = 600


def train_command(dataset, output_dir, *extra, processes=1, launcher=True):
    """A short run of the synthetic-tiny recipe on a test dataset (8 steps, checkpoints at 4 and 8). Without the
    launcher (one process), train.py's own exit status comes back (`accelerate launch` turns every failure into 1)."""
    launch = [ACCELERATE, "launch", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
    if processes > 1:
        launch.append("--multi_gpu")
    if not launcher:
        assert processes == 1, "several processes need the launcher"
        launch = [sys.executable]
    return [*launch, str(REPO / "train.py"), "--config", str(REPO / "hub_configs/synthetic-tiny.yaml"),
            "--dataset", str(dataset), "--output_dir", str(output_dir), "--max_steps", "8", "--warmup_steps", "2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
            "--eval_steps", "0", "--save_steps", "4", "--save_total_limit", "2", "--boundary_workers", "0", *extra]  # fmt: skip


def training_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def start(command, **kwargs) -> subprocess.Popen:
    """Start a run in a session of its own (so that it can be killed as a whole)."""
    return subprocess.Popen(command, cwd=REPO, env=training_env(), start_new_session=True, **kwargs)


def run(command, timeout=RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run to the end and return its output; on a timeout, kill every process of the run before failing."""
    process = start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(process)
        raise
    finally:
        if process.poll() is None:
            kill_process_tree(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_all(commands, timeout=RUN_TIMEOUT) -> list[subprocess.CompletedProcess]:
    """`run` several independent commands at once (most of a short run is start-up, which overlaps well); results in
    the order of the commands."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda command: run(command, timeout), commands))


def train_records(output_dir):
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def is_running(pid: int) -> bool:
    """True for a live process; False once it is gone or a zombie (dead, waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def kill_process_tree(process: subprocess.Popen) -> set[int]:
    """SIGKILL `process` and every process it started, wherever their session; return the pids of the descendants.

    The tree is frozen first (SIGSTOP to the run's process group, then to each descendant found, until no new one
    appears), so that no process forks or is re-parented between listing and killing."""
    try:
        os.killpg(process.pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass
    tree: set[int] = set()
    while new := descendants(process.pid) - tree:
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        tree |= new
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in tree:
        _signal(pid, signal.SIGKILL)
    process.wait()
    return tree


def wait_until_gone(pids, timeout: float = 30.0) -> set[int]:
    """The pids still running after `timeout` seconds (empty when every one ended)."""
    deadline = time.time() + timeout
    while (alive := {pid for pid in pids if is_running(pid)}) and time.time() < deadline:
        time.sleep(0.1)
    return alive
