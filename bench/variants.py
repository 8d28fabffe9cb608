"""TaskExpert vs its bare backbone vs the shared-decoder baseline: forward latency, training-step throughput, FLOPs,
parameters and peak activation memory, at every setting of the plan's grid."""

import gc
from dataclasses import asdict
from pathlib import Path

from .measure import flops_and_peak_memory, interleaved_times, median_ratio, summarize
from .models import (
    build_variants,
    count_parameters,
    inference_call,
    load_config,
    random_labels,
    random_pixels,
    train_step,
)
from .plan import BenchPlan, Setting, SuiteContext
from .formatting import mib, millions, ms, pyplot, ratio, save_plot, setting_label, table

KEY = "variants"
TITLE = "TaskExpert vs backbone vs shared decoder"


def measure(context: SuiteContext) -> list[dict]:
    plan = context.plan
    train_settings = set(plan.train_grid)
    return [compare_variants(setting, plan, setting in train_settings) for setting in plan.grid]


def compare_variants(setting: Setting, plan: BenchPlan, train: bool) -> dict:
    """Forward latency (and, with `train`, training-step throughput) of TaskExpert, the bare backbone and the
    shared-decoder baseline, interleaved; FLOPs, parameters and peak tensor memory of each (from the warm-up call)."""
    config = load_config(setting.preset)
    variants = build_variants(config)
    pixels = random_pixels(setting.batch, setting.image_size)
    result = {
        "setting": asdict(setting),
        "num_tasks": len(config.tasks),
        "num_experts": config.num_experts,
        "parameters": {name: count_parameters(module) for name, module in variants.items()},
    }
    calls = {name: inference_call(module, pixels) for name, module in variants.items()}
    result.update(_compare(calls, "forward", setting, plan.forward_budget_s, plan.min_rounds))
    if train:
        labels = random_labels(config, setting.batch, setting.image_size)
        # Fresh modules: each variant gets its own optimizer and the inference modules stay untouched.
        variants = build_variants(config)
        steps = {name: train_step(module, pixels, labels) for name, module in variants.items()}
        result.update(_compare(steps, "train_step", setting, plan.train_budget_s, plan.min_rounds))
    del variants
    gc.collect()
    return result


def _compare(calls: dict, kind: str, setting: Setting, budget_s: float, min_rounds: int) -> dict:
    """Interleaved timing of the variants' calls; the first call of each also counts FLOPs and peak memory."""
    flops, peaks = {}, {}

    def profile_warm_up(name, function):
        flops[name], peaks[name] = flops_and_peak_memory(function)

    times = interleaved_times(calls, budget_s, min_rounds, warmup_hook=profile_warm_up)
    # Time ratio to the backbone: above 1 means slower; the throughput ratio is its inverse.
    ratios = {name: median_ratio(times[name], times["backbone"]) for name in calls if name != "backbone"}
    return {
        kind: {name: summarize(values, setting.batch) for name, values in times.items()},
        f"{kind}_flops": flops,
        f"{kind}_peak_memory_bytes": peaks,
        f"{kind}_time_ratio_to_backbone": ratios,
    }


def write_plots(section, folder: Path) -> dict[str, Path]:
    """Write this suite's PNG plot under `folder`; returns name -> path."""
    plt = pyplot()
    rows = section
    figure, axis = plt.subplots(figsize=(8, 3.6))
    names = [f"{row['setting']['preset']} {row['setting']['image_size']}²" for row in rows]
    positions = range(len(rows))
    for offset, variant in ((-0.2, "taskexpert"), (0.2, "shared_decoder")):
        axis.bar(
            [p + offset for p in positions],
            [row["forward_time_ratio_to_backbone"][variant] for row in rows],
            0.4,
            label=variant,
        )
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(list(positions), names)
    axis.set_ylabel("forward time / backbone")
    axis.legend(fontsize=8)
    axis.set_title("Forward latency relative to the bare backbone")
    return {"variants": save_plot(figure, folder / "variants.png")}


def sections(section: list[dict], plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _variants_text(section, plots))]


def _variants_text(rows: list[dict], plots: dict[str, str]) -> str:
    forward = table(
        ["setting", "tasks / experts", "params TE / BB / SD", "FLOP ratio TE / SD", "time ratio TE / SD",
         "peak act. MiB TE / BB / SD", "backbone ms (context)"],
        [[setting_label(row["setting"]), f"{row['num_tasks']} / {row['num_experts']}",
          " / ".join(millions(row["parameters"][v]) for v in ("taskexpert", "backbone", "shared_decoder")),
          " / ".join(ratio(row["forward_flops"][v] / row["forward_flops"]["backbone"]) for v in ("taskexpert", "shared_decoder")),
          " / ".join(ratio(row["forward_time_ratio_to_backbone"][v]) for v in ("taskexpert", "shared_decoder")),
          " / ".join(mib(row["forward_peak_memory_bytes"][v]) for v in ("taskexpert", "backbone", "shared_decoder")),
          ms(row["forward"]["backbone"]["median_s"])] for row in rows],
    )  # fmt: skip
    trained = [row for row in rows if "train_step" in row]
    train = table(
        ["setting", "throughput ratio TE / SD", "train FLOP ratio TE / SD", "peak MiB TE / BB / SD",
         "backbone images/s (context)"],
        [[setting_label(row["setting"]),
          " / ".join(ratio(1.0 / row["train_step_time_ratio_to_backbone"][v]) for v in ("taskexpert", "shared_decoder")),
          " / ".join(ratio(row["train_step_flops"][v] / row["train_step_flops"]["backbone"]) for v in ("taskexpert", "shared_decoder")),
          " / ".join(mib(row["train_step_peak_memory_bytes"][v]) for v in ("taskexpert", "backbone", "shared_decoder")),
          f"{row['train_step']['backbone']['items_per_s']:.2f}"] for row in trained],
    )  # fmt: skip
    untrained = [setting_label(row["setting"]) for row in rows if "train_step" not in row]
    return "\n\n".join([
        "TE = TaskExpert (the published `hub_configs/models` config of each size), BB = its bare backbone (the very "
        "backbone module of the model), SD = the shared-decoder baseline. Forward = inference (no gradients). FLOPs "
        "are counted with torch's `FlopCounterMode` (matmuls, convolutions, attention; element-wise work is not "
        "counted). Peak activation memory = the largest total size of live tensors created during the call "
        "(parameters excluded).",
        forward,
        f"![forward ratios]({plots['variants']})",
        "Training step (forward, backward, AdamW), throughput ratio = backbone step time / variant step time (below "
        "1 means fewer images per second than the bare backbone):",
        train,
        (f"Not timed in this mode (minutes per step on this machine; run `python bench/run.py --full`): "
         f"{', '.join(untrained)}.") if untrained else "",
    ])  # fmt: skip
