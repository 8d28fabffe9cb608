"""The quick mode end to end: real training runs (3 steps, subprocesses), then the report built from their folders."""

import json
import math
import re

import pytest

from experiments import report, run
from experiments.study import QUICK_SEEDS, study_runs
from modeling_taskexpert.evaluation import compute_delta_m


@pytest.mark.slow
def test_quick_study_produces_a_report_consistent_with_the_run_folders(tmp_path):
    root, output = tmp_path / "runs", tmp_path / "docs" / "results.md"
    assert run.main(["--quick", "--output-root", str(root), "--jobs", "2"]) == 0
    for entry in study_runs("quick"):
        folder = root / entry.variant.name / f"seed{entry.seed}"
        assert (folder / "metrics.json").is_file() and (folder / "model.safetensors").is_file()
        assert json.loads((folder / "launch.json").read_text())[0]["cpu_seconds"] > 0

    summary = report.build_report(root, output, notes_output=tmp_path / "notes.md")
    text = output.read_text()
    for section in ("QUICK MODE — NOT EVIDENCE", "## The paper's claims", "## Power and the study plan", "## Overview",
                    "## Metrics per task", "### semseg", "### depth", "## Training curves", "## Routing",
                    "## Reproducing the paper's tables on a GPU", "### Reading these results"):  # fmt: skip
        assert section in text, section
    assert not (tmp_path / "best").exists()  # a quick study's model is never promoted
    for figure in ("training_curves.png", "paired_differences.png", "routing-taskexpert.png", "routing-modsquad.png"):
        assert (output.parent / "figures" / figure).read_bytes().startswith(b"\x89PNG")
    assert "routing-shared-decoder.png" not in text  # a single candidate has nothing to show
    assert (tmp_path / "notes.md").read_text().split("\n", 2)[2].strip() in text  # the same notes in both

    # Δm in the table, recomputed here from the run folders alone (seed-mean single-task baselines).
    read = lambda name, seed: json.loads((root / name / f"seed{seed}" / "metrics.json").read_text())  # noqa: E731
    baselines = {"semseg/mIoU": sum(read("single-semseg", s)["semseg/mIoU"] for s in QUICK_SEEDS) / len(QUICK_SEEDS),
                 "depth/RMSE": sum(read("single-depth", s)["depth/RMSE"] for s in QUICK_SEEDS) / len(QUICK_SEEDS)}  # fmt: skip
    expected = {
        seed: compute_delta_m(read("taskexpert", seed), baselines, tasks=["semseg", "depth"]) for seed in QUICK_SEEDS
    }
    assert summary["variants"]["taskexpert"]["delta_m_per_seed"] == {
        str(s): pytest.approx(v) for s, v in expected.items()
    }
    # The paired Δm difference of the shared decoder against the TaskExpert whose heads read the same layers, seed by
    # seed, and its row in the claims table.
    shared, reference = (
        {seed: compute_delta_m(read(name, seed), baselines, tasks=["semseg", "depth"]) for seed in QUICK_SEEDS}
        for name in ("shared-decoder", "all-layer-heads")
    )
    comparison = next(c for c in summary["comparisons"] if c["name"] == "shared-decoder")
    differences = {s: reference[s] - shared[s] for s in QUICK_SEEDS}
    assert comparison["delta_m"]["differences"] == {str(s): pytest.approx(d) for s, d in differences.items()}
    mean = sum(differences.values()) / len(QUICK_SEEDS)
    row = re.search(
        r"^\| TaskExpert beats a shared decoder .*\| all-layer-heads − shared-decoder \| ([-+][\d.]+) \[", text, re.M
    )
    assert row and float(row.group(1)) == pytest.approx(mean, abs=0.006)
    assert comparison["verdict"] == "too few seeds"
    cost = summary["costs"]["taskexpert"]
    assert cost["parameters"] > 0 and cost["flops"] > 0

    # Routing through the shared routing report: per task and layer, mean weights over the candidates sum to 1.
    for name in ("taskexpert", "modsquad"):
        usage = summary["usage"][name]
        assert len(usage["layers"]) == len(usage["candidates"]) >= 2
        for values in usage["tasks"].values():
            assert all(math.isclose(sum(weights), 1.0, rel_tol=1e-4) for weights in values["selection_share"])
    assert summary["usage"]["taskexpert"]["candidates"][-1][-1] == "memory"
    for values in summary["usage"]["taskexpert"]["tasks"].values():
        assert all(math.isclose(sum(weights), 1.0, rel_tol=1e-4) for weights in values["mean_weight"])

    # The GPU guide's cost table comes from the recipes' models.
    for recipe in summary["gpu_recipes"]:
        assert (
            f"| {recipe['recipe']} | {recipe['eval_size'][0]}×{recipe['eval_size'][1]} | {recipe['parameters'] / 1e6:.1f} |"
            in text
        )

    # A rerun skips every finished run.
    assert all(status == "skipped" for status in run.run_study(study_runs("quick"), root, mode="quick").values())
