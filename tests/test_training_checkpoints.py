"""Training checkpoints (`modeling_taskexpert/training/checkpoints.py`) and output-folder ownership
(`training/provenance.py`), in process: exact round trips of our JSON/safetensors state, damage detection and the
fallback of `latest`, recipe fingerprints, pickles that never run, and folders that are never taken over silently."""

import json
import os
import random
import stat

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_config

from modeling_taskexpert import TaskExpertForDensePrediction
from modeling_taskexpert.training import (
    CheckpointError,
    build_loss_weighting,
    RecipeError,
    claim_output_dir,
    load_checkpoint,
    poly_schedule,
    resolve_checkpoint,
    save_checkpoint,
)
from modeling_taskexpert.training.checkpoints import MANIFEST_FILE, STATE_FILE, _sha256, checkpoint_root
from modeling_taskexpert.training.provenance import PROVENANCE_FILE

FINGERPRINT, FIELDS = "a" * 64, {"learning_rate": 0.002, "seed": 0}


class Trainer:
    """A tiny model with the optimiser, schedule and DWA loss weighting of train.py, prepared by accelerate."""

    def __init__(self):
        torch.manual_seed(0)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        model = TaskExpertForDensePrediction(tiny_config())
        self.weighting = build_loss_weighting("dwa", ["semseg", "depth"], {"semseg": 1.0, "depth": 1.0}, dwa_window=1)
        optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(2, 10, 0.9))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def step(self):
        loss = sum(parameter.square().sum() for parameter in self.model.parameters()) * 1e-3
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.weighting({"semseg": torch.rand(()), "depth": torch.rand(())})  # DWA history is state

    def save(self, output_dir, step, fingerprint=FINGERPRINT, keep=3):
        state = {"epoch": 0, "recipe_sha256": fingerprint, "recipe": FIELDS}
        return save_checkpoint(self.accelerator, str(output_dir), step, state, keep, self.scheduler, self.weighting)


def snapshot(trainer):
    return {
        "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "scheduler": trainer.scheduler.state_dict(),
        "weighting": {k: v.clone() for k, v in trainer.weighting.state_dict().items()},
        "draws": (random.random(), float(np.random.rand()), float(torch.rand(()))),
    }


@pytest.fixture
def saved(tmp_path):
    """Checkpoints at steps 1, 2 and 3 of a run, and the trainer as it was right after the step-3 save."""
    trainer = Trainer()
    for step in (1, 2, 3):
        trainer.step()
        trainer.save(tmp_path, step)
    return trainer, tmp_path


def test_round_trip_restores_weights_schedule_loss_weighting_and_random_generators(saved):
    trainer, output_dir = saved
    path, state = resolve_checkpoint(str(output_dir), "latest", FINGERPRINT, FIELDS)
    assert path.name == "step_00000003" and state["step"] == 3 and state["world_size"] == 1
    expected = snapshot(trainer)  # draws the generators: what the next step would see
    trainer.step()  # move everything on, then restore
    trainer.step()
    load_checkpoint(trainer.accelerator, path, state, trainer.scheduler, trainer.weighting)
    actual = snapshot(trainer)
    assert actual["scheduler"] == expected["scheduler"] and actual["draws"] == expected["draws"]
    for group in ("weights", "weighting"):
        for key, value in expected[group].items():
            assert torch.equal(actual[group][key], value), key
    # Our state is JSON and safetensors; no pickle in the folder; normal permissions.
    names = sorted(p.name for p in path.iterdir())
    assert names == ["loss_weighting.safetensors", MANIFEST_FILE, "model.safetensors", "optimizer.bin",
                     "rng_state_0.json", "scheduler.json", STATE_FILE]  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.iterdir()]:
        assert stat.S_IMODE(item.stat().st_mode) == (0o777 if item.is_dir() else 0o666) & ~umask, item


def test_latest_skips_damaged_and_incomplete_checkpoints_naming_them(saved):
    _, output_dir = saved
    root = checkpoint_root(str(output_dir))
    newest, middle = root / "step_00000003", root / "step_00000002"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (middle / STATE_FILE).write_text("{not json")  # garbage
    (root / ".tmp_step_00000004").mkdir()  # killed while saving: never renamed, never looked at
    (root / "step_00000005").mkdir()  # renamed by hand, no manifest
    warnings = []
    path, state = resolve_checkpoint(str(output_dir), "latest", FINGERPRINT, FIELDS, warn=warnings.append)
    assert path.name == "step_00000001" and state["step"] == 1
    assert len(warnings) == 3
    assert "step_00000005 is incomplete (no manifest.json" in warnings[0]
    assert "model.safetensors is damaged (100 bytes" in warnings[1] and "step_00000003" in warnings[1]
    assert "trainer_state.json is damaged (9 bytes" in warnings[2] and "step_00000002" in warnings[2]
    # Named as such when asked for directly; garbage JSON behind a matching manifest is named too.
    with pytest.raises(CheckpointError, match=r"step_00000003: model.safetensors is damaged"):
        resolve_checkpoint(str(output_dir), str(newest), FINGERPRINT, FIELDS)
    manifest = json.loads((middle / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = {
        "size": (middle / STATE_FILE).stat().st_size,
        "sha256": _sha256(middle / STATE_FILE),
    }
    (middle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"step_00000002: the trainer state trainer_state.json is not valid JSON"):
        resolve_checkpoint(str(output_dir), str(middle), FINGERPRINT, FIELDS)
    # Nothing complete at all: refused, never a silent fresh start over them.
    (root / "step_00000001" / MANIFEST_FILE).write_text("")
    with pytest.raises(CheckpointError, match="No complete checkpoint under .* --overwrite_output_dir"):
        resolve_checkpoint(str(output_dir), "latest", FINGERPRINT, FIELDS, warn=lambda message: None)


def test_a_checkpoint_of_another_recipe_is_refused_naming_the_difference(saved):
    _, output_dir = saved
    with pytest.raises(
        CheckpointError, match=r"step_00000003 belongs to another recipe \(learning_rate: 0.002 there, 0.001 now\)"
    ):
        resolve_checkpoint(str(output_dir), "latest", "b" * 64, {**FIELDS, "learning_rate": 0.001})
    assert resolve_checkpoint(str(output_dir), None, "b" * 64, FIELDS) is None
    assert resolve_checkpoint(str(output_dir / "empty"), "latest", FINGERPRINT, FIELDS) is None


def test_a_planted_pickle_never_runs(saved, tmp_path):
    """A pickle planted in a checkpoint is refused by name; one that replaces optimizer.bin behind a rewritten
    manifest is read with weights_only and refused. The payload (it would create a folder) never runs."""
    trainer, output_dir = saved
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    control = tmp_path / "control.bin"  # the payload works when unpickled without weights_only
    torch.save(Payload(), control)
    torch.load(control, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()

    checkpoint = checkpoint_root(str(output_dir)) / "step_00000003"
    torch.save(Payload(), checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl: train.py never writes pickles"):
        resolve_checkpoint(str(output_dir), str(checkpoint), FINGERPRINT, FIELDS)
    (checkpoint / "custom_checkpoint_0.pkl").unlink()

    torch.save(Payload(), checkpoint / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"optimizer.bin is damaged \(1337 bytes"):
        resolve_checkpoint(str(output_dir), str(checkpoint), FINGERPRINT, FIELDS)
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["files"]["optimizer.bin"] = {"size": (checkpoint / "optimizer.bin").stat().st_size,
                                          "sha256": _sha256(checkpoint / "optimizer.bin")}  # fmt: skip
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))
    path, state = resolve_checkpoint(str(output_dir), str(checkpoint), FINGERPRINT, FIELDS)
    with pytest.raises(CheckpointError, match="cannot be loaded safely into this run: UnpicklingError"):
        load_checkpoint(trainer.accelerator, path, state, trainer.scheduler, trainer.weighting)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is only on while loading


def test_a_fresh_run_never_takes_over_another_runs_folder(saved):
    _, output_dir = saved
    (output_dir / "metrics.json").write_text("{}")
    (output_dir / PROVENANCE_FILE).write_text(json.dumps({"recipe_sha256": FINGERPRINT}))
    with pytest.raises(RecipeError, match=r"already holds checkpoints step_00000001, step_00000002, step_00000003 and "
                                          r"metrics.json of a run of another recipe .*--overwrite_output_dir"):  # fmt: skip
        claim_output_dir(output_dir, "b" * 64, overwrite=False)
    with pytest.raises(
        RecipeError,
        match="of an earlier run of this recipe. A fresh run would replace them: --resume_from_checkpoint latest continues it",
    ):
        claim_output_dir(output_dir, FINGERPRINT, overwrite=False)
    assert len(list(checkpoint_root(str(output_dir)).iterdir())) == 3  # refusing deletes nothing
    (output_dir / "launch.log").write_text("kept")  # not a file of train.py
    claim_output_dir(output_dir, "b" * 64, overwrite=True)
    assert sorted(p.name for p in output_dir.iterdir()) == ["launch.log"]
    claim_output_dir(output_dir, "b" * 64, overwrite=False)  # nothing of a run left: no refusal


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_file_linked_elsewhere_is_refused_before_anything_is_read(saved, tmp_path, target):
    """Round-3 probe: `optimizer.bin` a symbolic link to /dev/zero, listed in the manifest with size 0, made every
    resume hash forever. Only regular files of the checkpoint folder itself are accepted, sizes are compared before
    hashing, and hashing reads no more than the recorded size."""
    import signal

    _, output_dir = saved
    newest = checkpoint_root(str(output_dir)) / "step_00000003"
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x" * 10)
    victim = sorted(name for name in json.loads((newest / MANIFEST_FILE).read_text())["files"] if name != STATE_FILE)[0]
    manifest = json.loads((newest / MANIFEST_FILE).read_text())
    manifest["files"][victim]["size"] = 0 if target == "/dev/zero" else 10
    (newest / MANIFEST_FILE).write_text(json.dumps(manifest))
    (newest / victim).unlink()
    (newest / victim).symlink_to(target if target == "/dev/zero" else outside)
    signal.alarm(60)  # a hang fails the test instead of the suite
    try:
        warnings = []
        path, _ = resolve_checkpoint(str(output_dir), "latest", FINGERPRINT, FIELDS, warn=warnings.append)
    finally:
        signal.alarm(0)
    assert path.name == "step_00000002"
    assert any(f"{victim} is a symbolic link" in warning for warning in warnings), warnings


def test_hashing_reads_no_more_than_the_recorded_size(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"abc" * 1000)
    assert _sha256(data, 3000) == __import__("hashlib").sha256(b"abc" * 1000).hexdigest()
    assert _sha256(data, 10) == "size changed while reading"  # grew after its size was taken
    assert _sha256(__import__("pathlib").Path("/dev/zero"), 0) == "size changed while reading"  # returns at once


def test_one_run_per_output_folder_and_a_dead_holder_s_lock_is_taken_over(tmp_path):
    """Round-3 probe: two runs into one output folder both exited 0 with interleaved logs. The folder is claimed with a
    lock held for the whole run; a second run is refused naming the holder; the lock of a killed run frees itself, and
    the next run removes the final-model staging folder the killed one left."""
    import socket
    import subprocess
    import sys

    from modeling_taskexpert.training import RecipeError, lock_output_dir

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom modeling_taskexpert.training import lock_output_dir\n"
         f"handle = lock_output_dir({str(tmp_path)!r})\nprint('locked', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RecipeError, match=rf"in use by another train.py run \(pid {holder.pid} on host "
                                              rf"{socket.gethostname()}, started "):  # fmt: skip
            lock_output_dir(tmp_path)
        (tmp_path / ".final_abc123").mkdir()  # what a run killed during its final save leaves
        (tmp_path / ".final_abc123" / "model.safetensors").write_bytes(b"x")
    finally:
        holder.kill()
        holder.wait()
    handle = lock_output_dir(tmp_path)  # the dead holder's lock is free
    assert not (tmp_path / ".final_abc123").exists()
    assert json.loads((tmp_path / ".train.lock").read_text())["pid"] == os.getpid()
    handle.close()


def test_a_torn_last_log_line_is_dropped_and_damage_elsewhere_is_named(tmp_path):
    from modeling_taskexpert.training import JsonLinesLogger

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train"}\n{"step": 3, "ki')
    with pytest.warns(UserWarning, match="dropped its last line, torn by an interrupted write"):
        JsonLinesLogger(log, resume_step=2)
    assert log.read_text() == '{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train"}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="train_log.jsonl, line 2, is not a JSON record"):
        JsonLinesLogger(log, resume_step=2)


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_and_says_why(saved, monkeypatch):
    """Round-3 re-run of a round-2 probe: a full disk while writing a checkpoint ended in a SafetensorError traceback
    and left `.tmp_step_*`. Now: its partial files are removed, the earlier checkpoints stay, the error says why."""
    import errno

    import modeling_taskexpert.training.checkpoints as checkpoints

    trainer, output_dir = saved

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    trainer.step()
    with pytest.raises(checkpoints.CheckpointWriteError, match=r"checkpoint of step 4 .*\(the disk is full\).*latest"):
        trainer.save(output_dir, 4)
    root = checkpoint_root(str(output_dir))
    assert sorted(path.name for path in root.iterdir()) == ["step_00000001", "step_00000002", "step_00000003"]
