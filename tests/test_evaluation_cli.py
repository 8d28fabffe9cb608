"""`python -m modeling_taskexpert.evaluation`: a saved model on a converted (synthetic) dataset folder."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from modeling_taskexpert import TaskExpertForDensePrediction
from modeling_taskexpert.data import (
    build_transforms,
    collate_dense_batch,
    generate_synthetic_dataset,
    read_dataset_metadata,
    load_multitask_dataset,
)
from modeling_taskexpert.data.synthetic import HUMAN_PART_CLASSES, SEMSEG_CLASSES
from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator
from modeling_taskexpert.evaluation.__main__ import main
from modeling_taskexpert.image_processing_dense_multitask import logits_to_predictions

VAL_SIZE = 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    generate_synthetic_dataset(root / "data", train_size=1, val_size=VAL_SIZE, image_size=32, seed=0, num_workers=0)
    torch.manual_seed(0)
    config = tiny_config(
        task_id2label={"semseg": dict(enumerate(SEMSEG_CLASSES)), "human_parts": dict(enumerate(HUMAN_PART_CLASSES))}
    )
    TaskExpertForDensePrediction(config).eval().save_pretrained(root / "model")
    return root


def cli(workspace, output, *extra):
    return main([
        "--model", str(workspace / "model"), "--dataset", str(workspace / "data"), "--output", str(output),
        "--batch-size", "2", "--cache-dir", str(workspace / "cache"), "--no-progress", *extra,
    ])  # fmt: skip


def direct_results(workspace, tasks, **kwargs):
    """The same evaluation written out by hand: model, transforms and evaluator, no command line."""
    model = TaskExpertForDensePrediction.from_pretrained(workspace / "model").eval()
    metadata = read_dataset_metadata(workspace / "data")
    dataset = load_multitask_dataset(workspace / "data", "validation", cache_dir=str(workspace / "cache"))
    dataset.set_transform(build_transforms(metadata, train=False, tasks=tasks))
    evaluator = DenseMultiTaskEvaluator.from_metadata(metadata, tasks=tasks, **kwargs)
    for start in range(0, len(dataset), 3):
        batch = collate_dense_batch([dataset[i] for i in range(start, min(start + 3, len(dataset)))])
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"], tasks=tasks).logits
        evaluator.update(logits_to_predictions(logits), batch["labels"], meta=batch)
    return evaluator.compute()


def test_cli_writes_the_metrics_of_a_saved_model(workspace, tmp_path, capsys):
    output = tmp_path / "out" / "metrics.json"
    assert cli(workspace, output) == 0
    payload = json.loads(output.read_text())
    tasks = ["semseg", "human_parts", "saliency", "normals", "edge", "depth"]
    assert payload["settings"]["tasks"] == tasks
    assert payload["settings"]["boundary_mode"] == "exact"
    assert payload["settings"]["saliency_maxf_mode"] == "standard"  # synthetic data
    assert payload["num_samples"] == VAL_SIZE and payload["split"] == "validation"
    expected = direct_results(workspace, tasks)
    assert payload["metrics"].keys() == expected.keys()
    for key, value in expected.items():
        assert payload["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert [path.name for path in output.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind
    printed = capsys.readouterr().out
    assert "semseg/mIoU" in printed and "semseg/IoU/floor" not in printed  # per-class values stay in the JSON


def test_cli_task_selection_modes_and_baselines(workspace, tmp_path):
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"depth/RMSE": 1.0, "edge/odsF_approx": 10.0}))
    output = tmp_path / "metrics.json"
    code = cli(
        workspace, output, "--tasks", "depth", "edge", "--boundary-mode", "approximate", "--baselines", str(baselines)
    )
    assert code == 0
    metrics = json.loads(output.read_text())["metrics"]
    assert "edge/odsF_approx" in metrics and "edge/odsF" not in metrics and "semseg/mIoU" not in metrics
    expected_delta = 50 * ((1.0 - metrics["depth/RMSE"]) / 1.0 + (metrics["edge/odsF_approx"] - 10.0) / 10.0)
    assert metrics["multi_task/delta_m"] == pytest.approx(expected_delta)


def test_cli_reports_bad_input_without_a_traceback(workspace, tmp_path, capsys):
    """Inputs refused before the evaluation starts exit with 2 (usage), like argparse's own errors."""
    output = tmp_path / "metrics.json"
    assert (
        main(["--model", str(workspace / "model"), "--dataset", str(tmp_path / "nowhere"), "--output", str(output)])
        == 2
    )
    assert "error:" in capsys.readouterr().err
    assert cli(workspace, output, "--batch-size", "0") == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli(workspace, output, "--boundary-mode", "fast")
    assert exited.value.code == 2
    assert not output.exists()


def test_cli_failure_while_running_exits_with_1(workspace, tmp_path, capsys):
    """The evaluation runs, then the output cannot be written (a file stands where its folder should be)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli(workspace, blocker / "metrics.json", "--boundary-mode", "approximate") == 1
    assert "error: the evaluation failed" in capsys.readouterr().err


def test_cli_refuses_a_weights_file_missing_tensors(workspace, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "model"
    shutil.copytree(workspace / "model", damaged)
    weights = load_file(damaged / "model.safetensors")
    removed = sorted(weights)[0]
    del weights[removed]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    output = tmp_path / "metrics.json"
    code = main(
        ["--model", str(damaged), "--dataset", str(workspace / "data"), "--output", str(output), "--no-progress"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert removed in error and str(damaged) in error and "Traceback" not in error
    assert not output.exists()


def test_cli_names_its_boundary_scorer_and_scores_both(workspace, tmp_path, capsys):
    """`--boundary-mode both` gives each scorer's keys, equal to the single-scorer runs; the scorer is announced."""
    both = tmp_path / "both.json"
    assert cli(workspace, both, "--tasks", "edge", "--boundary-mode", "both") == 0
    announced = capsys.readouterr().err
    assert "Boundary scorer: exact and approximate" in announced and "--boundary-workers" in announced
    metrics = json.loads(both.read_text())["metrics"]
    assert json.loads(both.read_text())["settings"]["boundary_mode"] == ["exact", "approximate"]
    assert sorted(metrics) == ["edge/odsF", "edge/odsF_approx", "edge/oisF", "edge/oisF_approx"]
    for mode in ("exact", "approximate"):
        single = tmp_path / f"{mode}.json"
        assert cli(workspace, single, "--tasks", "edge", "--boundary-mode", mode) == 0
        for key, value in json.loads(single.read_text())["metrics"].items():
            assert metrics[key] == value, key


@pytest.mark.slow
def test_module_entry_point_help():
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_taskexpert.evaluation", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    assert "--trust-remote-code" in completed.stdout and "--boundary-mode" in completed.stdout


def test_class_names_must_agree_or_be_mapped_explicitly(workspace, tmp_path, capsys):
    """Round-3 probe: a model whose class 0 is another class than the dataset's class 0 was scored as if they were the
    same (exit 0). It is refused naming the first difference, unless --class-mapping says which dataset class each
    model class is; then the predictions are scored as those classes."""
    reversed_names = list(reversed(SEMSEG_CLASSES))
    model = TaskExpertForDensePrediction.from_pretrained(workspace / "model").eval()
    model.config.task_id2label = {**model.config.task_id2label, "semseg": dict(enumerate(reversed_names))}
    model.save_pretrained(tmp_path / "reversed")
    args = ["--model", str(tmp_path / "reversed"), "--dataset", str(workspace / "data"), "--batch-size", "2",
            "--cache-dir", str(workspace / "cache"), "--no-progress", "--tasks", "semseg"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "refused.json")]) == 2
    assert f"class 0 is {reversed_names[0]!r} for the model and {SEMSEG_CLASSES[0]!r} in the dataset" in (
        capsys.readouterr().err
    )
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"semseg": {name: name for name in reversed_names}}))
    assert main([*args, "--output", str(tmp_path / "mapped.json"), "--class-mapping", str(mapping)]) == 0
    mapped = json.loads((tmp_path / "mapped.json").read_text())["metrics"]
    # Independently: the model's class i is the dataset's class n - 1 - i.
    metadata = read_dataset_metadata(workspace / "data")
    dataset = load_multitask_dataset(workspace / "data", "validation", cache_dir=str(workspace / "cache"))
    dataset.set_transform(build_transforms(metadata, train=False, tasks=["semseg"]))
    evaluator = DenseMultiTaskEvaluator.from_metadata(metadata, tasks=["semseg"])
    batch = collate_dense_batch([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        predicted = model(pixel_values=batch["pixel_values"], tasks=["semseg"]).logits["semseg"].argmax(dim=1)
    evaluator.update({"semseg": len(reversed_names) - 1 - predicted}, batch["labels"], meta=batch)
    assert mapped == pytest.approx(evaluator.compute())
    mapping.write_text(json.dumps({"semseg": {reversed_names[0]: "sky"}}))
    assert main([*args, "--output", str(tmp_path / "bad.json"), "--class-mapping", str(mapping)]) == 2
    assert "must map every model class" in capsys.readouterr().err


def test_the_earlier_flag_names_are_read_for_one_release():
    """`--edge-mode` / `--edge-workers` (the previous release's flags) set the same options as `--boundary-*`."""
    from modeling_taskexpert.evaluation.__main__ import build_parser

    required = ["--model", "m", "--dataset", "d", "--output", "o"]
    parser = build_parser()
    earlier = parser.parse_args(required + ["--edge-mode", "approximate", "--edge-workers", "3"])
    current = parser.parse_args(required + ["--boundary-mode", "approximate", "--boundary-workers", "3"])
    assert (earlier.boundary_mode, earlier.boundary_workers) == (current.boundary_mode, current.boundary_workers)
    assert vars(earlier) == vars(current)
