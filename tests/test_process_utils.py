"""Fault tests of the package's worker pools: killing the process that started them (SIGKILL, or SIGTERM without a
handler) ends every worker within seconds, whether it waits for work or is busy scoring. Only the parent is signalled:
the workers must end by themselves."""

import os
import signal
import subprocess
import sys
import time

import pytest
from training_runs import REPO, descendants, is_running, kill_process_tree, start, wait_until_gone

# The kernel ends the workers at once; the portable fallback polls every PARENT_POLL_SECONDS (0.5 s).
GONE_WITHIN_SECONDS = 10

# A run's final evaluation with the exact boundary scorer and 2 background workers. The workers are up once the first
# batch is flushed (idle, waiting on their queue); a second batch keeps them busy at the time of the kill.
EVALUATION = """
import torch
from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator

evaluator = DenseMultiTaskEvaluator(["edge"], boundary_tolerance=0.0075, boundary_mode="exact", boundary_workers=2)
generator = torch.Generator().manual_seed(0)

def batch(size, side):
    labels = (torch.rand(size, side, side, generator=generator) > 0.9).float()
    return {"edge": torch.rand(size, side, side, generator=generator)}, {"edge": labels}

evaluator.update(*batch(4, 32))
evaluator.flush()
if BUSY:
    evaluator.update(*batch(8, 400))
"""

# A pool like the dataset writer's (fork) with one of the two mechanisms disabled: the kernel signal (as where
# PR_SET_PDEATHSIG does not exist) or the parent poll. The module is loaded on its own (standard library only), sparing
# the package's import.
FORK_POOL = f"""
import importlib.util, multiprocessing, os, time
spec = importlib.util.spec_from_file_location("process_utils", {str(REPO / "modeling_taskexpert" / "process_utils.py")!r})
process_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(process_utils)

if DISABLE == "kernel signal":
    process_utils._set_parent_death_signal = lambda number: False
else:
    process_utils._watch_parent = lambda parent_pid: None
pool = multiprocessing.get_context("fork").Pool(2, initializer=process_utils.end_with_parent, initargs=(os.getpid(),))
pool.map(abs, range(8))
pool.map_async(time.sleep, [60, 60])  # busy: a worker waiting on its queue would also end at end-of-file
time.sleep(0.5)
"""


def _start_script(body: str, **settings) -> subprocess.Popen:
    """Run `body` after the assignments `settings` in a session of its own; it prints "ready" once its pool is up."""
    assignments = "".join(f"{name.upper()} = {value!r}\n" for name, value in settings.items())
    script = f"{assignments}{body}\nprint('ready', flush=True)\nimport time\ntime.sleep(600)\n"
    return start([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_workers(process: subprocess.Popen, count: int, ready_line: bool) -> set[int]:
    deadline = time.time() + 300
    if ready_line:
        line = process.stdout.readline()
        assert line.strip() == "ready", process.stderr.read()[-4000:] if process.poll() is not None else line
    while len(workers := {pid for pid in descendants(process.pid) if is_running(pid)}) < count:
        assert process.poll() is None, process.stderr.read()[-4000:]
        assert time.time() < deadline, f"only {len(workers)} of {count} workers started"
        time.sleep(0.1)
    time.sleep(0.5)  # let the last started worker reach its initializer
    return {pid for pid in descendants(process.pid) if is_running(pid)}


def _kill_parent_and_check(process: subprocess.Popen, workers: set[int], number: int) -> None:
    try:
        process.send_signal(number)  # the parent only: its workers are left to end by themselves
        process.wait(timeout=30)
        assert process.returncode == -number
        left = wait_until_gone(workers, timeout=GONE_WITHIN_SECONDS)
        assert not left, f"workers {sorted(left)} outlived their parent by {GONE_WITHIN_SECONDS} s"
    finally:
        if process.poll() is None:
            kill_process_tree(process)
        for pid in workers:  # never leave a process behind, even when the test fails
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "number, busy", [(signal.SIGKILL, True), (signal.SIGTERM, False)], ids=["kill-busy", "term-idle"]
)
def test_boundary_workers_end_with_a_killed_evaluation(number, busy):
    process = _start_script(EVALUATION, busy=busy)
    # The 2 workers, and the resource tracker that "spawn" starts, which must end too.
    workers = _wait_for_workers(process, count=2, ready_line=True)
    _kill_parent_and_check(process, workers, number)


@pytest.mark.parametrize("disabled", ["kernel signal", "parent poll"])
def test_each_mechanism_alone_ends_busy_workers(disabled):
    process = _start_script(FORK_POOL, disable=disabled)
    workers = _wait_for_workers(process, count=2, ready_line=True)
    assert len(workers) == 2
    _kill_parent_and_check(process, workers, signal.SIGKILL)
