"""train.py end to end: a short run, exact resume after a kill, two processes, and early failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def train_command(dataset, output_dir, *extra, processes=1):
    launch = [ACCELERATE, "launch", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
    if processes > 1:
        launch.append("--multi_gpu")
    return [*launch, str(REPO / "train.py"), "--config", str(REPO / "hub_configs/synthetic-tiny.yaml"),
            "--dataset", str(dataset), "--output_dir", str(output_dir), "--max_steps", "8", "--warmup_steps", "2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
            "--eval_steps", "0", "--save_steps", "4", "--save_total_limit", "2", *extra]  # fmt: skip


def run(command, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def train_records(output_dir):
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]


@pytest.fixture(scope="module")
def finished_run(synthetic_dataset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    completed = run(train_command(synthetic_dataset, output_dir))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return output_dir


@pytest.mark.slow
def test_run_writes_model_card_curves_and_metrics(finished_run, synthetic_dataset):
    from transformers import AutoModel

    from modeling_taskexpert.data import build_transforms, collate_dense_batch, read_dataset_metadata, load_multitask_dataset
    from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator, evaluate_model

    files = set(os.listdir(finished_run))
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "metrics.json",
                 "training_curves.png", "recipe.yaml", "train_log.jsonl", "modeling_taskexpert.py"):  # fmt: skip
        assert name in files, name
    assert sorted(os.listdir(finished_run / "checkpoints")) == ["step_00000004", "step_00000008"]
    records = train_records(finished_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["world_size"] == 1 and r["loss"] > 0 for r in records)

    # The saved model evaluates to the numbers in metrics.json.
    metrics = json.loads((finished_run / "metrics.json").read_text())
    model = AutoModel.from_pretrained(finished_run)
    metadata = read_dataset_metadata(synthetic_dataset)
    dataset = load_multitask_dataset(synthetic_dataset, "validation").with_transform(build_transforms(metadata, train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_dense_batch)
    evaluator = DenseMultiTaskEvaluator.from_metadata(metadata, edge_mode="approximate")
    recomputed = evaluate_model(model, loader, evaluator, progress=False)
    for key in ("semseg/mIoU", "depth/RMSE", "normals/mean", "saliency/maxF", "edge/odsF_approx", "human_parts/mIoU"):
        assert recomputed[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key

    # The card's front matter is valid YAML with a model-index holding the metrics.
    card = (finished_run / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    reported = {m["type"]: m["value"] for result in front_matter["model-index"][0]["results"] for m in result["metrics"]}
    assert reported["semseg/mIoU"] == pytest.approx(metrics["semseg/mIoU"], abs=1e-4)
    assert reported["depth/RMSE"] == pytest.approx(metrics["depth/RMSE"], abs=1e-4)
    assert front_matter["library_name"] == "transformers"


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_uninterrupted_run(finished_run, synthetic_dataset, tmp_path):
    """SIGKILL the run once its step-4 checkpoint exists, resume from `latest`: the same losses and final weights."""
    output_dir = tmp_path / "interrupted"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(train_command(synthetic_dataset, output_dir, "--max_steps", "8"), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not (output_dir / "checkpoints" / "step_00000004" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output_dir / "model.safetensors").exists()

    completed = run(train_command(synthetic_dataset, output_dir, "--resume_from_checkpoint", "latest"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Resumed from" in completed.stdout + completed.stderr
    expected, actual = train_records(finished_run), train_records(output_dir)
    assert [r["step"] for r in actual] == list(range(1, 9))
    for a, b in zip(expected, actual):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], (a["step"], a["loss"], b["loss"])
    final_expected = load_file(finished_run / "model.safetensors")
    final_actual = load_file(output_dir / "model.safetensors")
    assert final_expected.keys() == final_actual.keys()
    for key in final_expected:
        assert torch.equal(final_expected[key], final_actual[key]), key


@pytest.mark.slow
def test_two_process_data_parallel_run(synthetic_dataset, tmp_path):
    output_dir = tmp_path / "ddp"
    completed = run(train_command(synthetic_dataset, output_dir, "--max_steps", "3", "--save_steps", "0",
                                  "--per_device_train_batch_size", "2", processes=2))  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    records = train_records(output_dir)
    assert records and all(r["world_size"] == 2 for r in records)
    assert (output_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_push_to_hub_offline_fails_before_training(synthetic_dataset, tmp_path):
    output_dir = tmp_path / "push"
    started = time.time()
    completed = run(train_command(synthetic_dataset, output_dir, "--push_to_hub", "--hub_model_id", "someone/model"))
    assert completed.returncode != 0
    assert "Hub is offline (HF_HUB_OFFLINE=1)" in completed.stderr
    assert "Traceback" not in completed.stderr.split("train.py:")[0][-200:]
    assert not (output_dir / "checkpoints").exists() and not (output_dir / "train_log.jsonl").exists()
    assert time.time() - started < 120


@pytest.mark.slow
def test_bad_recipe_and_unwritable_output_fail_cleanly(synthetic_dataset, tmp_path):
    completed = run(train_command(synthetic_dataset, tmp_path / "x", "--learning_rat", "1"))
    assert completed.returncode != 0
    assert "Unknown recipe field 'learning_rat'" in completed.stderr
    completed = run(train_command(synthetic_dataset, tmp_path / "y", "--tasks", "[flow]"))
    assert "Recipe tasks ['flow'] are not in dataset" in completed.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    completed = run(train_command(synthetic_dataset, blocker / "out"))
    assert completed.returncode != 0 and "is not writable" in completed.stderr
