"""Evaluate a saved model on a converted dataset folder with the benchmark metrics.

    python -m modeling_taskexpert.evaluation --model PATH --dataset FOLDER --split validation --output metrics.json

Data-parallel: `accelerate launch --num_processes N -m modeling_taskexpert.evaluation ...` (each process
scores its share of the split and the metric states are summed). The JSON holds "metrics" (the
results, keyed "<task>/<metric>"; boundary keys name their scorer: `edge/odsF` from the exact one,
`edge/odsF_approx` from the approximate one) and "settings" (the modes and tolerances behind them); it
is written to a temporary file and renamed, so an existing output is never left half-written.

Exit status: 0 on success, 2 when the arguments or inputs are refused before the evaluation starts
(argparse's convention for usage errors), 1 when the evaluation fails while running.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

from ..file_utils import write_json_atomic
from ..data.schema import dataset_task_specs
from .boundary import BOUNDARY_MODES, DEFAULT_EXACT_SECONDS_PER_IMAGE
from .metrics import SALIENCY_MAXF_MODES

BOUNDARY_MODE_CHOICES = (*BOUNDARY_MODES, "both")
EXIT_BAD_INPUT, EXIT_FAILURE = 2, 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_taskexpert.evaluation",
        description="Evaluate a saved multi-task dense model on a converted dataset with the benchmark metrics.",
    )
    parser.add_argument("--model", required=True, help="Folder (or Hub id) of a model saved with save_pretrained.")
    parser.add_argument("--dataset", required=True, help="Converted dataset folder (or Hub dataset id).")
    parser.add_argument("--split", default="validation", choices=["train", "validation"])
    parser.add_argument("--output", required=True, help="Where to write the metrics JSON.")
    parser.add_argument("--tasks", nargs="+", help="Tasks to score (default: the model's tasks the dataset has).")
    parser.add_argument("--batch-size", type=int, default=6, help="Evaluation batch size per process (protocol: 6).")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument(
        "--cache-dir", help="Cache folder of `datasets` for the prepared split (default: its usual cache)."
    )
    parser.add_argument("--max-samples", type=int, help="Score only the first N samples of the split (quick checks).")
    parser.add_argument(
        "--boundary-mode",
        "--edge-mode",  # the previous release's name, read for one release
        choices=BOUNDARY_MODE_CHOICES,
        default="exact",
        help="Boundary scorer: the protocol's 'exact' one (needs pyEdgeEval; keys edge/odsF, edge/oisF), the fast "
        "'approximate' stand-in used during training (edge/odsF_approx, edge/oisF_approx), or 'both'.",
    )
    parser.add_argument(
        "--boundary-workers",
        "--edge-workers",  # the previous release's name, read for one release
        type=int,
        default=0,
        help="Processes scoring boundaries in the background (the exact scorer takes about 1-3 s per 128x128 image "
        "and tens of seconds per full-size image on one core; use as many workers as there are free cores).",
    )
    parser.add_argument(
        "--edge-time-limit",
        type=float,
        default=DEFAULT_EXACT_SECONDS_PER_IMAGE,
        help="The exact boundary scorer's limit per image in seconds (default %(default)g): a noisy map can take hours; "
        "past the limit the evaluation stops naming the image.",
    )
    parser.add_argument(
        "--saliency-maxf-mode",
        choices=SALIENCY_MAXF_MODES,
        help="Saliency maxF: 'reference' (as published PASCAL-Context numbers) or 'standard' (default: by dataset).",
    )
    parser.add_argument("--baselines", help="JSON of single-task baseline metrics, for the multi-task gain delta_m.")
    parser.add_argument(
        "--class-mapping",
        help='JSON {"task": {"model class": "dataset class"}} for a model whose segmentation classes are not the '
        "dataset's (otherwise refused): every model class is scored as the dataset class it names.",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="Allow running the checkpoint's own model code."
    )
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU even when an accelerator is available.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def format_table(results: dict[str, float]) -> str:
    """Aligned `metric  value` lines of the headline metrics (per-class IoU is left to the JSON)."""
    rows = [(key, value) for key, value in results.items() if "/IoU/" not in key]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value:10.4f}" for key, value in rows)


def _resolve_tasks(
    requested: Optional[Sequence[str]], model_tasks: Sequence[str], dataset_tasks: Sequence[str], dataset: str
):
    if requested is None:
        tasks = [task for task in model_tasks if task in dataset_tasks]
        if not tasks:
            raise ValueError(
                f"The model predicts {list(model_tasks)} but the dataset {dataset} has none of them "
                f"({list(dataset_tasks)})."
            )
        return tasks
    for task in requested:
        if task not in model_tasks:
            raise ValueError(f"--tasks: the model does not predict {task!r} (it predicts {list(model_tasks)}).")
        if task not in dataset_tasks:
            raise ValueError(f"--tasks: the dataset {dataset} has no {task!r} labels (it has {list(dataset_tasks)}).")
    return list(requested)


def read_class_mapping(path: Optional[str]) -> dict:
    """The `--class-mapping` JSON: {task: {model class name: dataset class name}}."""
    if path is None:
        return {}
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--class-mapping {path}: cannot read it as JSON ({error}).") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(names, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())
        for names in mapping.values()
    ):
        raise ValueError(f"--class-mapping {path} must map task names to {{model class name: dataset class name}}.")
    return mapping


def _check_tasks_agree(
    model_config, metadata: dict, tasks: Sequence[str], class_mapping: Optional[dict] = None
) -> dict:
    """The model's tasks must be the dataset's: the same kind, and for segmentation the same class names in the same
    order, or class ids would be compared across label sets (a model whose class 0 is "wall" scored against a dataset
    whose class 0 is "floor"). Where they differ, `class_mapping` (`--class-mapping`) may say which dataset class
    each model class is; returns {task: model class id -> dataset class id (a LongTensor)} for those tasks."""
    import torch

    class_mapping = dict(class_mapping or {})
    unknown = sorted(set(class_mapping) - set(tasks))
    if unknown:
        raise ValueError(f"--class-mapping names task(s) {unknown} that are not evaluated here ({list(tasks)}).")
    if not hasattr(model_config, "task_specs"):
        return {}
    model_specs, dataset_specs = model_config.task_specs, dataset_task_specs(metadata)
    class_maps = {}
    for task in tasks:
        ours, theirs = model_specs[task], dataset_specs[task]
        if ours.kind.name != theirs.kind.name:
            raise ValueError(
                f"Task {task!r} is a {ours.kind.name} task of the model but a {theirs.kind.name} task of the dataset."
            )
        if ours.class_names == theirs.class_names:
            if task in class_mapping:
                raise ValueError(f"--class-mapping maps {task!r}, whose classes are the dataset's already.")
            continue
        if task in class_mapping:
            names = class_mapping[task]
            missing = [name for name in ours.class_names if name not in names]
            wrong = sorted(set(names) - set(ours.class_names)) + sorted(
                name for name in names.values() if name not in theirs.class_names
            )
            if missing or wrong:
                raise ValueError(
                    f"--class-mapping for {task!r} must map every model class {list(ours.class_names)} to a dataset "
                    f"class {list(theirs.class_names)}; missing {missing}, unknown {wrong}."
                )
            class_maps[task] = torch.tensor([theirs.class_names.index(names[name]) for name in ours.class_names])
            continue
        if len(ours.class_names) != len(theirs.class_names):
            raise ValueError(
                f"The model predicts {len(ours.class_names)} classes for {task!r} but the dataset has "
                f"{len(theirs.class_names)}; --class-mapping FILE says which dataset class each model class is."
            )
        first = next(i for i, (a, b) in enumerate(zip(ours.class_names, theirs.class_names)) if a != b)
        raise ValueError(
            f"The classes of {task!r} differ between the model and the dataset: class {first} is "
            f"{ours.class_names[first]!r} for the model and {theirs.class_names[first]!r} in the dataset. Scores would "
            "compare different classes; evaluate on a dataset with the model's classes, or give --class-mapping FILE "
            '({"task": {"model class": "dataset class", ...}}).'
        )
    return class_maps


def describe_boundary_scoring(evaluator, num_samples: int) -> Optional[str]:
    """What the boundary scorer is and what it costs, printed before a long evaluation starts."""
    boundary_tasks = [task for task, spec in evaluator.task_specs.items() if spec.kind.name == "boundary"]
    if not boundary_tasks:
        return None
    modes, task = evaluator.boundary_modes, boundary_tasks[0]
    lines = [f"Boundary scorer: {' and '.join(modes)} (results "
             + ", ".join(f"{task}/odsF" if mode == "exact" else f"{task}/odsF_approx" for mode in modes) + ")."]  # fmt: skip
    if "exact" in modes:
        workers = evaluator.meters[task].workers
        lines.append(
            f"The exact scorer (the protocol's one-to-one matching at 101 thresholds) takes about 1-3 s per 128x128 "
            f"image and tens of seconds per full-size image on one core, for {num_samples} images here; the progress "
            f"bar's ETA includes it. "
            + (f"It runs in {workers} background processes (--boundary-workers)." if workers
               else "--boundary-workers N scores in N background processes; --boundary-mode approximate is the fast stand-in.")
        )  # fmt: skip
    return "\n".join(lines)


def prepare(args: argparse.Namespace):
    """Check the arguments and load the model, the data and the evaluator: everything that can be refused before the
    evaluation starts. Returns (model, dataloader, evaluator, accelerator, number of samples)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from ..data import build_transforms, collate_dense_batch, load_multitask_dataset, read_dataset_metadata
    from ..loading import load_dense_model  # also registers the model types with the Auto classes
    from .evaluator import DenseMultiTaskEvaluator

    for name, minimum in (("batch_size", 1), ("max_samples", 1), ("boundary_workers", 0), ("num_workers", 0)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}.")
    metadata = read_dataset_metadata(args.dataset)
    try:
        model, loading_info = load_dense_model(
            args.model, trust_remote_code=args.trust_remote_code, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"Cannot load the model {args.model!r}: {error}") from None
    # Scoring a model whose weights are partly random would report numbers of a model that does not exist.
    for kind in ("missing_keys", "mismatched_keys"):
        names = sorted(str(name) for name in loading_info.get(kind) or ())
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise ValueError(
                f"The weights of {args.model!r} do not match its config ({kind.replace('_', ' ')}: {shown}); "
                "the file is incomplete or belongs to another model."
            )
    model_tasks = list(getattr(model.config, "tasks", []))
    tasks = _resolve_tasks(args.tasks, model_tasks, list(metadata["tasks"]), args.dataset)
    class_maps = _check_tasks_agree(model.config, metadata, tasks, read_class_mapping(args.class_mapping))
    evaluator = DenseMultiTaskEvaluator.from_metadata(
        metadata,
        tasks=tasks,
        class_maps=class_maps,
        boundary_time_limit=args.edge_time_limit,
        boundary_mode=BOUNDARY_MODES if args.boundary_mode == "both" else args.boundary_mode,
        saliency_maxf_mode=args.saliency_maxf_mode,
        single_task_baselines=args.baselines,
        boundary_workers=args.boundary_workers,
    )

    dataset = load_multitask_dataset(args.dataset, args.split, cache_dir=args.cache_dir)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    transform = build_transforms(metadata, train=False, tasks=tasks)
    dataset.set_transform(transform)
    dataloader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=partial(collate_dense_batch, task_specs=transform.task_specs),
    )
    accelerator = Accelerator(cpu=args.cpu)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    dataloader = accelerator.prepare_data_loader(dataloader)
    return model, dataloader, evaluator, accelerator, len(dataset)


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the command line does and return the JSON payload (also written to `args.output`)."""
    model, dataloader, evaluator, accelerator, num_samples = prepare(args)
    return evaluate_prepared(args, model, dataloader, evaluator, accelerator, num_samples)


def evaluate_prepared(args, model, dataloader, evaluator, accelerator, num_samples: int) -> dict:
    """Run the evaluation prepared by `prepare`, write the JSON and print the table."""
    from .loop import evaluate_model

    description = describe_boundary_scoring(evaluator, num_samples)
    if description and accelerator.is_main_process:
        print(description, file=sys.stderr, flush=True)
    try:
        results = evaluate_model(model, dataloader, evaluator, accelerator=accelerator, progress=not args.no_progress)
    finally:
        evaluator.close()
    payload = {
        "metrics": results,
        "settings": evaluator.settings,
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "num_samples": num_samples,
    }
    if accelerator.is_main_process:
        write_json_atomic(args.output, payload)
        print(format_table(results))
        print(f"Metrics of {num_samples} samples ({args.split}) written to {args.output}")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit with 2 here
    try:
        prepared = prepare(args)
    except (ValueError, TypeError, OSError, ImportError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        evaluate_prepared(args, *prepared)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as error:
        print(f"error: the evaluation failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
