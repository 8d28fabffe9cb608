"""The quick mode end to end: real training runs (3 steps, subprocesses), then the report built from their folders."""

import json
import math
import re

import pytest

from experiments import report, run
from modeling_taskexpert.evaluation import compute_delta_m
from experiments.study import QUICK_VARIANTS


@pytest.mark.slow
def test_quick_study_produces_a_report_consistent_with_the_run_folders(tmp_path):
    root, output = tmp_path / "runs", tmp_path / "docs" / "results.md"
    assert run.main(["--quick", "--output-root", str(root)]) == 0
    for name in QUICK_VARIANTS:
        assert (root / name / "seed0" / "metrics.json").is_file() and (root / name / "seed0" / "model.safetensors").is_file()

    summary = report.build_report(root, output, best_output=tmp_path / "best")
    text = output.read_text()
    for section in ("QUICK MODE — NOT EVIDENCE", "## Overview", "## Metrics per task", "### semseg", "### depth",
                    "## The paper's claims", "## Training curves", "## Gate and expert usage",
                    "## Reproducing the paper's tables on a GPU"):  # fmt: skip
        assert section in text, section
    assert not (tmp_path / "best").exists()  # a quick study's model is never promoted
    assert "Reading these results" not in text  # the full study's notes do not describe quick-mode numbers
    for figure in ("training_curves.png", "usage-taskexpert.png", "usage-modsquad.png"):
        assert (output.parent / "figures" / figure).read_bytes().startswith(b"\x89PNG")
    assert "usage-shared-decoder.png" not in text  # a single candidate has nothing to show

    # Δm in the table, recomputed here from the run folders alone.
    read = lambda name: json.loads((root / name / "seed0" / "metrics.json").read_text())  # noqa: E731
    baselines = {"semseg/mIoU": read("single-semseg")["semseg/mIoU"], "depth/RMSE": read("single-depth")["depth/RMSE"]}
    for name in ("taskexpert", "shared-decoder", "modsquad"):
        expected = compute_delta_m(read(name), baselines, tasks=["semseg", "depth"])
        row = re.search(rf"^\| {name} \| [^|]+ \| 1 \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| (-?[\d.]+) \|$", text, re.M)
        assert row, name
        assert float(row.group(3)) == pytest.approx(expected, abs=0.006)
        assert summary["variants"][name]["delta_m"][0] == pytest.approx(expected)
        cost = summary["costs"][name]
        assert float(row.group(1)) == pytest.approx(cost["parameters"] / 1e6, abs=0.006) and cost["flops"] > 0
    semseg_row = re.search(r"^\| taskexpert \| ([\d.]+) \|", text.split("### semseg")[1], re.M)
    assert float(semseg_row.group(1)) == pytest.approx(read("taskexpert")["semseg/mIoU"], abs=0.006)

    # Gate weights are distributions over the experts and the memory, per task and MMoE layer.
    gates = summary["usage"]["taskexpert"]
    assert gates["candidates"][-1] == "memory" and len(gates["layers"]) == 2  # synthetic-tiny: MMoE at layers 2 and 4
    for per_layer in gates["weights"].values():
        assert all(math.isclose(sum(weights), 1.0, rel_tol=1e-4) for weights in per_layer)

    # A rerun skips every finished run.
    assert run.main(["--quick", "--output-root", str(root)]) == 0
    assert all(status == "skipped" for status in run.run_study(run.study_runs(quick=True), root, quick=True).values())
