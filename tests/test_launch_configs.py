"""The Accelerate launch configurations of hub_configs/accelerate/: what each declares, the wrap units FSDP2 finds in
both models, and train.py launched with them on this CPU machine (DDP with gloo; an FSDP2 configuration runs as CPU
data parallel here, which train.py says), saving the full model at the end."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from accelerate.utils.dataclasses import get_module_class_from_name
from conftest import tiny_config
from modsquad_reference import tiny_modsquad_config
from safetensors.torch import load_file
from training_runs import ACCELERATE, REPO, train_records

CONFIGS = REPO / "hub_configs" / "accelerate"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_every_launch_configuration_says_when_to_use_it_and_declares_its_engine():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert names == ["ddp.yaml", "deepspeed_zero2.yaml", "fsdp2.yaml", "multi_node_ddp.yaml"]
    for name in names:
        text = (CONFIGS / name).read_text()
        assert text.startswith("# ") and "accelerate launch --config_file hub_configs/accelerate/" in text, name
    assert load("ddp.yaml")["distributed_type"] == "MULTI_GPU" and load("ddp.yaml")["num_machines"] == 1
    multi = load("multi_node_ddp.yaml")
    assert multi["num_machines"] == 2 and {"machine_rank", "main_process_ip", "main_process_port"} <= set(multi)
    fsdp = load("fsdp2.yaml")
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    deepspeed = load("deepspeed_zero2.yaml")
    assert deepspeed["distributed_type"] == "DEEPSPEED" and deepspeed["deepspeed_config"]["zero_stage"] == 2


def test_fsdp_finds_the_wrap_units_of_both_models():
    """The FSDP2 configuration wraps `_no_split_modules`; every name must be a class the model holds."""
    from modeling_taskexpert import ModSquadForDensePrediction, TaskExpertForDensePrediction

    for model in (TaskExpertForDensePrediction(tiny_config()), ModSquadForDensePrediction(tiny_modsquad_config())):
        for name in model._no_split_modules:
            assert get_module_class_from_name(model, name) is not None, (type(model).__name__, name)
    assert TaskExpertForDensePrediction._no_split_modules == ["ViTLayer", "TaskExpertMMoELayer"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp2.yaml"])  # on CPU it runs as ddp.yaml does (2 processes, gloo)
def test_train_py_under_a_launch_configuration_on_cpu(config, synthetic_dataset, tmp_path):
    output_dir = tmp_path / "run"
    command = [
        ACCELERATE, "launch", "--config_file", str(CONFIGS / config), str(REPO / "train.py"),
        "--config", str(REPO / "hub_configs/synthetic-tiny.yaml"), "--dataset", str(synthetic_dataset),
        "--output_dir", str(output_dir), "--max_steps", "3", "--warmup_steps", "0", "--eval_steps", "0",
        "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--num_workers", "0",
        "--boundary_mode", "approximate", "--final_boundary_modes", "[approximate]",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    records = train_records(output_dir)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["world_size"] == 2 for r in records)
    notice = "asks for FSDP, which Accelerate runs on GPUs only; this run is MULTI_CPU with 2 process(es)"
    assert (notice in completed.stdout + completed.stderr) == (config == "fsdp2.yaml")
    # The final model is whole: the tensors a model of its config saves, with their shapes, loadable as it is.
    from modeling_taskexpert import TaskExpertConfig, TaskExpertForDensePrediction

    saved = load_file(output_dir / "model.safetensors")
    TaskExpertForDensePrediction(TaskExpertConfig.from_pretrained(output_dir)).save_pretrained(tmp_path / "fresh")
    fresh = load_file(tmp_path / "fresh" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in fresh.items()}
    TaskExpertForDensePrediction.from_pretrained(output_dir)  # complete weights (a missing one is refused)
    assert (output_dir / "checkpoints" / "step_00000002").is_dir()
    assert json.loads((output_dir / "config.json").read_text())["model_type"] == "taskexpert"
    assert Path(output_dir / "metrics.json").is_file()
