"""Writing the study's report: figures, `docs/results.md` and the reading notes (`experiments/study_notes.md`).

Every number on the page is formatted here from the collected, aggregated and measured values: the notes are
sentences chosen by the computed verdicts, with the numbers filled in.
"""

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from modeling_taskexpert.evaluation import PRIMARY_METRICS
from modeling_taskexpert.file_utils import atomic_write
from modeling_taskexpert.task_definitions import TASKS

from . import paired, power
from .collect import UNRECORDED, revisions
from .paths import MEASUREMENTS_FILE, STUDY_BEST_MODEL_DIR
from .study import COMPARISONS, PLAN_CLAIM_SEEDS, SECONDARY_EXCLUDED_TASKS, SINGLE_TASK
from .table import STUDY_TABLE

UNITS = "Units: mIoU and maxF/odsF in %, normals in degrees, depth in metres"


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class StudyReport:
    """Everything the report and its notes are written from, computed by `experiments.report.build_report`.

    collected/summary: the runs (`collect.collect`) and their aggregate (`collect.aggregate`); results: the paired
    comparisons (`collect.comparisons`); costs/usage: parameters, FLOPs and routing of the study's models; figures:
    paths of the figures, relative to the report; estimate/plan: the power estimate and the study plan built from it
    (`power.study_plan`), or `no_estimate` saying why there is none; pairing: the augmentation-pairing measurement;
    best: the run copied for the Space; gpu_recipes: the costs of the GPU recipes; recipe: the study's training size."""

    collected: dict
    summary: dict
    results: list
    costs: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    estimate: Optional[dict] = None
    pairing: Optional[dict] = None
    plan: Optional[dict] = None
    no_estimate: Optional[str] = None
    best: Optional[dict] = None
    gpu_recipes: list = field(default_factory=list)
    recipe: Optional[dict] = None  # {"max_steps", "images_per_step"} of the default TaskExpert's recipe
    claim_power: Optional[dict] = None  # the pre-registered study's power per claim (`power.claim_power`)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    _pyplot().close(figure)


def _mean_curve(curves: list[list]) -> tuple[list[int], list[float]]:
    """Mean over seeds of the logged training loss at the steps every seed logged ([[step, loss], ...] per seed)."""
    per_seed = [dict((step, loss) for step, loss in curve) for curve in curves]
    steps = sorted(set.intersection(*(set(curve) for curve in per_seed))) if per_seed else []
    return steps, [statistics.fmean(curve[step] for curve in per_seed) for step in steps]


def plot_curves(collected: dict, training_loss: dict, path: Path) -> None:
    """Training loss of every model (seed mean over the seeds of `training_loss`: variant -> seed -> curve), the
    multi-task models and the single-task ones side by side."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5), squeeze=False)
    for number, (name, variant) in enumerate(collected["variants"].items()):
        curves = list((training_loss.get(name) or {}).values())
        if not curves:
            continue
        axis = axes[0][1] if variant["kind"] == "single-task" else axes[0][0]
        axis.plot(*_mean_curve(curves), linewidth=1, label=f"{name} ({len(curves)} seeds)", color=f"C{number % 10}")
    axes[0][0].set_title("training loss, multi-task models (mean over seeds)", fontsize=9)
    axes[0][1].set_title("training loss, single-task models (mean over seeds)", fontsize=9)
    for axis in axes[0]:
        axis.set_yscale("log")
        axis.set_xlabel("step")
        if axis.get_lines():
            axis.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path)


def plot_paired_differences(results: list[dict], path: Path) -> None:
    """One row per comparison: every seed's paired difference (dots), their mean and 95 % interval (bar), for Δm and
    each task's primary metric (positive = the first model of the comparison is better)."""
    plt = _pyplot()
    tasks = [t for t in TASKS if any(t in r["per_task"] for r in results)]
    panels = [("Δm (points)", lambda r: r["delta_m"])] + [
        (f"{t}: {PRIMARY_METRICS[t][0].split('/')[1]}", lambda r, t=t: r["per_task"][t]["difference"] if t in r["per_task"] else None)
        for t in tasks
    ]  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 2.5, 0.45 * len(results) + 1.4),
                                squeeze=False, sharey=True)  # fmt: skip
    labels = [f"{r['comparison'].variant} − {_reference_label(r['comparison'].reference)}" for r in results]
    for axis, (title, pick) in zip(axes[0], panels):
        for row, result in enumerate(results):
            difference = pick(result)
            if difference is None:
                continue
            y = len(results) - 1 - row
            values = list(difference.differences.values())
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            axis.scatter(values, [y + j for j in jitter], s=10, color="C0", alpha=0.7, zorder=3)
            if difference.low is not None:
                axis.plot([difference.low, difference.high], [y, y], color="black", linewidth=2, zorder=2)
            axis.plot([difference.mean], [y], marker="|", color="black", markersize=12, zorder=4)
        axis.axvline(0.0, color="grey", linewidth=0.8)
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(results)), labels[::-1], fontsize=7)
    figure.suptitle("Per-seed paired differences (dots), mean and 95 % t interval (bar); right of 0 = first model better",
                    fontsize=9)  # fmt: skip
    figure.tight_layout()
    save_figure(figure, path)


def plot_routing(name: str, usage: dict, path: Path) -> None:
    """One heat map per routing layer: tasks (rows) by candidates (columns), the mean weight of each."""
    plt = _pyplot()
    tasks = list(usage["tasks"])
    layers = usage["layers"]
    width = sum(0.45 * len(candidates) + 0.8 for candidates in usage["candidates"]) + 1.5
    figure, axes = plt.subplots(1, len(layers), figsize=(width, 0.4 * len(tasks) + 1.8), squeeze=False)
    for index, layer in enumerate(layers):
        matrix = np.array([usage["tasks"][task]["mean_weight"][index] for task in tasks])
        axis = axes[0][index]
        axis.imshow(matrix, vmin=0, vmax=max(matrix.max(), 1e-9), cmap="viridis", aspect="auto")
        axis.set_xticks(range(matrix.shape[1]), usage["candidates"][index], fontsize=6, rotation=90)
        axis.set_yticks(range(len(tasks)), tasks if index == 0 else [""] * len(tasks), fontsize=7)
        axis.set_title(f"{name}: {layer}", fontsize=8)
        for (row, column), value in np.ndenumerate(matrix):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=5,
                      color="white" if value < matrix.max() / 2 else "black")  # fmt: skip
    figure.tight_layout()
    save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------
def _format(value: Optional[tuple], digits: int = 2) -> str:
    if value is None:
        return "n/a"
    mean, std = value
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval(difference: Optional[paired.PairedDifference], digits: int = 2) -> str:
    if difference is None:
        return "n/a"
    if difference.low is None:
        return f"{difference.mean:+.{digits}f} (one seed)"
    return f"{difference.mean:+.{digits}f} [{difference.low:+.{digits}f}, {difference.high:+.{digits}f}]"


def _p(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _seeds_cell(result: dict, mode: str) -> str:
    """Paired seeds of a claim, "n of N" against the plan in the full study."""
    n = result["delta_m"].n if result["delta_m"] else 0
    return f"{n} of {PLAN_CLAIM_SEEDS[result['comparison'].name]}" if mode == "full" else str(n)


def _reference_label(reference: str) -> str:
    return "single-task models" if reference == SINGLE_TASK else reference


def _revision_text(collected: dict) -> str:
    found = revisions(collected)
    if len(found) == 1:
        revision = next(iter(found))
        return "all runs: " + ("not recorded (runs without provenance.json)" if revision == UNRECORDED else revision)
    return "**mixed** (reported with --allow-mixed-revisions): " + "; ".join(
        f"{revision}: {len(runs)} run(s)" for revision, runs in found.items()
    )


def _seed_ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    ranges, start = [], None
    for index, seed in enumerate(sorted(seeds)):
        if start is None:
            start = seed
        if index + 1 == len(seeds) or sorted(seeds)[index + 1] != seed + 1:
            ranges.append(str(start) if start == seed else f"{start}-{seed}")
            start = None
    return ", ".join(ranges)


def _machines_text(collected: dict) -> str:
    counts: dict[str, int] = {}
    for variant in collected["variants"].values():
        for run in variant["runs"].values():
            machine = run.get("machine") or "not recorded"
            counts[machine] = counts.get(machine, 0) + 1
    return "; ".join(f"{machine}: {count} run(s)" for machine, count in counts.items())


def _variant_revision(collected: dict, summary: dict, name: str) -> str:
    """The revision of a variant's runs, shown beside its name when the study mixes revisions or it is Mod-Squad's."""
    mixed = len(revisions(collected)) > 1
    if not mixed and collected["variants"][name]["kind"] != "modsquad":
        return ""
    return " (" + "; ".join(summary["variants"][name].get("revisions", [])) + ")"


def _step_time_conditions(collected: dict) -> str:
    """Where the step times were measured: they compare with each other only under the same conditions."""
    jobs, cores = collected["jobs"], collected["cpu_count"] or os.cpu_count()
    if jobs > 1:
        return f"with {jobs} runs training at once on {cores} CPU core(s), each with {max(1, cores // jobs)} thread(s) (`--jobs`)"
    return f"one run at a time on {cores} CPU core(s)"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The reading notes (templated from the verdicts)
# ---------------------------------------------------------------------------------------------------------------------
def _claim_sentence(result: dict, resolution: Optional[float]) -> str:
    comparison, difference, verdict = result["comparison"], result["delta_m"], result["verdict"]
    reference = _reference_label(comparison.reference)
    owner = f"the {reference}'" if reference.endswith("s") else f"{reference}'s"  # "the single-task models'"
    if difference is None:
        return f"**{comparison.claim}**: not assessed (Δm is not available)."
    interval = (
        f"{difference.mean:+.2f} points, 95 % interval {difference.low:+.2f} to {difference.high:+.2f}, {difference.n} seeds"
        if difference.low is not None
        else f"{difference.mean:+.2f} points, {difference.n} seed"
    )
    if difference.p_value is not None:
        interval += f"; p = {difference.p_value:.3g}"
        if result.get("adjusted_p") is not None:
            interval += f", Holm-adjusted over {result['family_size']} claims {result['adjusted_p']:.3g}"
        if difference.p_sign_flip is not None:
            interval += f"; sign-flip test p = {difference.p_sign_flip:.3g}"
    if verdict == paired.HOLDS:
        text = f"**{comparison.claim}: holds.** {comparison.variant}'s Δm is above {owner} on average ({interval})."
    elif verdict == paired.FAILS:
        text = f"**{comparison.claim}: fails.** {comparison.variant}'s Δm is below {owner} ({interval})."
    elif verdict == paired.INCONCLUSIVE:
        excludes_zero = difference.low > 0 or difference.high < 0
        reason = (
            "The interval excludes 0, but not after Holm's correction" if excludes_zero else "The interval contains 0"
        )
        text = f"**{comparison.claim}: inconclusive.** {reason} ({interval})"
        # What the data still allow: the interval's bounds are the largest effects either way it does not rule out.
        text += f"; it rules out effects above {difference.high:+.2f} and below {difference.low:+.2f} points"
        text += (
            f"; with this many seeds the study resolves differences of about {resolution:.2f} points."
            if resolution
            else "."
        )
    elif verdict == paired.INTERIM:
        planned = PLAN_CLAIM_SEEDS[comparison.name]
        text = (f"**{comparison.claim}: interim** ({interval}; {difference.n} of the {planned} seeds the plan gives "
                "this claim): no verdict before every planned seed of every claim is in the table.")  # fmt: skip
    else:
        text = f"**{comparison.claim}: not decided** ({interval}; a verdict needs {paired.MIN_SEEDS} or more paired seeds)."
    secondary = result.get("secondary_delta_m")
    if secondary is not None and verdict is not None:
        excluded = " and ".join(SECONDARY_EXCLUDED_TASKS)
        text += f" Without {excluded} (secondary, no verdict): {_interval(secondary)}."
    better = [
        t
        for t, v in result["per_task"].items()
        if v["difference"].n >= paired.MIN_SEEDS and v["difference"].low is not None and v["difference"].low > 0
    ]
    worse = [
        t
        for t, v in result["per_task"].items()
        if v["difference"].n >= paired.MIN_SEEDS and v["difference"].high is not None and v["difference"].high < 0
    ]
    if better or worse:
        parts = []
        if better:
            parts.append(f"better on {', '.join(better)}")
        if worse:
            parts.append(f"worse on {', '.join(worse)}")
        unresolved = len(result["per_task"]) - len(better) - len(worse)
        text += (
            f" Per task (primary metric, same test): {comparison.variant} is "
            + " and ".join(parts)
            + ("; the other tasks are not resolved." if unresolved else ".")
        )
    return text


def build_notes(report: StudyReport) -> str:
    """The "Reading these results" notes: sentences chosen by the computed values, every number filled in by code."""
    collected, summary, results, costs = report.collected, report.summary, report.results, report.costs
    estimate, pairing, plan = report.estimate, report.pairing, report.plan
    mode = collected["mode"]
    lines = ["### Reading these results", ""]
    if mode == "quick":
        lines.append("- Quick mode: a smoke test of the machinery; nothing here is evidence.")
    variants = summary["variants"]
    reference = variants.get("taskexpert", {})
    seeds = len(reference.get("seeds", []))
    first = (
        next(iter(collected["variants"]["taskexpert"]["runs"].values()), None)
        if "taskexpert" in collected["variants"]
        else None
    )
    if first is not None and "taskexpert" in costs and report.recipe:
        recipe = report.recipe
        lines.append(
            f"- **Size.** {'The pilot' if mode == 'pilot' else 'The study'} trains the tiny models "
            f"({costs['taskexpert']['parameters'] / 1e6:.2f} M parameters for TaskExpert, {recipe['max_steps']} steps of "
            f"{recipe['images_per_step']} images), up to {seeds} paired seeds per model, "
            f"{sum(len(v['runs']) for v in collected['variants'].values())} runs."
        )
    if estimate is not None:
        lines.append(_power_sentence(estimate, mode))
    if plan is not None:
        lines.append("- **Plan.** " + _plan_sentence(plan, estimate))
    if estimate is not None and estimate.get("bigger_recipe"):
        lines.append("- **Model size.** " + _size_sentence(estimate))
    resolution = estimate["detectable_difference"] if estimate else None
    per_claim = (report.claim_power or {}).get("claims", {})
    claims = [r for r in results if r["comparison"].claim]
    if mode == "full" or claims:
        for result in claims:
            claim = per_claim.get(result["comparison"].name)
            lines.append("- " + _claim_sentence(result, claim["resolution"] if claim else resolution))
    others = [r for r in results if not r["comparison"].claim and r["delta_m"] is not None]
    for result in others:
        comparison, difference = result["comparison"], result["delta_m"]
        text = (f"- {comparison.variant} against {comparison.reference} (no claim of the paper): Δm difference "
                f"{_interval(difference)}")  # fmt: skip
        if comparison.variant in costs and comparison.reference in costs:
            ratio = costs[comparison.reference]["flops"] / costs[comparison.variant]["flops"]
            text += f"; {comparison.reference} costs {ratio:.1f}× the FLOPs of {comparison.variant}"
        lines.append(text + ".")
    if pairing is not None:
        shares = ", ".join(f"{task} {count}/{pairing['samples']}" for task, count in pairing["identical"].items())
        lines.append(
            "- **Pairing.** Runs of one seed share the initial backbone weights, the data order and the augmentation "
            "draws (tests/test_experiments_study.py). A single-task model without semseg sees the multi-task model's "
            f"augmented image unless the protocol's crop check (which reads semseg) rejected a crop: identical training samples in "
            f"epoch 0 of seed {pairing['seed']}: {shares}."
        )
    lines.append(f"- **Code revision** of the runs: {_revision_text(collected)}.")
    return "\n".join(lines) + "\n"


def _power_sentence(estimate: dict, mode: str) -> str:
    source = "this pilot" if estimate["mode"] == "pilot" and mode == "pilot" else f"the {estimate['mode']} runs"
    required = estimate["required_seeds"]
    required_upper = estimate["required_seeds_upper"]
    return (
        f"- **Power.** In {source}, the per-seed Δm differences of the paired comparisons have a pooled standard "
        f"deviation of {estimate['sigma']:.2f} points (df = {estimate['df']}; "
        f"{estimate['sigma_upper_level']:.0%} upper bound {estimate['sigma_upper']:.2f}). A paired t-test at "
        f"{estimate['alpha']:.2f} detects a true {estimate['target_difference']:g}-point difference with "
        f"{estimate['target_power']:.0%} probability from {required if required else 'more than ' + str(power.MAX_SEEDS)} "
        f"seeds ({required_upper if required_upper else 'more than ' + str(power.MAX_SEEDS)} at the upper bound). "
        + (
            f"The full study has {estimate['study_seeds']} seeds"
            if estimate["study_seeds"] == estimate["planned_seeds"]
            else f"This study ran {estimate['study_seeds']} of the plan's {estimate['planned_seeds']} seeds"
        )
        + f": power {estimate['power_at_study_seeds']:.0%} at "
        f"{estimate['target_difference']:g} point ({estimate['power_at_study_seeds_upper']:.0%} at the upper bound); it "
        f"resolves (80 % power) differences of {estimate['detectable_difference']:.2f} points "
        f"({estimate['detectable_difference_upper']:.2f} at the upper bound)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------
def build_markdown(report: StudyReport, notes: str) -> str:
    """The report (`docs/results.md`): tables, figures, verdicts and `notes`, from `report` alone."""
    collected, summary, results, costs, usage = (
        report.collected, report.summary, report.results, report.costs, report.usage
    )  # fmt: skip
    figures, estimate, best, plan = report.figures, report.estimate, report.best, report.plan
    no_estimate, gpu_recipes = report.no_estimate, report.gpu_recipes
    mode = collected["mode"]
    variants = summary["variants"]
    lines = ["# Results: TaskExpert on the synthetic benchmark", "",
             "<!-- Generated by `python -m experiments.report` from the study's results table; edit experiments/, not "
             "this file. -->", ""]  # fmt: skip
    if mode == "quick":
        lines += ["> **QUICK MODE — NOT EVIDENCE.** These numbers come from `make experiments QUICK=1`: a few variants",
                  "> trained for 3 steps on a toy dataset. They only show that the study's machinery (runner, paired",
                  "> statistics, costs, figures, this report) works. Nothing below supports or refutes any claim.", ""]  # fmt: skip
    elif mode == "pilot":
        lines += ["> **PILOT — NOT THE STUDY.** These runs (`make experiments PILOT=1`) measure the seed noise of the",
                  "> paired comparisons, from which the number of seeds of the full study is chosen (section *Power and",
                  "> the study plan*). Their verdicts cover a few models and seeds only; the full study (`make",
                  "> experiments`, on one code revision) is reported in `docs/results.md`.", ""]  # fmt: skip
    else:
        planned = sum(len(seeds) for seeds in collected.get("planned", {}).values())
        done = sum(len(v["runs"]) for v in collected["variants"].values())
        lines += [f"Produced by `make experiments` (the full study) from `{STUDY_TABLE}`, one row per run: every number "
                  "below is computed from that table (parameters, FLOPs, routing and the curves from the measurements "
                  f"beside it, `{MEASUREMENTS_FILE}`), and `tests/reproduce_results.py` recomputes them with its own "
                  "arithmetic. The plan it follows, fixed before its runs: `experiments/preregistration.md`.", ""]  # fmt: skip
        if done < planned:
            lines += [f"> **INTERIM — {done} of the plan's {planned} runs are in the table.** The study trains over "
                      "several sessions on one code revision; the numbers below are those of the runs done so far and "
                      "no claim has a verdict until every planned run is in the table.", ""]  # fmt: skip
    lines += ["## Setup", "",
              f"- Mode: **{mode}**; dataset: `{Path(collected['dataset']).name}`; variants, seeds and comparisons: "
              "`experiments/study.py`; recipes: `hub_configs/`.",
              f"- Code revision: {_revision_text(collected)}.",
              f"- Machines (CPU model of each run; one seed gives the same numbers on one machine, not bit for bit "
              f"across CPU models): {_machines_text(collected)}.",
              "- Paired design: runs of one seed start from the same backbone weights and see the same data order and "
              "augmentation draws; every ablation changes one thing against the model it is compared with.",
              f"- Verdicts: per-seed paired differences of Δm (and of each task's primary metric), {paired.METHOD} at "
              f"{paired.CONFIDENCE:.0%}, the two-sided paired t-test's p and the exact sign-flip test's p beside it. "
              "The claims are one family: a claim *holds* when its Holm-adjusted p is below "
              f"{1 - paired.CONFIDENCE:.2f} and the mean difference is in the paper's direction, *fails* when it is "
              "below in the other direction, and is *inconclusive* otherwise (the interval's bounds are the largest "
              f"effects the data still allow); fewer than {paired.MIN_SEEDS} seeds: not decided"
              + ("; in the full study, no verdict before every planned seed (*interim*)." if mode == "full" else "."),
              f"- Secondary endpoint: Δm without {' and '.join(SECONDARY_EXCLUDED_TASKS)} (near chance at this size), "
              "against the same references, without verdicts.",
              "- Δm: `compute_delta_m` over the model's tasks (main metrics: "
              + ", ".join(f"{t} {k}" for t, (k, _) in PRIMARY_METRICS.items())
              + ("), against the single-task models of the same seed (the plan's endpoint), for every comparison and "
                 "in the overview. Boundary odsF: the " if mode == "full" else
                 "), against the seed-mean of the single-task models; for the multi-task gain, against the "
                 "single-task models of the same seed. Boundary odsF: the ")
              + 
              f"{collected['boundary_scorer'] or 'n/a'} scorer for every model. {UNITS}.",
              "- Cost: parameters; FLOPs of one forward pass of one image at the evaluation size, all tasks "
              "(`torch.utils.flop_counter`, a multiply-add = 2 FLOPs); step time = median over logging windows of one "
              f"optimiser step as logged, {_step_time_conditions(collected)}; CPU time per run as measured by the runner.",
              ""]  # fmt: skip
    missing = {name: v["missing"] for name, v in variants.items() if v["missing"]}
    if missing:
        lines += ["**Runs not finished yet** (left out): " + "; ".join(
            f"{name} seeds {_seed_ranges(seeds)}" for name, seeds in missing.items()) + ".", ""]  # fmt: skip

    # Claims
    lines += ["## The paper's claims on this benchmark", ""]
    claims = [r for r in results if r["comparison"].claim]
    rows = [[r["comparison"].claim, f"{r['comparison'].variant} − {_reference_label(r['comparison'].reference)}",
             _interval(r["delta_m"]), _seeds_cell(r, mode), _p(r["delta_m"].p_value if r["delta_m"] else None),
             _p(r.get("adjusted_p")), _p(r["delta_m"].p_sign_flip if r["delta_m"] else None), r["verdict"] or "n/a",
             _interval(r.get("secondary_delta_m")), ", ".join(f"`{revision}`" for revision in r["revisions"])]
            for r in claims]  # fmt: skip
    lines += _table(
        ["claim", "paired comparison", "Δm difference, mean [95 % CI]", "seeds", "p", "Holm p", "sign-flip p",
         "verdict", f"Δm difference without {', '.join(SECONDARY_EXCLUDED_TASKS)}", "revision"], rows
    )  # fmt: skip
    not_run = [c for c in COMPARISONS if c.claim and c.name not in {r["comparison"].name for r in claims}]
    if not_run:
        lines += [
            "",
            "Not part of this study (a model has no finished run; `make experiments` trains what is missing): "
            + "; ".join(f"{c.claim} ({c.variant} − {_reference_label(c.reference)})" for c in not_run)
            + ".",
        ]
    others = [r for r in results if not r["comparison"].claim]
    if others:
        lines += ["", "Other paired comparisons (no claim of the paper):", ""]
        lines += _table(["comparison", "Δm difference, mean [95 % CI]", "seeds", "revision"],
                        [[f"{r['comparison'].variant} − {r['comparison'].reference}", _interval(r["delta_m"]),
                          r["delta_m"].n if r["delta_m"] else 0, ", ".join(f"`{revision}`" for revision in r["revisions"])]
                         for r in others])  # fmt: skip
    tasks = [t for t in TASKS if any(t in r["per_task"] for r in results)]
    lines += ["", f"Per task: paired difference of the primary metric, mean [95 % CI], signed so that positive means the "
              f"first model is better ({UNITS}).", ""]  # fmt: skip
    lines += _table(["comparison"] + [f"{t} ({PRIMARY_METRICS[t][0].split('/')[1]})" for t in tasks],
                    [[f"{r['comparison'].variant} − {_reference_label(r['comparison'].reference)}"]
                     + [_interval(r["per_task"][t]["difference"]) if t in r["per_task"] else "—" for t in tasks] for r in results])  # fmt: skip
    lines += ["", f"![per-seed paired differences]({figures['paired']})", "",
              "Each dot is one seed's difference; the bar is the 95 % t interval of the mean, the tick the mean.", ""]  # fmt: skip
    lines += [notes.strip(), ""]

    # Power
    lines += ["## Power and the study plan", ""]
    if report.claim_power is not None:
        lines += _claim_power_lines(report.claim_power)
    elif estimate is None:
        lines += [f"No power estimate: {no_estimate or 'no pilot'}. `make experiments PILOT=1` runs the pilot.", ""]
    else:
        lines += _power_table(estimate)
    if plan is not None:
        lines += ["", _plan_sentence(plan, estimate), ""]

    # Overview
    lines += ["## Overview", "", *_table(["model", "kind", "seeds", "parameters (M)", "GFLOPs", "s / step", "CPU min / run", "Δm (%)"], [
        [name + _variant_revision(collected, summary, name), collected["variants"][name]["kind"], len(entry["seeds"]),
         f"{costs[name]['parameters'] / 1e6:.2f}" if name in costs else "n/a",
         f"{costs[name]['flops'] / 1e9:.2f}" if name in costs else "n/a",
         _format(entry["step_seconds"], 3) if entry["step_seconds"] else "n/a",
         _format(tuple(v / 60 if v is not None else None for v in entry["cpu_seconds"]), 1) if entry.get("cpu_seconds") else "n/a",
         "reference" if collected["variants"][name]["kind"] == "single-task"
         else _format(entry.get("delta_m_same_seed_mean" if mode == "full" else "delta_m"))]
        for name, entry in variants.items() if entry["seeds"]
    ])]  # fmt: skip
    lines += [
        "",
        "Models: "
        + "; ".join(f"**{n}**: {v['description']}" for n, v in collected["variants"].items() if v["runs"])
        + ".",
        "",
    ]

    # Per task
    lines += ["## Metrics per task", "", "Mean ± sample standard deviation over seeds; the primary metric in bold.", ""]
    for task in [t for t in TASKS if any(t in v.get("tasks", []) for v in variants.values())]:
        rows = [(name, entry) for name, entry in variants.items() if task in entry.get("tasks", [])]
        keys = sorted({k for _, e in rows for k in e["metrics"] if k.startswith(f"{task}/")})
        main = rows[0][1]["primary"][task]
        keys = [main] + [k for k in keys if k != main]
        lines += [f"### {task}", "", *_table(["model"] + [f"**{k}**" if k == main else k for k in keys],
                  [[name] + [_format(entry["metrics"].get(k)) for k in keys] for name, entry in rows]), ""]  # fmt: skip

    # Figures
    lines += ["## Training curves", "", f"![training curves]({figures['curves']})", "",
              "Total training loss as logged (seed mean over the runs whose curves were measured); the study evaluates "
              "at the end only.", "", "## Routing", "",
              "Mean routing weight of every candidate (TaskExpert: experts and memory; Mod-Squad: attention and MLP "
              "experts, 0 where the top-k router did not select it) per task and routing layer, on validation images "
              "of the first seed (`routing_summary` of `dense_model_utils`).", ""]  # fmt: skip
    for name, data in usage.items():
        header = ["task"] + [f"{layer}: top candidate (weight)" for layer in data["layers"]]
        rows = []
        for task, values in data["tasks"].items():
            cells = []
            for index, weights in enumerate(values["mean_weight"]):
                top = int(np.argmax(weights))
                cells.append(f"{data['candidates'][index][top]} ({weights[top]:.2f})")
            rows.append([task] + cells)
        lines += [f"### {name}", "", f"![{name} routing]({figures['usage'][name]})", "", *_table(header, rows), ""]

    lines += ["## Best checkpoint", ""]
    if best is not None:
        delta_m = f"Δm {best['delta_m']:+.2f} %, " if best.get("delta_m") is not None else ""
        lines += [f"`python -m experiments.run` copies the default TaskExpert's seed {best['seed']} ({delta_m}final "
                  f"training loss {best['training_loss']:.4g}, the lowest of its seeds: the choice reads no validation "
                  "number, so the numbers reported here do not select the model they describe), push-ready (weights, "
                  f"config, processor, remote code, model card), to `{STUDY_BEST_MODEL_DIR}`, which `make space` "
                  "serves.", ""]  # fmt: skip
    else:
        lines += ["No checkpoint is promoted: only the full study's models are served.", ""]
    lines += [gpu_guide(gpu_recipes), ""]
    return "\n".join(lines)


def _plan_sentence(plan: dict, estimate: dict) -> str:
    return (
        f"The full study, `{plan['command']}`, trains {plan['runs']} runs ({plan['variants']} models; the seeds of "
        "the pre-registered plan (experiments/preregistration.md) for the models of the claims, "
        f"{', '.join(f'{name} {seeds}' for name, seeds in plan['seeds'].items())}, {plan['descriptive_seeds']} for "
        f"{', '.join(plan['descriptive'])}); the CPU time measured in the {estimate['mode']} runs gives about "
        f"{plan['cpu_hours']:.1f} CPU-hours, about {plan['wall_hours']:.1f} hours on {plan['cores']} otherwise idle "
        f"cores with `JOBS={plan['jobs']}`."
        + (
            f" Not measured in the {estimate['mode']} runs (counted at a TaskExpert run's cost): "
            f"{', '.join(plan['unmeasured'])}."
            if plan["unmeasured"]
            else ""
        )
    )


def _size_sentence(estimate: dict) -> str:
    """Why the study stays at the tiny recipe (or what a bigger one would need), from the measured noise and costs."""
    bigger = estimate["bigger_recipe"]
    name = Path(bigger["recipe"]).stem
    if bigger["affordable_seeds"] < 2:
        return (
            f"`{name}` costs {bigger['cost_ratio']:.1f}× a tiny run (counted training FLOPs): the study's CPU time "
            "would not even give it two paired seeds, so the study stays at the tiny size."
        )
    return (
        f"`{name}` costs {bigger['cost_ratio']:.1f}× a tiny run (counted training FLOPs); the study's CPU time "
        f"affords {bigger['affordable_seeds']} paired seeds there, which resolve a {estimate['target_difference']:g}-point "
        f"difference only if its paired noise is below {bigger['sigma_needed']:.2f} points, {bigger['sigma_ratio']:.1f}× "
        f"below the {estimate['sigma']:.2f} measured at the tiny size. That noise is not measured (a pilot at that "
        "size costs as much as the tiny study), so the study stays at the tiny size, with the resolution stated above."
    )


def _claim_power_lines(claim_power: dict) -> list[str]:
    """The pre-registered study's power per claim, from its own per-seed differences, and what remains to run."""
    lines = [f"The seeds are the pre-registered plan's (`experiments/preregistration.md`), sized from an earlier "
             "study's noise. The noise of this study's own per-seed Δm differences, at the seeds run so far, and what "
             f"it resolves with {claim_power['target_power']:.0%} power at α = {claim_power['alpha']:.3g} (Holm's "
             "strictest step):", ""]  # fmt: skip
    rows = [[name, f"{c['sigma']:.2f}", f"{c['n']} of {c['planned']}", f"{c['resolution']:.2f}",
             f"{c['power_at_effect']:.2f}"] for name, c in claim_power["claims"].items()]  # fmt: skip
    lines += _table(["claim", "σ of the per-seed differences", "seeds", "difference resolved",
                     f"power at {claim_power['effect']:g} points"], rows) + [""]  # fmt: skip
    if claim_power["remaining_runs"]:
        cpu = claim_power["remaining_cpu_hours"]
        lines += [f"Still to run: {claim_power['remaining_runs']} runs of the plan"
                  + (f", about {cpu:.1f} CPU-hours at the mean CPU time of the runs done "
                     f"({claim_power['mean_cpu_seconds'] / 60:.1f} min)" if cpu is not None else "")
                  + " (`make experiments` trains them with the study's code revision and adds their rows to the "
                  "table).", ""]  # fmt: skip
    return lines


def _power_table(estimate: dict) -> list[str]:
    lines = [_power_sentence(estimate, estimate["mode"])[2:], ""]
    rows = [[name, f"{c['variant']} − {c['reference']}", c["n"], f"{c['mean']:+.2f}", f"{c['std']:.2f}"]
            for name, c in estimate["comparisons"].items()]  # fmt: skip
    lines += _table(["comparison", "models", "seeds", "mean Δm difference", "std of the per-seed differences"], rows)
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# The GPU guide (the real benchmarks), with its numbers read from the recipes and counted on their models
# ---------------------------------------------------------------------------------------------------------------------
TRAIN_FORWARD_EQUIVALENTS = 3  # a training step (forward and backward) costs about three forward passes
ASSUMED_SUSTAINED_TFLOPS = 200  # an assumed sustained throughput of one recent GPU, for scale only
FP32_TRAINING_BYTES_PER_PARAMETER = 16  # weights, gradients and Adam's two moments in fp32


def gpu_guide(recipes: list[dict]) -> str:
    """The "Reproducing the paper's tables on a GPU" section: commands, protocol and cost estimates of the real
    benchmarks' recipes (`measure.recipe_cost`)."""
    from modeling_taskexpert.data import SOURCES
    from modeling_taskexpert.task_definitions import IGNORE_INDEX

    by_name = {r["recipe"]: r for r in recipes}
    pascal, nyud = SOURCES["pascal-context"], SOURCES["nyud"]
    large = [r for r in recipes if r["recipe"].endswith("vitl")]
    steps = {r["max_steps"] for r in recipes}
    step_text = " / ".join(f"{s:,}" for s in sorted(steps))
    rates = ", ".join(f"{r['learning_rate']:g} ({r['recipe']})" for r in large)
    settings = sorted(
        {(r["optimizer"], r["weight_decay"], r["batch"], r["max_grad_norm"], r["mixed_precision"]) for r in recipes}
    )
    optimizer, weight_decay, batch, clip, precision = settings[0]
    lines = ["## Reproducing the paper's tables on a GPU", "",
             "No GPU run of the real benchmarks has been measured for this page yet. The commands below are complete; "
             "the time and memory figures are **estimates** from FLOP counts, not measurements.", "",
             "### 1. Convert the data", "",
             f"Download and extract the PASCAL-Context (PASCAL-MT, {len(pascal.tasks)} tasks) and NYUD-v2 "
             f"({len(nyud.tasks)} tasks) archives of the multi-task benchmark, then:", "",
             "```bash",
             f"python -m modeling_taskexpert.data pascal-context --raw-dir RAW/{pascal.archive} --output-dir data/pascal-context",
             f"python -m modeling_taskexpert.data nyud --raw-dir RAW/{nyud.archive} --output-dir data/nyud",
             "```", "", "### 2. Train", "",
             f"The recipes follow the protocol ({optimizer}, learning rate {rates}, weight decay {weight_decay:g}, poly "
             f"decay over {step_text} steps, batch {batch} per device, gradient clipping {clip:g}, {precision}) and start "
             "from the ImageNet ViT checkpoints named in them (" + ", ".join(dict.fromkeys(f"`{r['backbone_checkpoint']}`" for r in large)) + "):", "",
             "```bash", "accelerate launch train.py --config hub_configs/pascal-context-vitl.yaml",
             "accelerate launch train.py --config hub_configs/nyud-vitl.yaml",
             "# other sizes: hub_configs/pascal-context-vits.yaml, -vitb.yaml, nyud-vits.yaml, nyud-vitb.yaml",
             "# interrupted? add --resume_from_checkpoint latest", "```", "",
             f"The paper's batch is {batch} images per GPU; with several GPUs (`--multi_gpu --num_processes N`) the "
             "effective batch grows, so keep one process or lower `per_device_train_batch_size` to stay on protocol.", "",
             "### 3. Evaluate with the protocol's boundary metric", "",
             "Training reports the fast approximate boundary odsF; the paper's numbers use the exact scorer:", "",
             "```bash",
             "python -m modeling_taskexpert.evaluation --model outputs/taskexpert-pascal-context-vitl \\",
             "    --dataset data/pascal-context --output pascal-vitl-metrics.json --boundary-mode exact --boundary-workers 16",
             "python -m modeling_taskexpert.evaluation --model outputs/taskexpert-nyud-vitl \\",
             "    --dataset data/nyud --output nyud-vitl-metrics.json --boundary-mode exact --boundary-workers 16",
             "```", "",
             "Δm needs single-task models trained with the same recipe on one task (`--tasks [semseg]`, …); pass their "
             "metrics with `--baselines`. The paper's tables report the primary metrics: "
             + "; ".join(f"{source.name}: " + ", ".join(PRIMARY_METRICS[t][0] for t in source.tasks) for source in (pascal, nyud)) + ".", "",
             "### Expected cost (estimates)", "",
             "FLOPs of one forward pass of one image at the evaluation size, all tasks, counted with "
             "`torch.utils.flop_counter` on the recipes' model configs (built on the meta device, no weights):", "",
             *_table(["recipe", "evaluation size", "parameters (M)", "forward GFLOPs / image"],
                     [[r["recipe"], f"{r['eval_size'][0]}×{r['eval_size'][1]}", f"{r['parameters'] / 1e6:.1f}",
                       f"{r['flops'] / 1e9:.0f}"] for r in recipes]), ""]  # fmt: skip
    reference = by_name.get("pascal-context-vitl") or recipes[-1]
    total = reference["batch"] * TRAIN_FORWARD_EQUIVALENTS * reference["flops"] * reference["max_steps"]
    minutes = total / (ASSUMED_SUSTAINED_TFLOPS * 1e12) / 60
    memory = reference["parameters"] * FP32_TRAINING_BYTES_PER_PARAMETER / 1e9
    lines += [
        f"A training step costs about {TRAIN_FORWARD_EQUIVALENTS} forward passes per image, so {reference['recipe']} "
        f"({reference['max_steps']:,} steps at batch {reference['batch']}) is about {reference['batch']} × "
        f"{TRAIN_FORWARD_EQUIVALENTS} × {reference['flops'] / 1e9:.0f} GFLOPs × {reference['max_steps']:,} ≈ "
        f"{total:.1e} FLOPs: about {minutes:.0f} minutes at a sustained {ASSUMED_SUSTAINED_TFLOPS} TFLOP/s. At this "
        "batch a GPU runs far below its peak and the protocol's data augmentation runs on the CPU, so plan for several "
        "hours per ViT-L run on one recent GPU, and measure the first few hundred steps (`images_per_second` in "
        "`train_log.jsonl`) before planning more. Memory: the weights, gradients and Adam moments take about "
        f"{memory:.1f} GB in fp32 ({FP32_TRAINING_BYTES_PER_PARAMETER} bytes per parameter); activations add more "
        "(`gradient_checkpointing: true` trades them for time). The exact boundary evaluation is slow per image, so "
        "give `--boundary-workers` as many CPU cores as the machine has.", "",
        "### Protocol notes", "",
        "- Inputs: training crops of " + " and ".join(f"{s.train_size[0]}×{s.train_size[1]} ({s.name})" for s in (pascal, nyud))
        + " with the protocol's augmentation; evaluation pads every image, centred, to "
        + " / ".join(f"{s.eval_size[0]}×{s.eval_size[1]}" for s in (pascal, nyud)) + " and scores the original pixels only.",
        f"- Labels equal to {IGNORE_INDEX} are ignored; normals are scored on valid pixels with the mean angular error in degrees.",
        "- Saliency maxF follows the published PASCAL-Context convention (`--saliency-maxf-mode reference`, the dataset default).",
        "- Boundary odsF uses a matching tolerance of " + " and ".join(f"{s.boundary_tolerance:g} of the image diagonal ({s.name})" for s in (pascal, nyud)) + ".",
    ]  # fmt: skip
    return "\n".join(lines)
