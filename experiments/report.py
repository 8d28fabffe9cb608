"""Build `docs/results.md` (and its figures) from the run folders of the study.

    python -m experiments.report                                   # outputs/experiments -> docs/results.md
    python -m experiments.report --output-root outputs/experiments-quick

Everything comes from the run folders: `metrics.json` (final evaluation), `train_log.jsonl` (step time, curves),
`recipe.yaml` (batch size, dataset) and the saved model (parameters, FLOPs of one evaluation-size forward, gate and
expert usage on validation images). Seeds are aggregated as mean ± sample standard deviation, and Δm of every
multi-task model is computed against the mean of the single-task models (`compute_delta_m`). The numbers also go
to `OUTPUT_ROOT/summary.json`. After a full study, the best TaskExpert seed is copied as a push-ready folder.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from modeling_taskexpert.evaluation import PRIMARY_METRICS, compute_delta_m
from modeling_taskexpert.evaluation.delta_m import APPROXIMATE_EDGE_METRIC
from modeling_taskexpert.task_definitions import TASKS
from modeling_taskexpert.training import read_log, write_json_atomic

from .run import REPO_ROOT, StudyError, read_study
from .study import KINDS

DEFAULT_OUTPUT = "docs/results.md"
DEFAULT_BEST_OUTPUT = "outputs/taskexpert-synthetic-best"
GUIDE = Path(__file__).with_name("reproduce_on_gpu.md")
STUDY_NOTES = Path(__file__).with_name("study_notes.md")
GATE_IMAGES = 8  # validation images whose gates are averaged for the usage figures


class ReportError(RuntimeError):
    """A run folder that cannot be read; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading the run folders
# ---------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReportError(f"Missing {path}.") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from None


def load_run(folder: Path) -> dict:
    """The final metrics, tasks, recipe and log of one finished run folder."""
    folder = Path(folder)
    metrics = _read_json(folder / "metrics.json")
    config = _read_json(folder / "config.json")
    try:
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        log = read_log(folder / "train_log.jsonl")
    except FileNotFoundError as error:
        raise ReportError(f"Run folder {folder} is incomplete: missing {Path(error.filename).name}.") from None
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ReportError(f"Run folder {folder}: cannot parse its recipe or log ({error}).") from None
    return {"folder": folder, "metrics": metrics, "tasks": list(config["tasks"]), "recipe": recipe, "log": log,
            "model_type": config["model_type"], "step_seconds": step_seconds(log, recipe)}  # fmt: skip


def step_seconds(log: list[dict], recipe: dict) -> Optional[float]:
    """Median wall time of one optimiser step, from the logged throughput. The first logging window holds the
    warm-up (allocator, lazy initialisation) and is left out when there are others."""
    records = [r for r in log if r.get("kind") == "train" and r.get("images_per_second")]
    if len(records) > 1:
        records = records[1:]
    if not records:
        return None
    images_per_step = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    return statistics.median(images_per_step * r.get("world_size", 1) / r["images_per_second"] for r in records)


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _resolve_dataset(dataset: str) -> str:
    return dataset if Path(dataset).is_absolute() or not (REPO_ROOT / dataset).exists() else str(REPO_ROOT / dataset)


def collect(output_root: Path) -> dict:
    """Every variant of the study with its finished seeds (runs still missing are listed, not fatal)."""
    study = read_study(output_root)
    variants: dict[str, dict] = {}
    for entry in study["runs"]:
        variant = variants.setdefault(entry["variant"], {
            "name": entry["variant"], "kind": entry["kind"], "description": entry["description"],
            "recipe": entry["recipe"], "runs": {}, "missing": [],
        })  # fmt: skip
        folder = Path(output_root) / entry["folder"]
        if (folder / "metrics.json").is_file():
            variant["runs"][entry["seed"]] = load_run(folder)
        else:
            variant["missing"].append(entry["seed"])
    order = {kind: index for index, kind in enumerate(KINDS)}
    ordered = sorted(variants.values(), key=lambda v: order[v["kind"]])  # stable: the study's order within a kind
    return {"mode": study["mode"], "dataset": study["dataset"], "jobs": study.get("jobs", 1),
            "cpu_count": study.get("cpu_count"), "variants": {v["name"]: v for v in ordered}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def primary_key(task: str, metrics: dict) -> str:
    """The main metric of a task as reported (boundary odsF from the approximate scorer when the exact one is absent)."""
    key = PRIMARY_METRICS[task][0]
    return APPROXIMATE_EDGE_METRIC if task == "edge" and key not in metrics and APPROXIMATE_EDGE_METRIC in metrics else key


def single_task_baselines(variants: dict) -> dict[str, float]:
    """Mean over seeds of every metric of the single-task models (each holds the metrics of its one task)."""
    baselines = {}
    for variant in variants.values():
        if variant["kind"] != "single-task" or not variant["runs"]:
            continue
        runs = list(variant["runs"].values())
        for key in runs[0]["metrics"]:
            values = [run["metrics"][key] for run in runs if isinstance(run["metrics"].get(key), (int, float))]
            if values and len(values) == len(runs):
                baselines[key] = statistics.fmean(values)
    return baselines


def delta_m_of(run: dict, baselines: dict) -> Optional[float]:
    """Δm of one multi-task run over its tasks; None when a task has no single-task reference."""
    if not all(primary_key(task, run["metrics"]) in baselines for task in run["tasks"]):
        return None
    return compute_delta_m(run["metrics"], baselines, tasks=run["tasks"])


def aggregate(collected: dict) -> dict:
    """Per variant: mean ± std over seeds of every metric, of Δm and of the step time."""
    baselines = single_task_baselines(collected["variants"])
    summary = {}
    for name, variant in collected["variants"].items():
        runs = variant["runs"]
        if not runs:
            summary[name] = {"seeds": [], "missing": variant["missing"], "metrics": {}}
            continue
        first = next(iter(runs.values()))
        metric_keys = [k for k, v in first["metrics"].items() if isinstance(v, (int, float)) and "/IoU/" not in k]
        metrics = {key: mean_std([run["metrics"][key] for run in runs.values()]) for key in sorted(metric_keys)}
        entry = {"seeds": sorted(runs), "missing": variant["missing"], "tasks": first["tasks"], "metrics": metrics,
                 "primary": {task: primary_key(task, first["metrics"]) for task in first["tasks"]}}  # fmt: skip
        times = [run["step_seconds"] for run in runs.values() if run["step_seconds"] is not None]
        entry["step_seconds"] = mean_std(times) if times else None
        if variant["kind"] != "single-task":
            deltas = {seed: delta_m_of(run, baselines) for seed, run in runs.items()}
            entry["delta_m_per_seed"] = deltas
            entry["delta_m"] = mean_std(list(deltas.values())) if None not in deltas.values() else None
        summary[name] = entry
    return {"baselines": baselines, "variants": summary}


# ---------------------------------------------------------------------------------------------------------------------
# Models: cost and gate / expert usage
# ---------------------------------------------------------------------------------------------------------------------
def _load_model(folder: Path):
    from modeling_taskexpert.loading import load_dense_model

    return load_dense_model(folder).eval()


def _eval_size(run: dict) -> tuple[int, int]:
    from modeling_taskexpert.data import read_dataset_metadata

    return tuple(read_dataset_metadata(_resolve_dataset(run["recipe"]["dataset"]))["eval_size"])


def model_cost(run: dict) -> dict:
    """Parameters and FLOPs of one forward pass of one image at the dataset's evaluation size (all tasks)."""
    from bench.measure import count_flops

    model = _load_model(run["folder"])
    height, width = _eval_size(run)
    pixel_values = torch.zeros(1, 3, height, width)
    with torch.no_grad():
        flops = count_flops(lambda: model(pixel_values=pixel_values))
    return {"parameters": sum(p.numel() for p in model.parameters()), "flops": flops, "eval_size": [height, width]}


def _validation_pixels(run: dict, count: int) -> torch.Tensor:
    from modeling_taskexpert.data import build_transforms, read_dataset_metadata, load_multitask_dataset

    dataset_path = _resolve_dataset(run["recipe"]["dataset"])
    metadata = read_dataset_metadata(dataset_path)
    dataset = load_multitask_dataset(dataset_path, "validation")
    dataset = dataset.select(range(min(count, len(dataset)))).with_transform(
        build_transforms(metadata, train=False, tasks=run["tasks"])
    )
    return torch.stack([sample["pixel_values"] for sample in dataset])


def gate_usage(run: dict, count: int = GATE_IMAGES) -> dict:
    """Mean routing weights on validation images, per task and layer.

    TaskExpert: the gate weight of every expert and, last, of the memory, averaged over images and positions, at
    each MMoE layer. Mod-Squad: the mean gate of every expert of each MoE layer (the top-k routing probabilities, 0
    where not selected; layers with fewer experts zero-padded).
    """
    model = _load_model(run["folder"])
    pixel_values = _validation_pixels(run, count)
    with torch.no_grad():
        gates = model(pixel_values=pixel_values, output_gates=True).gates
    if run["model_type"] == "modsquad":
        candidates = max(model.config.candidate_names, key=len)
        weights = {task: [torch.nn.functional.pad(layer[task].mean(dim=(0, 1, 2)), (0, len(candidates) - layer[task].shape[-1])).tolist()
                          for layer in gates] for task in run["tasks"]}  # fmt: skip
        return {"model_type": "modsquad", "layers": model.config.layer_names, "candidates": candidates, "weights": weights}
    config = model.config
    candidates = [f"E{i}" for i in range(config.num_experts)] + (["memory"] if config.use_memory else [])
    weights = {task: [layer[task].mean(dim=(0, 1, 2)).tolist() for layer in gates] for task in run["tasks"]}
    return {"model_type": "taskexpert", "layers": [f"layer {i}" for i in config.mmoe_layers], "candidates": candidates,
            "weights": weights}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    _pyplot().close(figure)
    os.replace(temporary, path)


def _mean_curve(runs: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of a logged value at the steps every seed logged."""
    per_seed = [{r["step"]: r[key] for r in run["log"] if r.get("kind") == kind and key in r} for run in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in per_seed))) if per_seed else []
    return steps, [statistics.fmean(curve[step] for curve in per_seed) for step in steps]


def plot_curves(collected: dict, path: Path) -> None:
    """Training loss of the multi-task models, and each task's main validation metric for every model."""
    plt = _pyplot()
    variants = [v for v in collected["variants"].values() if v["runs"]]
    tasks = [t for t in TASKS if any(t in run["tasks"] for v in variants for run in v["runs"].values())]
    figure, axes = plt.subplots(1, 1 + len(tasks), figsize=(4 * (1 + len(tasks)), 3.5), squeeze=False)
    for number, variant in enumerate(variants):
        runs = list(variant["runs"].values())
        style = {"label": variant["name"], "color": f"C{number % 10}"}  # one colour per model in every panel
        if variant["kind"] != "single-task":
            axes[0][0].plot(*_mean_curve(runs, "train", "loss"), linewidth=1, **style)
        for index, task in enumerate(tasks, start=1):
            if task in runs[0]["tasks"]:
                key = primary_key(task, runs[0]["metrics"])
                axes[0][index].plot(*_mean_curve(runs, "eval", key), marker="o", markersize=3, **style)
                axes[0][index].set_title(key, fontsize=9)
    axes[0][0].set_title("training loss (multi-task)", fontsize=9)
    axes[0][0].set_yscale("log")
    for axis in axes[0]:
        axis.legend(fontsize=6)
    for axis in axes[0]:
        axis.set_xlabel("step")
    figure.tight_layout()
    _save_figure(figure, path)


def plot_usage(name: str, usage: dict, path: Path) -> None:
    """One heat map per layer: tasks (rows) by experts and memory (columns), annotated with the weights."""
    plt = _pyplot()
    tasks = list(usage["weights"])
    layers = usage["layers"]
    figure, axes = plt.subplots(1, len(layers), figsize=(0.6 * len(usage["candidates"]) * len(layers) + 2, 0.45 * len(tasks) + 1.5), squeeze=False)
    for index, layer in enumerate(layers):
        matrix = np.array([usage["weights"][task][index] for task in tasks])
        axis = axes[0][index]
        axis.imshow(matrix, vmin=0, vmax=max(matrix.max(), 1e-9), cmap="viridis", aspect="auto")
        axis.set_xticks(range(matrix.shape[1]), usage["candidates"], fontsize=7, rotation=90)
        axis.set_yticks(range(len(tasks)), tasks if index == 0 else [""] * len(tasks), fontsize=7)
        axis.set_title(f"{name}: {layer}", fontsize=8)
        for (row, column), value in np.ndenumerate(matrix):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=5, color="white" if value < matrix.max() / 2 else "black")
    figure.tight_layout()
    _save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------------------------
# The best checkpoint
# ---------------------------------------------------------------------------------------------------------------------
def best_taskexpert_run(collected: dict, summary: dict, variant: str = "taskexpert") -> Optional[tuple[int, dict]]:
    """The seed of the default TaskExpert with the highest Δm (None when Δm is not available)."""
    deltas = summary["variants"].get(variant, {}).get("delta_m_per_seed") or {}
    candidates = {seed: delta for seed, delta in deltas.items() if delta is not None}
    if not candidates:
        return None
    seed = max(candidates, key=candidates.get)
    return seed, collected["variants"][variant]["runs"][seed]


def copy_model_folder(source: Path, destination: Path) -> None:
    """Copy a finished run folder without its resumable checkpoints, logs of the launcher and hidden files, through
    a temporary folder renamed into place (an existing destination is replaced only once the copy is complete)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        shutil.copytree(source, staging / "folder", ignore=shutil.ignore_patterns("checkpoints", "launch.log", ".*"))
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging / "folder", destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------
def _format(value: tuple[float, Optional[float]], digits: int = 2) -> str:
    mean, std = value
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def assess(better: Optional[tuple], worse: Optional[tuple], seeds: int) -> str:
    """Whether `better` (mean, std) exceeds `worse` by more than the seed noise sqrt(std_a^2 + std_b^2)."""
    if better is None or worse is None:
        return "not assessable (missing runs or Δm)"
    if seeds < 2 or better[1] is None or worse[1] is None:
        return "not assessable (fewer than 2 seeds)"
    difference = better[0] - worse[0]
    noise = math.hypot(better[1], worse[1])
    verdict = "holds" if difference > noise else "does not hold" if difference < -noise else "inconclusive"
    return f"{verdict} (difference {difference:+.2f} points, seed noise {noise:.2f})"


def claims(summary: dict) -> list[tuple[str, str]]:
    """The paper's claims, each assessed on Δm of TaskExpert against the run that removes the ingredient."""
    variants = summary["variants"]
    reference = variants.get("taskexpert", {})
    delta = reference.get("delta_m")
    seeds = len(reference.get("seeds", []))
    rows = []
    for other, claim in (("uniform-gates", "Dynamic gating helps (TaskExpert vs uniform gates)"),
                         ("no-memory", "The multi-task memory helps (TaskExpert vs no memory)"),
                         ("one-expert", "Several experts help (TaskExpert vs 1 expert)"),
                         ("shared-decoder", "TaskExpert beats the shared-decoder multi-task baseline")):  # fmt: skip
        if other in variants:
            rows.append((claim, assess(delta, variants[other].get("delta_m"), min(seeds, len(variants[other]["seeds"])))))
    rows.append(("Multi-task gain Δm > 0 (TaskExpert vs single-task models)", assess(delta, (0.0, 0.0), seeds)))
    return rows


def build_markdown(collected: dict, summary: dict, costs: dict, usage: dict, figures: dict, best: Optional[str]) -> str:
    quick = collected["mode"] == "quick"
    variants = summary["variants"]
    lines = ["# Results: TaskExpert on the synthetic benchmark", ""]
    lines += ["<!-- Generated by `python -m experiments.report` from the run folders; edit experiments/, not this file. -->", ""]
    if quick:
        lines += ["> **QUICK MODE — NOT EVIDENCE.** These numbers come from `make experiments QUICK=1`: a few variants",
                  "> trained for 3 steps on a toy dataset of 8 images, one seed. They only show that the study's machinery",
                  "> (runner, Δm, costs, figures, this report) works. Nothing below supports or refutes any claim of the",
                  "> paper. Run `make experiments` (the full study) to replace this page with evidence.", ""]  # fmt: skip
    else:
        lines += ["Produced by `make experiments` (the full study).", ""]
    lines += ["## Setup", "",
              f"- Mode: **{collected['mode']}**; dataset: `{Path(collected['dataset']).name}`; variants and seeds: "
              "`experiments/study.py`; recipes: `hub_configs/`.",
              "- Metrics: final evaluation on the validation split (`metrics.json` of each run); mean ± sample standard "
              "deviation over seeds. Units: mIoU and maxF/odsF in %, normals in degrees, depth in metres. Boundary odsF is "
              "the approximate scorer used during training (`boundary_mode: approximate`).",
              "- Δm: `compute_delta_m` of each seed against the seed-mean of the single-task models, over the model's "
              "tasks (main metrics: " + ", ".join(f"{t} {k}" for t, (k, _) in PRIMARY_METRICS.items()) + ").",
              "- Cost: parameters; FLOPs of one forward pass of one image at the evaluation size, all tasks "
              "(`torch.utils.flop_counter`, a multiply-add = 2 FLOPs); step time = median over logging windows of one "
              f"optimiser step as logged, {_step_time_conditions(collected)}.", ""]  # fmt: skip

    missing = {name: v["missing"] for name, v in variants.items() if v["missing"]}
    if missing:
        lines += ["**Unfinished runs** (left out): " + "; ".join(f"{n} seeds {s}" for n, s in missing.items()), ""]

    # Overview
    tasks = [t for t in TASKS if any(t in v.get("tasks", []) for v in variants.values())]
    lines += ["## Overview", "", "| model | kind | seeds | parameters (M) | GFLOPs | s / step | Δm (%) |", "|---|---|---|---|---|---|---|"]
    for name, entry in variants.items():
        if not entry["seeds"]:
            continue
        cost = costs.get(name, {})
        delta = entry.get("delta_m")
        lines.append(
            f"| {name} | {collected['variants'][name]['kind']} | {len(entry['seeds'])} | "
            f"{cost['parameters'] / 1e6:.2f} | {cost['flops'] / 1e9:.2f} | "
            f"{_format(entry['step_seconds'], 3) if entry['step_seconds'] else 'n/a'} | "
            f"{'reference' if collected['variants'][name]['kind'] == 'single-task' else _format(delta) if delta else 'n/a'} |"
        )
    lines += ["", "Models: " + "; ".join(f"**{n}**: {v['description']}" for n, v in collected["variants"].items() if v["runs"]) + ".", ""]

    # Per task
    lines += ["## Metrics per task", ""]
    for task in tasks:
        rows = [(name, entry) for name, entry in variants.items() if task in entry.get("tasks", [])]
        keys = sorted({k for _, e in rows for k in e["metrics"] if k.startswith(f"{task}/")})
        main = rows[0][1]["primary"][task]
        keys = [main] + [k for k in keys if k != main]
        lines += [f"### {task}", "", "| model | " + " | ".join(f"**{k}**" if k == main else k for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]  # fmt: skip
        for name, entry in rows:
            lines.append(f"| {name} | " + " | ".join(_format(entry["metrics"][k]) if k in entry["metrics"] else "n/a" for k in keys) + " |")
        lines.append("")

    # Claims
    lines += ["## The paper's claims on this benchmark", ""]
    if quick:
        lines += ["Not assessed: quick-mode numbers are no evidence. The table below only shows the form of the assessment.", ""]
    lines += ["A claim *holds* when TaskExpert's mean Δm exceeds the other model's by more than the seed noise "
              "(sqrt of the sum of both variances), *does not hold* when it is lower by more than that, and is "
              "*inconclusive* otherwise.", "", "| claim | verdict |", "|---|---|"]  # fmt: skip
    lines += [f"| {claim} | {verdict} |" for claim, verdict in claims(summary)]
    lines.append("")
    if not quick and STUDY_NOTES.is_file():  # what the numbers alone do not say (how the runs were made)
        lines += [STUDY_NOTES.read_text().strip(), ""]

    # Figures
    lines += ["## Training curves", "", f"![training curves]({figures['curves']})", "",
              "Left: total training loss of the multi-task models (seed mean); then each task's main validation metric "
              "at every evaluation.", "", "## Gate and expert usage", ""]  # fmt: skip
    for name, data in usage.items():
        lines += [f"### {name}", "", f"![{name} usage]({figures['usage'][name]})", ""]
        if data["model_type"] == "taskexpert":
            lines += ["Mean gate weight on validation images, per task (rows) and MMoE layer: each expert's and the memory's.",
                      "", "| task | " + " | ".join(f"{layer}: dominant expert" for layer in data["layers"])
                      + ("".join(f" | {layer}: memory" for layer in data["layers"]) if "memory" in data["candidates"] else "") + " |",
                      "|---|" + "---|" * (len(data["layers"]) * (2 if "memory" in data["candidates"] else 1))]  # fmt: skip
            experts = len(data["candidates"]) - ("memory" in data["candidates"])
            for task, per_layer in data["weights"].items():
                dominant = [f"{data['candidates'][int(np.argmax(w[:experts]))]} ({max(w[:experts]):.2f})" for w in per_layer]
                memory = [f"{w[-1]:.2f}" for w in per_layer] if "memory" in data["candidates"] else []
                lines.append(f"| {task} | " + " | ".join(dominant + memory) + " |")
        else:
            lines += ["Share of each task's token slots routed to every expert of each MoE layer, on validation images."]
        lines.append("")

    lines += ["## Best checkpoint", ""]
    if best:
        lines += [best, ""]
    else:
        lines += ["No checkpoint selected: "
                  + ("the quick mode's models are not worth serving." if quick else "Δm of the default TaskExpert is not available."), ""]
    lines += [GUIDE.read_text().strip(), ""]
    return "\n".join(lines)


def _step_time_conditions(collected: dict) -> str:
    """Where the step times were measured: they compare with each other only under the same conditions."""
    jobs, cores = collected["jobs"], collected["cpu_count"] or os.cpu_count()
    if jobs > 1:
        return (f"with {jobs} runs training at once on {cores} CPU core(s), each with {max(1, cores // jobs)} "
                "thread(s) (`--jobs`)")
    return f"one run at a time on {cores} CPU core(s)"


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def build_report(output_root: Path, output: Path, best_output: Optional[Path] = None) -> dict:
    """Write the markdown report, its figures (next to it, under `figures/`) and `OUTPUT_ROOT/summary.json`;
    after a full study, copy the best TaskExpert seed to `best_output`. Returns the summary."""
    output_root, output = Path(output_root), Path(output)
    collected = collect(output_root)
    if not any(v["runs"] for v in collected["variants"].values()):
        raise ReportError(f"No finished run under {output_root}: train first (`python -m experiments.run`).")
    summary = aggregate(collected)
    figure_dir = output.parent / "figures"
    figures = {"curves": "figures/training_curves.png", "usage": {}}
    plot_curves(collected, output.parent / figures["curves"])
    costs, usage = {}, {}
    for name, variant in collected["variants"].items():
        if not variant["runs"]:
            continue
        first = variant["runs"][min(variant["runs"])]
        costs[name] = model_cost(first)
        if variant["kind"] != "single-task":
            data = gate_usage(first)
            if len(data["candidates"]) > 1:  # one candidate always gets weight 1: nothing to show
                usage[name] = data
                figures["usage"][name] = f"figures/usage-{name}.png"
                plot_usage(name, data, figure_dir / f"usage-{name}.png")
    best_text = None
    best = best_taskexpert_run(collected, summary)
    if best is not None and collected["mode"] == "full" and best_output is not None:
        seed, run = best
        copy_model_folder(run["folder"], best_output)
        delta = summary["variants"]["taskexpert"]["delta_m_per_seed"][seed]
        best_text = (f"The default TaskExpert's seed {seed} (Δm {delta:+.2f} %, the highest of its seeds) is copied, "
                     f"push-ready (weights, config, processor, remote code, model card), to `{Path(best_output).name}` "
                     "under `outputs/`.")  # fmt: skip
    summary_json = {"mode": collected["mode"], "baselines": summary["baselines"], "costs": costs, "usage": usage,
                    "variants": summary["variants"]}  # fmt: skip
    write_json_atomic(output_root / "summary.json", json.loads(json.dumps(summary_json, default=list)))
    write_text_atomic(output, build_markdown(collected, summary, costs, usage, figures, best_text))
    return summary_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build docs/results.md from the study's run folders.")
    parser.add_argument("--output-root", type=Path, default=Path("outputs/experiments"), help="the runner's output root")
    parser.add_argument("--output", type=Path, default=Path(DEFAULT_OUTPUT), help="the markdown report to write")
    parser.add_argument("--best-output", type=Path, default=Path(DEFAULT_BEST_OUTPUT),
                        help="where the best TaskExpert seed is copied after a full study")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        with contextlib.chdir(REPO_ROOT):  # run folders name their datasets relative to the repository root
            build_report(args.output_root.resolve(), args.output.resolve(), args.best_output.resolve())
    except (ReportError, StudyError) as error:
        print(f"experiments.report: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
