"""train.py end to end: a short run and what it writes, exact resume after a kill, two processes, whose output folder
it is, resuming without running pickles, a non-finite loss, and early failures."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest
from PIL import Image
import torch
import yaml
from safetensors.torch import load_file
from modeling_taskexpert.training.run import HUB_IGNORE_PATTERNS
from training_runs import REPO, kill_process_tree, run, run_all, start, train_command, train_records, wait_until_gone


@pytest.fixture(scope="module")
def finished_run(synthetic_dataset, tmp_path_factory):
    """8 steps with checkpoints at 4 and 8; the final evaluation with both boundary scorers (as the recipe asks)."""
    output_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    completed = run(train_command(synthetic_dataset, output_dir))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return output_dir


def copy_run(finished_run, destination):
    shutil.copytree(finished_run, destination)
    return destination


@pytest.mark.slow
def test_run_writes_model_card_curves_and_metrics(finished_run, synthetic_dataset):
    from transformers import AutoModel

    from modeling_taskexpert.data import (
        build_transforms,
        collate_dense_batch,
        read_dataset_metadata,
        load_multitask_dataset,
    )
    from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator, evaluate_model

    files = set(os.listdir(finished_run))
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "metrics.json",
                 "training_curves.png", "recipe.yaml", "train_log.jsonl", "modeling_taskexpert.py", "provenance.json"):  # fmt: skip
        assert name in files, name
    assert sorted(os.listdir(finished_run / "checkpoints")) == ["step_00000004", "step_00000008"]
    records = train_records(finished_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["world_size"] == 1 and r["loss"] > 0 for r in records)

    # The saved model evaluates to the numbers in metrics.json, with each boundary scorer under its own key.
    metrics = json.loads((finished_run / "metrics.json").read_text())
    model = AutoModel.from_pretrained(finished_run)
    metadata = read_dataset_metadata(synthetic_dataset)
    dataset = load_multitask_dataset(synthetic_dataset, "validation").with_transform(
        build_transforms(metadata, train=False)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_dense_batch)
    evaluator = DenseMultiTaskEvaluator.from_metadata(metadata, boundary_mode=["approximate", "exact"])
    recomputed = evaluate_model(model, loader, evaluator, progress=False)
    for key in (
        "semseg/mIoU",
        "depth/RMSE",
        "normals/mean",
        "saliency/maxF",
        "edge/odsF_approx",
        "edge/odsF",
        "human_parts/mIoU",
    ):
        assert recomputed[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key

    # Provenance: the fields the experiments report reads.
    provenance = json.loads((finished_run / "provenance.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["recipe_sha256"])
    assert provenance["torch_version"] == torch.__version__ and provenance["package_version"]
    assert set(provenance) >= {"git_commit", "git_dirty", "created"}


@pytest.mark.slow
def test_model_card_and_folder_are_fit_for_the_hub(finished_run, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    metrics = json.loads((finished_run / "metrics.json").read_text())
    card = (finished_run / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "transformers" and front_matter["license"] == "apache-2.0"
    # No pipeline tag whose standard pipeline would fail on the model, no `datasets` entry that is not a Hub id.
    assert "pipeline_tag" not in front_matter and "datasets" not in front_matter
    assert "TASKEXPERT_MODEL=your-namespace/uninterrupted python space_app/app.py" in card
    # Example maps rendered by the pipeline, referenced by the card (relative paths, as the Hub shows them).
    config = json.loads((finished_run / "config.json").read_text())
    for name in ["input", *config["tasks"]]:
        assert (finished_run / "examples" / f"{name}.png").is_file() and f"](examples/{name}.png)" in card, name
    assert (
        Image.open(finished_run / "examples" / "depth.png").size
        == Image.open(finished_run / "examples" / "input.png").size
    )
    # transformers' id2label means something: the first segmentation task's classes.
    assert config["id2label"] == config["task_id2label"]["semseg"]
    assert {"taskexpert", "multi-task-learning", "synthetic-data", "edge-detection"} <= set(front_matter["tags"])
    assert "base_model" not in front_matter  # the tiny model starts from scratch
    results = {result["task"]["name"]: result for result in front_matter["model-index"][0]["results"]}
    assert len(results) == 6  # one entry per task, none merged into another
    assert results["Salient Object Detection"]["task"]["type"] == "saliency-detection"
    assert results["Edge Detection"]["task"]["type"] == "edge-detection"
    reported = {(name, m["name"]): m["value"] for name, r in results.items() for m in r["metrics"]}
    assert reported[("Semantic Segmentation", "mIoU (%)")] == pytest.approx(metrics["semseg/mIoU"], abs=1e-4)
    assert reported[("Monocular Depth Estimation", "RMSE (m)")] == pytest.approx(metrics["depth/RMSE"], abs=1e-4)
    assert reported[("Edge Detection", "odsF, exact scorer (%)")] == pytest.approx(metrics["edge/odsF"], abs=1e-4)
    assert reported[("Edge Detection", "odsF, approximate scorer (%)")] == pytest.approx(
        metrics["edge/odsF_approx"], abs=1e-4
    )
    # The body: limitations, both scorers, per-class IoU, the curves, a namespaced usage snippet, the citation.
    assert "synthetic scenes only" in card and "meaningless" in card
    assert f"| {metrics['edge/odsF']:.2f} |" in card and f"| {metrics['edge/odsF_approx']:.2f} |" in card
    assert f"| semseg | 2 | sky | {metrics['semseg/IoU/sky']:.2f} |" in card
    assert "![" in card and "(training_curves.png)" in card and "@inproceedings{ye2023taskexpert" in card
    assert 'from_pretrained("your-namespace/uninterrupted"' in card
    # No path of this machine in what goes to the Hub.
    for name in ("README.md", "recipe.yaml", "config.json", "provenance.json"):
        text = (finished_run / name).read_text()
        assert str(finished_run.parent) not in text and str(REPO) not in text and "/tmp/" not in text, name
    recipe = yaml.safe_load((finished_run / "recipe.yaml").read_text())
    assert recipe["dataset"] == "synthetic" and "output_dir" not in recipe

    # The usage snippet of the card runs as written (with the local folder in place of the Hub id), with only torch,
    # transformers, numpy and pillow installed.
    snippet = (
        re.search(r"```python\n(.*?)```", card, re.S)
        .group(1)
        .replace("your-namespace/uninterrupted", str(finished_run))
    )
    from clean_environment import clean_python  # what a transformers user has: not this package

    completed = subprocess.run([str(clean_python()), "-c", snippet + "\nassert set(maps) == set(result)\n"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]

    # What upload_folder would push: no checkpoint (optimiser state), no hidden temporary file.
    every_file = [p.relative_to(finished_run).as_posix() for p in finished_run.rglob("*") if p.is_file()]
    pushed = set(filter_repo_objects(every_file, ignore_patterns=HUB_IGNORE_PATTERNS))
    assert "model.safetensors" in pushed and "README.md" in pushed
    assert not any(path.startswith("checkpoints/") or "/." in f"/{path}" for path in pushed)

    # Every file and folder has the user's normal permissions (mkstemp and safetensors make 0o600 files).
    umask = os.umask(0)
    os.umask(umask)
    for path in [finished_run, *finished_run.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_uninterrupted_run(finished_run, synthetic_dataset, tmp_path):
    """SIGKILL the run once its step-4 checkpoint exists, resume from `latest`: the same losses and final weights,
    and no process of the killed run left behind."""
    output_dir = tmp_path / "interrupted"
    process = start(train_command(synthetic_dataset, output_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (output_dir / "checkpoints" / "step_00000004" / "manifest.json").exists():
            assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        killed = kill_process_tree(process)
    assert killed and not wait_until_gone(killed)
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
    provenance = json.loads((output_dir / "provenance.json").read_text())
    assert [entry["step"] for entry in provenance["resumes"]] == [4]
    assert not any(path.suffix == ".pkl" for path in (output_dir / "checkpoints").rglob("*"))


@pytest.mark.slow
def test_output_folder_of_another_run_is_refused(finished_run, synthetic_dataset, tmp_path):
    """A fresh run, or a resume with another recipe, never takes over the folder of a run; both leave it untouched."""
    folder = copy_run(finished_run, tmp_path / "taken")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    completed = run(train_command(synthetic_dataset, folder, "--learning_rate", "1e-4", launcher=False))
    assert completed.returncode == 2
    assert (
        "already holds checkpoints step_00000004, step_00000008 and model.safetensors and metrics.json of a run of "
        "another recipe"
        in completed.stderr
        and "--overwrite_output_dir" in completed.stderr
    )
    completed = run(train_command(synthetic_dataset, folder, "--learning_rate", "1e-4", "--resume_from_checkpoint", "latest",
                                  launcher=False))  # fmt: skip
    assert completed.returncode == 2
    assert "step_00000008 belongs to another recipe (learning_rate: 0.002 there, 0.0001 now)" in completed.stderr
    assert "Traceback" not in completed.stderr.split("train.py: ")[0]  # the message, not a trace, comes first
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing deleted, nothing added


@pytest.mark.slow
def test_planted_pickle_never_runs_on_resume(finished_run, synthetic_dataset, tmp_path):
    """An optimizer.bin replaced by a malicious pickle, behind a manifest rewritten to match, is read with
    weights_only: train.py refuses the checkpoint (exit 2) and the pickle's code never runs. (The other plantings,
    refused before anything is read, are in test_training_checkpoints.py.)"""
    from modeling_taskexpert.training.checkpoints import MANIFEST_FILE, _sha256

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = copy_run(finished_run, tmp_path / "planted")
    checkpoint = folder / "checkpoints" / "step_00000008"
    torch.save(Payload(), checkpoint / "optimizer.bin")
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["files"]["optimizer.bin"] = {"size": (checkpoint / "optimizer.bin").stat().st_size,
                                          "sha256": _sha256(checkpoint / "optimizer.bin")}  # fmt: skip
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))
    completed = run(train_command(synthetic_dataset, folder, "--resume_from_checkpoint", "latest", launcher=False))
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"{checkpoint} cannot be loaded safely into this run: UnpicklingError" in completed.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_non_finite_loss_stops_at_once_and_names_the_step(synthetic_dataset, tmp_path):
    """lr 1e30 blows the weights up after step 1: the run stops at step 2, naming the tasks and the step-1
    checkpoint, and writes nothing more. fp16 on a CPU gets a notice, not a silent float32 run."""
    output_dir = tmp_path / "diverging"
    completed = run(train_command(synthetic_dataset, output_dir, "--learning_rate", "1e30", "--warmup_steps", "0",
                                  "--save_steps", "1", "--mixed_precision", "fp16", launcher=False))  # fmt: skip
    assert completed.returncode == 1
    assert (
        "Notice: `mixed_precision: fp16` needs a GPU; this CPU run computes in float32"
        in completed.stdout + completed.stderr
    )
    message = completed.stderr.split("train.py: ")[-1]
    assert message.startswith("Training stopped at step 2: the loss is not finite (semseg: nan")
    assert f"The last good checkpoint is {output_dir / 'checkpoints' / 'step_00000001'}." in message
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["step_00000001"]
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "metrics.json").exists()


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
def test_push_to_hub_uploads_the_folder_without_checkpoints_and_a_second_push_updates_it(synthetic_dataset, tmp_path):
    """train.py --push_to_hub against a Hub-compatible endpoint on 127.0.0.1: the repository receives exactly the
    model folder minus checkpoints and hidden files, byte for byte; a second run pushing to it updates it."""
    from huggingface_hub.utils import filter_repo_objects
    from hub_server import hub_environment, local_hub
    from training_runs import training_env

    def pushed_files(folder):
        every_file = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        kept = filter_repo_objects(every_file, ignore_patterns=HUB_IGNORE_PATTERNS)
        return {path: (folder / path).read_bytes() for path in kept}

    with local_hub() as hub:
        env = hub_environment(hub, training_env())
        output_dir = tmp_path / "run"
        command = train_command(synthetic_dataset, output_dir, "--max_steps", "2", "--save_steps", "1",
                                "--push_to_hub", "--hub_model_id", "tester/model", launcher=False)  # fmt: skip
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert (output_dir / "checkpoints").is_dir()  # there were checkpoints to leave out
        repository = hub.repos[("model", "tester/model")]
        assert repository.files == pushed_files(output_dir)
        assert "model.safetensors" in repository.files and "README.md" in repository.files
        assert not any(path.startswith("checkpoints/") for path in repository.files)
        # The folder changes (as a longer run would change it) and train.py's push runs again: the repo follows.
        (output_dir / "metrics.json").write_text('{"semseg/mIoU": 1.0}\n')
        (output_dir / "notes.txt").write_text("second push\n")
        push = ("import sys, types; sys.path.insert(0, '.'); from modeling_taskexpert.training.run import push_folder; push_folder(types.SimpleNamespace("
                f"hub_model_id='tester/model', hub_private=False, output_dir={str(output_dir)!r}))")  # fmt: skip
        completed = subprocess.run([sys.executable, "-c", push], cwd=REPO, env=env, capture_output=True, text=True)
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert repository.files == pushed_files(output_dir) and repository.files["notes.txt"] == b"second push\n"
        assert len(repository.commits) == 2 and hub.unknown_requests == []


@pytest.mark.slow
def test_bad_recipe_and_unwritable_output_fail_cleanly(synthetic_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    unknown_field, unknown_task, no_dataset, unwritable = run_all(
        [
            train_command(synthetic_dataset, tmp_path / "x", "--learning_rat", "1", launcher=False),
            train_command(synthetic_dataset, tmp_path / "y", "--tasks", "[flow]"),
            train_command(tmp_path / "no-dataset", tmp_path / "w", launcher=False),
            train_command(synthetic_dataset, blocker / "out"),
        ]
    )
    assert unknown_field.returncode == 2
    assert "Unknown recipe field 'learning_rat'" in unknown_field.stderr
    assert "Recipe tasks ['flow'] are not in dataset" in unknown_task.stderr
    assert (
        no_dataset.returncode == 2
        and "Recipe field `dataset`:" in no_dataset.stderr
        and "Traceback" not in no_dataset.stderr
    )
    assert unwritable.returncode != 0 and "is not writable" in unwritable.stderr
