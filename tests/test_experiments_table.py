"""The study's results as data: the table of runs, the runner writing it at a fixed code revision, and the page built
from it alone, recomputed by an independent script (tests/reproduce_results.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import collect, paired, report, run, study, table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_results  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "a" * 40


def _row(variant: str, seed: int, metrics: dict, **fields) -> dict:
    known = study.variants_by_name()[variant]
    row = {"variant": variant, "kind": known.kind, "seed": seed, "tasks": fields.pop("tasks", "semseg;depth"),
           "model_type": "taskexpert", "git_commit": COMMIT, "git_dirty": False, "package_version": "0.1.0",
           "torch_version": "2.13.0+cpu", "recipe_sha256": "ab" * 32, "machine": "Some CPU, 2 logical CPUs",
           "cpu_seconds": 300.5, "wall_seconds": 160.25,
           "step_seconds": 0.25, "final_training_loss": 11.5}  # fmt: skip
    return {**row, **fields, **metrics}


def test_the_table_gives_back_every_number_it_was_given(tmp_path):
    rows = [
        _row("taskexpert", 0, {"semseg/mIoU": 0.1 + 0.2, "depth/RMSE": 1e-300, "semseg/IoU/cat": 47.123456789012345}),
        _row("single-semseg", 1, {"semseg/mIoU": -3.0}, tasks="semseg", cpu_seconds=None, git_dirty=None),
    ]
    path = tmp_path / "runs.csv"
    table.write_table(path, rows)
    back = table.read_table(path)
    assert back[0] == rows[0]  # repr round trip: bit for bit, booleans and ints typed back
    assert back[1]["cpu_seconds"] is None and back[1]["git_dirty"] is None
    assert "depth/RMSE" not in back[1]  # a metric the run does not have is absent, not 0
    header = path.read_text().splitlines()[0].split(",")
    assert header[: len(table.RUN_COLUMNS)] == list(table.RUN_COLUMNS)
    assert header[len(table.RUN_COLUMNS) :] == sorted(["semseg/mIoU", "depth/RMSE", "semseg/IoU/cat"])


def test_a_bad_table_is_refused_naming_the_file_line_and_column(tmp_path):
    path = tmp_path / "runs.csv"
    table.write_table(path, [_row("taskexpert", 0, {"semseg/mIoU": 40.0})])
    good = path.read_text()
    with pytest.raises(table.TableError, match="No results table at"):
        table.read_table(tmp_path / "missing.csv")
    path.write_text(good.replace("recipe_sha256,", ""))
    with pytest.raises(table.TableError, match="the header has no column 'recipe_sha256'"):
        table.read_table(path)
    path.write_text(good.replace(",40.0", ",forty"))
    with pytest.raises(table.TableError, match=r"runs.csv, line 2, column 'semseg/mIoU': cannot read 'forty'"):
        table.read_table(path)
    path.write_text(good + good.splitlines()[1] + "\n")
    with pytest.raises(table.TableError, match="two rows for taskexpert seed 0"):
        table.read_table(path)
    path.write_text(good.rstrip("\n") + ",1\n")
    with pytest.raises(table.TableError, match="line 2: 17 cells, the header has 16"):
        table.read_table(path)


def test_rows_of_another_commit_are_refused_and_a_rerun_replaces_its_row(tmp_path):
    path = tmp_path / "runs.csv"
    table.add_row(path, _row("taskexpert", 1, {"semseg/mIoU": 40.0}))
    table.add_row(path, _row("taskexpert", 0, {"semseg/mIoU": 41.0}))
    table.add_row(path, _row("taskexpert", 1, {"semseg/mIoU": 42.0}))
    assert [(r["seed"], r["semseg/mIoU"]) for r in table.read_table(path)] == [(0, 41.0), (1, 42.0)]
    with pytest.raises(table.TableError, match="holds runs of commit aaaaaaaaaaaa; .* trained with bbbbbbbbbbbb"):
        table.add_row(path, _row("taskexpert", 2, {"semseg/mIoU": 40.0}, git_commit="b" * 40))


def test_the_runner_adds_a_row_per_finished_run_and_skips_runs_the_table_has(tmp_path):
    from test_experiments import COMMIT as RUN_COMMIT, METRICS, _variant_runs, fake_launcher

    runs, root, path = _variant_runs(["taskexpert", "single-semseg"]), tmp_path / "runs", tmp_path / "runs.csv"
    outcome = run.run_study(runs, root, launcher=fake_launcher([]), results_table=path)
    assert set(outcome.values()) == {"finished"}
    rows = {(r["variant"], r["seed"]): r for r in table.read_table(path)}
    assert sorted(rows) == sorted((r.variant.name, r.seed) for r in runs)
    taskexpert = rows[("taskexpert", 0)]
    assert taskexpert["semseg/mIoU"] == METRICS["taskexpert"][0]["semseg/mIoU"]
    assert taskexpert["git_commit"] == RUN_COMMIT and taskexpert["tasks"] == "semseg;depth"
    assert taskexpert["final_training_loss"] == 1.0

    # The folders are gone (another session): the table alone says what is done; a run it lacks trains.
    for folder in root.iterdir():
        if folder.is_dir():
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    table.write_table(path, [r for key, r in rows.items() if key != ("single-semseg", 1)])
    launched = []
    outcome = run.run_study(runs, root, launcher=fake_launcher(launched), results_table=path)
    assert outcome.pop("single-semseg/seed1") == "finished" and set(outcome.values()) == {"skipped"}
    assert len(launched) == 1 and len(table.read_table(path)) == len(runs)


def test_the_best_seed_is_chosen_from_the_table_and_retrained_when_its_folder_is_elsewhere(tmp_path):
    """A study spanning sessions: the seed with the lowest final training loss among all rows is served; without its
    folder on this machine it is trained again, and its metrics must equal its row."""
    from test_experiments import _variant_runs, fake_launcher

    runs, root, path = (
        _variant_runs(["taskexpert", "single-semseg", "single-depth"]),
        tmp_path / "runs",
        tmp_path / "t.csv",
    )
    run.run_study(runs, root, launcher=fake_launcher([]), results_table=path)
    subprocess.run(["rm", "-rf", str(root / "taskexpert" / "seed0")], check=True)  # the best (loss 1.0 < 1.5)
    launched = []
    best = run.promote_best_model(root, tmp_path / "best", results_table=path, launcher=fake_launcher(launched))
    assert best["seed"] == 0 and launched == ["taskexpert"]
    assert json.loads((tmp_path / "best" / "metrics.json").read_text()) == table.metric_columns(
        next(r for r in table.read_table(path) if (r["variant"], r["seed"]) == ("taskexpert", 0))
    )
    # The table says something else than what training gives: refused, nothing served from it.
    rows = table.read_table(path)
    next(r for r in rows if (r["variant"], r["seed"]) == ("taskexpert", 0))["semseg/mIoU"] += 1.0
    table.write_table(path, rows)
    with pytest.raises(
        collect.StudyError, match=r"seed0: its final metrics differ from its row .* \(semseg/mIoU: 55.0 against 56.0\)"
    ):
        run.promote_best_model(root, tmp_path / "best2", results_table=path)
    assert not (tmp_path / "best2").exists()


def test_the_study_trains_with_the_code_of_its_fixed_revision(tmp_path):
    """A clean checkout of the commit, apart from the working tree; the launched processes import its package."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    folder = run.checkout_code("HEAD", tmp_path, generate_data=False)
    assert folder == tmp_path / "code" / head and (folder / "train.py").is_file()
    assert (
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip() == head
    )
    assert run.checkout_code(head, tmp_path, generate_data=False) == folder  # reused, not cloned again
    command = [
        sys.executable,
        "-c",
        "import modeling_taskexpert, os; print(os.path.realpath(modeling_taskexpert.__file__))",
    ]
    assert run._launch_subprocess(command, tmp_path / "launch.log", code_dir=folder) == 0
    assert (tmp_path / "launch.log").read_text().strip() == os.path.realpath(
        folder / "modeling_taskexpert" / "__init__.py"
    )
    with pytest.raises(collect.StudyError, match="git rev-parse .*no-such-revision"):
        run.checkout_code("no-such-revision", tmp_path, generate_data=False)


# ---------------------------------------------------------------------------------------------------------------------
# The page from the table alone, and its independent reproduction
# ---------------------------------------------------------------------------------------------------------------------
BASE = {"semseg": ("semseg/mIoU", 40.0, 1), "human_parts": ("human_parts/mIoU", 18.0, 1),
        "saliency": ("saliency/maxF", 55.0, 1), "edge": ("edge/odsF", 38.0, 1), "normals": ("normals/mean", 30.0, -1),
        "depth": ("depth/RMSE", 0.8, -1)}  # fmt: skip
# Effects (% of every primary metric, in the better direction) making gating hold, the shared decoder fail and the
# memory inconclusive.
EFFECTS = {"taskexpert": 3.0, "all-layer-heads": 3.0, "uniform-gates": 0.5, "no-memory": 2.8, "one-expert": 1.5,
           "shared-decoder": 6.0, "two-experts": 2.0, "twelve-experts": 3.5, "last-layer-only": 1.0, "modsquad": 2.0}  # fmt: skip


def constructed_full_study(seed: int = 0) -> list[dict]:
    """Every run of the pre-registered plan, with metrics drawn around the effects above."""
    rng = np.random.default_rng(seed)
    rows = []
    for entry in study.study_runs("full"):
        name = entry.variant.name
        tasks = [name.removeprefix("single-")] if entry.variant.kind == "single-task" else list(BASE)
        effect = EFFECTS.get(name, 0.0)
        metrics = {}
        for task in tasks:
            key, base, sign = BASE[task]
            relative = (effect + rng.normal(0, 1.5)) / 100
            metrics[key] = base * (1 + sign * relative)
            metrics[f"{task}/second"] = float(rng.uniform(10, 20))
        if "edge" in tasks:
            metrics["edge/odsF_approx"] = metrics["edge/odsF"] + 8.0
        rows.append(_row(name, entry.seed, metrics, tasks=";".join(tasks), cpu_seconds=float(rng.uniform(280, 360)),
                         step_seconds=float(rng.uniform(0.2, 0.3)), final_training_loss=float(rng.uniform(10, 12))))  # fmt: skip
    return rows


def build_page(tmp_path, rows: list[dict]) -> Path:
    table_path, page = tmp_path / "study-runs.csv", tmp_path / "docs" / "results.md"
    table.write_table(table_path, rows)
    report.build_report(tmp_path / "no-run-folders", page, mode="full", table_path=table_path,
                        measurements_path=tmp_path / "no-measurements.json")  # fmt: skip
    return page


@pytest.mark.slow
def test_a_page_built_from_the_table_alone_is_reproduced_by_the_independent_script(tmp_path):
    rows = constructed_full_study()
    assert len(rows) == sum(len(study.mode_seeds("full", v)) for v in study.VARIANTS) == 134
    page = build_page(tmp_path, rows)
    text = page.read_text()
    assert "INTERIM" not in text
    verdicts = {
        m.group(1): m.group(2) for m in re.finditer(r"^\| (.+?) \| .*\| (holds|fails|inconclusive) \|", text, re.M)
    }
    assert verdicts["Dynamic gating helps (TaskExpert vs uniform gates)"] == paired.HOLDS
    assert (
        verdicts["TaskExpert beats a shared decoder (same parameters, heads reading the same layers)"] == paired.FAILS
    )
    assert "| 7 of 7 |" in text and "| 10 of 10 |" in text

    plan = REPO_ROOT / "experiments" / "preregistration.md"
    check = reproduce_results.reproduce(tmp_path / "study-runs.csv", page, tmp_path / "no-measurements.json", plan)
    assert check.errors == [] and check.checked > 600

    # The script is not a rubber stamp: one digit changed on the page, or one value in the table, and it says where.
    gating = re.search(r"^\| Dynamic gating helps .*$", text, re.M).group(0)
    mean = re.search(r"\| ([-+]\d+\.\d\d) \[", gating).group(1)
    changed = f"{float(mean) + 0.01:+.2f}"
    page.write_text(text.replace(gating, gating.replace(f"| {mean} [", f"| {changed} [", 1)))
    check = reproduce_results.reproduce(tmp_path / "study-runs.csv", page, tmp_path / "no-measurements.json", plan)
    assert len(check.errors) == 1 and check.errors[0].startswith(f"claim gating mean: page {changed}")
    page.write_text(text)
    rows[0]["semseg/mIoU"] += 1.0  # taskexpert seed 0: its Δm, every comparison with it, its semseg mean move
    table.write_table(tmp_path / "study-runs.csv", rows)
    check = reproduce_results.reproduce(tmp_path / "study-runs.csv", page, tmp_path / "no-measurements.json", plan)
    assert any(error.startswith("claim gating mean") for error in check.errors)
    assert any(error.startswith("taskexpert semseg/mIoU mean") for error in check.errors)


@pytest.mark.slow
def test_an_interim_page_gives_no_verdict_and_says_what_remains(tmp_path):
    rows = [row for row in constructed_full_study() if row["seed"] < 3]
    page = build_page(tmp_path, rows)
    text = page.read_text()
    assert f"INTERIM — {len(rows)} of the plan's 134 runs are in the table" in text
    assert text.count(f"| {paired.INTERIM} |") == 5 and "| holds |" not in text and "| 3 of 7 |" in text
    assert f"Still to run: {134 - len(rows)} runs of the plan" in text
    assert "taskexpert seeds 3-9; " in text and "two-experts seeds 3-4; " in text  # what is missing, as ranges
    check = reproduce_results.reproduce(tmp_path / "study-runs.csv", page, tmp_path / "none.json",
                                        REPO_ROOT / "experiments" / "preregistration.md")  # fmt: skip
    assert check.errors == [] and check.checked > 300


@pytest.mark.slow
def test_the_committed_page_is_what_the_committed_table_gives(tmp_path):
    """docs/results.md is regenerated from the committed table and measurements, on a clone without any run folder,
    and the independent script reproduces its numbers."""
    committed = REPO_ROOT / "docs" / "results.md"
    check = reproduce_results.reproduce(
        REPO_ROOT / table.STUDY_TABLE, committed, REPO_ROOT / "experiments" / "results" / "study-measurements.json",
        REPO_ROOT / "experiments" / "preregistration.md",
    )  # fmt: skip
    assert check.errors == [] and check.checked > 100
    page = tmp_path / "docs" / "results.md"
    report.build_report(tmp_path / "no-run-folders", page, notes_output=tmp_path / "notes.md", mode="full")
    assert page.read_text() == committed.read_text()
    assert (tmp_path / "notes.md").read_text() == (REPO_ROOT / "experiments" / "study_notes.md").read_text()
    summary = json.loads((tmp_path / "no-run-folders" / "summary.json").read_text())
    assert summary["mode"] == "full"
