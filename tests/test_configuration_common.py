"""Config validation shared by both model configs (`configuration_common.py`): every wrong type or value of a field
is refused when the config is built, naming the field, whether given in Python or read from a `config.json`."""

import json
import math

import pytest
from conftest import tiny_config
from transformers import AutoConfig

from modeling_taskexpert import ModSquadConfig
from modeling_taskexpert.configuration_common import (
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_number,
    resolve_task_settings,
)

MODSQUAD_TINY = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
    num_attention_experts=6, attention_top_k=2, attention_head_dim=16, num_mlp_experts=5, mlp_top_k=2,
    tasks=["semseg", "depth"], task_id2label={"semseg": {0: "a", 1: "b"}}, head_hidden_size=16,
)  # fmt: skip

# (field, bad value, message) valid for both configs.
SHARED_CASES = [
    ("loss_weights", {"depth": math.nan}, r"`loss_weights\['depth'\]` must be a finite number, got nan"),
    ("loss_weights", {"depth": math.inf}, r"`loss_weights\['depth'\]` must be a finite number, got inf"),
    ("loss_weights", {"depth": -1.0}, r"`loss_weights\['depth'\]` must be in \[0.0, inf\), got -1.0"),
    ("loss_weights", {"depth": "2"}, r"`loss_weights\['depth'\]` must be a finite number, got '2' \(str\)"),
    ("loss_weights", {"depth": True}, r"`loss_weights\['depth'\]` must be a finite number, got True \(bool\)"),
    ("loss_weights", {"flow": 1.0}, r"Unknown task in `loss_weights` 'flow'"),
    ("loss_weights", [1.0], r"`loss_weights` must map task names to weights, got \[1.0\] \(list\)"),
    ("boundary_positive_weight", "0.9", r"`boundary_positive_weight` must be a finite number, got '0.9' \(str\)"),
    ("boundary_positive_weight", 1.0, r"`boundary_positive_weight` must be in \(0.0, 1.0\), got 1.0"),
    ("task_id2label", {"semseg": ["a", "b"]}, r"`task_id2label\['semseg'\]` must map integer ids to class names"),
    ("task_id2label", ["a"], r"`task_id2label` must map task names to \{id: class name\}"),
    ("tasks", "semseg", r"`tasks` must be a list of task names, got 'semseg'"),
    ("head_hidden_size", "16", r"`head_hidden_size` must be a positive integer, got '16' \(str\)"),
    ("head_hidden_size", 16.0, r"`head_hidden_size` must be a positive integer, got 16.0 \(float\)"),
    ("head_norm", "layer", r"`head_norm` must be one of \('group', 'batch', 'none'\), got 'layer'"),
    ("initializer_range", math.nan, r"`initializer_range` must be a finite number, got nan"),
    ("initializer_range", -0.02, r"`initializer_range` must be in \[0.0, inf\), got -0.02"),
]
TASKEXPERT_CASES = [
    ("use_memory", "yes", r"`use_memory` must be true or false, got 'yes' \(str\)"),
    ("gate_use_context", 1, r"`gate_use_context` must be true or false, got 1 \(int\)"),
    ("head_uses_all_layers", "false", r"`head_uses_all_layers` must be true or false"),
    ("output_gates", None, r"`output_gates` must be true or false, got None"),
    ("mmoe_layers", 2, r"`mmoe_layers` must be a list of integers, got 2 \(int\)"),
    ("mmoe_layers", [2.0, 4], r"`mmoe_layers` must be a list of integers; entry 2.0 \(float\) is not one"),
    ("mmoe_layers", [99], r"`mmoe_layers` entry 99 is out of range: the backbone has layers 1..4"),
    ("num_experts", "8", r"`num_experts` must be a positive integer, got '8' \(str\)"),
    ("num_experts", True, r"`num_experts` must be a positive integer, got True \(bool\)"),
    ("expert_hidden_size", 0, r"`expert_hidden_size` must be a positive integer, got 0"),
    ("gate_top_k", True, r"`gate_top_k` must be an integer in 1..4 or null, got True \(bool\)"),
    ("gate_top_k", 5, r"`gate_top_k` must be an integer in 1..4 or null, got 5"),
    ("memory_ema_momentum", "0.5", r"`memory_ema_momentum` must be a finite number, got '0.5' \(str\)"),
    ("memory_ema_momentum", 1.5, r"`memory_ema_momentum` must be in \[0.0, 1.0\], got 1.5"),
    ("gate_balance_loss_weight", math.nan, r"`gate_balance_loss_weight` must be a finite number, got nan"),
    ("gate_balance_loss_weight", -0.1, r"`gate_balance_loss_weight` must be in \[0.0, inf\), got -0.1"),
    ("layer_norm_eps", 0.0, r"`layer_norm_eps` must be in \(0.0, inf\), got 0.0"),
    ("gating", True, r"`gating` must be one of \('dynamic', 'uniform'\), got True \(bool\)"),
    ("backbone_checkpoint", 3, r"`backbone_checkpoint` must be a string or null, got 3 \(int\)"),
]
MODSQUAD_CASES = [
    ("qkv_bias", "no", r"`qkv_bias` must be true or false, got 'no' \(str\)"),
    ("moe_mlp_layers", 1, r"`moe_mlp_layers` must be a list of integers, got 1 \(int\)"),
    ("moe_attention_layers", ["0"], r"`moe_attention_layers` must be a list of integers; entry '0' \(str\) is not one"),
    ("kept_experts", 3, r"`kept_experts` must list the experts of each of the \d+ MoE layers, got 3"),
    (
        "kept_experts",
        [[0, 1.0]] * 4,
        r"`kept_experts entry of the MoE attention of block 0` must be a list of integers; entry 1.0 \(float\)",
    ),
    ("num_hidden_layers", "4", r"`num_hidden_layers` must be a positive integer, got '4' \(str\)"),
    ("hidden_size", 32.0, r"`hidden_size` must be a positive integer, got 32.0 \(float\)"),
    ("mutual_information_loss_weight", math.inf, r"`mutual_information_loss_weight` must be a finite number, got inf"),
    ("mutual_information_loss_weight", -1.0, r"`mutual_information_loss_weight` must be in \[0.0, inf\), got -1.0"),
    ("switch_loss_weight", "0", r"`switch_loss_weight` must be a finite number, got '0' \(str\)"),
    ("z_loss_weight", -1e-3, r"`z_loss_weight` must be in \[0.0, inf\), got -0.001"),
    ("routing_epsilon", math.nan, r"`routing_epsilon` must be a finite number, got nan"),
    ("noisy_gating", 1, r"`noisy_gating` must be true or false, got 1 \(int\)"),
    ("use_task_embedding", "true", r"`use_task_embedding` must be true or false, got 'true' \(str\)"),
    (
        "mutual_information_estimator",
        "kl",
        r"`mutual_information_estimator` must be one of \('reference', 'exact'\), got 'kl'",
    ),
    ("aux_loss_min_tasks", 2.5, r"`aux_loss_min_tasks` must be a positive integer, got 2.5 \(float\)"),
    ("expert_usage_momentum", 1.0, r"`expert_usage_momentum` must be in \[0.0, 1.0\), got 1.0"),
    ("layer_norm_eps", math.nan, r"`layer_norm_eps` must be a finite number, got nan"),
    ("moe_layout", 3, r"`moe_layout` must be one of \('twice', 'every'\), got 3 \(int\)"),
]


def _taskexpert(**overrides):
    return tiny_config(**{"tasks": ["semseg", "depth"], "task_id2label": {"semseg": {0: "a", 1: "b"}}, **overrides})


def _modsquad(**overrides):
    return ModSquadConfig(**{**MODSQUAD_TINY, **overrides})


BUILDERS = {"taskexpert": _taskexpert, "modsquad": _modsquad}
CASES = (
    [(kind, *case) for kind in BUILDERS for case in SHARED_CASES]
    + [("taskexpert", *case) for case in TASKEXPERT_CASES]
    + [("modsquad", *case) for case in MODSQUAD_CASES]
)


@pytest.mark.parametrize("kind, field, value, message", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]!r}" for c in CASES])
def test_wrong_field_is_refused_naming_it(kind, field, value, message):
    with pytest.raises(ValueError, match=message):
        BUILDERS[kind](**{field: value})


@pytest.mark.parametrize(
    "kind, field, value, message",
    [("taskexpert", "use_memory", "yes", "`use_memory` must be true or false"),
     ("taskexpert", "mmoe_layers", 2, "`mmoe_layers` must be a list of integers"),
     ("taskexpert", "loss_weights", {"depth": "NaN"}, r"`loss_weights\['depth'\]` must be a finite number"),
     ("modsquad", "mutual_information_loss_weight", "0.005", "`mutual_information_loss_weight` must be a finite number"),
     ("modsquad", "moe_mlp_layers", 1, "`moe_mlp_layers` must be a list of integers")],
)  # fmt: skip
def test_a_config_file_with_a_wrong_field_is_refused(tmp_path, kind, field, value, message):
    """Hand-edited config.json files go through the same checks (JSON has no NaN for Python's json either way)."""
    settings = BUILDERS[kind]().to_dict()
    settings[field] = value
    (tmp_path / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_valid_configs_round_trip_unchanged(kind, tmp_path):
    config = BUILDERS[kind](loss_weights={"depth": 2})
    assert config.loss_weights == {"semseg": 1.0, "depth": 2.0} and isinstance(config.loss_weights["depth"], float)
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is type(config)
    assert {**again.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}
    # JSON turns the integer class ids into strings; they come back as integers.
    assert again.task_id2label == {"semseg": {0: "a", 1: "b"}}


def test_the_generic_checks_accept_what_they_should():
    check_bool("f", False)
    check_int("f", 0, minimum=0)
    check_int("f", None, minimum=1, allow_none=True)
    check_number("f", 3, minimum=0.0)  # an int is a number
    check_number("f", 0.5, 0.0, 1.0, min_exclusive=True, max_exclusive=True)
    check_choice("f", "a", ("a", "b"))
    check_int_list("f", (1, 2), minimum=1)
    check_int_list("f", None, allow_none=True)
    with pytest.raises(ValueError, match=r"`f` must be an integer >= 0, got -1"):
        check_int("f", -1, minimum=0)
    with pytest.raises(ValueError, match=r"`f` must be in \(0.0, 1.0\], got 0.0"):
        check_number("f", 0.0, 0.0, 1.0, min_exclusive=True)
    with pytest.raises(ValueError, match=r"`f` entry 0 is out of range: expected 1..inf"):
        check_int_list("f", [0], minimum=1)


def test_resolve_task_settings_fills_defaults_and_keeps_bad_values_for_validation():
    tasks, labels, weights, kinds = resolve_task_settings(None, None, {"edge": 3})
    assert tasks == ["semseg", "human_parts", "saliency", "normals", "edge"]
    assert kinds["edge"]["kind"] == "boundary" and kinds["human_parts"]["background_only_is_unlabelled"] is True
    assert labels["human_parts"][0] == "background" and len(labels["semseg"]) == 21
    assert weights == {"semseg": 1.0, "human_parts": 2.0, "saliency": 5.0, "normals": 10.0, "edge": 3.0}
    tasks, labels, weights, _ = resolve_task_settings("semseg", {"semseg": {"0": "a", "x": "b"}}, {"semseg": "1"})
    assert tasks == "semseg"  # not split into letters
    assert labels == {"semseg": {0: "a", "x": "b"}}
    assert weights == {}  # no task list to weight yet; `tasks` is refused first


@pytest.mark.parametrize("kind", ["taskexpert", "modsquad"])
def test_both_configs_share_the_base_and_read_the_earlier_boundary_weight_name(kind, tmp_path):
    """The shared task and head fields live in `DenseMultiTaskConfig` only; a config.json written with the earlier
    `edge_positive_weight` loads into `boundary_positive_weight` and saves under the current name."""
    from modeling_taskexpert import DenseMultiTaskConfig

    config = tiny_config() if kind == "taskexpert" else ModSquadConfig()
    assert isinstance(config, DenseMultiTaskConfig)
    shared = {"tasks", "task_id2label", "task_kinds", "head_hidden_size", "head_norm", "depth_activation",
              "loss_weights", "boundary_positive_weight", "initializer_range", "output_gates"}  # fmt: skip
    own_arguments = set(type(config).__init__.__code__.co_varnames[1 : type(config).__init__.__code__.co_argcount])
    assert not shared & own_arguments  # declared once, in the base
    written = config.to_dict()
    del written["boundary_positive_weight"]
    written["edge_positive_weight"] = 0.8
    (tmp_path / "config.json").write_text(json.dumps(written))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.boundary_positive_weight == 0.8
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["boundary_positive_weight"] == 0.8 and "edge_positive_weight" not in saved
    with pytest.raises(ValueError, match="both `edge_positive_weight` and `boundary_positive_weight`"):
        type(config)(edge_positive_weight=0.8, boundary_positive_weight=0.7)
