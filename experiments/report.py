"""Build `docs/results.md`, its figures and the reading notes from the run folders of the study.

    python -m experiments.report                                       # outputs/experiments (the full study)
    python -m experiments.report --output-root outputs/experiments-pilot
    python -m experiments.report --output-root outputs/experiments-quick   # -> outputs/experiments-quick/results.md

Three steps: `collect` (run folders -> metrics per seed, Δm, revisions, paired comparisons), `measure` (parameters,
FLOPs and routing of the trained models; pairing of the augmentations) and `write` (figures, markdown, notes). The
report refuses runs of several code revisions unless `--allow-mixed-revisions`. The full and the pilot study write
`docs/results.md` and `experiments/study_notes.md`; every mode also writes `OUTPUT_ROOT/summary.json`.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from modeling_taskexpert.file_utils import write_json_atomic, write_text_atomic

from . import measure, power, write
from .collect import (
    StudyError,
    aggregate,
    best_run,
    check_one_revision,
    collect,
    comparisons,
    comparisons_to_json,
    read_study,
    revisions,
)
from .paths import DEFAULT_OUTPUT_ROOTS, REPO_ROOT, RESULTS_FILE, STUDY_FILE, STUDY_NOTES_FILE

SUMMARY_FILE = "summary.json"


def measure_models(collected: dict) -> tuple[dict, dict]:
    """Cost of every variant and routing of every multi-task variant with more than one candidate somewhere (one
    candidate always gets weight 1: nothing to show), each on the variant's first seed."""
    costs, usage = {}, {}
    for name, variant in collected["variants"].items():
        if not variant["runs"]:
            continue
        first = variant["runs"][min(variant["runs"])]
        costs[name] = measure.model_cost(first, collected["dataset"])
        if variant["kind"] != "single-task":
            data = measure.routing_usage(first, collected["dataset"])
            if data is not None and any(len(candidates) > 1 for candidates in data["candidates"]):
                usage[name] = data
    return costs, usage


def measure_pairing(collected: dict) -> Optional[dict]:
    """How often the single-task models see the default TaskExpert's augmentations (None without both)."""
    reference = collected["variants"].get("taskexpert")
    has_singles = any(v["kind"] == "single-task" and v["runs"] for v in collected["variants"].values())
    if not reference or not reference["runs"] or not has_singles:
        return None
    seed = min(reference["runs"])
    return measure.augmentation_pairing(collected["dataset"], reference["runs"][seed]["tasks"], seed=seed)


def build_report(output_root: Path, output: Path, notes_output: Optional[Path] = None, pilot_root: Optional[Path] = None,
                 allow_mixed_revisions: bool = False, jobs: int = 2) -> dict:  # fmt: skip
    """Write the markdown report, its figures (next to it, under `figures/`), the notes (to `notes_output` when given)
    and `OUTPUT_ROOT/summary.json`; returns the summary. `pilot_root`: the pilot whose power estimate plans the full
    study (a pilot's own report uses its runs)."""
    output_root, output = Path(output_root), Path(output)
    collected = collect(output_root)
    if not any(v["runs"] for v in collected["variants"].values()):
        raise StudyError(f"No finished run under {output_root}: train first (`python -m experiments.run`).")
    check_one_revision(collected, allow_mixed_revisions)
    summary = aggregate(collected)
    results = comparisons(collected, summary)

    costs, usage = measure_models(collected)
    pairing = measure_pairing(collected)
    estimate, plan, no_estimate = None, None, None
    try:
        if collected["mode"] != "full":  # a pilot (or the quick mode's smoke test) estimates from its own runs
            estimate = power.estimate_from(collected, summary)
        else:  # the study's own paired noise, at the seeds it ran; the pilot's only when the study has no pair yet
            seeds_run = max(
                (r["delta_m"].n for r in results if r["delta_m"] is not None and r["comparison"].claim), default=0
            )
            try:
                estimate = power.estimate_from(collected, summary, study_seeds=seeds_run)
            except StudyError:
                if pilot_root is None or not (Path(pilot_root) / STUDY_FILE).is_file():
                    raise
                estimate = power.estimate(Path(pilot_root))
    except StudyError as error:
        no_estimate = str(error)
    if estimate is not None:
        plan = power.study_plan(estimate, jobs=jobs, cores=os.cpu_count() or 1)
    best = best_run(collected, summary) if collected["mode"] == "full" else None

    figures = {"curves": "figures/training_curves.png", "paired": "figures/paired_differences.png",
               "usage": {name: f"figures/routing-{name}.png" for name in usage}}  # fmt: skip
    write.plot_curves(collected, output.parent / figures["curves"])
    write.plot_paired_differences(results, output.parent / figures["paired"])
    for name, data in usage.items():
        write.plot_routing(name, data, output.parent / figures["usage"][name])
    gpu_recipes = [measure.recipe_cost(name) for name in measure.GPU_RECIPES]
    report = write.StudyReport(
        collected=collected, summary=summary, results=results, costs=costs, usage=usage, figures=figures,
        estimate=estimate, pairing=pairing, plan=plan, no_estimate=no_estimate,
        best={k: v for k, v in best.items() if k != "run"} if best else None, gpu_recipes=gpu_recipes,
    )  # fmt: skip
    notes = write.build_notes(report)
    write_text_atomic(output, write.build_markdown(report, notes))
    if notes_output is not None:
        header = ("<!-- Generated by `python -m experiments.report` with docs/results.md; edit experiments/write.py, "
                  "not this file. -->\n\n")  # fmt: skip
        write_text_atomic(notes_output, header + notes)
    summary_json = {
        "mode": collected["mode"], "revisions": revisions(collected), "baselines": summary["baselines"],
        "costs": costs, "usage": usage, "variants": summary["variants"], "comparisons": comparisons_to_json(results),
        "pairing": pairing, "power": estimate, "plan": plan, "no_power_estimate": no_estimate,
        "best": {k: best[k] for k in ("seed", "delta_m", "training_loss")} if best else None, "gpu_recipes": gpu_recipes,
    }  # fmt: skip
    summary_json = json.loads(json.dumps(summary_json, default=list))
    write_json_atomic(output_root / SUMMARY_FILE, summary_json)
    return summary_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build docs/results.md from the study's run folders.")
    parser.add_argument(
        "--output-root", type=Path, default=Path(DEFAULT_OUTPUT_ROOTS["full"]), help="the runner's output root"
    )
    parser.add_argument("--output", type=Path, default=None,
                        help=f"the markdown report (default: {RESULTS_FILE} for the full study and the pilot, "
                             "OUTPUT_ROOT/results.md for the quick mode)")  # fmt: skip
    parser.add_argument(
        "--notes",
        type=Path,
        default=None,
        help=f"where the reading notes go too (default: {STUDY_NOTES_FILE}, not in the quick mode)",
    )
    parser.add_argument(
        "--pilot-root",
        type=Path,
        default=Path(DEFAULT_OUTPUT_ROOTS["pilot"]),
        help="the pilot whose power estimate plans the full study",
    )
    parser.add_argument(
        "--allow-mixed-revisions",
        action="store_true",
        help="report runs of several code revisions (each model marked with its revision)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once in the planned full study (default: 2)")
    args = parser.parse_args(argv)
    try:
        with contextlib.chdir(REPO_ROOT):  # run folders name their datasets relative to the repository root
            output_root = args.output_root.resolve()
            quick = read_study(output_root)["mode"] == "quick"
            output = args.output or (output_root / "results.md" if quick else Path(RESULTS_FILE))
            notes = args.notes or (None if quick else Path(STUDY_NOTES_FILE))
            build_report(output_root, output.resolve(), notes.resolve() if notes else None, args.pilot_root.resolve(),
                         args.allow_mixed_revisions, args.jobs)  # fmt: skip
    except StudyError as error:
        print(f"experiments.report: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {output}" + (f" and {notes}" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
