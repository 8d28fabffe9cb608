"""Resources: what the Space keeps between requests, and the bounds that keep memory and disk flat.

- Per session, the Experts tab's state is small (`experts_tab.ExpertsState`) and expires (`state_ttl_s`); Gradio keeps
  at most `max_sessions` sessions.
- Every file the app hands out (uploads, maps, the `.npz` downloads) lives in Gradio's cache folder, and
  `CacheJanitor` deletes those older than `cache_max_age_s` and, beyond `cache_max_mb`, the oldest ones first (but
  none younger than `cache_min_age_s`: a client may still be fetching it, or the request may be waiting in the queue).
  A request that finds the budget exceeded all the same is refused at admission (`CacheJanitor.admit`).
- When the server stops (Ctrl-C, SIGTERM, `Blocks.close`), every file the app created is deleted; `app.serve` gives
  the app a cache folder of its own (unless `GRADIO_TEMP_DIR` names one) and removes it whole.
"""

import os
import signal
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

ENV_PREFIX = "TASKEXPERT_SPACE_"


@dataclass(frozen=True)
class ResourceLimits:
    """Bounds on what the Space keeps; each can be set with the environment variable `TASKEXPERT_SPACE_<NAME>`
    (upper case), e.g. `TASKEXPERT_SPACE_CACHE_MAX_MB=256`."""

    # Seconds a session's Experts state lives after its last run (a closed browser tab drops it earlier).
    state_ttl_s: float = 1800.0
    # Sessions whose state Gradio keeps; the oldest beyond this are dropped.
    max_sessions: int = 200
    # Total size of the files the app keeps in Gradio's cache folder.
    cache_max_mb: float = 512.0
    # Files older than this are deleted (download links last at least this long unless the size budget needs room).
    cache_max_age_s: float = 1800.0
    # Files younger than this are never deleted to make room.
    cache_min_age_s: float = 120.0
    # Seconds between two sweeps of the cache folder (a sweep also follows every request).
    sweep_interval_s: float = 30.0

    @classmethod
    def from_env(cls, environ=None) -> "ResourceLimits":
        environ = os.environ if environ is None else environ
        values = {}
        for item in fields(cls):
            name = ENV_PREFIX + item.name.upper()
            if name not in environ:
                continue
            kind = int if item.type in (int, "int") else float
            try:
                value = kind(environ[name])
            except ValueError:
                raise ValueError(f"{name} must be a {kind.__name__}, got {environ[name]!r}.") from None
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {environ[name]!r}.")
            values[item.name] = value
        return cls(**values)


def last_change(stat: os.stat_result) -> float:
    """When a file was last written or handed out again: its ctime, as Gradio's own cleanup reads it (a copy into the
    cache keeps the source's mtime, and re-serving a cached file touches it)."""
    return stat.st_ctime


class StorageFull(Exception):
    """A request refused because the files the app keeps exceed their size budget."""


@dataclass
class SweepReport:
    deleted_files: int = 0
    deleted_bytes: int = 0
    kept_files: int = 0
    kept_bytes: int = 0


class CacheJanitor:
    """Deletes the files a Gradio app created in its cache folder, by age and by total size.

    It reads the same record of created files Gradio's own `delete_cache` uses (`Blocks.temp_file_sets`, less the
    files Gradio keeps for good, such as cached examples), and also removes the per-file folders it empties.
    """

    def __init__(self, blocks, limits: ResourceLimits):
        self.blocks = blocks
        self.limits = limits
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _tracked(self) -> list[tuple[str, set]]:
        """(path, the set that records it) of every file the app created, less the ones Gradio keeps for good."""
        keep = set()
        for block in self.blocks.blocks.values():
            keep.update(getattr(block, "keep_in_cache", ()))
        return [(path, files) for files in self.blocks.temp_file_sets for path in list(files) if path not in keep]

    def sweep(self, now: Optional[float] = None) -> SweepReport:
        """Delete files past the age limit, then the oldest ones (past the minimum age) while over the size budget."""
        now = time.time() if now is None else now
        limits = self.limits
        report = SweepReport()
        with self._lock:
            entries = []
            for path, files in self._tracked():
                try:
                    stat = os.lstat(path)
                except FileNotFoundError:
                    files.discard(path)
                    continue
                entries.append((last_change(stat), stat.st_size, path, files))
            entries.sort()
            total = sum(size for _, size, _, _ in entries)
            budget = limits.cache_max_mb * 2**20
            for changed, size, path, files in entries:
                age = now - changed
                if age > limits.cache_max_age_s or (total > budget and age > limits.cache_min_age_s):
                    if self._delete(path, files):
                        total -= size
                        report.deleted_files += 1
                        report.deleted_bytes += size
                        continue
                report.kept_files += 1
                report.kept_bytes += size
        return report

    def admit(self, upload: Optional[str] = None) -> None:
        """Admit a request only while the files kept fit the size budget (the age rules alone let a burst of uploads,
        all younger than `cache_min_age_s`, pass it: 45 uploads of 19 MB put 855 MiB in a 512 MB budget). After a
        sweep, a request that finds the budget exceeded is refused with `StorageFull`, and its own upload (a file this
        app recorded) is deleted at once, so the folder stays within the budget plus the uploads in flight."""
        report = self.sweep()
        budget = self.limits.cache_max_mb * 2**20
        if report.kept_bytes <= budget:
            return
        if upload is not None:
            with self._lock:
                for path, files in self._tracked():
                    if path == upload:
                        self._delete(path, files)
        raise StorageFull(
            f"The demo's temporary storage is full ({report.kept_bytes / 2**20:.0f} MB of "
            f"{self.limits.cache_max_mb:.0f} MB, kept for recent downloads): try again in a minute."
        )

    def delete_all(self) -> SweepReport:
        """Delete every file the app created (at shutdown), less the ones Gradio keeps for good (the cached examples,
        which another app sharing the cache folder may show; `serve` gives the app a folder of its own and removes it
        whole)."""
        report = SweepReport()
        with self._lock:
            for path, files in self._tracked():
                try:
                    size = os.lstat(path).st_size
                except FileNotFoundError:
                    files.discard(path)
                    continue
                if self._delete(path, files):
                    report.deleted_files += 1
                    report.deleted_bytes += size
        return report

    def _delete(self, path: str, files: set) -> bool:
        """Delete a recorded file if it lies in the cache folder (a recorded path elsewhere is never touched)."""
        if not Path(path).resolve().is_relative_to(Path(self.blocks.GRADIO_CACHE).resolve()):
            return False
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        files.discard(path)
        self._remove_empty_parent(Path(path).parent)
        return True

    def _remove_empty_parent(self, folder: Path) -> None:
        """Remove `folder` when empty and strictly inside the cache folder (Gradio makes one folder per file)."""
        root = Path(self.blocks.GRADIO_CACHE).resolve()
        try:
            if folder.resolve() != root and folder.resolve().is_relative_to(root):
                folder.rmdir()
        except OSError:  # not empty (another file landed there), or already gone
            pass

    # The periodic sweep runs while the server runs: started and stopped by the server's lifespan.
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="space-cache-janitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.limits.sweep_interval_s):
            self.sweep()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def lifespan(self):
        """A lifespan for the server app (`launch(app_kwargs={"lifespan": ...})`): sweep while it serves, delete
        everything when it stops."""

        @asynccontextmanager
        async def lifespan(_app):
            self.start()
            try:
                yield
            finally:
                self.stop()
                self.delete_all()

        return lifespan


class ErrorNotes:
    """The last error message of each session, so that the page can show it in its status box after the failed
    event (a `.failure` listener cannot see the exception). Bounded: the oldest sessions' notes are dropped."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self._notes: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, session: Optional[str], message: str) -> None:
        if session is None:
            return
        with self._lock:
            self._notes[session] = message
            self._notes.move_to_end(session)
            while len(self._notes) > self.capacity:
                self._notes.popitem(last=False)

    def pop(self, session: Optional[str]) -> Optional[str]:
        with self._lock:
            return self._notes.pop(session, None)

    def __len__(self) -> int:
        return len(self._notes)


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the server the way Ctrl-C does (Gradio closes it and its lifespan cleans up), instead of
    killing the process on the spot. Only the main thread can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
