"""The benchmark's targets: which measured quantity each bounds, how it is read from the suites' sections, and the
notes that explain each value (and what bounds a missed one)."""

from dataclasses import asdict
from typing import Optional

from .plan import BenchPlan
from .formatting import setting_label

# Targets of the issue, as (results key, comparison, bound).
TARGETS = {
    "mmoe_overhead_ratio": ("<=", 1.15),
    "batched_vs_loop_speedup": (">=", 3.0),
    "subset_vs_all_ratio": ("<=", 0.5),
    "data_vs_train_rate_ratio": (">=", 2.0),
    "memory_growth_mib": ("<=", 1.0),
}

TARGET_DESCRIPTIONS = {
    "mmoe_overhead_ratio": "TaskExpert forward / bare backbone forward (headline setting)",
    "batched_vs_loop_speedup": "per-expert loop time / batched experts time (first loop setting, middle expert count)",
    "subset_vs_all_ratio": "MMoE + heads time, one task / all tasks (headline setting)",
    "data_vs_train_rate_ratio": "data loader samples/s (most workers) / tiny model train-step images/s",
    "memory_growth_mib": "largest RSS growth over the repeated inference calls (MiB)",
}


def target_values(sections: dict, plan: BenchPlan) -> dict:
    """The value of every target (and the related ratios the notes quote) from the measured sections."""
    headline = next(row for row in sections["variants"] if row["setting"] == asdict(plan.headline))
    loop_rows = [row for row in sections["batched_vs_loop"] if row["setting"] == asdict(plan.loop_settings[0])]
    middle_experts = plan.num_experts_sweep[len(plan.num_experts_sweep) // 2]
    growth = sections["memory_growth"]
    return {
        "mmoe_overhead_ratio": headline["forward_time_ratio_to_backbone"]["taskexpert"],
        "shared_decoder_overhead_ratio": headline["forward_time_ratio_to_backbone"]["shared_decoder"],
        "mmoe_overhead_ratio_decomposed": sections["headline"]["overhead_ratio_decomposed"],
        "batched_vs_loop_speedup": next(row["speedup"] for row in loop_rows if row["num_experts"] == middle_experts),
        "subset_vs_all_ratio": sections["headline"]["subset_vs_all_ratio"],
        "data_vs_train_rate_ratio": sections["data_pipeline"]["loader_vs_train_rate"][
            sections["data_pipeline"]["target_workers"]
        ],
        "memory_growth_mib": max(growth[name]["growth_bytes"] for name in ("model", "pipeline")) / 2**20,
    }


def assess(values: dict) -> dict:
    return {
        key: {
            "value": values[key],
            "comparison": comparison,
            "bound": bound,
            "met": meets(values[key], comparison, bound),
        }
        for key, (comparison, bound) in TARGETS.items()
    }


def meets(value: Optional[float], comparison: str, bound: float) -> Optional[bool]:
    if value is None:
        return None
    return value <= bound if comparison == "<=" else value >= bound


def target_notes(results: dict) -> str:
    sections = results["sections"]
    notes = []
    headline = sections["headline"]
    notes.append(
        f"- **MMoE overhead**: measured directly as {results['mmoe_overhead_ratio']:.3f} (TaskExpert and backbone "
        f"forwards interleaved); the low-noise decomposition (backbone timed alone, MMoE + heads timed alone on "
        f"replayed backbone features) gives {results['mmoe_overhead_ratio_decomposed']:.3f}. The shared-decoder "
        f"baseline costs {results['shared_decoder_overhead_ratio']:.3f}× the backbone in the same run."
    )
    loop = [row for row in sections["batched_vs_loop"] if row["setting"] == sections["batched_vs_loop"][0]["setting"]]
    notes.append(
        "- **Batched experts**: "
        + ", ".join(f"{row['speedup']:.1f}× at {row['num_experts']} experts" for row in loop)
        + f" ({setting_label(loop[0]['setting'])}, {loop[0]['num_tokens']} tokens); outputs match the loop "
        f"({'all' if all(row['outputs_match'] for row in sections['batched_vs_loop']) else 'NOT all'} settings)."
    )
    notes.append(
        f"- **Task subset**: one task ({headline['subset_task']}) costs {results['subset_vs_all_ratio']:.2f} of all "
        f"{headline['num_tasks']} tasks in the MMoE + heads part ({headline['subset_vs_all_flops_ratio']:.2f} in counted "
        "FLOPs): the per-task gates, memory and head are computed only for the requested task, while the experts are "
        "shared by all tasks and computed once whatever the subset."
    )
    data = sections["data_pipeline"]
    notes.append(
        f"- **Data loading**: {results['data_vs_train_rate_ratio']:.2f}× the training-step rate with "
        f"{data['target_workers'].replace('_', ' ')} on {results['machine']['cpu_count']} cores. Workers and the "
        "training step compete for the same cores in a real run; the measured rates are each alone."
    )
    notes.append(
        f"- **Memory**: RSS changed by {results['memory_growth_mib']:.1f} MiB at most over "
        f"{sections['memory_growth']['model']['calls']} model and {sections['memory_growth']['pipeline']['calls']} "
        "pipeline calls (after a warm-up); see the trace below."
    )
    missed = [key for key, target in results["targets"].items() if not target["met"]]
    if missed:
        notes.append(
            "- Missed targets and what bounds them: " + "; ".join(_missed_reason(key, results) for key in missed) + "."
        )
    return "\n".join(notes)


def _missed_reason(key: str, results: dict) -> str:
    sections = results["sections"]
    if key == "mmoe_overhead_ratio":
        top = sections["headline"]["mmoe_and_heads_profile"][:3]
        hot = ", ".join(f"{row['operator']} {row['share']:.0%}" for row in top)
        decomposed = results.get("mmoe_overhead_ratio_decomposed")
        within = (f"the low-noise decomposition gives {decomposed:.3f}, within the target, while the direct ratio of two "
                  "full forwards carries the run-to-run noise of the shared machine; "
                  if decomposed is not None and decomposed <= results["targets"][key]["bound"] else "")  # fmt: skip
        return (f"`{key}`: {within}the counted FLOPs alone give {sections['headline']['overhead_flops_ratio']:.3f}, the "
                f"floor of this ratio on a compute-bound CPU; the MMoE + heads time is dominated by {hot} (profile below)")  # fmt: skip
    if key == "batched_vs_loop_speedup":
        return (f"`{key}`: batching saves per-expert dispatch and small-matmul inefficiency, but both paths do the "
                "same FLOPs; where each expert's matmul is already large enough to saturate the cores, the gain is "
                "bounded by the FLOPs")  # fmt: skip
    if key == "subset_vs_all_ratio":
        return (f"`{key}`: the experts are task-generic and computed once for any subset, so the ratio is bounded "
                f"below by the experts' share of the part: in counted FLOPs one task is already "
                f"{sections['headline']['subset_vs_all_flops_ratio']:.2f} of all tasks, and no implementation of this "
                "architecture can go below that without skipping experts")  # fmt: skip
    if key == "data_vs_train_rate_ratio":
        return (f"`{key}`: the loader's rate is bounded by the NumPy augmentation per sample on few cores; "
                "more workers (cores) raise it")  # fmt: skip
    return f"`{key}`: see its section"
