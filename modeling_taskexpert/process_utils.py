"""Worker processes that end with the process that started them. Standard library only; used by the pools of the
evaluation (boundary scoring) and of the dataset writer.

A pool worker waits on its task queue, and nothing tells it when its parent is killed (SIGKILL, or SIGTERM without a
handler): it holds both ends of the queue's pipe, so it never reads end-of-file, and it waits forever. Each worker
therefore runs `end_with_parent(parent_pid)` first (as the pool's `initializer`):

- on Linux the kernel sends it SIGKILL when its parent ends (`PR_SET_PDEATHSIG`), even in the middle of a long call
  into compiled code that holds the GIL. The kernel counts the *thread* that started the worker as its parent: a pool
  must be used from a thread that outlives it (the main thread, in the package);
- everywhere, a daemon thread checks every `PARENT_POLL_SECONDS` that the parent is still the one it started under
  (the fallback where the signal cannot be set, and a guard against a parent that ended before the signal was set).
"""

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

# How often the fallback checks that the parent is still alive.
PARENT_POLL_SECONDS = 0.5
# From <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


def end_with_parent(parent_pid: int) -> None:
    """Make the calling process (a pool worker) end as soon as the process `parent_pid` that started it ends."""
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent ended before the signal was set: nobody is waiting for this worker
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _set_parent_death_signal(number: int) -> bool:
    """Ask the kernel to send `number` to this process when its parent ends (Linux only); True when it is set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(number), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    # Once the parent ends, the worker is re-parented (to init or a subreaper), so its parent pid changes.
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)
