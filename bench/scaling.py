"""MMoE + heads cost as the number of experts, tasks, MMoE layers and the image size grow."""

from pathlib import Path

from dataclasses import asdict

from .measure import count_flops, interleaved_times, median
from .models import build_model, count_parameters, inference_call, load_config, random_pixels, replay_backbone
from .plan import BenchPlan, SuiteContext
from .formatting import millions, ms, pyplot, ratio, save_plot, setting_label, table

KEY = "scaling"
TITLE = "Cost vs experts, tasks, MMoE layers, image size"


def measure(context: SuiteContext) -> dict:
    return scaling(context.plan)


def scaling(plan: BenchPlan) -> dict:
    """MMoE + heads cost as the number of experts, tasks, MMoE layers and the image size grow.

    The backbone is timed once per image size; the MMoE + heads part is timed alone (backbone replayed), and the
    overhead ratio is 1 + part / backbone. FLOPs are counted on the meta device.
    """
    base = plan.sweep
    all_tasks = list(load_config(base.preset).tasks)
    extra_tasks = [
        task for task in ("semseg", "human_parts", "saliency", "normals", "edge", "depth") if task not in all_tasks
    ]
    task_pool = all_tasks + extra_tasks
    sweeps = {
        "num_experts": [(value, {"num_experts": value}, base.image_size) for value in plan.sweep_experts],
        "num_tasks": [(value, {"tasks": task_pool[:value]}, base.image_size) for value in plan.sweep_tasks],
        "num_mmoe_layers": [
            (len(value), {"mmoe_layers": list(value)}, base.image_size) for value in plan.sweep_mmoe_layers
        ],
        "image_size": [(value, {}, value) for value in plan.sweep_image_sizes],
    }
    backbone_cache = {}
    result = {"setting": asdict(base)}
    for axis, points in sweeps.items():
        rows = []
        for value, overrides, size in points:
            config = load_config(base.preset, **overrides)
            model = build_model(config)
            pixels = random_pixels(base.batch, size)
            key = (size, config.mmoe_layers[-1])
            meta_model = build_model(config, device="meta")
            meta_pixels = pixels.to("meta")
            if key not in backbone_cache:
                times = interleaved_times(
                    {"backbone": inference_call(model.taskexpert.backbone, pixels)},
                    plan.small_budget_s,
                    plan.min_rounds,
                )
                backbone_flops = count_flops(inference_call(meta_model.taskexpert.backbone, meta_pixels))
                backbone_cache[key] = (median(times["backbone"]), backbone_flops)
            backbone_s, backbone_flops = backbone_cache[key]
            flops = count_flops(inference_call(meta_model, meta_pixels))
            replay_backbone(model, pixels)
            times = interleaved_times(
                {"part": inference_call(model, pixels)}, plan.small_budget_s, max(plan.min_rounds, 3)
            )
            part_s = median(times["part"])
            rows.append({
                "value": value,
                "image_size": size,
                "mmoe_and_heads_s": part_s,
                "backbone_s": backbone_s,
                "overhead_ratio": 1.0 + part_s / backbone_s,
                "flops_ratio": flops / backbone_flops,
                "parameters": count_parameters(model),
            })  # fmt: skip
        result[axis] = rows
    return result


def write_plots(section, folder: Path) -> dict[str, Path]:
    """Write this suite's PNG plot under `folder`; returns name -> path."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    labels = {
        "num_experts": "experts",
        "num_tasks": "tasks",
        "num_mmoe_layers": "MMoE layers",
        "image_size": "image size (px)",
    }
    for axis, (key, label) in zip(axes, labels.items()):
        rows = section[key]
        values = [row["value"] for row in rows]
        axis.plot(values, [row["overhead_ratio"] for row in rows], "o-", label="time ratio (measured)")
        axis.plot(values, [row["flops_ratio"] for row in rows], "s--", label="FLOP ratio (counted)")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel(label)
        axis.set_ylabel("TaskExpert / backbone")
    axes[0].legend(fontsize=8)
    setting = section["setting"]
    figure.suptitle(
        f"Cost of the MMoE layers and heads relative to the backbone ({setting['preset']}, batch {setting['batch']})"
    )
    return {"scaling": save_plot(figure, folder / "scaling.png")}


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _scaling_text(section, plots))]


def _scaling_text(scaling: dict, plots: dict[str, str]) -> str:
    parts = [
        f"Base: {setting_label(scaling['setting'])} with its published config; one quantity changes at a time. The MMoE + "
        "heads part is timed alone (replayed backbone) and the ratio is 1 + part / backbone."
    ]
    for key, label in (
        ("num_experts", "experts"),
        ("num_tasks", "tasks"),
        ("num_mmoe_layers", "MMoE layers"),
        ("image_size", "image size"),
    ):
        parts.append(table(
            [label, "time ratio", "FLOP ratio", "MMoE + heads ms (context)", "parameters"],
            [[row["value"], ratio(row["overhead_ratio"]), ratio(row["flops_ratio"]), ms(row["mmoe_and_heads_s"]),
              millions(row["parameters"])] for row in scaling[key]],
        ))  # fmt: skip
    parts.append(f"![scaling]({plots['scaling']})")
    return "\n\n".join(parts)
