"""experiments/study.py: the variants are single-factor changes of the model they are compared with, and runs of one
seed are paired (train.py gives every variant of a seed the same initial backbone weights and the same first batch)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from experiments import study
from modeling_taskexpert.task_definitions import TASKS
from modeling_taskexpert.training import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]


def _recipes() -> dict:
    with contextlib.chdir(REPO_ROOT):
        return {variant.name: load_recipe(variant.recipe) for variant in study.VARIANTS}


def _model_settings(recipe) -> dict:
    """Every field of the model config a recipe trains (its model config file with its overrides, defaults filled)."""
    import modeling_taskexpert  # noqa: F401 - registers the model types

    settings = json.loads((REPO_ROOT / recipe.model_config).read_text())
    settings.update(recipe.model_overrides)
    return AutoConfig.for_model(**settings).to_dict()


def test_every_comparison_changes_exactly_one_thing():
    recipes = _recipes()
    variants = study.variants_by_name()
    expected_changes = {  # comparison -> the model fields in which its two models differ
        "gating": {"gating"},
        "memory": {"use_memory"},
        # Mixing, at matched parameters: one expert as large as the four allow.
        "experts": {"num_experts", "expert_hidden_size"},
        # The one factor is the decoder (one shared MLP, matched in parameters, reading the same layers).
        "shared-decoder": {"num_experts", "use_memory", "gating", "expert_hidden_size"},
        "all-layer-heads": {"head_uses_all_layers"},
        "twelve-experts": {"num_experts"},
    }
    for comparison in study.COMPARISONS:
        assert comparison.variant in variants
        assert comparison.reference in variants or comparison.reference == study.SINGLE_TASK
        if comparison.name not in expected_changes:
            continue
        a, b = recipes[comparison.variant], recipes[comparison.reference]
        settings_a, settings_b = _model_settings(a), _model_settings(b)
        changed = {k for k in settings_a.keys() | settings_b.keys() if settings_a.get(k) != settings_b.get(k)}
        assert changed == expected_changes[comparison.name], comparison.name
        # Everything else of the recipe is the same: data, schedule, tasks, evaluation.
        fields_a = {k: v for k, v in a.to_dict().items() if k not in ("model_overrides", "output_dir")}
        fields_b = {k: v for k, v in b.to_dict().items() if k not in ("model_overrides", "output_dir")}
        assert fields_a == fields_b, comparison.name
    shared = recipes["shared-decoder"].model_overrides
    assert shared == {
        "head_uses_all_layers": True, "num_experts": 1, "use_memory": False, "gating": "uniform",
        "expert_hidden_size": 42,
    }  # fmt: skip
    assert recipes["no-memory"].model_overrides == {"head_uses_all_layers": True, "use_memory": False}


def _parameter_count(recipe) -> int:
    import modeling_taskexpert  # noqa: F401 - registers the model types

    settings = json.loads((REPO_ROOT / recipe.model_config).read_text())
    settings.update(recipe.model_overrides)
    return sum(p.numel() for p in AutoModel.from_config(AutoConfig.for_model(**settings)).parameters())


@pytest.mark.parametrize("comparison", ["shared-decoder", "experts"])
def test_baselines_of_the_claims_about_mixing_and_decoders_are_matched_in_parameters(comparison):
    """The shared decoder and the one-expert model have as many parameters as the model they are compared with
    (within 5 %): the claims are about mixing and routing, not about size."""
    recipes = _recipes()
    pair = next(c for c in study.COMPARISONS if c.name == comparison)
    variant, reference = _parameter_count(recipes[pair.variant]), _parameter_count(recipes[pair.reference])
    assert abs(reference / variant - 1) <= 0.05, (comparison, variant, reference)


def test_every_study_model_trains_with_the_same_schedule():
    recipes = _recipes()
    assert recipes["modsquad"].model_config.endswith("modsquad-tiny.json")
    assert {(r.max_steps, r.learning_rate, r.per_device_train_batch_size) for r in recipes.values()} == {(600, 2e-3, 8)}
    for task in TASKS:
        assert recipes[f"single-{task}"].tasks == [task]


def test_modes_and_seeds():
    full = study.study_runs()
    assert len(study.SEEDS) >= 5  # the verdicts need at least five paired seeds
    assert {r.variant.name for r in full} == set(study.variants_by_name())
    claims = {name for c in study.COMPARISONS if c.claim for name in (c.variant, c.reference)} - {study.SINGLE_TASK}
    counts = study.claim_seed_counts()
    for name in study.variants_by_name():
        if name in study.DESCRIPTIVE_VARIANTS:
            expected = study.DESCRIPTIVE_SEEDS
        else:  # the models of a claim train with the seeds the plan gives their claims (the most of them)
            expected = study.SEEDS[: counts[name]]
            needed = [
                study.PLAN_CLAIM_SEEDS[c.name]
                for c in study.COMPARISONS
                if c.claim and name in (c.variant, c.reference)
            ]
            assert counts[name] == max(needed or [study.PLAN_CLAIM_SEEDS["multi-task-gain"]]), name
        assert sorted(r.seed for r in full if r.variant.name == name) == list(expected)
    assert claims <= set(counts) and len(full) == 134
    assert len(study.DESCRIPTIVE_SEEDS) >= 5 and study.DESCRIPTIVE_SEEDS == study.SEEDS[: len(study.DESCRIPTIVE_SEEDS)]
    assert all(r.all_overrides == study.STUDY_OVERRIDES for r in full)  # the recipes as they are, one boundary scorer
    pilot = study.study_runs("pilot")
    assert {r.variant.name for r in pilot if len([p for p in pilot if p.variant == r.variant]) > 1} == set(
        study.PILOT_VARIANTS
    )
    assert {r.seed for r in pilot if r.variant.kind in ("single-task", "modsquad")} == {0}
    with pytest.raises(ValueError, match="Unknown study mode 'fast'"):
        study.study_runs("fast")


def test_a_seed_count_cuts_the_full_study_to_its_first_seeds():
    cut = study.study_runs(seed_count=5)
    seeds = {name: sorted(r.seed for r in cut if r.variant.name == name) for name in study.variants_by_name()}
    for name, kept in seeds.items():
        assert kept == ([0, 1, 2] if name in study.DESCRIPTIVE_VARIANTS else [0, 1, 2, 3, 4])
    assert {r.name for r in cut} < {r.name for r in study.study_runs()}  # the same runs as the full study's
    assert [r.name for r in study.study_runs(only=("taskexpert",), seed_count=2)] == [
        "taskexpert/seed0",
        "taskexpert/seed1",
    ]
    for mode, count in (("pilot", 2), ("full", 0)):
        with pytest.raises(ValueError, match="full study only and must be at least 1"):
            study.study_runs(mode, seed_count=count)


def test_only_restricts_and_unknown_names_are_reported():
    assert {r.variant.name for r in study.study_runs(only=("taskexpert", "single-edge"))} == {
        "taskexpert",
        "single-edge",
    }
    with pytest.raises(ValueError, match="Unknown study variant.*'tsakexpert'"):
        study.study_runs(only=("tsakexpert",))
    with pytest.raises(ValueError, match="quick study"):
        study.study_runs("quick", only=("twelve-experts",))


# ---- pairing: what train.py gives each variant of a seed --------------------------------------------------------------
# Runs train.py (in its own process, as the study does) with the model construction and the model's forward spied on,
# and saves the backbone's initial weights and the first training batch (then stops: nothing later is compared).
SPY = """
import os
import sys
import torch
from safetensors.torch import save_file
from transformers import AutoModel

import train

capture_path, argv = sys.argv[1], sys.argv[2:]
captured = {}
build = AutoModel.from_config


def spy(config, **kwargs):
    model = build(config, **kwargs)
    if config.model_type == "taskexpert":
        for name, tensor in model.get_backbone_module().state_dict().items():
            captured[f"backbone/{name}"] = tensor.detach().clone()

    def first_batch(module, args, kwargs):
        if module.training and "batch/pixel_values" not in captured:
            captured["batch/pixel_values"] = kwargs["pixel_values"].detach().clone()
            for task, label in kwargs["labels"].items():
                captured[f"batch/labels/{task}"] = label.detach().clone()
            # All that is compared is captured: stop here, before the step, the evaluation and the saved model.
            save_file({k: v.contiguous() for k, v in captured.items()}, capture_path)
            os._exit(0)

    model.register_forward_pre_hook(first_batch, with_kwargs=True)
    return model


AutoModel.from_config = spy
train.main(argv)
save_file({k: v.contiguous() for k, v in captured.items()}, capture_path)
"""


def _start_capture(recipe: str, seed: int, dataset: Path, folder: Path) -> subprocess.Popen:
    """Start one spied one-step run (one thread: the runs of a test go at once, sharing the cores)."""
    folder.mkdir(parents=True)
    argv = ["--config", recipe, "--dataset", str(dataset), "--output_dir", str(folder / "run"), "--seed", str(seed),
            "--max_steps", "1", "--warmup_steps", "0", "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_eval_samples", "4"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(folder / "stderr.log", "w") as stderr:  # the child keeps its own copy of the file
        return subprocess.Popen([sys.executable, "-c", SPY, str(folder / "captured.safetensors"), *argv],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip


def _initial_states(runs: dict[str, tuple[str, int]], dataset: Path, root: Path) -> dict[str, dict]:
    """name -> (recipe, seed) of the runs to spy on; returns name -> captured tensors."""
    processes = {name: _start_capture(recipe, seed, dataset, root / name) for name, (recipe, seed) in runs.items()}
    try:
        for name, process in processes.items():
            process.wait(timeout=600)
            assert process.returncode == 0, f"{name}:\n{(root / name / 'stderr.log').read_text()[-3000:]}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {name: load_file(root / name / "captured.safetensors") for name in runs}


def _part(captured: dict, prefix: str) -> dict:
    return {key[len(prefix) :]: value for key, value in captured.items() if key.startswith(prefix)}


@pytest.mark.slow
def test_variants_of_a_seed_share_initial_backbone_and_first_batch(synthetic_dataset, tmp_path):
    variants = study.variants_by_name()
    names = ("taskexpert", "single-semseg", "modsquad")  # another TaskExpert variant, and the other model type
    runs = _initial_states(
        {**{name: (variants[name].recipe, 1) for name in names}, "other-seed": (variants["taskexpert"].recipe, 2)},
        synthetic_dataset,
        tmp_path,
    )
    other_seed = runs.pop("other-seed")

    reference = runs["taskexpert"]
    backbone, batch = _part(reference, "backbone/"), _part(reference, "batch/")
    assert len(backbone) > 10 and "pixel_values" in batch
    for name in ("single-semseg",):  # TaskExpert models: same backbone module
        other = _part(runs[name], "backbone/")
        assert other.keys() == backbone.keys(), name
        assert all(torch.equal(other[key], backbone[key]) for key in backbone), f"{name}: different initial backbone"
    for name in names[1:]:  # every model of the seed, Mod-Squad included, reads the same images and labels
        other = _part(runs[name], "batch/")
        assert torch.equal(other["pixel_values"], batch["pixel_values"]), f"{name}: different first batch"
        for key, label in other.items():
            assert torch.equal(label, batch[key]), f"{name}: different {key}"
    # The test can fail: another seed changes both.
    assert not torch.equal(_part(other_seed, "batch/")["pixel_values"], batch["pixel_values"])
    assert not all(torch.equal(value, backbone[key]) for key, value in _part(other_seed, "backbone/").items())


def _parameters_without_gradient(variant) -> tuple[list[str], int]:
    """(names, total size) of the parameters of a study model that get no gradient (None or all zero) from one
    backward pass of its training loss on random inputs and labels."""
    from conftest import make_labels

    recipe = _recipes()[variant.name]
    settings = json.loads((REPO_ROOT / recipe.model_config).read_text())
    settings.update(recipe.model_overrides)
    if recipe.tasks:
        settings["tasks"] = list(recipe.tasks)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(**settings)).train()
    generator = torch.Generator().manual_seed(0)
    labels = make_labels(2, 64, 64, generator)
    labels["semseg"] = labels["semseg"] % len(model.config.task_id2label.get("semseg", {0: 0, 1: 1}))
    labels["human_parts"] = labels["human_parts"] % len(model.config.task_id2label.get("human_parts", {0: 0, 1: 1}))
    out = model(torch.randn(2, 3, 64, 64, generator=generator), labels={t: labels[t] for t in model.config.tasks})
    out.loss.backward()
    idle = [(name, p.numel()) for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    return [name for name, _ in idle], sum(size for _, size in idle)


@pytest.mark.parametrize("name", [variant.name for variant in study.VARIANTS])
def test_every_parameter_of_every_study_model_gets_a_gradient(name):
    """No study model carries parameters its loss does not reach: an ablation that leaves weights idle (an MMoE layer
    whose features no head reads) changes more than its one factor (the confound of the earlier memory and
    shared-decoder comparisons)."""
    import modeling_taskexpert  # noqa: F401 - registers the model types

    names, size = _parameters_without_gradient(study.variants_by_name()[name])
    assert not names, f"{name}: {size} parameters get no gradient: {names[:6]}"
