"""space_app/resources.py: the limits, the cache janitor (age, size budget, shutdown) and the per-session error notes."""

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import resources


def test_limits_come_from_the_environment_and_bad_values_are_named():
    assert resources.ResourceLimits.from_env({}) == resources.ResourceLimits()
    limits = resources.ResourceLimits.from_env(
        {"TASKEXPERT_SPACE_CACHE_MAX_MB": "64", "TASKEXPERT_SPACE_MAX_SESSIONS": "7"}
    )
    assert limits.cache_max_mb == 64.0 and limits.max_sessions == 7 and isinstance(limits.max_sessions, int)
    with pytest.raises(ValueError, match="TASKEXPERT_SPACE_MAX_SESSIONS must be a int, got '2.5'"):
        resources.ResourceLimits.from_env({"TASKEXPERT_SPACE_MAX_SESSIONS": "2.5"})
    with pytest.raises(ValueError, match="TASKEXPERT_SPACE_STATE_TTL_S must be positive, got '0'"):
        resources.ResourceLimits.from_env({"TASKEXPERT_SPACE_STATE_TTL_S": "0"})


class FakeBlocks:
    """What the janitor reads of a Gradio app: its cache folder, its record of created files, its components."""

    def __init__(self, cache: Path):
        self.GRADIO_CACHE = str(cache)
        self.temp_file_sets = [set(), set()]
        self.blocks = {1: SimpleNamespace(keep_in_cache=set())}

    def add(self, name: str, size: int, age: float, kept: bool = False, record: int = 0) -> str:
        """A file of `size` bytes in its own folder, last changed `age` seconds ago."""
        path = Path(self.GRADIO_CACHE) / name / "file.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (time.time() - age, time.time() - age))
        (self.blocks[1].keep_in_cache if kept else self.temp_file_sets[record]).add(str(path))
        return str(path)


@pytest.fixture(autouse=True)
def age_by_mtime(monkeypatch):
    """The janitor ages files by ctime, which cannot be set from Python: these tests date their files by mtime."""
    monkeypatch.setattr(resources, "last_change", lambda stat: stat.st_mtime)


def limits(**overrides) -> resources.ResourceLimits:
    values = dict(cache_max_mb=3000 / 2**20, cache_max_age_s=100.0, cache_min_age_s=10.0)
    values.update(overrides)
    return resources.ResourceLimits(**values)


def test_sweep_deletes_old_files_then_the_oldest_beyond_the_budget(tmp_path):
    blocks = FakeBlocks(tmp_path)
    expired = blocks.add("expired", 100, age=500)
    oldest = blocks.add("oldest", 1000, age=60, record=1)
    older = blocks.add("older", 1000, age=50)
    newer = blocks.add("newer", 1000, age=40)
    fresh = blocks.add("fresh", 1000, age=1)  # younger than the minimum age: never deleted for room
    example = blocks.add("example", 5000, age=1000, kept=True)  # Gradio keeps it for good
    janitor = resources.CacheJanitor(blocks, limits())
    # 4100 bytes of deletable files for a 3000-byte budget: the expired one goes, then the oldest, then it fits.
    report = janitor.sweep()
    assert (report.deleted_files, report.deleted_bytes) == (2, 1100)
    assert not Path(expired).exists() and not Path(oldest).exists()
    assert not Path(expired).parent.exists()  # the per-file folder goes too
    assert all(Path(path).exists() for path in (older, newer, fresh, example))
    assert oldest not in blocks.temp_file_sets[1] and older in blocks.temp_file_sets[0]
    assert (report.kept_files, report.kept_bytes) == (3, 3000)
    assert tmp_path.is_dir()  # never the cache folder itself


def test_files_younger_than_the_minimum_age_stay_even_over_budget(tmp_path):
    blocks = FakeBlocks(tmp_path)
    young = [blocks.add(f"young{k}", 2000, age=1) for k in range(3)]
    assert resources.CacheJanitor(blocks, limits()).sweep().deleted_files == 0
    assert all(Path(path).exists() for path in young)


def test_delete_all_removes_every_file_the_app_created(tmp_path):
    blocks = FakeBlocks(tmp_path / "cache")
    paths = [blocks.add("a", 10, age=0), blocks.add("b", 10, age=0, record=1)]
    kept = blocks.add("kept", 10, age=0, kept=True)  # Gradio keeps it for good (a cached example another app may show)
    outside = tmp_path / "user-file.txt"  # a recorded path outside the cache folder is never touched
    outside.write_text("mine")
    blocks.temp_file_sets[0].add(str(outside))
    report = resources.CacheJanitor(blocks, limits()).delete_all()
    assert outside.exists()
    assert report.deleted_files == 2 and not any(Path(path).exists() for path in paths)
    assert Path(kept).exists() and [p.name for p in (tmp_path / "cache").iterdir()] == ["kept"]


def test_the_lifespan_sweeps_while_serving_and_cleans_up_at_the_end(tmp_path):
    import asyncio

    blocks = FakeBlocks(tmp_path)
    expired = blocks.add("expired", 10, age=500)
    current = blocks.add("current", 10, age=0)
    janitor = resources.CacheJanitor(blocks, limits(sweep_interval_s=0.05))

    async def serve_briefly():
        async with janitor.lifespan()(None):
            deadline = time.monotonic() + 10
            while Path(expired).exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not Path(expired).exists() and Path(current).exists()

    asyncio.run(serve_briefly())
    assert not Path(current).exists() and janitor._thread is None


def test_error_notes_are_per_session_and_bounded():
    notes = resources.ErrorNotes(capacity=2)
    notes.record("a", "first")
    notes.record("b", "second")
    notes.record("a", "again")
    notes.record("c", "third")  # "b" is now the oldest: dropped
    notes.record(None, "no session")
    assert len(notes) == 2 and notes.pop("b") is None
    assert notes.pop("a") == "again" and notes.pop("a") is None and notes.pop("c") == "third"


def test_sigterm_interrupts_the_main_thread_like_ctrl_c():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        resources.stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        worker = threading.Thread(target=resources.stop_on_sigterm)  # elsewhere: a no-op, not an error
        worker.start()
        worker.join()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_request_is_refused_at_admission_while_the_budget_is_exceeded(tmp_path):
    """Round-3 probe: with the defaults, 45 uploads of 19 MB put 855 MiB into a 512 MB budget within 22 s (no file
    younger than 120 s is deleted). A request now finds the budget exceeded at admission: refused, its upload deleted."""
    blocks = FakeBlocks(tmp_path)
    recent = [blocks.add(f"map{k}", 1000, age=1, record=1) for k in range(3)]  # young: the age rules keep them
    upload = blocks.add("upload", 1000, age=0)
    janitor = resources.CacheJanitor(blocks, limits())
    with pytest.raises(resources.StorageFull, match=r"temporary storage is full .* try again in a minute"):
        janitor.admit(upload)
    assert not Path(upload).exists() and upload not in blocks.temp_file_sets[0]
    assert all(Path(path).exists() for path in recent)  # what others may still be downloading stays
    Path(recent[0]).unlink()
    janitor.admit(None)  # within the budget again (2000 of 3000 bytes): admitted
