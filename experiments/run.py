"""Train every run of the study (each in its own folder), skipping finished runs and resuming unfinished ones.

    python -m experiments.run                      # the full study (hours on 2 CPU cores)
    python -m experiments.run --pilot              # the pilot of the power estimate (experiments/power.py)
    python -m experiments.run --quick              # a smoke test of the machinery (minutes)
    python -m experiments.run --only taskexpert single-semseg
    python -m experiments.run --seeds 5            # the full study's first 5 seeds (add the rest later)
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
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from modeling_taskexpert.data import generate_synthetic_dataset, has_dataset_metadata, read_dataset_metadata
from modeling_taskexpert.file_utils import write_json_atomic
from modeling_taskexpert.training import load_recipe
from modeling_taskexpert.training.provenance import cpu_model

from . import table
from .collect import StudyError, aggregate, best_run, collect, collect_table, load_run, read_study
from .paths import DEFAULT_OUTPUT_ROOTS, LAUNCH_FILE, REPO_ROOT, STUDY_BEST_MODEL_DIR, STUDY_FILE
from .study import MODES, QUICK_DATASET, STUDY_OVERRIDES, STUDY_REVISION, Run, study_runs, variants_by_name


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
    mode: str = "full",
    dataset: Optional[str] = None,
    launcher: Callable[[list[str], Path], int] = None,
    jobs: int = 1,
    code_dir: Optional[Path] = None,
    results_table: Optional[Path] = None,
) -> dict[str, str]:
    """Train the runs that are not finished; returns run name -> "skipped" / "finished" / "failed".

    `launcher(command, log_path)` runs one command and returns its exit status (default: a subprocess in `code_dir`,
    the repository root when None, its output in `log_path`). A failed run does not stop the others; its log says
    why. With `jobs` > 1, that many runs train at once, each with an equal share of the CPU threads (small models use
    many threads poorly, so two one-thread runs finish sooner than two two-thread runs one after the other).
    With `results_table`, a run that has a row there is skipped as finished, and every run that finishes adds its
    row (`experiments/table.py`): the table, committed, carries the study across machines and sessions.
    """
    if jobs < 1:
        raise StudyError(f"jobs must be at least 1, got {jobs}.")
    output_root = Path(output_root)
    if launcher is None:
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        launcher = functools.partial(_launch_subprocess, threads=threads, code_dir=code_dir)
    tabled = set()
    if results_table is not None and Path(results_table).is_file():
        tabled = {(row["variant"], row["seed"]) for row in table.read_table(results_table)}
    table_lock = threading.Lock()

    def add_row(run: Run, folder: Path) -> None:
        if results_table is not None:
            with table_lock:  # runs finishing at once rewrite the table one after the other
                table.add_row(results_table, table.run_row(run.variant, run.seed, load_run(folder)))

    if mode not in MODES:
        raise StudyError(f"Unknown study mode {mode!r}; the modes are {MODES}.")
    _check_mode(output_root, mode)
    if dataset is None and mode == "quick":
        dataset = prepare_quick_dataset(output_root)
    if dataset is not None:
        read_dataset_metadata(dataset)  # a missing or foreign folder fails before any run starts
    check_runs(runs, dataset)
    _record_study(output_root, runs, mode, dataset or recipe_dataset(runs[0], code_dir), jobs)

    def train(index: int, run: Run) -> str:
        folder = run_dir(output_root, run)
        if (run.variant.name, run.seed) in tabled:
            print(f"[{index}/{len(runs)}] {run.name}: in {results_table}, skipped", flush=True)
            return "skipped"
        if is_finished(folder):
            print(f"[{index}/{len(runs)}] {run.name}: finished before, skipped", flush=True)
            add_row(run, folder)
            return "skipped"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        status = launcher(launch_command(run, folder, dataset), folder / "launch.log")
        outcome = "finished" if status == 0 and is_finished(folder) else "failed"
        if outcome == "finished":
            add_row(run, folder)
        print(f"[{index}/{len(runs)}] {run.name}: {outcome} in {time.perf_counter() - start:.0f} s"
              + (f" (see {folder / 'launch.log'})" if outcome == "failed" else ""), flush=True)  # fmt: skip
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train, index, run) for index, run in enumerate(runs, start=1)]
        return {run.name: future.result() for run, future in zip(runs, futures)}


def _launch_subprocess(
    command: list[str], log_path: Path, threads: Optional[int] = None, code_dir: Optional[Path] = None
) -> int:
    """Run one training command in `code_dir` (default: the repository root), its output appended to `log_path`; its
    wall and CPU time (the process and every process it waited for, e.g. train.py under `accelerate launch`) are
    appended to `launch.json` beside it."""
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    if code_dir is not None:  # that checkout's package, not the one installed from the repository
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_dir), environment.get("PYTHONPATH")]))
    # A launch into a folder without checkpoints trains from the first step: the run's CPU time is complete only
    # when its first launch was such a fresh one (a runner killed mid-run records nothing for that launch).
    fresh = not any((Path(log_path).parent / "checkpoints").glob("*"))
    start = time.perf_counter()
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            command, cwd=code_dir or REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment
        )
        _, wait_status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(wait_status)
    record_launch(Path(log_path).parent, {
        "exit_status": process.returncode, "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": usage.ru_utime + usage.ru_stime, "threads": threads, "fresh": fresh,
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
    })  # fmt: skip
    return process.returncode


def record_launch(folder: Path, launch: dict) -> None:
    """Append one launch (a run that was resumed has several) to `folder/launch.json`."""
    path = Path(folder) / LAUNCH_FILE
    launches = json.loads(path.read_text()) if path.is_file() else []
    write_json_atomic(path, [*launches, launch])


def _check_mode(output_root: Path, mode: str) -> None:
    """Studies of different modes never share an output root (the report could not tell their runs apart)."""
    if (Path(output_root) / STUDY_FILE).is_file():
        recorded = read_study(output_root)["mode"]
        if recorded != mode:
            raise StudyError(
                f"{Path(output_root) / STUDY_FILE} records a {recorded} study; use another --output-root for the {mode} study."
            )


def _record_study(output_root: Path, runs: list[Run], mode: str, dataset: Optional[str], jobs: int = 1) -> None:
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
    write_json_atomic(path, {"mode": mode, "dataset": dataset, "jobs": jobs, "cpu_count": os.cpu_count(),
                             "runs": list(entries.values())})  # fmt: skip


def recipe_dataset(run: Run, code_dir: Optional[Path] = None) -> str:
    """The dataset folder of a run's recipe, as an absolute path when it is a local folder of the repository (or of
    the checkout `code_dir` the runs train in)."""
    with contextlib.chdir(REPO_ROOT):
        dataset = load_recipe(run.variant.recipe).dataset
    root = Path(code_dir) if code_dir is not None else REPO_ROOT
    return str(root / dataset) if (root / dataset).exists() else dataset


def _git(*arguments: str, cwd: Path = REPO_ROOT) -> str:
    completed = subprocess.run(["git", *arguments], cwd=cwd, capture_output=True, text=True)
    if completed.returncode != 0:
        raise StudyError(f"git {' '.join(arguments)} failed: {completed.stderr.strip()}")
    return completed.stdout.strip()


def checkout_code(revision: str, output_root: Path, generate_data: bool = True) -> Path:
    """A clean checkout of commit `revision` of this repository in OUTPUT_ROOT/code/COMMIT, holding the embedded
    synthetic benchmark as that code generates it (unless not `generate_data`). Every run of the study trains there,
    so all of them come from one revision whatever the working tree holds when they run (the runner, the table and
    the report may be newer)."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    folder = Path(output_root) / "code" / commit
    if not (folder / "train.py").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{commit}."))
        try:
            _git("clone", "--quiet", "--shared", "--no-checkout", str(REPO_ROOT), str(staging / "repo"))
            _git("checkout", "--quiet", "--detach", commit, cwd=staging / "repo")
            os.replace(staging / "repo", folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not generate_data:
        return folder
    environment = {**os.environ, "PYTHONPATH": str(folder)}
    command = [sys.executable, "-m", "modeling_taskexpert.data", "synthetic", "--output-dir", "data/synthetic",
               "--skip-if-exists"]  # fmt: skip
    completed = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        raise StudyError(f"Generating the synthetic benchmark with the code of {commit[:12]} failed:\n"
                         f"{completed.stderr[-2000:]}")  # fmt: skip
    return folder


def promote_best_model(
    output_root: Path,
    destination: Path = REPO_ROOT / STUDY_BEST_MODEL_DIR,
    results_table: Optional[Path] = None,
    launcher: Callable[[list[str], Path], int] = None,
    code_dir: Optional[Path] = None,
) -> Optional[dict]:
    """Copy the default TaskExpert's seed with the lowest final training loss (`collect.best_run`), push-ready, to
    `destination` (what `make space` serves). Returns {"seed", "delta_m", "folder"} of the copied run, or None when
    no seed logged a training loss.

    With `results_table`, the seed is chosen among every run of the table (a study spanning sessions has only some
    run folders on this machine); when its folder is missing, the run is trained again with the study's code
    (`launcher`, `code_dir` as in `run_study`) and its final metrics must equal its row: training is deterministic for
    a given code revision and machine, and the served model must be the one the table describes."""
    output_root = Path(output_root)
    if results_table is None:
        collected = collect(output_root)
    else:
        collected = collect_table(table.read_table(results_table), "full", source=str(results_table))
    best = best_run(collected, aggregate(collected))
    if best is None:
        return None
    best_training = Run(variants_by_name()["taskexpert"], best["seed"], dict(STUDY_OVERRIDES))
    folder = run_dir(output_root, best_training)
    if not is_finished(folder):
        run_study([best_training], output_root, launcher=launcher, code_dir=code_dir)
        if not is_finished(folder):
            raise StudyError(f"Retraining taskexpert seed {best['seed']} (the best of {results_table}) failed: "
                             f"see {folder / 'launch.log'}.")  # fmt: skip
    if results_table is not None:
        row = table.metric_columns(table.run_row(variants_by_name()["taskexpert"], best["seed"], load_run(folder)))
        expected = best["run"]["metrics"]
        differing = sorted(key for key in expected.keys() | row.keys() if expected.get(key) != row.get(key))
        if differing:
            raise StudyError(f"{folder}: its final metrics differ from its row in {results_table} ({differing[0]}: "
                             f"{row.get(differing[0])} against {expected.get(differing[0])}); the served model would "
                             "not be the one the table describes. Was it trained with other code or on another "
                             "machine?")  # fmt: skip
    copy_model_folder(folder, destination)
    return {"seed": best["seed"], "delta_m": best["delta_m"], "folder": str(folder)}


def copy_model_folder(source: Path, destination: Path) -> None:
    """Copy a finished run folder without its resumable checkpoints, the runner's files and hidden files, through
    a temporary folder renamed into place (an existing destination is replaced only once the copy is complete)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        shutil.copytree(
            source, staging / "folder", ignore=shutil.ignore_patterns("checkpoints", "launch.log", LAUNCH_FILE, ".*")
        )
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging / "folder", destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the runs of the TaskExpert study (see experiments/study.py).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few steps of a few variants on a toy dataset")
    mode.add_argument(
        "--pilot", action="store_true", help="the pilot runs of the power estimate (experiments/power.py)"
    )
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="full study only: train its first N seeds (descriptive variants: the first half, rounded up) "
                             "instead of all of them; a later run with more seeds completes the same study")  # fmt: skip
    parser.add_argument("--only", nargs="+", default=(), metavar="NAME", help="train only these variants")
    parser.add_argument("--output-root", type=Path, default=None,
                        help="runs go to OUTPUT_ROOT/VARIANT/seedS (default: "
                             + ", ".join(f"{path} for the {name} study" for name, path in DEFAULT_OUTPUT_ROOTS.items()) + ")")  # fmt: skip
    parser.add_argument("--dataset", default=None, help="dataset folder for every run (default: each recipe's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with CPU cores / JOBS threads (default: 1)")  # fmt: skip
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--code-revision", default=None, metavar="COMMIT",
                      help="train with the code of this commit, checked out under OUTPUT_ROOT/code (default for the "
                           f"full study: its revision, {STUDY_REVISION or 'not fixed yet'})")  # fmt: skip
    code.add_argument("--working-tree", action="store_true", help="train with the repository's working tree")
    parser.add_argument("--results-table", type=Path, default=None,
                        help=f"runs with a row there are done; finished runs add theirs (default for the full study: "
                             f"{table.STUDY_TABLE})")  # fmt: skip
    args = parser.parse_args(argv)
    study_mode = "quick" if args.quick else "pilot" if args.pilot else "full"
    output_root = args.output_root or Path(DEFAULT_OUTPUT_ROOTS[study_mode])
    revision = args.code_revision or (STUDY_REVISION if study_mode == "full" and not args.working_tree else None)
    results_table = args.results_table or (REPO_ROOT / table.STUDY_TABLE if study_mode == "full" else None)
    try:
        runs = study_runs(study_mode, only=tuple(args.only), seed_count=args.seeds)
        code_dir = checkout_code(revision, output_root.resolve()) if revision else None
        dataset = str(Path(args.dataset).resolve()) if args.dataset else None
        if dataset is None and study_mode != "quick":
            # a missing dataset fails now, with the folder named
            read_dataset_metadata(recipe_dataset(runs[0], code_dir))
        outcome = run_study(runs, output_root.resolve(), mode=study_mode, dataset=dataset, jobs=args.jobs,
                            code_dir=code_dir, results_table=results_table)  # fmt: skip
    except (StudyError, table.TableError, ValueError, FileNotFoundError) as error:
        print(f"experiments.run: {error}", file=sys.stderr)
        return 2
    failed = [name for name, status in outcome.items() if status == "failed"]
    if failed:
        print(f"experiments.run: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if study_mode == "full":
        try:
            with contextlib.chdir(REPO_ROOT):  # run folders name their datasets relative to the repository root
                best = promote_best_model(output_root.resolve(), results_table=results_table, code_dir=code_dir)
        except (StudyError, table.TableError) as error:
            print(f"experiments.run: the best model was not copied: {error}", file=sys.stderr)
            return 1
        if best is not None:
            print(f"Best TaskExpert seed {best['seed']} (Δm {best['delta_m']:+.2f} %) copied to {STUDY_BEST_MODEL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
