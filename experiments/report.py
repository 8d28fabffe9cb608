"""Build `docs/results.md`, its figures and the reading notes from the study's results table.

    python -m experiments.report                                       # the full study: its committed table
    python -m experiments.report --output-root outputs/experiments-pilot   # -> outputs/experiments-pilot/results.md
    python -m experiments.report --output-root outputs/experiments-quick   # -> outputs/experiments-quick/results.md

Every number of the results comes from the table of runs (`experiments/table.py`): for the full study the committed
`experiments/results/study-runs.csv` (so the page is rebuilt on a fresh clone, without any run folder); for the pilot
and the quick mode a table written from their run folders into the output root. What needs the trained models or the
dataset (parameters, FLOPs, routing, the augmentation pairing, the training-loss curves) is measured from the run
folders where they exist and kept beside the table (`study-measurements.json`); a fresh clone reads it from there.
Three steps: `collect` (table -> metrics per seed, Δm, revisions, paired comparisons), `measure` and `write` (figures,
markdown, notes). The report refuses runs of several code revisions unless `--allow-mixed-revisions`. The full study
writes `docs/results.md` and `experiments/study_notes.md`, the others `OUTPUT_ROOT/results.md`; every mode writes
`OUTPUT_ROOT/summary.json`.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

from modeling_taskexpert.file_utils import write_json_atomic, write_text_atomic

from . import measure, power, table, write
from .collect import (
    StudyError,
    aggregate,
    best_run,
    check_one_revision,
    collect,
    collect_table,
    comparisons,
    comparisons_to_json,
    read_study,
    revisions,
)
from .paths import (
    DEFAULT_OUTPUT_ROOTS,
    MEASUREMENTS_FILE,
    REPO_ROOT,
    RESULTS_FILE,
    STUDY_FILE,
    STUDY_NOTES_FILE,
)
from .study import variants_by_name

SUMMARY_FILE = "summary.json"
FOLDER_TABLE = "study-runs.csv"  # in the output root of a pilot or quick study: its table, from its run folders
FOLDER_MEASUREMENTS = "measurements.json"


def rows_from_folders(folders: dict) -> list[dict]:
    """The table rows of every finished run folder of a study (`collect.collect`)."""
    known = variants_by_name()
    return [table.run_row(known[name], seed, run) for name, variant in folders["variants"].items()
            for seed, run in variant["runs"].items()]  # fmt: skip


def empty_measurements() -> dict:
    return {"costs": {}, "usage": {}, "pairing": None, "training_loss": {}, "recipe": None, "conditions": None,
            "dataset": None}  # fmt: skip


def read_measurements(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return empty_measurements()
    try:
        return {**empty_measurements(), **json.loads(path.read_text())}
    except json.JSONDecodeError as error:
        raise StudyError(f"{path} is not valid JSON: {error}") from None


def measure_folders(folders: dict, measurements: dict) -> dict:
    """Add to `measurements` what the run folders give and it lacks: the cost (parameters, FLOPs) of every variant
    and the routing of every multi-task variant with more than one candidate somewhere (one candidate always gets
    weight 1: nothing to show), each on the first seed present; every run's training-loss curve; the augmentation
    pairing; the recipe's size and the conditions of the step times. What is there already stays (a later session's
    folders of other seeds do not replace it)."""
    measurements = json.loads(json.dumps(measurements))
    dataset = folders["dataset"]
    for name, variant in folders["variants"].items():
        if not variant["runs"]:
            continue
        seed = min(variant["runs"])
        first = variant["runs"][seed]
        if name not in measurements["costs"]:
            measurements["costs"][name] = {**measure.model_cost(first, dataset), "seed": seed}
        if variant["kind"] != "single-task" and name not in measurements["usage"]:
            data = measure.routing_usage(first, dataset)
            if data is not None and any(len(candidates) > 1 for candidates in data["candidates"]):
                measurements["usage"][name] = {**data, "seed": seed}
        curves = measurements["training_loss"].setdefault(name, {})
        for seed, run in variant["runs"].items():
            curve = [[r["step"], r["loss"]] for r in run["log"] if r.get("kind") == "train" and "loss" in r]
            if curve and str(seed) not in curves:
                curves[str(seed)] = curve
        if measurements["recipe"] is None and name == "taskexpert":
            recipe = first["recipe"]
            measurements["recipe"] = {"max_steps": recipe["max_steps"], "images_per_step":
                                      recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]}  # fmt: skip
    if measurements["pairing"] is None:
        measurements["pairing"] = measure_pairing(folders)
    if measurements["conditions"] is None:
        measurements["conditions"] = {"jobs": folders["jobs"], "cpu_count": folders["cpu_count"]}
    if measurements["dataset"] is None:
        measurements["dataset"] = Path(dataset).name
    return measurements


def measure_pairing(folders: dict) -> Optional[dict]:
    """How often the single-task models see the default TaskExpert's augmentations (None without both)."""
    reference = folders["variants"].get("taskexpert")
    has_singles = any(v["kind"] == "single-task" and v["runs"] for v in folders["variants"].values())
    if not reference or not reference["runs"] or not has_singles:
        return None
    seed = min(reference["runs"])
    return measure.augmentation_pairing(folders["dataset"], reference["runs"][seed]["tasks"], seed=seed)


def study_data(
    output_root: Path, mode: str, table_path: Optional[Path] = None, measurements_path: Optional[Path] = None
) -> tuple[dict, dict]:
    """(the collected study from its table, the measurements): for the full study the
    committed table, with the measurements updated from the run folders under `output_root` when there are any;
    for the other modes the table written from their run folders."""
    folders = collect(output_root) if (Path(output_root) / STUDY_FILE).is_file() else None
    if mode == "full":
        table_path = Path(table_path or REPO_ROOT / table.STUDY_TABLE)
        measurements_path = Path(measurements_path or REPO_ROOT / MEASUREMENTS_FILE)
        try:
            rows = table.read_table(table_path)
        except table.TableError as error:
            raise StudyError(f"{error} Train the study first (`python -m experiments.run`).") from None
    else:
        table_path, measurements_path = Path(output_root) / FOLDER_TABLE, Path(output_root) / FOLDER_MEASUREMENTS
        rows = rows_from_folders(folders)
        table.write_table(table_path, rows)
    measurements = read_measurements(measurements_path)
    if folders is not None and any(v["runs"] for v in folders["variants"].values()):
        measurements = measure_folders(folders, measurements)
        write_json_atomic(measurements_path, measurements)
    conditions = measurements["conditions"] or {"jobs": 1, "cpu_count": None}
    source = table_path.relative_to(REPO_ROOT) if table_path.is_relative_to(REPO_ROOT) else table_path
    collected = collect_table(rows, mode, source=str(source), dataset=measurements["dataset"] or "synthetic",
                              jobs=conditions["jobs"], cpu_count=conditions["cpu_count"])  # fmt: skip
    return collected, measurements


def build_report(output_root: Path, output: Path, notes_output: Optional[Path] = None,
                 allow_mixed_revisions: bool = False, jobs: int = 2, mode: Optional[str] = None,
                 table_path: Optional[Path] = None, measurements_path: Optional[Path] = None) -> dict:  # fmt: skip
    """Write the markdown report, its figures (next to it, under `figures/`), the notes (to `notes_output` when given)
    and `summary.json`; returns the summary. `mode`: the study's (default: the one `output_root` records, else the
    full study). `table_path`, `measurements_path`: the full study's data (default: the committed files)."""
    output_root, output = Path(output_root), Path(output)
    if mode is None:
        mode = read_study(output_root)["mode"] if (output_root / STUDY_FILE).is_file() else "full"
    collected, measurements = study_data(output_root, mode, table_path, measurements_path)
    if not any(v["runs"] for v in collected["variants"].values()):
        raise StudyError(f"No finished run in the {mode} study's table: train first (`python -m experiments.run`).")
    check_one_revision(collected, allow_mixed_revisions)
    summary = aggregate(collected)
    results = comparisons(collected, summary)

    estimate, plan, no_estimate, claim_power = None, None, None, None
    conditions = measurements["conditions"] or {}
    if mode == "full":  # the pre-registered plan fixed the seeds; its power, claim by claim, at the seeds run so far
        done = [run for v in collected["variants"].values() for run in v["runs"].values()]
        remaining = sum(len(v["missing"]) for v in collected["variants"].values())
        claim_power = power.claim_power(
            results, [run["cpu_seconds"] for run in done if run["cpu_seconds"] is not None], remaining
        )
    else:  # a pilot (or the quick mode's smoke test) estimates the noise that plans a study from its own runs
        try:
            estimate = power.estimate_from(collected, summary)
        except StudyError as error:
            no_estimate = str(error)
        if estimate is not None:
            plan = power.study_plan(estimate, jobs=jobs, cores=conditions.get("cpu_count") or 1)
    best = best_run(collected, summary) if collected["mode"] == "full" else None

    usage = measurements["usage"]
    figures = {"curves": "figures/training_curves.png", "paired": "figures/paired_differences.png",
               "usage": {name: f"figures/routing-{name}.png" for name in usage}}  # fmt: skip
    write.plot_curves(collected, measurements["training_loss"], output.parent / figures["curves"])
    write.plot_paired_differences(results, output.parent / figures["paired"])
    for name, data in usage.items():
        write.plot_routing(name, data, output.parent / figures["usage"][name])
    for stale in (output.parent / "figures").glob("routing-*.png"):  # of models this report no longer shows
        if stale.name not in {Path(path).name for path in figures["usage"].values()}:
            stale.unlink()
    gpu_recipes = [measure.recipe_cost(name) for name in measure.GPU_RECIPES]
    report = write.StudyReport(
        collected=collected, summary=summary, results=results, costs=measurements["costs"], usage=usage,
        figures=figures, estimate=estimate, pairing=measurements["pairing"], plan=plan, no_estimate=no_estimate,
        best={k: v for k, v in best.items() if k != "run"} if best else None, gpu_recipes=gpu_recipes,
        recipe=measurements["recipe"], claim_power=claim_power,
    )  # fmt: skip
    notes = write.build_notes(report)
    write_text_atomic(output, write.build_markdown(report, notes))
    if notes_output is not None:
        header = ("<!-- Generated by `python -m experiments.report` with docs/results.md; edit experiments/write.py, "
                  "not this file. -->\n\n")  # fmt: skip
        write_text_atomic(notes_output, header + notes)
    summary_json = {
        "mode": collected["mode"], "revisions": revisions(collected), "baselines": summary["baselines"],
        "costs": measurements["costs"], "usage": usage, "variants": summary["variants"],
        "comparisons": comparisons_to_json(results), "pairing": measurements["pairing"], "power": estimate,
        "plan": plan, "no_power_estimate": no_estimate, "claim_power": claim_power, "gpu_recipes": gpu_recipes,
        "best": {k: best[k] for k in ("seed", "delta_m", "training_loss")} if best else None,
    }  # fmt: skip
    summary_json = json.loads(json.dumps(summary_json, default=list))
    output_root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_root / SUMMARY_FILE, summary_json)
    return summary_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build docs/results.md from the study's results table.")
    parser.add_argument(
        "--output-root", type=Path, default=Path(DEFAULT_OUTPUT_ROOTS["full"]), help="the runner's output root"
    )
    parser.add_argument("--output", type=Path, default=None,
                        help=f"the markdown report (default: {RESULTS_FILE} for the full study, OUTPUT_ROOT/results.md "
                             "for the pilot and the quick mode)")  # fmt: skip
    parser.add_argument(
        "--notes",
        type=Path,
        default=None,
        help=f"where the reading notes go too (default: {STUDY_NOTES_FILE} for the full study)",
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
            has_study = (output_root / STUDY_FILE).is_file()
            # Only the full study writes the committed page: a pilot or a smoke test writes beside its runs.
            full = not has_study or read_study(output_root)["mode"] == "full"
            output = args.output or (Path(RESULTS_FILE) if full else output_root / "results.md")
            notes = args.notes or (Path(STUDY_NOTES_FILE) if full else None)
            build_report(output_root, output.resolve(), notes.resolve() if notes else None,
                         args.allow_mixed_revisions, args.jobs)  # fmt: skip
    except StudyError as error:
        print(f"experiments.report: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {output}" + (f" and {notes}" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
