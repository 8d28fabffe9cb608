"""Recipes: YAML, inheritance, command-line overrides and their errors; model overrides and loss weights checked
before training."""

import re
from pathlib import Path

import pytest


from modeling_taskexpert.training import (
    RecipeError,
    build_loss_weighting,
    load_recipe,
    parse_command_line,
    poly_schedule,
)


def test_every_shipped_recipe_loads():
    from pathlib import Path

    # Every training recipe; hub_configs/accelerate/ holds launch configurations (tests/test_launch_configs.py).
    recipes = sorted(p for p in Path("hub_configs").rglob("*.yaml") if p.parent.name != "accelerate")
    assert len(recipes) >= 20
    for path in recipes:
        recipe = load_recipe(str(path))
        assert Path(recipe.model_config).is_file(), path


def test_overrides_and_inheritance():
    recipe = parse_command_line(
        ["--config", "hub_configs/ablations/synthetic-tiny-no-memory.yaml", "--max_steps", "7", "--warmup_steps", "0", "--tasks=[depth, semseg]",
         "--model_overrides", "{num_experts: 3}", "--push_to_hub", "--hub_model_id", "me/x"]
    )  # fmt: skip
    assert recipe.max_steps == 7 and recipe.tasks == ["depth", "semseg"] and recipe.push_to_hub
    # The ablation's own override survives the command-line one (mappings are merged) ...
    assert recipe.model_overrides == {"head_uses_all_layers": True, "use_memory": False, "num_experts": 3}
    # ... and fields come from the base: synthetic-tiny.
    assert recipe.model_config == "hub_configs/models/taskexpert-tiny.json"
    assert recipe.per_device_train_batch_size == 8 and recipe.learning_rate == 2.0e-3
    # A chain of bases: synthetic-small -> synthetic-tiny (its own fields win over its base's).
    recipe = load_recipe("hub_configs/synthetic-small.yaml")
    assert recipe.model_config == "hub_configs/models/taskexpert-small.json"
    assert recipe.per_device_train_batch_size == 8 and recipe.learning_rate == 1.0e-3 and recipe.max_steps == 2000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_step", "3"], "Unknown recipe field 'max_step' in the command line. Valid fields:"),
        (["--max_steps", "three"], "`max_steps` in the command line must be of type int"),
        (["--optimizer", "sgd"], "`optimizer` must be one of"),
        (["--max_steps", "0"], "`max_steps` must be >= 1"),
        (["--push_to_hub"], "needs `hub_model_id`"),
        (["--model_config", "nowhere.json"], "no such file"),
        (["stray"], "Unexpected argument 'stray'"),
        (["--learning_rate", ".nan"], "`learning_rate` must be a finite number > 0, got nan"),
        (["--learning_rate", "inf"], "`learning_rate` must be a finite number > 0, got inf"),
        (["--learning_rate", "-1e-4"], "`learning_rate` must be a finite number > 0, got -0.0001"),
        (["--weight_decay", "-1"], "`weight_decay` must be a finite number >= 0"),
        (["--poly_power", "-0.9"], "`poly_power` must be a finite number >= 0"),
        (["--poly_power", "nan"], "`poly_power` must be a finite number >= 0, got nan"),
        (["--dwa_temperature", "0"], "`dwa_temperature` must be a finite number > 0"),
        (["--adam_beta2", "1.0"], "`adam_beta2` must be a finite number >= 0 and < 1"),
        (["--max_grad_norm", "inf"], "`max_grad_norm` must be a finite number >= 0"),
        (["--max_eval_samples", "0"], "`max_eval_samples` must be >= 1"),
        (["--seed", "-1"], "`seed` must be >= 0"),
        (["--crop_size", "[64, 0]"], "`crop_size` must be [height, width]"),
        (["--tasks", "[]"], "`tasks` must be a non-empty list"),
        (["--boundary_mode", "fast"], "`boundary_mode` must be one of"),
        (["--final_boundary_modes", "[exact, fast]"], "`final_boundary_modes` must list one or both of"),
        (["--edge_mode", "exact", "--boundary_mode", "exact"], "gives both `edge_mode` (the earlier name) and"),
    ],
)
def test_bad_overrides(argv, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_command_line(["--config", "hub_configs/synthetic-tiny.yaml", *argv])


def test_exponent_floats_are_numbers():
    """YAML 1.1 reads 1e-4 (no dot) as a string; recipes read it as the number everyone means."""
    recipe = parse_command_line(["--config", "hub_configs/synthetic-tiny.yaml", "--learning_rate", "1e-4"])
    assert recipe.learning_rate == 1e-4


def test_bad_recipe_files(tmp_path):
    (tmp_path / "unknown.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(RecipeError, match="Unknown recipe field 'learning_rat'"):
        load_recipe(str(tmp_path / "unknown.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(str(tmp_path / "list.yaml"))
    (tmp_path / "type.yaml").write_text("tasks: semseg\n")
    with pytest.raises(RecipeError, match="`tasks` .* must be of type list"):
        load_recipe(str(tmp_path / "type.yaml"))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RecipeError, match="inherits from itself"):
        load_recipe(str(tmp_path / "loop.yaml"))
    (tmp_path / "broken.yaml").write_text("a: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(tmp_path / "broken.yaml"))
    with pytest.raises(RecipeError, match="Recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_earlier_field_names_are_read_with_a_warning_for_one_release(tmp_path):
    """`edge_mode`, `final_edge_modes` and `edge_workers` became `boundary_*`: an old recipe still loads, and says so."""
    (tmp_path / "old.yaml").write_text(
        "base: " + str(Path("hub_configs/synthetic-tiny.yaml").resolve()) + "\n"
        "edge_mode: exact\nfinal_edge_modes: [exact]\nedge_workers: 3\n"
    )
    with pytest.warns(FutureWarning, match=r"`edge_mode` in .*old.yaml is now called `boundary_mode`"):
        recipe = load_recipe(str(tmp_path / "old.yaml"))
    assert (recipe.boundary_mode, recipe.final_boundary_modes, recipe.boundary_workers) == ("exact", ["exact"], 3)
    with pytest.warns(FutureWarning, match="`edge_workers` in the command line is now called `boundary_workers`"):
        recipe = parse_command_line(["--config", "hub_configs/synthetic-tiny.yaml", "--edge_workers", "2"])
    assert recipe.boundary_workers == 2
    (tmp_path / "both.yaml").write_text("edge_mode: exact\nboundary_mode: exact\n")
    with pytest.raises(RecipeError, match="gives both `edge_mode`"):
        load_recipe(str(tmp_path / "both.yaml"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"num_expert": 3},
            r"Unknown key\(s\) \['num_expert'\] in the recipe field `model_overrides`: not fields of taskexpert configs. Valid keys: .*num_experts",
        ),
        ({"tasks": ["depth"]}, "`model_overrides` cannot set `tasks`: train.py sets it"),
        ({"loss_weights": {"depth": float("nan")}}, r"loss_weights\['depth'\].* nan"),
        ({"loss_weights": {"depth": -1.0}}, r"loss_weights\['depth'\].* -1"),
    ],
)
def test_model_overrides_are_checked_before_training(synthetic_dataset, overrides, message):
    from modeling_taskexpert.data import read_dataset_metadata

    from modeling_taskexpert.training.run import build_model_config

    recipe = load_recipe("hub_configs/synthetic-tiny.yaml", {"model_overrides": overrides})
    metadata = read_dataset_metadata(synthetic_dataset)
    with pytest.raises(RecipeError, match=message):
        config = build_model_config(recipe, metadata)
        LossWeighting_checked(config)


def LossWeighting_checked(config):
    """What train.py does with the config's loss weights right after building it."""
    try:
        build_loss_weighting("fixed", list(config.tasks), config.loss_weights)
    except ValueError as error:
        raise RecipeError(str(error)) from None


def test_poly_schedule_with_warmup():
    factor = poly_schedule(warmup_steps=4, max_steps=20, power=0.9)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(10) == pytest.approx(0.5**0.9)
    assert factor(20) == 0.0


def test_loss_weighting_strategies():
    import torch

    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    fixed = build_loss_weighting("fixed", ["a", "b"], {"a": 1.0, "b": 10.0})
    assert fixed(losses).item() == pytest.approx(32.0)
    uncertainty = build_loss_weighting("uncertainty", ["a", "b"], {"a": 1.0, "b": 10.0})
    with torch.no_grad():
        uncertainty.log_variances.copy_(torch.tensor([0.0, 1.0]))
    # w (exp(-s) L + s): 1 * (2 + 0) + 10 * (exp(-1) * 3 + 1)
    assert uncertainty(losses).item() == pytest.approx(2.0 + 10 * (3 * torch.exp(torch.tensor(-1.0)).item() + 1))
    dwa = build_loss_weighting("dwa", ["a", "b"], {"a": 1.0, "b": 1.0}, dwa_temperature=2.0, dwa_window=1)
    dwa({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    dwa({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})  # b's loss doubled: ratios (1, 2)
    expected = torch.softmax(torch.tensor([1.0, 2.0]) / 2.0, 0) * 2
    torch.testing.assert_close(dwa.current_weights(), expected)


def test_help_lists_every_recipe_field_with_its_type_default_and_doc():
    from modeling_taskexpert.training.recipe import _field_types, build_parser, field_help

    assert set(field_help()) == set(_field_types())  # every field documented in the dataclass
    text = build_parser().format_help()
    for name in _field_types():
        assert f"--{name} [" in text, name
    assert "--max_steps [INT]" in text and "optimiser steps in total (T). (default: 1000)" in " ".join(text.split())


def test_a_short_smoke_run_scales_the_warm_up_and_says_so():
    with pytest.warns(UserWarning, match=r"`warmup_steps` \(50\) is not smaller than `max_steps` \(2\); using 0"):
        recipe = parse_command_line(["--config", "hub_configs/synthetic-tiny.yaml", "--max_steps", "2"])
    assert recipe.warmup_steps == 0 and recipe.max_steps == 2
    recipe = parse_command_line(
        ["--config", "hub_configs/synthetic-tiny.yaml", "--max-steps=30", "--gradient_checkpointing"]
    )
    assert recipe.max_steps == 30 and recipe.warmup_steps == 3 and recipe.gradient_checkpointing is True


def test_cosine_schedule_and_the_fingerprint_of_the_default_schedule():
    import math

    from modeling_taskexpert.training import cosine_schedule, lr_factor, poly_schedule
    from modeling_taskexpert.training.provenance import fingerprint_fields

    factor = cosine_schedule(warmup_steps=10, max_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)
    assert factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor("poly", 0, 100, 0.9)(50) == poly_schedule(0, 100, 0.9)(50)
    # At its default the field stays out of the fingerprint, so that runs started before it existed still resume.
    recipe = load_recipe("hub_configs/synthetic-tiny.yaml")
    assert recipe.lr_schedule == "poly" and "lr_schedule" not in fingerprint_fields(recipe)
    assert (
        fingerprint_fields(load_recipe("hub_configs/modsquad-synthetic-taskonomy-tiny.yaml"))["lr_schedule"] == "cosine"
    )
    with pytest.raises(RecipeError, match="lr_schedule"):
        parse_command_line(["--config", "hub_configs/synthetic-tiny.yaml", "--lr_schedule", "step"])
