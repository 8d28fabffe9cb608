"""What a training run leaves behind besides weights: a JSON-lines log, curves, metrics and a model card."""

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from ..task_definitions import TASKS

# Hub task ids for the model-index of each dense task.
HUB_TASK_TYPES = {"segmentation": "image-segmentation", "saliency": "image-segmentation",
                  "boundary": "image-segmentation", "normals": "image-to-image", "depth": "depth-estimation"}  # fmt: skip


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump(data, stream, indent=2, sort_keys=True)
    os.replace(temporary, path)


class JsonLinesLogger:
    """Appends one JSON object per logging event; on resume, drops the records after the resumed step so that the
    log reads as if the run had never been interrupted."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(record, sort_keys=True) + "\n")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_training_curves(log_path: Path, output_path: Path) -> None:
    """Training loss (total and per task) and every evaluation metric against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    metric_names = sorted({k for r in evals for k in r if "/" in k and isinstance(r[k], (int, float))})
    metric_names = [m for m in metric_names if "/IoU/" not in m][:12]
    panels = 1 + len(metric_names)
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    axis = axes[0][0]
    if train:
        steps = [r["step"] for r in train]
        axis.plot(steps, [r["loss"] for r in train], label="total", color="black")
        for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
            axis.plot(steps, [r.get(key, float("nan")) for r in train], label=key[5:], linewidth=0.8)
        axis.set_yscale("log")
        axis.legend(fontsize=6)
    axis.set_title("training loss")
    axis.set_xlabel("step")
    for index, name in enumerate(metric_names, start=1):
        axis = axes[index // columns][index % columns]
        axis.plot([r["step"] for r in evals], [r.get(name, float("nan")) for r in evals], marker="o")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step")
    for index in range(panels, rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    output_path = Path(output_path)
    temporary = output_path.with_name(f".{output_path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, output_path)


def _looks_like_repo_id(value: str) -> bool:
    parts = str(value).split("/")
    return len(parts) == 2 and all(parts) and not Path(value).exists() and not str(value).startswith((".", "/"))


def build_model_card(
    config, recipe: dict, metrics: dict, dataset_name: str, model_name: str, single_task_reference: bool = False
) -> str:
    """A Hub model card (README.md) with a `model-index` holding the evaluation metrics."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset_id = recipe["dataset"]
    # A local folder is no Hub dataset id: name the dataset by its metadata name then.
    dataset_type = dataset_id if _looks_like_repo_id(dataset_id) else dataset_name
    eval_results = []
    for key, value in sorted(metrics.items()):
        task = key.split("/")[0]
        if task not in TASKS or not isinstance(value, (int, float)) or "/IoU/" in key or not math.isfinite(value):
            continue
        eval_results.append(
            EvalResult(
                task_type=HUB_TASK_TYPES[TASKS[task].kind],
                dataset_type=dataset_type, dataset_name=dataset_name, dataset_split="validation",
                metric_type=key, metric_name=key, metric_value=round(float(value), 4),
            )
        )  # fmt: skip
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        tags=["taskexpert" if config.model_type == "taskexpert" else config.model_type, "multi-task-learning",
              "dense-prediction", "mixture-of-experts", "vision"],
        eval_results=eval_results or None,
        license="apache-2.0",
    )  # fmt: skip
    tasks = ", ".join(f"`{t}`" for t in config.tasks)
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and "/IoU/" not in k)
    backbone = getattr(config, "backbone_config", config)  # Mod-Squad configs describe their ViT themselves
    body = f"""
# {model_name}

A {config.model_type} multi-task dense prediction model trained with the `modeling_taskexpert` package on
`{dataset_id}` ({dataset_name}). Tasks: {tasks}. Backbone: ViT ({backbone.model_type}), hidden size
{getattr(backbone, "hidden_size", "?")}, {getattr(backbone, "num_hidden_layers", "?")} layers.

## Usage

```python
from transformers import AutoImageProcessor, AutoModel
model = AutoModel.from_pretrained("{model_name}", trust_remote_code=True)  # or `import modeling_taskexpert` first
processor = AutoImageProcessor.from_pretrained("{model_name}", trust_remote_code=True)
inputs = processor(image, return_tensors="pt")
outputs = model(**inputs)
maps = processor.post_process_dense_predictions(outputs, target_sizes=[image.size[::-1]])
```

## Evaluation (validation split, after the last training step)

| metric | value |
|---|---|
{rows}

Units: mIoU, maxF and odsF in %, normal errors in degrees, depth errors in metres.
{"Boundary odsF marked `approx` comes from the fast approximate scorer used during training, not the official protocol." if any("approx" in k for k in metrics) else ""}

## Training recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```

## Citation

```bibtex
@inproceedings{{ye2023taskexpert,
  title={{TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial Mixture-of-Experts}},
  author={{Ye, Hanrong and Xu, Dan}},
  booktitle={{ICCV}},
  year={{2023}}
}}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").content
