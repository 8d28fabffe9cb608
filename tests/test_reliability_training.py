"""Fault injection in training: SIGKILL a 2-process data-parallel run at a random step after its first checkpoint,
resume from `latest`, and get bit-identical final weights to an uninterrupted 2-process run; the kill leaves no
process of the run behind."""

import random
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from training_runs import (
    descendants,
    is_running,
    kill_process_tree,
    run,
    start,
    train_command,
    train_records,
    wait_until_gone,
)

pytestmark = pytest.mark.slow

MAX_STEPS, SAVE_STEPS = 6, 2
SETTINGS = ("--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--save_total_limit", "3",
            "--per_device_train_batch_size", "2")  # fmt: skip


def test_two_process_kill_and_resume_gives_identical_weights(synthetic_dataset, tmp_path):
    reference = tmp_path / "uninterrupted"
    completed = run(train_command(synthetic_dataset, reference, *SETTINGS, processes=2))
    assert completed.returncode == 0, completed.stderr[-4000:]

    # Kill once a random step after the first checkpoint has been logged (seeded: the test is reproducible).
    kill_after = random.Random(0).randrange(SAVE_STEPS, MAX_STEPS)
    output_dir = tmp_path / "interrupted"
    process = start(train_command(synthetic_dataset, output_dir, *SETTINGS, processes=2),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        first_checkpoint = output_dir / "checkpoints" / f"step_{SAVE_STEPS:08d}" / "manifest.json"
        while not (first_checkpoint.exists() and (output_dir / "train_log.jsonl").exists()
                   and any(r["step"] >= kill_after for r in train_records(output_dir))):  # fmt: skip
            assert process.poll() is None and time.time() < deadline, "training ended before the chosen step"
            time.sleep(0.02)
        workers = {pid for pid in descendants(process.pid) if is_running(pid)}
    finally:
        killed = kill_process_tree(process)  # the launcher and both workers, which run in sessions of their own
    # The launcher's descendants: the elastic agent's 2 workers at least; none of them survives the kill.
    assert len(workers) >= 2 and workers <= killed
    assert not wait_until_gone(killed), "a process of the killed run is still running"
    assert not (output_dir / "model.safetensors").exists()

    completed = run(
        train_command(synthetic_dataset, output_dir, *SETTINGS, "--resume_from_checkpoint", "latest", processes=2)
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Resumed from" in completed.stdout + completed.stderr
    records = train_records(output_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    assert all(r["world_size"] == 2 for r in records)
    for expected, actual in zip(train_records(reference), records):
        assert expected["loss"] == actual["loss"], (expected["step"], expected["loss"], actual["loss"])
    final_expected = load_file(reference / "model.safetensors")
    final_actual = load_file(output_dir / "model.safetensors")
    assert final_expected.keys() == final_actual.keys()
    for key in final_expected:
        assert torch.equal(final_expected[key], final_actual[key]), key
