"""What a training run leaves behind besides weights: a JSON-lines log, curves, metrics and a model card."""

import json
import math
from pathlib import Path
from typing import Mapping, Optional

import yaml

from ..file_utils import atomic_write, looks_like_repo_id
from ..task_definitions import PIPELINE_TASK, TASKS, TaskSpec, as_specs
from ..model_types import MODEL_TYPES


class JsonLinesLogger:
    """Appends one JSON object per logging event; on resume, drops the records after the resumed step so that the
    log reads as if the run had never been interrupted."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line, record in _log_lines(self.path) if record["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(record, sort_keys=True) + "\n")


def _log_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every record of a JSON-lines log. A torn last line (the run was killed while writing it) is
    dropped with a warning; a damaged line elsewhere, or a record without an integer `step`, is a ValueError naming
    the line."""
    import warnings

    lines = [line for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if line]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                warnings.warn(
                    f"{path}: dropped its last line, torn by an interrupted write: {line[:80]!r}", stacklevel=3
                )
                break
            raise ValueError(f"{path}, line {number}, is not a JSON record ({error}); the log is damaged.") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}, is not a log record with an integer `step`: {line[:80]!r}.")
        records.append((line, record))
    return records


def read_log(path: Path) -> list[dict]:
    return [record for _, record in _log_lines(path)]


def plot_training_curves(log_path: Path, output_path: Path, task_specs=None) -> list[tuple[str, list[str]]]:
    """One panel for the training loss (total and per task) and one per task with its primary metric(s) at every
    evaluation, legends outside the axes; written atomically with normal permissions. `task_specs`: the model's
    (`config.task_specs`; default: the preset tasks). Returns the task panels as (task, metric keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    specs = as_specs(task_specs if task_specs is not None else TASKS)
    panels = [
        (task, [key for key in spec.primary_metric_keys if any(key in r for r in evals)])
        for task, spec in specs.items()
    ]
    panels = [(task, keys) for task, keys in panels if keys]
    columns = 4
    rows = math.ceil((1 + len(panels)) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    axis = axes[0][0]
    if train:
        steps = [r["step"] for r in train]
        axis.plot(steps, [r["loss"] for r in train], label="total", color="black")
        for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
            axis.plot(steps, [r.get(key, float("nan")) for r in train], label=key[5:], linewidth=0.8)
        axis.set_yscale("log")
        axis.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, frameon=False)
    axis.set_title("training loss (log scale)", fontsize=9)
    axis.set_xlabel("step")
    for index, (task, keys) in enumerate(panels, start=1):
        axis = axes[index // columns][index % columns]
        for key in keys:
            points = [(r["step"], r[key]) for r in evals if key in r]
            label = (specs[task].card_metric(key) or (key, key))[1]
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
        direction = "lower is better" if specs[task].lower_is_better(keys[0]) else "higher is better"
        metric = keys[0].split("/")[1] + (" (both scorers)" if len(keys) > 1 else "")
        axis.set_title(f"{task}: {metric}, {direction}", fontsize=9)
        axis.set_xlabel("step")
        if len(keys) > 1:  # below the axes, so it never covers the curves
            axis.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=1, frameon=False)
    for index in range(1 + len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    atomic_write(output_path, lambda temporary: figure.savefig(temporary, dpi=100, format="png", bbox_inches="tight"))
    plt.close(figure)
    return panels


def primary_metric_rows(
    metrics: dict, tasks, chance: Optional[dict] = None
) -> list[tuple[str, str, float, Optional[float]]]:
    """(task, metric label with its direction, value, chance bar or None) of every primary metric in `metrics`: the rows
    of the results table of the model card and of the README. `tasks`: preset task names or {task: TaskSpec}."""
    rows = []
    for task, spec in as_specs(tasks).items():
        for key in spec.primary_metric_keys:
            if key in metrics:
                direction = "lower is better" if spec.lower_is_better(key) else "higher is better"
                rows.append((task, f"{spec.card_metric(key)[1]}, {direction}", metrics[key], (chance or {}).get(key)))
    return rows


def _format(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _dataset_id(recipe) -> str:
    from .recipe import hub_recipe

    return hub_recipe(recipe)["dataset"]


def card_task_types(specs: Mapping[str, TaskSpec]) -> dict[str, str]:
    """A model-index task type per task, unique within the model (the Hub merges results of one type): the first
    task of a kind gets the kind's type, any later one a slug of its title ("human-part-segmentation")."""
    types = {}
    for task, spec in specs.items():
        kind_type = spec.kind.card_task_type
        if kind_type in types.values():
            slug = "-".join("".join(c if c.isalnum() else " " for c in spec.title.lower()).split())
            kind_type = slug if slug not in types.values() else f"{task}-{kind_type}"
        types[task] = kind_type
    return types


def write_example_maps(model, processor, image, folder: Path) -> dict[str, str]:
    """Render the model's maps of one RGB image (H, W, 3) uint8 as the pipeline does, into `folder/examples/` (PNG,
    each written atomically); return {"input" or task: path relative to `folder`}."""
    import numpy as np
    import torch
    from PIL import Image

    from ..visualization_dense_multitask import visualize_prediction

    specs = model.config.task_specs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = processor(image, return_tensors="pt").to(model.device)
            outputs = model(**inputs)
        maps = processor.post_process_dense_predictions(outputs, target_sizes=[image.shape[:2]], task_specs=specs)[0]
    finally:
        model.train(was_training)
    rendered = {"input": np.asarray(image)}
    rendered.update({task: visualize_prediction(specs[task], value.cpu().numpy()) for task, value in maps.items()})
    paths = {}
    for name, array in rendered.items():
        relative = f"examples/{name}.png"
        (folder / "examples").mkdir(exist_ok=True)
        atomic_write(
            folder / relative, lambda temporary, array=array: Image.fromarray(array).save(temporary, format="PNG")
        )
        paths[name] = relative
    return paths


def build_model_card(config, recipe, metrics: dict, metadata: dict, model_name: str,
                     chance_baseline: Optional[dict] = None, example_maps: Optional[dict] = None) -> str:  # fmt: skip
    """A Hub model card (README.md): front matter with a `model-index` of the evaluation metrics, then intended uses
    and limitations, usage, training data and recipe, results (against the chance bar when one was recorded for
    this data), per-class IoU, the training curves and the citation. No path of the training machine appears in it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .recipe import hub_recipe

    dataset_name = metadata.get("name", "dataset")
    dataset_id = _dataset_id(recipe)
    synthetic = dataset_name == "synthetic"
    dataset_type = dataset_id if looks_like_repo_id(dataset_id) else dataset_name
    repo_id = model_name if looks_like_repo_id(model_name) else f"your-namespace/{model_name}"
    specs = config.task_specs
    tasks = list(specs)
    task_types = card_task_types(specs)
    eval_results = []
    for key, value in sorted(metrics.items()):
        spec = specs.get(key.split("/")[0])
        if (
            spec is None
            or spec.card_metric(key) is None
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            continue
        task_type, task_name = task_types[spec.name], spec.card_title
        metric_type, metric_name = spec.card_metric(key)
        eval_results.append(EvalResult(
            task_type=task_type, task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
            dataset_split="validation", metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4),
        ))  # fmt: skip
    backbone_checkpoint = getattr(config, "backbone_checkpoint", None)
    task_tags = list(dict.fromkeys(task_types.values()))
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        # No pipeline_tag: no standard transformers pipeline runs this model (the custom one below does), and a tag
        # would offer the Hub widget of one that fails. `datasets` names Hub datasets only.
        datasets=[dataset_id] if looks_like_repo_id(dataset_id) else None,
        base_model=backbone_checkpoint or None,
        tags=[config.model_type, "multi-task-learning", "dense-prediction", "mixture-of-experts", "vision",
              *task_tags, *(["synthetic-data"] if synthetic else [])],
        eval_results=eval_results or None,
        license="apache-2.0",
    )  # fmt: skip

    backbone = getattr(config, "backbone_config", None) or config  # Mod-Squad configs describe their ViT themselves
    size = metadata.get("eval_size") or []
    size_text = f"{size[0]}x{size[1]}" if len(size) == 2 else "its evaluation size"
    if synthetic:
        uses = (f"Trained on **synthetic scenes only** (the package's procedural benchmark: rooms with boxes, spheres, "
                f"cylinders and figures, rendered at {size_text} pixels). It demonstrates and tests the architecture "
                "and the tooling; **on real photos its maps are meaningless**. For real images, use a model trained on "
                "PASCAL-Context or NYUD-v2 (`hub_configs/` of the package has their recipes).")  # fmt: skip
    else:
        uses = (f"Dense prediction of {', '.join(spec.title for spec in specs.values())} on images like those of "
                f"{dataset_name} (evaluated at {size_text} pixels). Outside that domain (other scene types, very "
                "different resolutions or camera geometry) expect degraded maps; depth is metric only for cameras "
                "like the dataset's. Not evaluated for any safety-critical use.")  # fmt: skip
    # A validation image of the training data ships with the model (examples/input.png), so that the snippet runs
    # with transformers alone, for a Hub id or a local folder alike.
    image_code = ("from transformers.utils import cached_file\n"
                  f"image = Image.open(cached_file(\"{repo_id}\", \"examples/input.png\")).convert(\"RGB\")  "
                  "# or any photo")  # fmt: skip

    # Results: primary metrics per task, against the chance bar when one was recorded for this data.
    chance = chance_baseline or {}
    rows = [f"| {task} | {label} | {_format(value)} |" + (f" {_format(bar)} |" if chance else "")
            for task, label, value, bar in primary_metric_rows(metrics, specs, chance)]  # fmt: skip
    header = (
        "| task | metric | value |" + (" chance |" if chance else "") + "\n|---|---|---|" + ("---|" if chance else "")
    )
    other = [f"| {key} | {_format(value)} |" for key, value in sorted(metrics.items())
             if isinstance(value, (int, float)) and "/IoU/" not in key and not any(key in spec.primary_metric_keys for spec in specs.values())]  # fmt: skip
    class_rows = []
    for task in tasks:
        if specs[task].kind.name != "segmentation":
            continue
        for class_id, class_name in sorted(config.task_id2label.get(task, {}).items(), key=lambda item: int(item[0])):
            key = f"{task}/IoU/{class_name}"
            if key in metrics:
                class_rows.append(f"| {task} | {class_id} | {class_name} | {_format(metrics[key])} |"
                                  + (f" {_format(chance.get(key))} |" if chance else ""))  # fmt: skip
    class_header = (
        "| task | id | class | IoU (%) |"
        + (" chance |" if chance else "")
        + "\n|---|---|---|---|"
        + ("---|" if chance else "")
    )
    edge_note = ""
    if any(spec.kind.name == "boundary" for spec in specs.values()):
        edge_note = ("\nBoundaries: `odsF` comes from the protocol's exact scorer (non-maximum suppression, thinning and "
                     "one-to-one matching at 101 thresholds, as `python -m modeling_taskexpert.evaluation` computes it by "
                     "default); `odsF_approx` from the fast approximate scorer used during training (no thinning, no "
                     "one-to-one matching, so it reads higher). Compare only numbers of the same scorer.\n")  # fmt: skip
    chance_note = ""
    if chance:
        chance_note = ("\nChance: the best input-independent prediction on the same validation images (most frequent "
                       "class, positive rate, mean normal, mean depth), recorded with "
                       "`python -m modeling_taskexpert.evaluation.trivial_baselines`.\n")  # fmt: skip
    splits = metadata.get("splits", {})
    class_lists = "".join(
        f"- `{task}` classes: {', '.join(str(name) for _, name in sorted(config.task_id2label[task].items(), key=lambda item: int(item[0])))}\n"
        for task in tasks if task in getattr(config, "task_id2label", {})
    )  # fmt: skip
    recipe_text = yaml.safe_dump(hub_recipe(recipe), sort_keys=False).strip()
    examples_section = ""
    if example_maps:
        shown = [task for task in tasks if task in example_maps]
        examples_section = (
            "\nWhat it predicts for a validation image (rendered by the pipeline; files in `examples/`):\n\n"
            + "| input | " + " | ".join(shown) + " |\n|" + "---|" * (len(shown) + 1) + "\n"
            + f"| ![input]({example_maps['input']}) | "
            + " | ".join(f"![{task}]({example_maps[task]})" for task in shown) + " |\n"
        )  # fmt: skip
    architecture = MODEL_TYPES[config.model_type].title
    body = f"""
# {model_name}

A {architecture} multi-task dense prediction model: one image in, one map per task out ({", ".join(f"`{t}`" for t in tasks)}).
Backbone: ViT, hidden size {getattr(backbone, "hidden_size", "?")}, {getattr(backbone, "num_hidden_layers", "?")} layers,
patch size {getattr(config, "patch_size", getattr(backbone, "patch_size", "?"))}{f", initialised from [`{backbone_checkpoint}`](https://huggingface.co/{backbone_checkpoint})" if backbone_checkpoint else ""}.
Trained with `train.py` of the `modeling_taskexpert` package on `{dataset_id}`.

## Intended uses and limitations

{uses}

## How to use

The model predicts every task at once. No standard transformers pipeline covers that, so the model ships its own:
`{PIPELINE_TASK}` (remote code, which needs only torch, transformers, numpy and pillow; or install
`modeling_taskexpert`). To try it in a browser, serve it with the package's Gradio Space:
`TASKEXPERT_MODEL={repo_id} python space_app/app.py` (or publish `space_app/` as a Space naming this model).
{examples_section}
```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

{image_code}
model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(image, return_tensors="pt")
outputs = model(**inputs)
maps = processor.post_process_dense_predictions(outputs, target_sizes=[image.size[::-1]], task_specs=model.config)[0]

pipe = pipeline("{PIPELINE_TASK}", model="{repo_id}", trust_remote_code=True)
result = pipe(image)  # task -> {{"prediction": array, "image": rendering}}
```

To deploy without PyTorch, export it to ONNX with the package (its `export` extra) for all tasks or a subset; the
folder it writes describes every output and its post-processing for ONNX Runtime (the package's
`docs/deployment.md` has a numpy example):

```bash
python -m modeling_taskexpert.export onnx --model {repo_id} --output onnx-model --dynamic-size
```

## Training data

`{dataset_name}`: {splits.get("train", "?")} training and {splits.get("validation", "?")} validation images, trained on
crops of {"x".join(str(v) for v in (recipe.crop_size or metadata.get("train_size") or []))} pixels, evaluated at {size_text}.
{class_lists}
## Training procedure

{recipe.max_steps} steps of {recipe.optimizer} (learning rate {recipe.learning_rate:g}, {"cosine decay" if getattr(recipe, "lr_schedule", "poly") == "cosine" else f"poly decay with power {recipe.poly_power:g}"},
{recipe.warmup_steps} warm-up steps), batch {recipe.per_device_train_batch_size} per device,
loss weighting `{recipe.loss_weighting}`, seed {recipe.seed}. The full recipe (`recipe.yaml`):

```yaml
{recipe_text}
```

## Evaluation (validation split, after the last training step)

{header}
{chr(10).join(rows)}
{edge_note}{chance_note}
Per-class IoU:

{class_header}
{chr(10).join(class_rows) if class_rows else ""}

Every other metric:

| metric | value |
|---|---|
{chr(10).join(other)}

Units: mIoU, accuracy, maxF and odsF in %, angles in degrees, depth errors in metres.

![Training loss and the primary metric of every task against the step](training_curves.png)

## Citation

```bibtex
{MODEL_TYPES[config.model_type].citation}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").content


# ---- the README's table of what `make train` reaches -------------------------------------------------------------
README_START, README_END = "<!-- make-train-results:start -->", "<!-- make-train-results:end -->"


def run_summary(run_folder) -> dict:
    """What the README reports about a finished run, all read from its folder: the metrics, the chance bar the card
    used, steps, number of validation images, runtime and commit."""
    run_folder = Path(run_folder)
    metrics = json.loads((run_folder / "metrics.json").read_text())
    recipe = yaml.safe_load((run_folder / "recipe.yaml").read_text())
    config = json.loads((run_folder / "config.json").read_text())
    provenance = json.loads((run_folder / "provenance.json").read_text())
    end = ([r for r in read_log(run_folder / "train_log.jsonl") if r.get("kind") == "end"] or [{}])[-1]
    return {
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "chance": end.get("chance_baseline"),
        "tasks": config["tasks"],
        "max_steps": recipe["max_steps"],
        "runtime_seconds": end.get("runtime_seconds"),
        "num_eval_samples": end.get("num_eval_samples"),
        "git_commit": provenance.get("git_commit"),
        "recipe_sha256": provenance.get("recipe_sha256"),
    }


def render_readme_results(summary: dict) -> str:
    """The README block: the results table of `make train` against the chance bar, and how it was measured."""
    rows = primary_metric_rows(summary["metrics"], summary["tasks"], summary.get("chance"))
    lines = ["| task | metric | chance bar | `make train` |", "|---|---|---|---|"]
    lines += [f"| {task} | {label} | {_format(bar)} | {_format(value)} |" for task, label, value, bar in rows]
    lower = {label for _, label, _, _ in rows if "lower is better" in label}
    beaten = [
        task
        for task, label, value, bar in rows
        if bar is not None and ((value < bar) if label in lower else (value > bar))
    ]
    missed = sorted({task for task, _, _, bar in rows if bar is not None} - set(beaten))
    runtime = summary.get("runtime_seconds")
    lines += ["", f"Measured by `make train` ({summary['max_steps']} steps"
              + (f", {runtime / 60:.1f} minutes including evaluation" if runtime else "")
              + (f"; validation split, {summary['num_eval_samples']} images" if summary.get("num_eval_samples") else "")
              + (f"; commit `{summary['git_commit'][:10]}`" if summary.get("git_commit") else "") + "). "
              + ("Every task clears its bar." if not missed else f"Below the bar: {', '.join(missed)}.")]  # fmt: skip
    return "\n".join(lines)


def update_readme(readme, summary: dict) -> None:
    """Replace the block between the README's make-train markers with `render_readme_results(summary)`."""
    readme = Path(readme)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block.")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write(readme, lambda temporary: temporary.write_text(
        f"{head}{README_START}\n{render_readme_results(summary)}\n{README_END}{tail}"))  # fmt: skip
