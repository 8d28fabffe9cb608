"""How many seeds the study needs: the power of the paired t-test, estimated from the pilot's seed noise.

    python -m experiments.power                        # from outputs/experiments-pilot (`make experiments PILOT=1`)

The pilot (`study.PILOT_VARIANTS`, `study.PILOT_SEEDS`) trains the default TaskExpert and two ablations with a few
paired seeds. The standard deviation of their per-seed Δm differences, pooled over the pilot's comparisons, is the
noise a comparison of the full study will see. With it, the number of seeds n at which a paired two-sided t-test at
α = 0.05 detects a true difference of `TARGET_DIFFERENCE` Δm points with probability `TARGET_POWER` follows from the
noncentral t distribution (power = P(|T| > t_{1-α/2, n-1}), T ~ t_{n-1}(δ√n / σ); see `power`). Because a few seeds estimate σ
loosely, the same is computed with an upper confidence bound of σ (χ² with the pooled degrees of freedom). The
runner's `launch.json` gives the CPU time of every pilot run, hence the CPU time of the full study.
"""

import argparse
import contextlib
import math
import statistics
import sys
from pathlib import Path
from typing import Optional

from scipy import integrate, optimize, stats

from modeling_taskexpert.file_utils import write_json_atomic

from . import paired
from .collect import StudyError, aggregate, collect
from .paths import DEFAULT_OUTPUT_ROOTS, REPO_ROOT
from .study import (
    COMPARISONS,
    DESCRIPTIVE_SEEDS,
    DESCRIPTIVE_VARIANTS,
    PLAN_ALPHA,
    PLAN_CLAIM_SEEDS,
    PLAN_EFFECT,
    PLAN_POWER,
    SEEDS,
    SINGLE_TASK,
    VARIANTS,
    study_runs,
)

ALPHA = 1 - paired.CONFIDENCE
TARGET_DIFFERENCE = 1.0  # Δm points the study should resolve
TARGET_POWER = 0.8
SIGMA_UPPER_LEVEL = 0.8  # one-sided confidence of the upper bound of σ
MAX_SEEDS = 1000
POWER_FILE = "power.json"
BIGGER_RECIPE = "hub_configs/synthetic-small.yaml"  # the larger synthetic recipe the study could move to


def power(n: int, sigma: float, difference: float = TARGET_DIFFERENCE, alpha: float = ALPHA) -> float:
    """Probability that the paired two-sided t-test (n seeds, level α) rejects "no difference" when the true mean
    difference is `difference` and the per-seed differences have standard deviation `sigma`.

    T = (Z + λ) / sqrt(V / df) with Z standard normal, V ~ χ²_df and λ = difference·√n/σ, so the power is the mean
    over V of Φ(λ - c·sqrt(V/df)) + Φ(-λ - c·sqrt(V/df)), c = t_{1-α/2, df}: integrated numerically over the quantiles
    u of V (V = F⁻¹(u), u in (0, 1)), which copes with the density's pole at 0 for one degree of freedom and its
    narrow peak for many (integrating over V itself missed most of the mass at one degree of freedom, where it gave
    powers near 0 that are above 1 %; tests/reproduce_results.py, with scipy's noncentral t, found it)."""
    if n < 2:
        return 0.0
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    noncentrality = difference * math.sqrt(n) / sigma

    def rejection(u: float) -> float:
        scale = critical * math.sqrt(stats.chi2.ppf(u, df) / df)
        return stats.norm.cdf(noncentrality - scale) + stats.norm.cdf(-noncentrality - scale)

    value, _ = integrate.quad(rejection, 0.0, 1.0, limit=200)
    return float(min(max(value, 0.0), 1.0))


def required_seeds(sigma: float, difference: float = TARGET_DIFFERENCE, target: float = TARGET_POWER,
                   alpha: float = ALPHA, max_seeds: int = MAX_SEEDS) -> Optional[int]:  # fmt: skip
    """The smallest number of paired seeds with `power >= target` (None beyond `max_seeds`)."""
    for n in range(2, max_seeds + 1):
        if power(n, sigma, difference, alpha) >= target:
            return n
    return None


def detectable_difference(n: int, sigma: float, target: float = TARGET_POWER, alpha: float = ALPHA) -> float:
    """The true difference that n paired seeds detect with probability `target` (the study's resolution)."""
    if n < 2:
        return math.inf
    high = sigma
    while power(n, sigma, high, alpha) < target:  # bracket the root (power grows with the difference)
        high *= 2
    return float(optimize.brentq(lambda d: power(n, sigma, d, alpha) - target, 0.0, high))


def pooled_std(groups: list[list[float]]) -> tuple[float, int]:
    """(pooled standard deviation, degrees of freedom) of several samples, each about its own mean."""
    groups = [group for group in groups if len(group) > 1]
    df = sum(len(group) - 1 for group in groups)
    if df == 0:
        raise ValueError("A pooled standard deviation needs a sample of at least two values.")
    squares = sum(sum((value - sum(group) / len(group)) ** 2 for value in group) for group in groups)
    return math.sqrt(squares / df), df


def sigma_upper_bound(sigma: float, df: int, level: float = SIGMA_UPPER_LEVEL) -> float:
    """One-sided upper confidence bound of a standard deviation estimated with `df` degrees of freedom."""
    return sigma * math.sqrt(df / stats.chi2.ppf(1 - level, df))


def study_cpu_seconds(summary: dict) -> dict:
    """CPU time of the full study from measured runs: the mean CPU time of a run of each kind of model (a TaskExpert-
    size model, a single-task model, Mod-Squad) times the full study's runs of that kind (`study.study_runs`)."""
    per_kind = {}
    for name, entry in summary["variants"].items():
        if entry.get("cpu_seconds"):
            per_kind.setdefault(_cost_kind(name), []).extend([entry["cpu_seconds"][0]] * len(entry["seeds"]))
    per_run = {kind: sum(values) / len(values) for kind, values in per_kind.items()}
    counts = {}
    for run in study_runs("full"):
        counts[_cost_kind(run.variant.name)] = counts.get(_cost_kind(run.variant.name), 0) + 1
    missing = sorted(set(counts) - set(per_run))
    total = sum(per_run[kind] * count for kind, count in counts.items() if kind in per_run)
    return {"per_run_seconds": per_run, "runs": counts, "total_seconds": total, "unmeasured_kinds": missing}


def training_flops(recipe_path: str) -> float:
    """Counted FLOPs of the forward passes of one training run of a synthetic recipe (forward FLOPs of one image at
    its training crop × batch × steps; the backward pass scales both sizes alike), on the meta device."""
    import json

    import torch
    from transformers import AutoConfig, AutoModel

    from bench.measure import count_flops
    from modeling_taskexpert.training import load_recipe

    with contextlib.chdir(REPO_ROOT):
        recipe = load_recipe(recipe_path)
        settings = json.loads(Path(recipe.model_config).read_text())
    settings.update(recipe.model_overrides)
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.for_model(**settings))
    size = settings.get("image_size") or settings["backbone_config"]["image_size"]
    pixel_values = torch.zeros(1, 3, size, size, device="meta")
    with torch.no_grad():
        flops = count_flops(lambda: model(pixel_values=pixel_values))
    return float(flops) * recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps * recipe.max_steps


def bigger_recipe(
    estimate: dict, recipe: str = BIGGER_RECIPE, reference: str = "hub_configs/synthetic-tiny.yaml"
) -> dict:
    """What the study's CPU time buys at a bigger recipe: its cost per run relative to the study's (counted training
    FLOPs), the paired seeds that CPU time affords there, and the paired noise it would need to resolve
    `TARGET_DIFFERENCE` with `TARGET_POWER` at that many seeds (the noise at that size is not measured)."""
    ratio = training_flops(recipe) / training_flops(reference)
    per_run = estimate["cpu"]["per_run_seconds"]
    per_seed = sum(per_run.get(_cost_kind(v.name), 0.0) for v in VARIANTS if v.name not in DESCRIPTIVE_VARIANTS)
    seeds = int(estimate["cpu"]["total_seconds"] // (ratio * per_seed)) if per_seed else 0
    needed = TARGET_DIFFERENCE / detectable_difference(seeds, 1.0) if seeds >= 2 else 0.0
    return {"recipe": recipe, "cost_ratio": ratio, "affordable_seeds": seeds, "sigma_needed": needed,
            "sigma_ratio": estimate["sigma"] / needed if needed else math.inf}  # fmt: skip


def _cost_kind(name: str) -> str:
    variant = next(v for v in VARIANTS if v.name == name)
    return {"single-task": "single-task", "modsquad": "modsquad"}.get(variant.kind, "taskexpert")


def estimate(output_root: Path) -> dict:
    """The power estimate of the study under `output_root` (a pilot, or any study: its own comparisons' noise)."""
    collected = collect(output_root)
    return estimate_from(collected, aggregate(collected))


def estimate_from(collected: dict, summary: dict, study_seeds: Optional[int] = None) -> dict:
    """`estimate` of collected and aggregated runs; the power figures are for `study_seeds` paired seeds (default:
    the planned full study's `SEEDS`)."""
    study_seeds = len(SEEDS) if study_seeds is None else study_seeds
    groups, per_comparison = [], {}
    for comparison in COMPARISONS:
        if comparison.reference == SINGLE_TASK:
            continue  # its noise includes the single-task models', which the pilot trains with one seed
        variant, reference = summary["variants"].get(comparison.variant), summary["variants"].get(comparison.reference)
        if not variant or not reference or not variant.get("delta_m_per_seed") or not reference.get("delta_m_per_seed"):
            continue
        difference = paired.compare({s: v for s, v in variant["delta_m_per_seed"].items() if v is not None},
                                    {s: v for s, v in reference["delta_m_per_seed"].items() if v is not None})  # fmt: skip
        if difference is None or difference.n < 2:
            continue
        groups.append(list(difference.differences.values()))
        per_comparison[comparison.name] = {"n": difference.n, "mean": difference.mean, "std": difference.std,
                                           "variant": comparison.variant, "reference": comparison.reference}  # fmt: skip
    if not groups:
        raise StudyError("No paired comparison with two or more seeds in this study: run the pilot first "
                         "(`python -m experiments.run --pilot`).")  # fmt: skip
    sigma, df = pooled_std(groups)
    upper = sigma_upper_bound(sigma, df)
    cpu = study_cpu_seconds(summary)
    result = {
        "mode": collected["mode"],
        "comparisons": per_comparison,
        "sigma": sigma, "df": df, "sigma_upper": upper, "sigma_upper_level": SIGMA_UPPER_LEVEL,
        "target_difference": TARGET_DIFFERENCE, "target_power": TARGET_POWER, "alpha": ALPHA,
        "required_seeds": required_seeds(sigma), "required_seeds_upper": required_seeds(upper),
        "study_seeds": study_seeds, "planned_seeds": len(SEEDS),
        "power_at_study_seeds": power(study_seeds, sigma),
        "power_at_study_seeds_upper": power(study_seeds, upper),
        "detectable_difference": detectable_difference(study_seeds, sigma),
        "detectable_difference_upper": detectable_difference(study_seeds, upper),
        "cpu": cpu,
    }  # fmt: skip
    result["bigger_recipe"] = bigger_recipe(result)
    return result


def claim_power(results: list[dict], cpu_seconds: list[float], remaining_runs: int) -> dict:
    """The pre-registered study's power, claim by claim, from its own per-seed differences at the seeds run so far:
    σ of the differences, the difference resolved with the plan's power at Holm's strictest level, the power at the
    plan's effect; and the CPU time still needed (`remaining_runs` at the mean CPU time of the runs done)."""
    claims = [r for r in results if r["comparison"].claim]
    alpha = PLAN_ALPHA / len(PLAN_CLAIM_SEEDS)
    per_claim = {}
    for result in claims:
        difference = result["delta_m"]
        if difference is None or difference.std is None or difference.std == 0:
            continue
        per_claim[result["comparison"].name] = {
            "sigma": difference.std, "n": difference.n, "planned": PLAN_CLAIM_SEEDS[result["comparison"].name],
            "resolution": detectable_difference(difference.n, difference.std, PLAN_POWER, alpha),
            "power_at_effect": power(difference.n, difference.std, PLAN_EFFECT, alpha),
        }  # fmt: skip
    mean_cpu = statistics.fmean(cpu_seconds) if cpu_seconds else None
    return {"claims": per_claim, "alpha": alpha, "effect": PLAN_EFFECT, "target_power": PLAN_POWER,
            "remaining_runs": remaining_runs, "mean_cpu_seconds": mean_cpu,
            "remaining_cpu_hours": remaining_runs * mean_cpu / 3600 if mean_cpu is not None else None}  # fmt: skip


def study_plan(estimate: dict, jobs: int, cores: int) -> dict:
    """The full study's command, runs and CPU time, from the power estimate's measured CPU times."""
    cpu = estimate["cpu"]
    runs = sum(cpu["runs"].values())
    hours = cpu["total_seconds"] / 3600
    # Counted at the TaskExpert cost when a kind was not measured (the pilot has no Mod-Squad run, say).
    if cpu["unmeasured_kinds"] and "taskexpert" in cpu["per_run_seconds"]:
        hours += (
            sum(cpu["runs"][kind] for kind in cpu["unmeasured_kinds"]) * cpu["per_run_seconds"]["taskexpert"] / 3600
        )
    return {"command": f"make experiments JOBS={jobs}", "runs": runs, "seeds": dict(PLAN_CLAIM_SEEDS),
            "descriptive_seeds": len(DESCRIPTIVE_SEEDS), "descriptive": list(DESCRIPTIVE_VARIANTS),
            "variants": len(VARIANTS), "cpu_hours": hours, "wall_hours": hours / min(jobs, cores), "cores": cores,
            "jobs": jobs, "unmeasured": cpu["unmeasured_kinds"]}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Seeds needed by the study, from the pilot's paired seed noise.")
    parser.add_argument(
        "--output-root", type=Path, default=Path(DEFAULT_OUTPUT_ROOTS["pilot"]), help="the pilot's runs"
    )
    args = parser.parse_args(argv)
    try:
        with contextlib.chdir(REPO_ROOT):
            result = estimate(args.output_root.resolve())
    except StudyError as error:
        print(f"experiments.power: {error}", file=sys.stderr)
        return 2
    write_json_atomic(args.output_root / POWER_FILE, result)
    print(
        f"pooled σ of paired Δm differences: {result['sigma']:.2f} points ({result['df']} degrees of freedom; "
        f"{SIGMA_UPPER_LEVEL:.0%} upper bound {result['sigma_upper']:.2f})"
    )
    print(
        f"seeds for {TARGET_POWER:.0%} power at a {TARGET_DIFFERENCE:g}-point difference: {result['required_seeds']} "
        f"(upper bound: {result['required_seeds_upper']}); the study has {result['study_seeds']}, which resolve "
        f"{result['detectable_difference']:.2f} points (upper bound {result['detectable_difference_upper']:.2f})"
    )
    print(
        f"full study: {sum(result['cpu']['runs'].values())} runs, about "
        f"{result['cpu']['total_seconds'] / 3600:.1f} CPU-hours"
    )
    bigger = result["bigger_recipe"]
    print(
        f"{bigger['recipe']}: {bigger['cost_ratio']:.1f}x a run's FLOPs; the same CPU time affords {bigger['affordable_seeds']} "
        f"seeds, which resolve {TARGET_DIFFERENCE:g} point only with a paired noise below {bigger['sigma_needed']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
