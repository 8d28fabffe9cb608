"""The study's machinery without training (experiments/run.py, collect.py, write.py): launch commands, skip/resume,
CPU time per launch, aggregation, Δm, paired comparisons, revisions, the templated notes, the best-model copy."""

import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

import pytest
from scipy import stats
import yaml

from experiments import collect, paired, run, study, write
from modeling_taskexpert.training import parse_command_line

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_is_small_and_overrides_reach_train_py():
    runs = study.study_runs("quick")
    assert {r.variant.name for r in runs} == set(study.QUICK_VARIANTS)
    by_name = {r.name: r for r in runs}
    command = run.launch_command(by_name["taskexpert/seed0"], Path("out/taskexpert/seed0"), dataset="toy")
    assert command[command.index("--seed") + 1] == "0" and "latest" in command
    with contextlib.chdir(REPO_ROOT):
        recipe = parse_command_line(command[command.index("train.py") + 1 :])
        single = run.launch_command(by_name["single-depth/seed1"], Path("out/single-depth/seed1"))
        single_recipe = parse_command_line(single[single.index("train.py") + 1 :])
    assert recipe.tasks == ["semseg", "depth"] and recipe.max_steps == 3 and recipe.dataset == "toy"
    assert recipe.output_dir == "out/taskexpert/seed0" and recipe.resume_from_checkpoint == "latest"
    assert single_recipe.tasks == ["depth"] and single_recipe.max_steps == 3 and single_recipe.seed == 1


# ---- a fake training: writes a finished run folder with chosen metrics ----------------------------------------------
METRICS = {  # variant -> seed -> metrics; single-task models give their task only
    "single-semseg": {0: {"semseg/mIoU": 40.0}, 1: {"semseg/mIoU": 60.0}},
    "single-depth": {0: {"depth/RMSE": 2.0}, 1: {"depth/RMSE": 2.0}},
    "taskexpert": {0: {"semseg/mIoU": 55.0, "depth/RMSE": 1.8}, 1: {"semseg/mIoU": 45.0, "depth/RMSE": 2.2}},
    "shared-decoder": {0: {"semseg/mIoU": 50.0, "depth/RMSE": 2.0}, 1: {"semseg/mIoU": 50.0, "depth/RMSE": 2.0}},
    # the reference of the shared-decoder comparison (heads reading both MMoE layers), here as good as taskexpert
    "all-layer-heads": {0: {"semseg/mIoU": 55.0, "depth/RMSE": 1.8}, 1: {"semseg/mIoU": 45.0, "depth/RMSE": 2.2}},
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def provenance(commit=COMMIT, dirty=False, **extra):
    return {"git_commit": commit, "git_dirty": dirty, "package_version": "0.1.0", "recipe_sha256": "ab" * 32,
            "torch_version": "2.13.0", "created": "2026-01-01T00:00:00+00:00", **extra}  # fmt: skip


def fake_launcher(calls, commit=COMMIT):
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
        recipe = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "dataset": "toy", "max_steps": 60}
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        (output_dir / "provenance.json").write_text(json.dumps(provenance(commit)))
        log = [{"kind": "train", "step": 20, "images_per_second": 1.0, "loss": 3.0},  # warm-up window, left out
               {"kind": "train", "step": 40, "images_per_second": 16.0, "loss": 2.0},
               {"kind": "train", "step": 60, "images_per_second": 32.0 / (seed + 1), "loss": 1.0 + 0.5 * seed}]  # fmt: skip
        (output_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        run.record_launch(
            output_dir, {"exit_status": 0, "wall_seconds": 10.0, "cpu_seconds": 60.0 * (seed + 1), "threads": 1}
        )
        return 0

    return launch


def _variant_runs(names, seeds=(0, 1)):
    variants = study.variants_by_name()
    return [study.Run(variants[name], seed) for name in names for seed in seeds]


def test_finished_runs_are_skipped_and_failures_do_not_stop_the_study(tmp_path):
    calls = []
    names = ["taskexpert", "single-semseg"]
    outcome = run.run_study(_variant_runs(names), tmp_path, dataset=None, launcher=fake_launcher(calls))
    assert set(outcome.values()) == {"finished"} and calls == [
        "taskexpert",
        "taskexpert",
        "single-semseg",
        "single-semseg",
    ]
    calls.clear()
    outcome = run.run_study(_variant_runs(names), tmp_path, launcher=fake_launcher(calls))
    assert set(outcome.values()) == {"skipped"} and calls == []

    broken = study.Variant("broken", "hub_configs/synthetic-tiny.yaml", "ablation", "fails")
    runs = [study.Run(broken, 0)] + _variant_runs(["single-depth"], seeds=(0,))
    outcome = run.run_study(runs, tmp_path, launcher=fake_launcher(calls))
    assert outcome == {"broken/seed0": "failed", "single-depth/seed0": "finished"}
    recorded = collect.read_study(tmp_path)
    assert recorded["mode"] == "full" and len(recorded["runs"]) == 6  # merged with the earlier runs
    with pytest.raises(collect.StudyError, match="records a full study"):
        run.run_study(_variant_runs(["taskexpert"]), tmp_path, mode="quick", launcher=fake_launcher(calls))
    with pytest.raises(collect.StudyError, match="Unknown study mode"):
        run.run_study(_variant_runs(["taskexpert"]), tmp_path, mode="fast", launcher=fake_launcher(calls))


def test_parallel_jobs_train_every_run_once_with_a_share_of_the_threads(tmp_path):
    calls = []
    names = ["taskexpert", "single-semseg", "single-depth"]
    outcome = run.run_study(_variant_runs(names), tmp_path, launcher=fake_launcher(calls), jobs=2)
    assert list(outcome) == [f"{name}/seed{seed}" for name in names for seed in (0, 1)]
    assert set(outcome.values()) == {"finished"} and sorted(calls) == sorted(names * 2)
    # The report says under which conditions the step times were measured.
    assert collect.read_study(tmp_path)["jobs"] == 2
    collected = collect.collect(tmp_path)
    assert collected["jobs"] == 2 and "2 runs training at once" in write._step_time_conditions(collected)
    with pytest.raises(collect.StudyError, match="jobs must be at least 1"):
        run.run_study(_variant_runs(names), tmp_path, launcher=fake_launcher(calls), jobs=0)


def test_the_default_launcher_gives_threads_and_records_the_cpu_time(tmp_path):
    command = [sys.executable, "-c", "import os\nfor _ in range(2_000_000): pass\nprint(os.environ['OMP_NUM_THREADS'])"]
    assert run._launch_subprocess(command, tmp_path / "launch.log", threads=3) == 0
    assert (tmp_path / "launch.log").read_text().strip() == "3"
    assert run._launch_subprocess([sys.executable, "-c", "raise SystemExit(4)"], tmp_path / "launch.log") == 4
    launches = json.loads((tmp_path / "launch.json").read_text())
    assert [launch["exit_status"] for launch in launches] == [0, 4]  # a resumed run has several launches
    assert launches[0]["threads"] == 3 and 0 < launches[0]["cpu_seconds"] and launches[0]["wall_seconds"] > 0
    from modeling_taskexpert.training.provenance import cpu_model

    assert launches[0]["machine"] == f"{cpu_model()}, {os.cpu_count()} logical CPUs"  # the run's machine, for its row


def test_bad_override_fails_before_any_run(tmp_path):
    variant = study.Variant("taskexpert", "hub_configs/synthetic-tiny.yaml", "taskexpert", "x", {"max_stepz": 3})
    calls = []
    with pytest.raises(collect.StudyError, match=r"taskexpert/seed0.*max_stepz"):
        run.run_study([study.Run(variant, 0)], tmp_path, launcher=fake_launcher(calls))
    assert calls == []


def test_aggregation_delta_m_and_step_time_match_hand_computation(tmp_path):
    run.run_study(_variant_runs(list(METRICS)), tmp_path, launcher=fake_launcher([]))
    collected = collect.collect(tmp_path)
    assert list(collected["variants"]) == [
        "taskexpert",
        "all-layer-heads",
        "shared-decoder",
        "single-semseg",
        "single-depth",
    ]
    summary = collect.aggregate(collected)
    assert summary["baselines"] == {"semseg/mIoU": 50.0, "depth/RMSE": 2.0}
    taskexpert = summary["variants"]["taskexpert"]
    assert taskexpert["metrics"]["semseg/mIoU"] == (50.0, pytest.approx(statistics.stdev([55.0, 45.0])))
    # Δm = 100/2 * ((M_semseg - 50) / 50 - (M_depth - 2) / 2): seed 0: 50 * (0.1 + 0.1); seed 1: 50 * (-0.1 - 0.1).
    assert taskexpert["delta_m_per_seed"] == {0: pytest.approx(10.0), 1: pytest.approx(-10.0)}
    assert taskexpert["delta_m"][0] == pytest.approx(0.0) and taskexpert["delta_m"][1] == pytest.approx(200**0.5)
    # Against the single-task models of the same seed: seed 0: 50 * ((55 - 40) / 40 + 0.1) = 23.75;
    # seed 1: 50 * ((45 - 60) / 60 - 0.1) = -17.5.
    assert taskexpert["delta_m_same_seed"] == {0: pytest.approx(23.75), 1: pytest.approx(-17.5)}
    assert summary["variants"]["shared-decoder"]["delta_m"] == (pytest.approx(0.0), pytest.approx(0.0))
    # Step time: batch 8 / images per second, median over the windows after the first (seed 0: 0.5 s and 0.25 s;
    # seed 1: 0.5 s twice), then the mean over seeds. CPU time: 60 s and 120 s.
    assert taskexpert["step_seconds"][0] == pytest.approx(statistics.fmean([(0.5 + 0.25) / 2, 0.5]))
    assert taskexpert["cpu_seconds"][0] == pytest.approx(90.0)
    assert "delta_m" not in summary["variants"]["single-depth"]
    assert taskexpert["revisions"] == [f"commit {COMMIT[:12]}, package 0.1.0, torch 2.13.0"]
    assert taskexpert["recipe_sha256"] == {0: "ab" * 32, 1: "ab" * 32}

    best = collect.best_run(collected, summary)  # its Δm: the full study's endpoint (same-seed single-task models)
    assert best["seed"] == 0 and best["delta_m"] == pytest.approx(23.75)
    assert best["run"]["folder"] == tmp_path / "taskexpert" / "seed0"

    # The choice reads the training loss, never the validation metrics: make the seed with the lower Δm the one with
    # the lower final training loss, and it is chosen.
    collected["variants"]["taskexpert"]["runs"][1]["final_training_loss"] = 0.25
    best = collect.best_run(collected, summary)
    assert best["seed"] == 1 and best["training_loss"] == 0.25
    assert best["delta_m"] == summary["variants"]["taskexpert"]["delta_m_same_seed"][1] < 23.75


def test_paired_comparisons_of_the_study(tmp_path):
    run.run_study(_variant_runs(list(METRICS)), tmp_path, launcher=fake_launcher([]))
    collected = collect.collect(tmp_path)
    collected["mode"] = "pilot"  # verdicts on whatever seeds there are (the full study waits for its plan's seeds)
    results = {r["comparison"].name: r for r in collect.comparisons(collected, collect.aggregate(collected))}
    assert set(results) == {"shared-decoder", "multi-task-gain", "all-layer-heads"}  # the others were not trained
    shared = results["shared-decoder"]
    # Δm differences seed by seed: 10 - 0 and -10 - 0; semseg: +5, -5; depth (lower is better): +0.2, -0.2.
    assert shared["delta_m"].differences == {0: pytest.approx(10.0), 1: pytest.approx(-10.0)}
    assert shared["per_task"]["depth"]["difference"].differences == {0: pytest.approx(0.2), 1: pytest.approx(-0.2)}
    assert shared["verdict"] == paired.TOO_FEW_SEEDS  # two seeds
    gain = results["multi-task-gain"]
    assert gain["delta_m"].differences == {0: pytest.approx(23.75), 1: pytest.approx(-17.5)}
    assert gain["per_task"]["semseg"]["difference"].differences == {0: pytest.approx(15.0), 1: pytest.approx(-15.0)}
    assert shared["revisions"] == [COMMIT[:12]]
    as_json = collect.comparisons_to_json(list(results.values()))
    assert json.loads(json.dumps(as_json))[0]["delta_m"]["method"] == paired.METHOD


def _constructed_study(tmp_path, mode: str, offsets: dict, seeds) -> dict:
    """One task (semseg), single-task mIoU 50 for every seed, each model's mIoU offset by the given percentages."""
    variants = study.variants_by_name()
    collected = {"mode": mode, "dataset": "toy", "jobs": 1, "cpu_count": 2, "variants": {}}
    for name, deltas in offsets.items():
        runs = {seed: {"metrics": {"semseg/mIoU": 50.0 * (1 + deltas[seed] / 100)}, "tasks": ["semseg"],
                       "revision": "r1", "short_revision": "r1", "step_seconds": None, "cpu_seconds": None, "folder": tmp_path}
                for seed in seeds}  # fmt: skip
        collected["variants"][name] = {"name": name, "kind": variants[name].kind, "runs": runs, "missing": []}
    collected["variants"]["single-semseg"] = {"name": "single-semseg", "kind": "single-task", "missing": [], "runs": {
        seed: {"metrics": {"semseg/mIoU": 50.0}, "tasks": ["semseg"], "revision": "r1", "short_revision": "r1", "step_seconds": None,
               "cpu_seconds": None, "folder": tmp_path} for seed in seeds}}  # fmt: skip
    return collected


def test_notes_are_templated_from_the_verdicts(tmp_path):
    """Five seeds, constructed so that one claim holds, one fails and one is inconclusive; the notes say so with the
    computed numbers (a pilot: verdicts on the seeds there are)."""
    offsets = {"taskexpert": [0.0] * 5, "all-layer-heads": [0.0] * 5, "uniform-gates": [-2.0, -1.5, -2.5, -1.0, -3.0],
               "shared-decoder": [1.0, 2.0, 1.5, 2.5, 3.0], "no-memory": [-1.0, 1.0, -0.5, 0.5, 0.2]}  # fmt: skip
    collected = _constructed_study(tmp_path, "pilot", offsets, range(5))
    summary = collect.aggregate(collected)
    results = {r["comparison"].name: r for r in collect.comparisons(collected, summary)}
    # Δm of taskexpert minus the other: the negated offsets, in points (one task, baseline 50).
    assert results["gating"]["verdict"] == paired.HOLDS
    assert results["shared-decoder"]["verdict"] == paired.FAILS
    assert results["memory"]["verdict"] == paired.INCONCLUSIVE
    notes = write.build_notes(write.StudyReport(collected, summary, list(results.values())))
    gating = results["gating"]["delta_m"]
    assert "Dynamic gating helps (TaskExpert vs uniform gates): holds.** taskexpert's Δm is above" in notes
    assert f"{gating.mean:+.2f} points, 95 % interval {gating.low:+.2f} to {gating.high:+.2f}, 5 seeds" in notes
    assert "TaskExpert beats a shared decoder (same parameters, heads reading the same layers): fails." in notes
    assert "(heads reading both MMoE layers, with and without memory): inconclusive." in notes
    assert "Code revision** of the runs: all runs: r1." in notes
    # The claims with five seeds are one family: Holm's adjustment of their two-sided t-test p-values, by hand.
    family = {name: results[name] for name in ("gating", "memory", "shared-decoder", "multi-task-gain")}
    # (multi-task-gain: all five differences are 0, no spread: p = 1 by definition, where scipy gives NaN)
    raw = {
        name: stats.ttest_1samp(list(r["delta_m"].differences.values()), 0.0).pvalue if r["delta_m"].std else 1.0
        for name, r in family.items()
    }
    ordered = sorted(raw, key=raw.get)
    expected, running = {}, 0.0
    for index, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - index) * raw[name]))
        expected[name] = running
    for name, result in family.items():
        assert result["family_size"] == 4
        assert result["delta_m"].p_value == pytest.approx(raw[name], rel=1e-9)
        assert result["adjusted_p"] == pytest.approx(expected[name], rel=1e-9)
    assert f"Holm-adjusted over 4 claims {expected['gating']:.3g}" in notes
    # The sign-flip test of five same-direction differences cannot go below 2/32.
    assert results["gating"]["delta_m"].p_sign_flip == 2 / 32 and "sign-flip test p = 0.0625" in notes
    memory = results["memory"]["delta_m"]
    assert f"rules out effects above {memory.high:+.2f} and below {memory.low:+.2f} points" in notes


def test_the_full_study_gives_verdicts_only_once_every_claim_has_its_planned_seeds(tmp_path):
    """Pre-registered plan, amendment 1: interim numbers without verdicts (and without a Holm family) until every
    model of every claim has the seeds the plan gives it; then the five claims are one Holm family."""
    offsets = {name: [0.0] * 10 for name in ("taskexpert", "all-layer-heads", "no-memory", "one-expert")}
    offsets["uniform-gates"] = [-2.0, -1.5, -2.5, -1.0, -3.0, -2.0, -1.8, 0, 0, 0]
    offsets["shared-decoder"] = [1.0, 2.0, 1.5, 2.5, 3.0, 2.0, 2.2, 0, 0, 0]
    collected = _constructed_study(tmp_path, "full", offsets, range(5))
    summary = collect.aggregate(collected)
    results = {r["comparison"].name: r for r in collect.comparisons(collected, summary)}
    claims = [name for name, r in results.items() if r["comparison"].claim]
    assert sorted(claims) == sorted(study.PLAN_CLAIM_SEEDS)
    assert all(results[name]["verdict"] == paired.INTERIM and "adjusted_p" not in results[name] for name in claims)
    notes = write.build_notes(write.StudyReport(collected, summary, list(results.values())))
    assert "Dynamic gating helps (TaskExpert vs uniform gates): interim** (" in notes
    assert "5 of the 7 seeds the plan gives this claim" in notes

    # Every model with the seeds of its claims (the plan's counts): verdicts, one family of five.
    counts = study.claim_seed_counts()
    complete = _constructed_study(tmp_path, "full", offsets, range(10))
    for name, variant in complete["variants"].items():
        variant["runs"] = {seed: run for seed, run in variant["runs"].items() if seed < counts.get(name, 10)}
    summary = collect.aggregate(complete)
    results = {r["comparison"].name: r for r in collect.comparisons(complete, summary)}
    assert results["gating"]["delta_m"].n == 7 and results["memory"]["delta_m"].n == 10
    assert {results[name]["family_size"] for name in claims} == {5}
    assert results["gating"]["verdict"] == paired.HOLDS and results["shared-decoder"]["verdict"] == paired.FAILS
    assert results["memory"]["verdict"] == paired.INCONCLUSIVE  # all-layer-heads equals no-memory: p = 1


def test_mixed_revisions_are_refused_unless_allowed(tmp_path):
    run.run_study(_variant_runs(["taskexpert"]), tmp_path, launcher=fake_launcher([]))
    run.run_study(_variant_runs(["shared-decoder"]), tmp_path, launcher=fake_launcher([], commit="f" * 40))
    collected = collect.collect(tmp_path)
    with pytest.raises(collect.StudyError, match=r"2 code revisions.*ffffffffffff.*shared-decoder/seed0"):
        collect.check_one_revision(collected)
    collect.check_one_revision(collected, allow_mixed=True)
    summary = collect.aggregate(collected)
    assert "ffffffffffff" in write._variant_revision(collected, summary, "shared-decoder")
    assert write._revision_text(collected).startswith("**mixed**")
    # A run resumed under other code is a revision of its own; a run without provenance is "unrecorded".
    resumed = provenance(resumes=[{**provenance("e" * 40), "step": 30}])
    assert collect.revision_of(resumed).startswith(
        "mixed: commit 0123456789ab"
    ) and "eeeeeeeeeeee" in collect.revision_of(resumed)
    assert collect.revision_of(provenance(dirty=True)).startswith("commit 0123456789ab with uncommitted changes")
    assert collect.revision_of(None) == collect.short_revision(None) == collect.UNRECORDED
    assert collect.short_revision(resumed) == "mixed 0123456789ab/eeeeeeeeeeee"
    assert collect.short_revision(provenance(dirty=True)) == "0123456789ab+changes"


def test_best_model_is_promoted_without_checkpoints_and_replaced_atomically(tmp_path):
    root = tmp_path / "runs"
    run.run_study(_variant_runs(list(METRICS)), root, launcher=fake_launcher([]))
    (root / "taskexpert" / "seed0" / "checkpoints" / "step_10").mkdir(parents=True)
    for name in ("model.safetensors", "launch.log", ".final_tmp"):
        (root / "taskexpert" / "seed0" / name).write_text(name)
    destination = tmp_path / "outputs" / "best"
    destination.mkdir(parents=True)
    (destination / "stale.txt").write_text("old")
    best = run.promote_best_model(root, destination)
    assert best["seed"] == 0 and best["delta_m"] == pytest.approx(23.75)
    assert sorted(p.name for p in destination.iterdir()) == [
        "config.json", "metrics.json", "model.safetensors", "provenance.json", "recipe.yaml", "train_log.jsonl",
    ]  # fmt: skip
    assert [p.name for p in destination.parent.iterdir()] == ["best"]  # no staging folder left behind


def test_report_without_study_names_the_folder(tmp_path):
    with pytest.raises(collect.StudyError, match="No study.json under"):
        collect.collect(tmp_path)
    (tmp_path / "study.json").write_text('{"mode": "big", "runs": []}')
    with pytest.raises(collect.StudyError, match="must hold 'mode'"):
        collect.collect(tmp_path)


def test_every_model_is_compared_on_one_boundary_scorer():
    def run_with(metrics):
        return {"tasks": ["edge"], "metrics": dict(metrics)}

    exact = {"edge/odsF": 50.0, "edge/oisF": 51.0, "edge/odsF_approx": 48.0}
    approximate = {"edge/odsF_approx": 47.0}
    variants = [{"runs": {0: run_with(exact), 1: run_with(exact)}}, {"runs": {0: run_with(approximate)}}]
    assert collect.one_boundary_scorer(variants) == "approximate"
    assert variants[0]["runs"][0]["metrics"] == {"edge/odsF_approx": 48.0}  # the exact keys are dropped everywhere
    assert collect.primary_key("edge", variants[0]["runs"][0]["metrics"]) == "edge/odsF_approx"
    variants = [{"runs": {0: run_with(exact)}}]
    assert collect.one_boundary_scorer(variants) == "exact" and variants[0]["runs"][0]["metrics"] == exact
    assert collect.one_boundary_scorer([{"runs": {0: {"tasks": ["depth"], "metrics": {}}}}]) is None
