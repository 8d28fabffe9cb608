"""Instruments: interleaved timing with medians, FLOP counting, peak tensor memory, process RSS, machine facts.

Timings on a shared machine drift (other processes, frequency scaling). Every comparison therefore runs its
variants interleaved (A B C, A B C, ...), and ratios are medians of per-round ratios, so a slow period affects
both sides of a ratio alike.
"""

import datetime
import os
import platform
import resource
import statistics
import time
import weakref
from typing import Callable, Optional

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from modeling_taskexpert.training.provenance import cpu_model

try:  # psutil reads the current RSS portably; /proc/self/statm is the fallback on Linux.
    import psutil
except ImportError:  # pragma: no cover - psutil ships with the test extra
    psutil = None


def interleaved_times(
    functions: dict[str, Callable[[], object]],
    budget_s: float,
    min_rounds: int = 2,
    max_rounds: int = 20,
    warmup: int = 1,
    warmup_hook: Optional[Callable[[str, Callable[[], object]], None]] = None,
) -> dict[str, list[float]]:
    """Time every function in rounds (one call of each per round, in rotating order) and return the seconds.

    `warmup` untimed calls of each function come first (`warmup_hook(name, fn)`, when given, replaces the first
    one, e.g. to run it under a FLOP counter). The number of rounds fits `budget_s` from the warm-up duration,
    within [min_rounds, max_rounds].
    """
    names = list(functions)
    start = time.perf_counter()
    for name in names:
        for index in range(warmup):
            if index == 0 and warmup_hook is not None:
                warmup_hook(name, functions[name])
            else:
                functions[name]()
    per_round = max((time.perf_counter() - start) / max(warmup, 1), 1e-6)
    rounds = int(min(max(budget_s // per_round, min_rounds), max_rounds))
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            tic = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - tic)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (both from the same `interleaved_times` call)."""
    return median([a / b for a, b in zip(numerator, denominator)])


def summarize(times: list[float], items_per_call: int = 1) -> dict:
    """Median seconds per call, spread (min, max) and items per second at the median."""
    middle = median(times)
    return {
        "median_s": middle,
        "min_s": float(min(times)),
        "max_s": float(max(times)),
        "rounds": len(times),
        "items_per_s": items_per_call / middle,
        "times_s": [float(value) for value in times],
    }


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmuls, convolutions and attention; a
    multiply-add is 2 FLOPs; element-wise operations are not counted)."""
    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


class PeakTensorMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storage allocated while the mode is active (parameters and inputs excluded).

    Counts every storage an operator creates and frees it when the storage dies, so the number is the
    allocator-independent size of the live activations (and, in a training step, the saved tensors and gradients).
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live = WeakIdKeyDictionary()

    def _release(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(output)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage in self._live or storage.nbytes() == 0:
                continue  # a view of a storage that is already counted
            self._live[storage] = True
            self.current += storage.nbytes()
            weakref.finalize(storage, self._release, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return output


def flops_and_peak_memory(function: Callable[[], object]) -> tuple[int, int]:
    """FLOPs (as `count_flops`) and peak bytes of tensors allocated (see `PeakTensorMemory`) of one call."""
    with FlopCounterMode(display=False) as counter, PeakTensorMemory() as tracker:
        function()
    return int(counter.get_total_flops()), int(tracker.peak)


def resident_memory_bytes() -> int:
    """Current resident set size of this process."""
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_memory_bytes() -> int:
    """High-water mark of the resident set size of this process (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def machine_info() -> dict:
    """Facts about the machine and the library versions, without any path of the machine."""
    import numpy
    import transformers

    memory_bytes = None
    try:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_bytes / 2**30, 1) if memory_bytes else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info
