"""At the headline setting: where the MMoE + heads time goes (backbone timed alone, MMoE + heads timed alone on replayed
backbone features, a profile of one call) and what a task subset costs against all tasks."""

from dataclasses import asdict

import torch

from .measure import count_flops, interleaved_times, median, median_ratio, summarize
from .models import build_model, inference_call, load_config, random_pixels, replay_backbone
from .plan import BenchPlan, SuiteContext
from .formatting import ms, ratio, setting_label, table

KEY = "headline"


def measure(context: SuiteContext) -> dict:
    """Needs the `variants` section: the backbone forward times of the headline setting measured there."""
    plan = context.plan
    headline = next(row for row in context.sections["variants"] if row["setting"] == asdict(plan.headline))
    return headline_decomposition(plan, headline["forward"]["backbone"]["times_s"])


def headline_decomposition(plan: BenchPlan, backbone_times: list[float]) -> dict:
    """At the headline setting: the MMoE + heads time measured alone (backbone replayed), for all tasks and for one
    task, against `backbone_times` (the backbone's forward times of the same run). Low-noise complement of the
    direct forward ratio, and the source of the subset ratio with its FLOP bound."""
    setting = plan.headline
    config = load_config(setting.preset)
    model = build_model(config)
    pixels = random_pixels(setting.batch, setting.image_size)
    meta_model = build_model(config, device="meta")
    meta_pixels = pixels.to("meta")
    flops = {
        "backbone": count_flops(inference_call(meta_model.taskexpert.backbone, meta_pixels)),
        "all_tasks": count_flops(inference_call(meta_model, meta_pixels)),
        "one_task": count_flops(inference_call(meta_model, meta_pixels, tasks=[plan.subset_task])),
    }
    replay_backbone(model, pixels)
    calls = {
        "all_tasks": inference_call(model, pixels),
        "one_task": inference_call(model, pixels, tasks=[plan.subset_task]),
    }
    post = interleaved_times(calls, plan.small_budget_s, max(plan.min_rounds, 5), max_rounds=30)
    backbone_s = median(backbone_times)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        calls["all_tasks"]()
    operators = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total_us = sum(event.self_cpu_time_total for event in operators)
    return {
        "setting": asdict(setting),
        "num_tasks": len(config.tasks),
        "subset_task": plan.subset_task,
        "backbone": summarize(backbone_times, setting.batch),
        "mmoe_and_heads_all_tasks": summarize(post["all_tasks"], setting.batch),
        "mmoe_and_heads_one_task": summarize(post["one_task"], setting.batch),
        "overhead_ratio_decomposed": 1.0 + median(post["all_tasks"]) / backbone_s,
        "subset_vs_all_ratio": median_ratio(post["one_task"], post["all_tasks"]),
        # The same ratio in counted FLOPs: what the work itself allows, whatever the machine.
        "subset_vs_all_flops_ratio": (flops["one_task"] - flops["backbone"]) / (flops["all_tasks"] - flops["backbone"]),
        "overhead_flops_ratio": flops["all_tasks"] / flops["backbone"],
        # Where the MMoE + heads time goes (one profiled call): operator, share of the self CPU time, calls.
        "mmoe_and_heads_profile": [
            {"operator": event.key, "share": event.self_cpu_time_total / total_us, "calls": event.count}
            for event in operators[:8]
        ],
    }


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [("Where the MMoE + heads time goes (headline setting)", _headline_text(section)),
            ("Task-subset inference", _subset_text(section))]  # fmt: skip


def _headline_text(headline: dict) -> str:
    return "\n\n".join([
        f"Setting {setting_label(headline['setting'])}, {headline['num_tasks']} tasks. The backbone is timed alone; the MMoE "
        "layers and heads are timed alone by replaying backbone features computed once (same code path, without the "
        "backbone's cost and noise).",
        f"Counted FLOPs: TaskExpert / backbone = {headline['overhead_flops_ratio']:.3f}.",
        table(["part", "median ms (context)", "ratio to backbone"], [
            ["backbone", ms(headline["backbone"]["median_s"]), "1.00×"],
            ["MMoE + heads, all tasks", ms(headline["mmoe_and_heads_all_tasks"]["median_s"]),
             ratio(headline["mmoe_and_heads_all_tasks"]["median_s"] / headline["backbone"]["median_s"])],
            [f"MMoE + heads, {headline['subset_task']} only", ms(headline["mmoe_and_heads_one_task"]["median_s"]),
             ratio(headline["mmoe_and_heads_one_task"]["median_s"] / headline["backbone"]["median_s"])],
        ]),
        "Profile of one MMoE + heads call (self CPU time by operator):",
        table(["operator", "share", "calls"],
               [[f"`{row['operator']}`", f"{row['share']:.0%}", row["calls"]] for row in headline["mmoe_and_heads_profile"]]),
    ])  # fmt: skip


def _subset_text(headline: dict) -> str:
    return (
        f'`model(pixel_values, tasks=["{headline["subset_task"]}"])` against all {headline["num_tasks"]} tasks at '
        f"{setting_label(headline['setting'])}, on the MMoE + heads part (model minus backbone): "
        f"**{headline['subset_vs_all_ratio']:.2f}** of the all-task cost. The backbone cost is the same for any subset."
    )
