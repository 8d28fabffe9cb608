"""What a run leaves besides weights (`modeling_taskexpert/training/reporting.py`): the training curves and the model
card, from made-up logs, metrics and recipes."""

import json

import yaml
from conftest import tiny_config
from PIL import Image

from modeling_taskexpert.training import build_model_card, load_recipe, plot_training_curves

METADATA = {
    "name": "nyud",
    "eval_size": [448, 576],
    "train_size": [448, 576],
    "splits": {"train": 795, "validation": 654},
}


def test_curves_show_every_tasks_primary_metric(tmp_path):
    """Twenty metric names per evaluation: the six tasks' primary metrics are all plotted (not the first twelve
    names), boundaries with both scorers."""
    log = tmp_path / "train_log.jsonl"
    records = [
        {"kind": "train", "step": s, "loss": 10.0 / s, "loss/depth": 1.0 / s, "loss/semseg": 2.0 / s}
        for s in range(1, 61)
    ]
    for step in range(10, 61, 10):
        record = {"kind": "eval", "step": step, **{f"aaa/extra_{i}": float(i) for i in range(14)}}
        record.update({"semseg/mIoU": step / 2, "human_parts/mIoU": 1.0, "saliency/maxF": 2.0, "edge/odsF_approx": 3.0,
                       "normals/mean": 40.0 - step / 10, "depth/RMSE": 1.0})  # fmt: skip
        if step == 60:
            record["edge/odsF"] = 2.5  # the exact scorer at the final evaluation only
        records.append(record)
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    panels = plot_training_curves(log, tmp_path / "curves.png")
    assert [task for task, _ in panels] == ["semseg", "human_parts", "saliency", "edge", "normals", "depth"]
    assert dict(panels)["edge"] == ["edge/odsF", "edge/odsF_approx"]
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.width > 1000


def test_card_of_a_real_data_model_with_a_pretrained_backbone(tmp_path):
    config = tiny_config(tasks=["semseg", "depth"], task_id2label={"semseg": {0: "wall", 1: "floor"}},
                         backbone_checkpoint="google/vit-base-patch16-384")  # fmt: skip
    recipe = load_recipe("hub_configs/synthetic-tiny.yaml", {"dataset": str(tmp_path / "data" / "nyud"),
                                                              "hub_model_id": "someone/taskexpert-nyud"})  # fmt: skip
    metrics = {
        "semseg/mIoU": 41.5,
        "semseg/IoU/wall": 60.0,
        "semseg/IoU/floor": 23.0,
        "depth/RMSE": 0.61,
        "depth/abs_rel": 0.2,
    }
    card = build_model_card(config, recipe, metrics, METADATA, "someone/taskexpert-nyud")
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["base_model"] == "google/vit-base-patch16-384"
    # A local dataset folder is no Hub dataset: no `datasets` entry (a Hub id is named, below).
    assert "datasets" not in front_matter and "synthetic-data" not in front_matter["tags"]
    types = {r["task"]["type"] for r in front_matter["model-index"][0]["results"]}
    assert types == {"image-segmentation", "depth-estimation"}
    assert 'AutoModel.from_pretrained("someone/taskexpert-nyud"' in card
    assert 'cached_file("someone/taskexpert-nyud", "examples/input.png")' in card
    recipe = load_recipe("hub_configs/synthetic-tiny.yaml", {"dataset": "someone/nyud-v2-multitask"})
    on_the_hub = yaml.safe_load(build_model_card(config, recipe, metrics, METADATA, "x").split("---")[1])
    assert on_the_hub["datasets"] == ["someone/nyud-v2-multitask"]
    assert "| semseg | 1 | floor | 23.00 |" in card and "synthetic scenes only" not in card
    assert str(tmp_path) not in card and "dataset: nyud" in card  # the local folder is named, not its path
    assert "chance" not in card  # no bar recorded for this data


def test_card_shows_the_chance_bar_beside_the_results():
    config = tiny_config(tasks=["edge"], task_id2label={})
    recipe = load_recipe("hub_configs/synthetic-tiny.yaml")
    metrics = {"edge/odsF": 30.0, "edge/odsF_approx": 45.0}
    chance = {"edge/odsF": 0.08, "edge/odsF_approx": 19.8}
    card = build_model_card(config, recipe, metrics, {**METADATA, "name": "synthetic"}, "tiny", chance_baseline=chance)
    assert "| edge | odsF, exact scorer (%), higher is better | 30.00 | 0.08 |" in card
    assert "| edge | odsF, approximate scorer (%), higher is better | 45.00 | 19.80 |" in card
    assert 'from_pretrained("your-namespace/tiny"' in card


def test_readme_results_are_the_recorded_make_train_run():
    """The README's table is generated from the recorded `make train` run, never typed: they must agree."""
    from pathlib import Path

    from modeling_taskexpert.training.reporting import README_END, README_START, render_readme_results

    repo = Path(__file__).resolve().parents[1]
    summary = json.loads((repo / "docs" / "make_train_results.json").read_text())
    readme = (repo / "README.md").read_text()
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert block == render_readme_results(summary)
    assert {"edge/odsF", "edge/odsF_approx"} <= set(summary["metrics"]) and summary["chance"]


def test_readme_block_is_rewritten_in_place(tmp_path):
    from modeling_taskexpert.training.reporting import README_END, README_START, render_readme_results, update_readme

    summary = {"metrics": {"semseg/mIoU": 40.0, "depth/RMSE": 3.0}, "chance": {"semseg/mIoU": 6.0, "depth/RMSE": 2.5},
               "tasks": ["semseg", "depth"], "max_steps": 600, "runtime_seconds": 300.0, "num_eval_samples": 200,
               "git_commit": "0123456789abcdef"}  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\nrest\n")
    update_readme(readme, summary)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\nrest\n") and "old table" not in text
    block = render_readme_results(summary)
    assert block in text and "| semseg | mIoU (%), higher is better | 6.00 | 40.00 |" in block
    assert "600 steps, 5.0 minutes including evaluation; validation split, 200 images; commit `0123456789`" in block
    assert "Below the bar: depth." in block  # 3.0 m RMSE is worse than the constant prediction's 2.5
