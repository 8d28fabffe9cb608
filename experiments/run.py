"""Train every run of the study (each in its own folder), skipping finished runs and resuming unfinished ones.

    python -m experiments.run                      # the full study (hours on 2 CPU cores)
    python -m experiments.run --quick              # a smoke test of the machinery (minutes)
    python -m experiments.run --only taskexpert single-semseg
    python -m experiments.run --jobs 2             # two runs at once, one thread each (on 2 cores)

Each run is `accelerate launch train.py --config RECIPE --seed S --output_dir ROOT/VARIANT/seedS ...`, with its console
output in `launch.log` of its folder. A folder holding `metrics.json` is finished and skipped; any other is resumed
from its latest checkpoint (or started afresh when it has none). `ROOT/study.json` records the mode and the runs, for
`python -m experiments.report`.
"""

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from modeling_taskexpert.data import generate_synthetic_dataset, has_dataset_metadata, read_dataset_metadata
from modeling_taskexpert.training import load_recipe, write_json_atomic

from .study import QUICK_DATASET, Run, study_runs

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_ROOT = "outputs/experiments"
DEFAULT_QUICK_OUTPUT_ROOT = "outputs/experiments-quick"
STUDY_FILE = "study.json"


class StudyError(RuntimeError):
    """A study that cannot run as asked; the message says which run or file and why."""


def run_dir(output_root: Path, run: Run) -> Path:
    return Path(output_root) / run.variant.name / f"seed{run.seed}"


def is_finished(folder: Path) -> bool:
    """train.py writes `metrics.json` last (after the model and its card), so its presence marks a finished run."""
    return (Path(folder) / "metrics.json").is_file()


def _command_line_value(value) -> str:
    """train.py parses override values as YAML; JSON is YAML, and plain strings pass as they are."""
    return value if isinstance(value, str) else json.dumps(value)


def launch_command(run: Run, output_dir: Path, dataset: Optional[str] = None) -> list[str]:
    """The `accelerate launch` command line of one run (always asking to resume: a fresh folder starts from scratch)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--dynamo_backend", "no", "train.py", "--config", run.variant.recipe, "--seed", str(run.seed),
               "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]  # fmt: skip
    overrides = dict(run.all_overrides)
    if dataset is not None:
        overrides["dataset"] = dataset
    for name, value in overrides.items():
        command += [f"--{name}", _command_line_value(value)]
    return command


def check_runs(runs: list[Run], dataset: Optional[str]) -> None:
    """Every recipe must load with its overrides before hours of training start (a typo fails here, not at run 20)."""
    for run in runs:
        overrides = {**run.all_overrides, **({"dataset": dataset} if dataset else {}), "seed": run.seed}
        try:
            with contextlib.chdir(REPO_ROOT):  # recipes name their files relative to the repository root
                load_recipe(run.variant.recipe, {key: _command_line_value(value) for key, value in overrides.items()})
        except ValueError as error:
            raise StudyError(f"Run {run.name}: {error}") from None


def prepare_quick_dataset(output_root: Path) -> str:
    """The toy dataset of the quick mode, generated once under the output root."""
    folder = Path(output_root) / "quick-dataset"
    if not has_dataset_metadata(folder):
        generate_synthetic_dataset(folder, num_workers=0, overwrite=folder.exists(), **QUICK_DATASET)
    return str(folder)


def run_study(
    runs: list[Run],
    output_root: Path,
    quick: bool = False,
    dataset: Optional[str] = None,
    launcher: Callable[[list[str], Path], int] = None,
    jobs: int = 1,
) -> dict[str, str]:
    """Train the runs that are not finished; returns run name -> "skipped" / "finished" / "failed".

    `launcher(command, log_path)` runs one command and returns its exit status (default: a subprocess in the
    repository root, its output in `log_path`). A failed run does not stop the others; its log says why. With
    `jobs` > 1, that many runs train at once, each with an equal share of the CPU threads (small models use many
    threads poorly, so two one-thread runs finish sooner than two two-thread runs one after the other).
    """
    if jobs < 1:
        raise StudyError(f"jobs must be at least 1, got {jobs}.")
    output_root = Path(output_root)
    if launcher is None:
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        launcher = functools.partial(_launch_subprocess, threads=threads)
    _check_mode(output_root, quick)
    if dataset is None and quick:
        dataset = prepare_quick_dataset(output_root)
    if dataset is not None:
        read_dataset_metadata(dataset)  # a missing or foreign folder fails before any run starts
    check_runs(runs, dataset)
    _record_study(output_root, runs, quick, dataset, jobs)

    def train(index: int, run: Run) -> str:
        folder = run_dir(output_root, run)
        if is_finished(folder):
            print(f"[{index}/{len(runs)}] {run.name}: finished before, skipped", flush=True)
            return "skipped"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        status = launcher(launch_command(run, folder, dataset), folder / "launch.log")
        outcome = "finished" if status == 0 and is_finished(folder) else "failed"
        print(f"[{index}/{len(runs)}] {run.name}: {outcome} in {time.perf_counter() - start:.0f} s"
              + (f" (see {folder / 'launch.log'})" if outcome == "failed" else ""), flush=True)  # fmt: skip
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train, index, run) for index, run in enumerate(runs, start=1)]
        return {run.name: future.result() for run, future in zip(runs, futures)}


def _launch_subprocess(command: list[str], log_path: Path, threads: Optional[int] = None) -> int:
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        return subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode


def _check_mode(output_root: Path, quick: bool) -> None:
    """A quick and a full study never share an output root (the report could not tell their runs apart)."""
    if (Path(output_root) / STUDY_FILE).is_file():
        recorded = read_study(output_root)["mode"]
        if recorded != ("quick" if quick else "full"):
            raise StudyError(f"{Path(output_root) / STUDY_FILE} records a {recorded} study; use another --output-root for this mode.")


def _record_study(output_root: Path, runs: list[Run], quick: bool, dataset: Optional[str], jobs: int = 1) -> None:
    """`study.json`: the mode, how many runs trained at once (their step times depend on it) and every run of the
    study, merged with the runs recorded before (e.g. by `--only`)."""
    path = output_root / STUDY_FILE
    recorded = read_study(output_root) if path.is_file() else {"runs": []}
    entries = {entry["name"]: entry for entry in recorded["runs"]}
    for run in runs:
        entries[run.name] = {
            "name": run.name, "variant": run.variant.name, "kind": run.variant.kind, "seed": run.seed,
            "description": run.variant.description, "recipe": run.variant.recipe, "overrides": run.all_overrides,
            "folder": str(Path(run.variant.name) / f"seed{run.seed}"),
        }  # fmt: skip
    dataset = dataset or recipe_dataset(runs[0])
    write_json_atomic(path, {"mode": "quick" if quick else "full", "dataset": dataset, "jobs": jobs, "cpu_count": os.cpu_count(),
                             "runs": list(entries.values())})  # fmt: skip


def recipe_dataset(run: Run) -> str:
    """The dataset folder of a run's recipe, as an absolute path when it is a local folder of the repository."""
    with contextlib.chdir(REPO_ROOT):
        dataset = load_recipe(run.variant.recipe).dataset
    return str(REPO_ROOT / dataset) if (REPO_ROOT / dataset).exists() else dataset


def read_study(output_root: Path) -> dict:
    path = Path(output_root) / STUDY_FILE
    try:
        study = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"No {STUDY_FILE} under {output_root}: run `python -m experiments.run` first.") from None
    except json.JSONDecodeError as error:
        raise StudyError(f"{path} is not valid JSON: {error}") from None
    if study.get("mode") not in ("quick", "full") or not isinstance(study.get("runs"), list):
        raise StudyError(f"{path} must hold 'mode' (quick or full) and a list of 'runs'.")
    return study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the runs of the TaskExpert study (see experiments/study.py).")
    parser.add_argument("--quick", action="store_true", help="a few steps of a few variants on a toy dataset")
    parser.add_argument("--only", nargs="+", default=(), metavar="NAME", help="train only these variants")
    parser.add_argument("--output-root", type=Path, default=None,
                        help=f"runs go to OUTPUT_ROOT/VARIANT/seedS (default: {DEFAULT_OUTPUT_ROOT}, "
                             f"or {DEFAULT_QUICK_OUTPUT_ROOT} with --quick)")  # fmt: skip
    parser.add_argument("--dataset", default=None, help="dataset folder for every run (default: each recipe's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with CPU cores / JOBS threads (default: 1)")  # fmt: skip
    args = parser.parse_args(argv)
    output_root = args.output_root or Path(DEFAULT_QUICK_OUTPUT_ROOT if args.quick else DEFAULT_OUTPUT_ROOT)
    try:
        runs = study_runs(quick=args.quick, only=tuple(args.only))
        dataset = str(Path(args.dataset).resolve()) if args.dataset else None
        if dataset is None and not args.quick:
            read_dataset_metadata(recipe_dataset(runs[0]))  # a missing dataset fails now, with the folder named
        outcome = run_study(runs, output_root.resolve(), quick=args.quick, dataset=dataset, jobs=args.jobs)
    except (StudyError, ValueError, FileNotFoundError) as error:
        print(f"experiments.run: {error}", file=sys.stderr)
        return 2
    failed = [name for name, status in outcome.items() if status == "failed"]
    if failed:
        print(f"experiments.run: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
