"""Resident memory before and after many inference calls, through the model and through the pipeline."""

import gc
from dataclasses import asdict
from pathlib import Path

import torch

from .measure import resident_memory_bytes
from .models import build_model, inference_call, load_config, random_pixels
from .pipeline_end_to_end import _build_pipeline
from .plan import BenchPlan, SuiteContext
from .formatting import mib, pyplot, save_plot, setting_label, table

KEY = "memory_growth"
TITLE = "Memory over repeated inference"


def measure(context: SuiteContext) -> dict:
    return memory_growth(context.plan)


def memory_growth(plan: BenchPlan) -> dict:
    """Resident memory before and after many inference calls, through the model and through the pipeline.

    Runs on one thread: the check is about memory, and on a shared machine a second thread makes every small
    operator wait for it to be scheduled, which multiplies the time of the many calls.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _memory_growth(plan)
    finally:
        torch.set_num_threads(threads)


def _memory_growth(plan: BenchPlan) -> dict:
    setting = plan.memory_setting
    config = load_config(setting.preset)
    model = build_model(config)
    pixels = random_pixels(setting.batch, setting.image_size)
    pipe, image = _build_pipeline(setting)
    result = {"setting": asdict(setting)}
    for name, call, count in (
        ("model", inference_call(model, pixels), plan.memory_model_calls),
        ("pipeline", lambda: pipe(image), plan.memory_pipeline_calls),
    ):
        for _ in range(max(count // 20, 2)):  # warm-up: allocator caches and lazy initialisation settle first
            call()
        gc.collect()
        trace = [resident_memory_bytes()]
        checkpoints = max(count // 10, 1)
        for index in range(count):
            call()
            if (index + 1) % checkpoints == 0:
                if index + 1 == count:
                    gc.collect()  # the final reading without collectable garbage, like the first
                trace.append(resident_memory_bytes())
        result[name] = {
            "calls": count,
            "rss_before_bytes": trace[0],
            "rss_after_bytes": trace[-1],
            "growth_bytes": trace[-1] - trace[0],
            "rss_trace_bytes": trace,
        }
    return result


def write_plots(section, folder: Path) -> dict[str, Path]:
    """Write this suite's PNG plot under `folder`; returns name -> path."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.6))
    growth = section
    for name in ("model", "pipeline"):
        trace = growth[name]["rss_trace_bytes"]
        calls = [growth[name]["calls"] * index / (len(trace) - 1) for index in range(len(trace))]
        axis.plot(calls, [(value - trace[0]) / 2**20 for value in trace], "o-", label=f"through the {name}")
    axis.set_xlabel("inference calls")
    axis.set_ylabel("RSS change (MiB)")
    axis.legend(fontsize=8)
    axis.set_title("Resident memory over repeated inference")
    return {"memory_growth": save_plot(figure, folder / "memory_growth.png")}


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _memory_text(section, plots))]


def _memory_text(growth: dict, plots: dict[str, str]) -> str:
    return "\n\n".join([
        f"Repeated inference at {setting_label(growth['setting'])}; RSS after a warm-up, then every tenth of the calls.",
        table(["through", "calls", "RSS before MiB", "RSS after MiB", "growth MiB"],
               [[name, growth[name]["calls"], mib(growth[name]["rss_before_bytes"]), mib(growth[name]["rss_after_bytes"]),
                 f"{growth[name]['growth_bytes'] / 2**20:.2f}"] for name in ("model", "pipeline")]),
        f"![memory]({plots['memory_growth']})",
    ])  # fmt: skip
