"""The study's machinery without training: study definition, launch commands, skip/resume, aggregation, Δm, claims."""

import contextlib
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from experiments import report, run, study
from modeling_taskexpert.task_definitions import TASKS
from modeling_taskexpert.training import load_recipe, parse_command_line

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_full_study_covers_every_variant_with_three_seeds():
    runs = study.study_runs()
    names = {r.variant.name for r in runs}
    assert {f"single-{task}" for task in TASKS} <= names
    assert {"taskexpert", "shared-decoder", "no-memory", "uniform-gates", "one-expert", "two-experts",
            "twelve-experts", "last-layer-only", "modsquad"} <= names  # fmt: skip
    for name in names:
        assert sorted(r.seed for r in runs if r.variant.name == name) == [0, 1, 2]
    assert all(r.all_overrides == {} for r in runs)  # the full study trains the recipes as they are


def test_every_study_recipe_loads_and_shared_decoder_is_what_it_claims():
    with contextlib.chdir(REPO_ROOT):
        recipes = {v.name: load_recipe(v.recipe) for v in study.VARIANTS}
    shared = recipes["shared-decoder"].model_overrides
    assert shared == {"num_experts": 1, "use_memory": False, "gating": "uniform", "head_uses_all_layers": True}
    # Without memory, only concatenated layer features reach the heads from every MMoE layer.
    assert recipes["no-memory"].model_overrides == {"use_memory": False, "head_uses_all_layers": True}
    assert recipes["modsquad"].model_config.endswith("modsquad-tiny.json")
    # Every model of the study trains with the same schedule as the default TaskExpert.
    assert {(r.max_steps, r.learning_rate, r.per_device_train_batch_size) for r in recipes.values()} == {(600, 2e-3, 8)}
    for task in TASKS:
        assert recipes[f"single-{task}"].tasks == [task]


def test_quick_study_is_small_and_overrides_reach_train_py():
    runs = study.study_runs(quick=True)
    assert [r.name for r in runs] == [f"{name}/seed0" for name in study.QUICK_VARIANTS]
    by_name = {r.variant.name: r for r in runs}
    command = run.launch_command(by_name["taskexpert"], Path("out/taskexpert/seed0"), dataset="toy")
    assert command[command.index("--seed") + 1] == "0" and "latest" in command
    with contextlib.chdir(REPO_ROOT):
        recipe = parse_command_line(command[command.index("train.py") + 1 :])
        single = run.launch_command(by_name["single-depth"], Path("out/single-depth/seed0"))
        single_recipe = parse_command_line(single[single.index("train.py") + 1 :])
    assert recipe.tasks == ["semseg", "depth"] and recipe.max_steps == 3 and recipe.dataset == "toy"
    assert recipe.output_dir == "out/taskexpert/seed0" and recipe.resume_from_checkpoint == "latest"
    assert single_recipe.tasks == ["depth"] and single_recipe.max_steps == 3


def test_only_restricts_and_unknown_names_are_reported():
    assert {r.variant.name for r in study.study_runs(only=("taskexpert", "single-edge"))} == {"taskexpert", "single-edge"}
    with pytest.raises(ValueError, match="Unknown study variant.*'tsakexpert'"):
        study.study_runs(only=("tsakexpert",))
    with pytest.raises(ValueError, match="quick study"):
        study.study_runs(quick=True, only=("twelve-experts",))


# ---- a fake training: writes a finished run folder with chosen metrics ----------------------------------------------
METRICS = {  # variant -> seed -> metrics; single-task models give their task only
    "single-semseg": {0: {"semseg/mIoU": 40.0}, 1: {"semseg/mIoU": 60.0}},
    "single-depth": {0: {"depth/RMSE": 2.0}, 1: {"depth/RMSE": 2.0}},
    "taskexpert": {0: {"semseg/mIoU": 55.0, "depth/RMSE": 1.8}, 1: {"semseg/mIoU": 45.0, "depth/RMSE": 2.2}},
    "shared-decoder": {0: {"semseg/mIoU": 50.0, "depth/RMSE": 2.0}, 1: {"semseg/mIoU": 50.0, "depth/RMSE": 2.0}},
}


def fake_launcher(calls):
    def launch(command, log_path):
        output_dir = Path(command[command.index("--output_dir") + 1])
        seed = int(command[command.index("--seed") + 1])
        variant = output_dir.parent.name
        calls.append(variant)
        if variant == "broken":
            return 1
        metrics = METRICS[variant][seed]
        tasks = [key.split("/")[0] for key in metrics]
        (output_dir / "metrics.json").write_text(json.dumps(metrics))
        (output_dir / "config.json").write_text(json.dumps({"tasks": tasks, "model_type": "taskexpert"}))
        recipe = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "dataset": "toy"}
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        log = [{"kind": "train", "step": 20, "images_per_second": 1.0, "loss": 3.0},  # warm-up window, left out
               {"kind": "train", "step": 40, "images_per_second": 16.0, "loss": 2.0},
               {"kind": "train", "step": 60, "images_per_second": 32.0 / (seed + 1), "loss": 1.0}]  # fmt: skip
        (output_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return 0

    return launch


def _variant_runs(names, seeds=(0, 1)):
    variants = study.variants_by_name()
    return [study.Run(variants[name], seed) for name in names for seed in seeds]


def test_finished_runs_are_skipped_and_failures_do_not_stop_the_study(tmp_path):
    calls = []
    names = ["taskexpert", "single-semseg"]
    outcome = run.run_study(_variant_runs(names), tmp_path, dataset=None, launcher=fake_launcher(calls))
    assert set(outcome.values()) == {"finished"} and calls == ["taskexpert", "taskexpert", "single-semseg", "single-semseg"]
    calls.clear()
    outcome = run.run_study(_variant_runs(names), tmp_path, launcher=fake_launcher(calls))
    assert set(outcome.values()) == {"skipped"} and calls == []

    broken = study.Variant("broken", "hub_configs/synthetic-tiny.yaml", "ablation", "fails")
    runs = [study.Run(broken, 0)] + _variant_runs(["single-depth"], seeds=(0,))
    outcome = run.run_study(runs, tmp_path, launcher=fake_launcher(calls))
    assert outcome == {"broken/seed0": "failed", "single-depth/seed0": "finished"}
    recorded = run.read_study(tmp_path)
    assert recorded["mode"] == "full" and len(recorded["runs"]) == 6  # merged with the earlier runs
    with pytest.raises(run.StudyError, match="records a full study"):
        run.run_study(_variant_runs(["taskexpert"]), tmp_path, quick=True, launcher=fake_launcher(calls))


def test_parallel_jobs_train_every_run_once_with_a_share_of_the_threads(tmp_path):
    calls = []
    names = ["taskexpert", "single-semseg", "single-depth"]
    outcome = run.run_study(_variant_runs(names), tmp_path, launcher=fake_launcher(calls), jobs=2)
    assert list(outcome) == [f"{name}/seed{seed}" for name in names for seed in (0, 1)]
    assert set(outcome.values()) == {"finished"} and sorted(calls) == sorted(names * 2)
    # The report says under which conditions the step times were measured.
    assert run.read_study(tmp_path)["jobs"] == 2
    collected = report.collect(tmp_path)
    assert collected["jobs"] == 2 and "2 runs training at once" in report._step_time_conditions(collected)
    with pytest.raises(run.StudyError, match="jobs must be at least 1"):
        run.run_study(_variant_runs(names), tmp_path, launcher=fake_launcher(calls), jobs=0)
    # The default launcher gives each run its share of the threads through OMP_NUM_THREADS.
    log = tmp_path / "launch.log"
    command = [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"]
    assert run._launch_subprocess(command, log, threads=3) == 0 and log.read_text().strip() == "3"


def test_bad_override_fails_before_any_run(tmp_path):
    variant = study.Variant("taskexpert", "hub_configs/synthetic-tiny.yaml", "taskexpert", "x", {"max_stepz": 3})
    calls = []
    with pytest.raises(run.StudyError, match=r"taskexpert/seed0.*max_stepz"):
        run.run_study([study.Run(variant, 0)], tmp_path, launcher=fake_launcher(calls))
    assert calls == []


def test_aggregation_delta_m_and_step_time_match_hand_computation(tmp_path):
    run.run_study(_variant_runs(list(METRICS)), tmp_path, launcher=fake_launcher([]))
    collected = report.collect(tmp_path)
    assert list(collected["variants"]) == ["taskexpert", "shared-decoder", "single-semseg", "single-depth"]
    summary = report.aggregate(collected)
    assert summary["baselines"] == {"semseg/mIoU": 50.0, "depth/RMSE": 2.0}
    taskexpert = summary["variants"]["taskexpert"]
    assert taskexpert["metrics"]["semseg/mIoU"] == (50.0, pytest.approx(statistics.stdev([55.0, 45.0])))
    # Δm = 100/2 * ((M_semseg - 50) / 50 - (M_depth - 2) / 2): seed 0: 50 * (0.1 + 0.1); seed 1: 50 * (-0.1 - 0.1).
    assert taskexpert["delta_m_per_seed"] == {0: pytest.approx(10.0), 1: pytest.approx(-10.0)}
    assert taskexpert["delta_m"][0] == pytest.approx(0.0) and taskexpert["delta_m"][1] == pytest.approx(200**0.5)
    assert summary["variants"]["shared-decoder"]["delta_m"] == (pytest.approx(0.0), pytest.approx(0.0))
    # Step time: batch 8 / images per second, median over the windows after the first (seed 0: 0.5 s and 0.25 s;
    # seed 1: 0.5 s twice), then the mean over seeds.
    assert taskexpert["step_seconds"][0] == pytest.approx(statistics.fmean([(0.5 + 0.25) / 2, 0.5]))
    assert "delta_m" not in summary["variants"]["single-depth"]

    best_seed, best_run = report.best_taskexpert_run(collected, summary)
    assert best_seed == 0 and best_run["folder"] == tmp_path / "taskexpert" / "seed0"


def test_claims_compare_against_seed_noise():
    assert report.assess((5.0, 1.0), (1.0, 1.0), seeds=3).startswith("holds (difference +4.00")
    assert report.assess((1.0, 1.0), (5.0, 1.0), seeds=3).startswith("does not hold")
    assert report.assess((2.0, 1.0), (1.0, 1.0), seeds=3).startswith("inconclusive")  # 1 < sqrt(2)
    assert report.assess((2.0, None), (1.0, None), seeds=1) == "not assessable (fewer than 2 seeds)"
    assert report.assess(None, (1.0, 0.0), seeds=3) == "not assessable (missing runs or Δm)"


def test_best_checkpoint_copy_leaves_out_checkpoints_and_replaces_atomically(tmp_path):
    source = tmp_path / "run"
    (source / "checkpoints" / "step_10").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "README.md", "launch.log", ".final_tmp"):
        (source / name).write_text(name)
    destination = tmp_path / "outputs" / "best"
    destination.mkdir(parents=True)
    (destination / "stale.txt").write_text("old")
    report.copy_model_folder(source, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in destination.parent.iterdir()] == ["best"]  # no staging folder left behind


def test_report_without_study_names_the_folder(tmp_path):
    with pytest.raises(run.StudyError, match="No study.json under"):
        report.collect(tmp_path)
