"""Accelerator part of the benchmark (`python bench/run.py --gpu`): bf16 training-step throughput and MFU of
TaskExpert with SDPA and eager attention, with and without torch.compile, and bf16 forward ratios."""

import time
from dataclasses import asdict
from typing import Callable, Optional

import torch

from .measure import count_flops, interleaved_times, median, median_ratio, summarize
from .models import build_model, inference_call, load_config, random_labels, random_pixels, train_step
from .plan import Setting, SuiteContext
from .formatting import mib, ratio, setting_label, table

# Dense bf16 tensor-core peak of common data-centre GPUs (FLOP/s, no sparsity), keyed by a name fragment.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def peak_bf16_flops(device_name: str) -> Optional[float]:
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


def _synchronized(function: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def call():
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def gpu_suite(
    setting: Setting,
    device: str = "cuda",
    compile_options: tuple[bool, ...] = (False, True),
    peak_flops: Optional[float] = None,
    budget_s: float = 20.0,
    min_rounds: int = 3,
) -> dict:
    """Measure on `device` (a CUDA device; the CPU works too, for testing the code path).

    Training: bf16 autocast steps of TaskExpert for each attention implementation of the ViT backbone, eager and
    (with `compile_options`) under torch.compile; MFU = counted training FLOPs per second / the device's peak bf16
    FLOP/s (`peak_flops`, or the table above for known devices). Inference: bf16 forward of TaskExpert, its bare
    backbone and one task, interleaved.
    """
    device = torch.device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = peak_flops or (peak_bf16_flops(device_name) if device.type == "cuda" else None)
    config = load_config(setting.preset)
    pixels = random_pixels(setting.batch, setting.image_size, device=str(device))
    labels = random_labels(config, setting.batch, setting.image_size, device=str(device))

    # FLOPs of one training step (forward and backward), counted without compilation.
    counting_model = build_model(config, device=str(device))
    train_flops = count_flops(train_step(counting_model, pixels, labels, autocast_dtype=torch.bfloat16))
    del counting_model

    steps, compile_seconds, peak_memory = {}, {}, {}
    for attention in ATTENTION_IMPLEMENTATIONS:
        for compiled in compile_options:
            name = f"{attention}{'+compile' if compiled else ''}"
            model = build_model(config, device=str(device))
            model.taskexpert.backbone.model.set_attn_implementation(attention)
            module = torch.compile(model) if compiled else model
            step = _synchronized(train_step(module, pixels, labels, autocast_dtype=torch.bfloat16), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tic = time.perf_counter()
            step()  # compiles, when compiled
            compile_seconds[name] = time.perf_counter() - tic
            if device.type == "cuda":
                peak_memory[name] = int(torch.cuda.max_memory_allocated(device))
            steps[name] = step
    times = interleaved_times(steps, budget_s, min_rounds)
    training = {}
    for name, values in times.items():
        summary = summarize(values, setting.batch)
        achieved = train_flops / summary["median_s"]
        summary.update(
            first_step_s=compile_seconds[name],
            achieved_tflops=achieved / 1e12,
            mfu=achieved / peak_flops if peak_flops else None,
            peak_memory_bytes=peak_memory.get(name),
        )
        training[name] = summary

    model = build_model(config, device=str(device))
    forward_calls = {
        "taskexpert": inference_call(model, pixels),
        "backbone": inference_call(model.taskexpert.backbone, pixels),
        "one_task": inference_call(model, pixels, tasks=[config.tasks[0]]),
    }
    bf16_calls = {name: _synchronized(_autocast(call, device), device) for name, call in forward_calls.items()}
    forward_times = interleaved_times(bf16_calls, budget_s / 2, min_rounds)
    return {
        "device": device_name,
        "setting": asdict(setting),
        "peak_bf16_flops": peak_flops,
        "train_step_flops": train_flops,
        "train_step": training,
        "compile_speedup": {
            attention: median_ratio(times[attention], times[f"{attention}+compile"])
            for attention in ATTENTION_IMPLEMENTATIONS
            if f"{attention}+compile" in times
        },
        "sdpa_vs_eager_speedup": median_ratio(times["eager"], times["sdpa"]),
        "forward_bf16": {name: summarize(values, setting.batch) for name, values in forward_times.items()},
        "mmoe_overhead_ratio_bf16": median_ratio(forward_times["taskexpert"], forward_times["backbone"]),
        "one_task_vs_all_forward_ratio_bf16": median_ratio(forward_times["one_task"], forward_times["taskexpert"]),
        "backbone_forward_s": median(forward_times["backbone"]),
    }


def _autocast(function: Callable[[], object], device: torch.device) -> Callable[[], object]:
    def call():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return function()

    return call


KEY = "gpu"
TITLE = "GPU"
GPU_COMMAND = "python bench/run.py --gpu"


def measure(context: SuiteContext) -> dict:
    """The accelerator part when asked for and possible; otherwise the reason it was skipped."""
    args, plan = context.args, context.plan
    if not getattr(args, "gpu", False):
        return {"skipped": "not requested (run with --gpu on a machine with a CUDA device)"}
    if not torch.cuda.is_available():
        return {"skipped": "--gpu was given but no CUDA device is available"}
    setting = Setting(plan.headline.preset, plan.headline.image_size, 2 if args.quick else 8)
    peak = args.gpu_peak_tflops * 1e12 if args.gpu_peak_tflops else None
    return gpu_suite(setting, "cuda", compile_options=(False,) if args.no_compile else (False, True), peak_flops=peak)


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _gpu_text(section))]


def _gpu_text(gpu: dict) -> str:
    if "skipped" in gpu:
        return (
            f"**Not measured in this run** ({gpu['skipped']}). On a machine with a CUDA device, "
            f"`{GPU_COMMAND}` adds: bf16 (autocast) training-step throughput of the headline model at batch 8 with SDPA "
            "and eager attention, each with and without `torch.compile`; MFU from the counted training FLOPs and the "
            "device's peak bf16 FLOP/s (`--gpu-peak-tflops` for devices not in `bench/gpu.py`); bf16 forward ratios "
            "(TaskExpert / backbone, one task / all tasks)."
        )
    rows = [[name, f"{row['items_per_s']:.1f}", f"{row['achieved_tflops']:.1f}",
             "—" if row["mfu"] is None else f"{row['mfu']:.1%}", mib(row["peak_memory_bytes"]), f"{row['first_step_s']:.1f}"]
            for name, row in gpu["train_step"].items()]  # fmt: skip
    return "\n\n".join(
        [
            f"Device: {gpu['device']}, {setting_label(gpu['setting'])}, bf16 autocast.",
            table(["attention / compile", "images/s", "TFLOP/s", "MFU", "peak MiB", "first step s"], rows),
            f"torch.compile speedup: {', '.join(f'{k} {ratio(v)}' for k, v in gpu['compile_speedup'].items()) or '—'}; "
            f"SDPA vs eager attention: {ratio(gpu['sdpa_vs_eager_speedup'])}; bf16 forward TaskExpert / backbone: "
            f"{ratio(gpu['mmoe_overhead_ratio_bf16'])}; one task / all tasks (whole forward): "
            f"{ratio(gpu['one_task_vs_all_forward_ratio_bf16'])}.",
        ]
    )
