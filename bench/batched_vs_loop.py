"""The batched experts (`TaskExpertExperts.forward`) against the per-expert reference loop, same weights and inputs."""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from modeling_taskexpert.modeling_taskexpert import TaskExpertExperts
from modeling_taskexpert.testing_utils import taskexpert_experts_loop

from .measure import interleaved_times, median_ratio, summarize
from .models import load_config
from .plan import BenchPlan, SuiteContext
from .formatting import pyplot, ratio, save_plot, setting_label, table

KEY = "batched_vs_loop"
TITLE = "Batched experts vs a per-expert loop"


def measure(context: SuiteContext) -> list[dict]:
    return batched_vs_loop(context.plan)


def batched_vs_loop(plan: BenchPlan) -> list[dict]:
    """The batched experts (`TaskExpertExperts.forward`) against the per-expert reference loop
    (`testing_utils.taskexpert_experts_loop`), same weights, on the tokens of an MMoE layer of each setting."""
    rows = []
    for setting in plan.loop_settings:
        config = load_config(setting.preset)
        channels = config.backbone_config.hidden_size
        grid = (setting.image_size // config.patch_size,) * 2
        tokens = torch.randn(setting.batch, grid[0] * grid[1], channels, generator=torch.Generator().manual_seed(0))
        for experts in plan.num_experts_sweep:
            torch.manual_seed(0)
            module = TaskExpertExperts(load_config(setting.preset, num_experts=experts), channels).eval()
            for weight in (module.fc1_weight, module.fc2_weight):
                torch.nn.init.normal_(weight, std=0.02)
            with torch.inference_mode():
                batched, looped = module(tokens, grid), taskexpert_experts_loop(module, tokens, grid)
                max_difference = float((batched - looped).abs().max())
                times = interleaved_times(
                    {
                        "batched": lambda: module(tokens, grid),
                        "loop": lambda: taskexpert_experts_loop(module, tokens, grid),
                    },
                    plan.small_budget_s,
                    max(plan.min_rounds, 5),
                    max_rounds=50,
                )
            rows.append({
                "setting": asdict(setting),
                "num_experts": experts,
                "in_channels": channels,
                "expert_hidden_size": config.expert_hidden_size,
                "num_tokens": grid[0] * grid[1],
                "outputs_match": bool(torch.allclose(batched, looped, rtol=1e-4, atol=1e-5)),
                "max_abs_difference": max_difference,
                "batched": summarize(times["batched"]),
                "loop": summarize(times["loop"]),
                "speedup": median_ratio(times["loop"], times["batched"]),
            })  # fmt: skip
    return rows


def write_plots(section, folder: Path) -> dict[str, Path]:
    """Write this suite's PNG plot under `folder`; returns name -> path."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.6))
    loop_rows = section
    for setting_key in dict.fromkeys(json.dumps(row["setting"], sort_keys=True) for row in loop_rows):
        subset = [row for row in loop_rows if json.dumps(row["setting"], sort_keys=True) == setting_key]
        setting = json.loads(setting_key)
        axis.plot([row["num_experts"] for row in subset], [row["speedup"] for row in subset], "o-",
                  label=f"{setting['preset']} {setting['image_size']}² b{setting['batch']}")  # fmt: skip
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("experts")
    axis.set_ylabel("loop time / batched time")
    axis.legend(fontsize=8)
    axis.set_title("Batched experts vs per-expert loop")
    return {"batched_vs_loop": save_plot(figure, folder / "batched_vs_loop.png")}


def sections(section: list[dict], plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _loop_text(section, plots))]


def _loop_text(rows: list[dict], plots: dict[str, str]) -> str:
    return "\n\n".join([
        "`TaskExpertExperts.forward` (first layer one matmul for all experts, second layer one batched matmul) "
        "against `taskexpert_experts_loop` (one expert at a time), same weights and inputs, on the tokens of one MMoE layer.",
        table(
            ["setting", "tokens", "C → D", "experts", "speedup", "outputs match (max abs diff)"],
            [[setting_label(row["setting"]), row["num_tokens"], f"{row['in_channels']} → {row['expert_hidden_size']}",
              row["num_experts"], ratio(row["speedup"]), f"{row['outputs_match']} ({row['max_abs_difference']:.1e})"]
             for row in rows],
        ),
        f"![batched vs loop]({plots['batched_vs_loop']})",
    ])  # fmt: skip
