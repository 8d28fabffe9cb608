"""The dataset writer's leftovers: what an interrupted write leaves is removed by the next write to the same place,
never a running writer's folder, never another destination's."""

import fcntl
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from modeling_taskexpert.data import generate_synthetic_dataset
from modeling_taskexpert.data.writer import UNLOCKED_STALE_SECONDS, remove_stale_temporaries

TINY = dict(train_size=1, val_size=1, image_size=16, num_workers=0)

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from modeling_taskexpert.data.writer import write_dataset

    def make_row(split, sample_id):
        Path(sys.argv[2]).touch()  # the temporary folder and its lock exist now
        time.sleep(600)

    write_dataset(sys.argv[1], {"train": ["a"]}, make_row, ["saliency"], lambda sizes: ({}, ""), num_workers=0)
    """
)


def _names(folder):
    return sorted(path.name for path in folder.iterdir())


def _wait_for(path, process, limit=300.0):
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - start < limit, "the writer did not start"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_write_is_cleaned_up_by_the_next_but_a_running_one_is_not(tmp_path):
    output, started = tmp_path / "out", tmp_path / "started"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(output), str(started)], start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for(started, writer)
        leftovers = [name for name in _names(tmp_path) if name.startswith(".out.incomplete-")]
        assert len(leftovers) == 2 and leftovers[1] == leftovers[0] + ".lock"
        assert remove_stale_temporaries(output) == []  # a running writer holds its lock: untouched
        assert _names(tmp_path) == sorted([*leftovers, "started"])
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    assert _names(tmp_path) == sorted([*leftovers, "started"])  # a killed process cannot clean up

    generate_synthetic_dataset(output, **TINY)
    assert _names(tmp_path) == ["out", "started"]


def _leftover(parent, name, locked_by=None, age=0.0):
    folder = parent / name
    (folder / "data").mkdir(parents=True)
    (folder / "data" / ".train-00000.parquet").write_bytes(b"partial")
    if locked_by is not None:
        lock = parent / f"{name}.lock"
        lock.touch()
        locked_by.append(open(lock, "a+b"))
        fcntl.flock(locked_by[-1].fileno(), fcntl.LOCK_EX)
    if age:
        stamp = time.time() - age
        for path in (folder / "data" / ".train-00000.parquet", folder / "data", folder):
            os.utime(path, (stamp, stamp))
    return folder


def test_only_this_destinations_unlocked_leftovers_are_removed(tmp_path, caplog):
    holders = []
    try:
        stale = _leftover(tmp_path, ".out.incomplete-stale")
        (tmp_path / ".out.incomplete-stale.lock").touch()  # its writer died: nobody holds the lock
        running = _leftover(tmp_path, ".out.incomplete-running", locked_by=holders)
        old_unlocked = _leftover(tmp_path, ".out.incomplete-old", age=UNLOCKED_STALE_SECONDS + 60)
        young_unlocked = _leftover(tmp_path, ".out.incomplete-young")
        other = _leftover(tmp_path, ".other.incomplete-x", age=UNLOCKED_STALE_SECONDS + 60)
        with caplog.at_level(logging.INFO):
            removed = remove_stale_temporaries(tmp_path / "out")
        assert sorted(removed) == sorted([stale, old_unlocked])
        assert "Removed 2 folder(s) left by interrupted writes" in caplog.text
        assert _names(tmp_path) == sorted(
            [running.name, running.name + ".lock", young_unlocked.name, other.name]
        )  # fmt: skip
    finally:
        for handle in holders:
            handle.close()
    # Once its writer is gone, the formerly running folder goes too.
    assert remove_stale_temporaries(tmp_path / "out") == [running]


def test_an_interrupted_overwrite_never_loses_the_only_complete_copy(tmp_path, caplog):
    """Killed between moving the old dataset aside and moving the new one in: the destination is missing, so both
    folders stay, and the warning says where they are."""
    new = _leftover(tmp_path, ".out.incomplete-abc")
    (tmp_path / ".out.incomplete-abc.lock").touch()
    old = _leftover(tmp_path, ".out.incomplete-abc.old")
    with caplog.at_level(logging.WARNING):
        assert remove_stale_temporaries(tmp_path / "out") == []
    assert new.is_dir() and old.is_dir()
    assert f"left the previous dataset at {old} and the new one at {new}" in caplog.text
    (tmp_path / "out").mkdir()  # once the destination exists again, the remains are removed
    assert sorted(remove_stale_temporaries(tmp_path / "out")) == sorted([new, old])


def test_written_datasets_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        generate_synthetic_dataset(tmp_path / "out", **TINY)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    for path in (tmp_path / "out").rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
