"""ONNX export of a TaskExpert or Mod-Squad model for a subset of its tasks, checked and verified in ONNX Runtime.

The graph takes `pixel_values` (batch, 3, height, width), normalised as the image processor does, and returns one
logits output per task (`logits.<task>`, (batch, C, height, width)) and, with `gates=True`, the routing report:
`gates.<layer>.<task>` (batch, h, w, K) per routing layer, in `config.layer_names` order (TaskExpert's gate weights
over its experts and memory, Mod-Squad's gates over the layer's experts, 0 where an expert was not selected). Only
the chosen tasks' gates, memory reads, passes and heads are in the graph.

Sizes: the batch is always dynamic. The height and width are fixed to `size` (default: the processor's canvas)
unless `dynamic_size=True`, where they may be any positive multiple of the patch size up to `max_size`: the ViT
position embeddings are interpolated bicubically for every size, including the training size (where this equals the
stored embeddings up to float rounding). Mod-Squad's top-k routing is exported as it runs (TopK per token); the
experts run densely on every token and the selected outputs are gathered (`DenseExpertDispatch`), which gives the
same outputs as the grouped sparse computation of eager PyTorch at E/k times its expert FLOPs.

Next to the `.onnx` file the output folder holds the image processor's config, the model's `config.json` and
`onnx_export.json`, which describes the inputs, outputs, tasks, class names and the post-processing each output
needs (each task kind's `postprocess_steps`), so that a runtime without PyTorch can use the model (docs/deployment.md
has an onnxruntime + numpy example). The export is verified before the folder is written: the ONNX checker, then
ONNX Runtime against PyTorch on the example input (1e-4 absolute on every output by default). A failure of the
exporter, of the checker or of the comparison raises `OnnxExportError` and leaves no output folder.

Needs the `export` extra (`pip install "modeling-taskexpert[export]"`: onnx, onnxscript, onnxruntime); no model file
imports this module.
"""

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..file_utils import give_default_permissions
from ..task_definitions import task_specs_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_TOLERANCE = 1e-4
DEFAULT_MAX_SIZE = 4096  # largest height / width (pixels) a dynamic-size graph accepts
MODEL_FILE = "model.onnx"
DESCRIPTION_FILE = "onnx_export.json"


class OnnxExportError(RuntimeError):
    """The model could not be exported, or the exported graph failed its checks; no output was written."""


def require_export_packages() -> None:
    """A clear error naming the extra when onnx / onnxscript / onnxruntime are missing."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise OnnxExportError(
            f"The ONNX export needs {', '.join(missing)}: install the export extra with "
            "pip install 'modeling-taskexpert[export]' (onnx, onnxscript and onnxruntime)."
        )


def model_geometry(config) -> tuple[int, int]:
    """(patch size, training image size) of a TaskExpert or Mod-Squad config."""
    if hasattr(config, "backbone_config"):  # TaskExpert
        backbone = config.backbone_config
        return config.patch_size, getattr(backbone, "image_size", 224)
    return config.patch_size, config.image_size


class ExportedForward(nn.Module):
    """The model's forward for `tasks` as a graph with flat tensor outputs: logits per task, then (with `gates`) the
    routing report, layer-major."""

    def __init__(self, model: nn.Module, tasks: Sequence[str], gates: bool):
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.gates = gates

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values, tasks=self.tasks, output_gates=self.gates, return_dict=True)
        flat = [outputs.logits[task] for task in self.tasks]
        if self.gates:
            flat += [layer[task] for layer in outputs.gates for task in self.tasks]
        return tuple(flat)


@dataclass
class OnnxExport:
    """What `export_onnx` wrote."""

    folder: Path
    model_file: Path
    description: dict
    max_abs_difference: float  # ONNX Runtime against PyTorch on the example input


def output_names(config, tasks: Sequence[str], gates: bool) -> list[str]:
    names = [f"logits.{task}" for task in tasks]
    if gates:
        names += [f"gates.{layer}.{task}" for layer in range(len(config.layer_names)) for task in tasks]
    return names


def describe(model, processor, tasks: list[str], gates: bool, dynamic_size: bool, size, opset, max_size) -> dict:
    """The contents of `onnx_export.json`."""
    config = model.config
    specs = task_specs_of(config)
    patch, trained = model_geometry(config)
    if dynamic_size:
        height = width = {"multiple_of": patch, "min": patch, "max": max_size}
    else:
        height, width = size
    outputs = []
    for task in tasks:
        spec = specs[task]
        outputs.append({
            "name": f"logits.{task}", "task": task, "kind": spec.kind.name,
            "shape": ["batch", spec.head_channels] + ([] if spec.kind.image_level else ["height", "width"]),
            "postprocess": spec.kind.postprocess_steps(spec),
            "class_names": list(spec.class_names) if spec.class_names is not None else None,
            "unit": spec.unit or None, "scales_with_zoom": spec.scales_with_zoom,
        })  # fmt: skip
    routing = []
    if gates:
        for layer, (layer_name, candidates) in enumerate(zip(config.layer_names, config.candidate_names)):
            for task in tasks:
                routing.append({
                    "name": f"gates.{layer}.{task}", "task": task, "layer": layer_name,
                    "shape": ["batch", "grid_height", "grid_width", len(candidates)], "candidates": list(candidates),
                })  # fmt: skip
    preprocessing = {
        key: getattr(processor, key)
        for key in ("size", "resize_mode", "resample", "do_normalize", "image_mean", "image_std", "size_divisor")
    }
    return {
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "model_file": MODEL_FILE,
        "opset": opset,
        "tasks": list(tasks),
        "all_model_tasks": list(config.tasks),
        "inputs": [
            {
                "name": "pixel_values",
                "dtype": "float32",
                "shape": ["batch", 3, "height", "width"],
                "height": height,
                "width": width,
                "training_size": trained,
                "note": "normalised RGB as the image processor prepares it (preprocessor_config.json)",
            }
        ],  # fmt: skip
        "outputs": outputs,
        "routing_outputs": routing,
        "preprocessing": preprocessing,
    }


def _example_size(patch: int, trained: int, dynamic_size: bool, size: Optional[tuple[int, int]]) -> tuple[int, int]:
    if size is not None:
        return size
    if dynamic_size:
        # Not the training size and not square, so that the traced graph takes the general (interpolating) path.
        return trained + patch, trained + 2 * patch
    return trained, trained


def _check_size(size: tuple[int, int], patch: int) -> tuple[int, int]:
    height, width = (int(v) for v in size)
    if height < patch or width < patch or height % patch or width % patch:
        raise OnnxExportError(f"size {height}x{width} must be positive multiples of the patch size {patch}.")
    return height, width


def export_onnx(
    model: nn.Module,
    output_dir,
    tasks: Optional[Sequence[str]] = None,
    opset: Optional[int] = None,
    dynamic_size: bool = False,
    size: Optional[tuple[int, int]] = None,
    gates: bool = False,
    processor=None,
    max_size: int = DEFAULT_MAX_SIZE,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> OnnxExport:
    """Export `model` (a `TaskExpertForDensePrediction` or `ModSquadForDensePrediction`) to `output_dir`.

    `tasks`: the task subset (default: all, in the model's order). `size`: the (height, width) of a fixed-size graph
    (default: the processor's canvas), or the example size of a dynamic one. `opset`: the ONNX opset (default: the
    exporter's). `tolerance`: the largest absolute difference between ONNX Runtime and PyTorch accepted on the
    example input. Returns what was written; raises `OnnxExportError` (nothing written) on any failure.
    """
    require_export_packages()
    import onnx

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise OnnxExportError(f"{output_dir} exists and is not empty; choose another folder or pass overwrite=True.")
    config = model.config
    try:
        tasks = model.resolve_tasks(list(tasks) if tasks is not None else None)
    except ValueError as error:
        raise OnnxExportError(str(error)) from None
    if processor is None:
        from ..image_processing_dense_multitask import DenseMultiTaskImageProcessor

        processor = DenseMultiTaskImageProcessor(size_divisor=model_geometry(config)[0])
    patch, trained = model_geometry(config)
    canvas = (processor.size["height"], processor.size["width"])
    example_size = _check_size(
        _example_size(patch, trained, dynamic_size, size or (None if dynamic_size else canvas)), patch
    )
    if dynamic_size and max_size < max(example_size):
        raise OnnxExportError(f"max_size {max_size} is smaller than the example size {example_size}.")

    model = model.eval().float()
    wrapper = ExportedForward(model, tasks, gates).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, *example_size, generator=generator)
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = {0: batch}
    if dynamic_size:
        shapes[2] = patch * torch.export.Dim("height_patches", min=1, max=max_size // patch)
        shapes[3] = patch * torch.export.Dim("width_patches", min=1, max=max_size // patch)
    names = output_names(config, tasks, gates)
    description = describe(model, processor, tasks, gates, dynamic_size, example_size, opset, max_size)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model_file = staging / MODEL_FILE
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    wrapper, (example,), dynamo=True, input_names=["pixel_values"], output_names=names,
                    dynamic_shapes={"pixel_values": shapes}, opset_version=opset, verbose=False,
                )  # fmt: skip
            program.save(str(model_file))
        except Exception as error:  # the exporter's own errors have many types
            raise OnnxExportError(
                f"torch.onnx.export could not export this {config.model_type} model (tasks {tasks}, "
                f"{'dynamic' if dynamic_size else 'fixed'} size {example_size}): {type(error).__name__}: "
                f"{_first_lines(error)}"
            ) from error
        try:
            onnx.checker.check_model(str(model_file))
        except Exception as error:
            raise OnnxExportError(f"The exported graph fails the ONNX checker: {_first_lines(error)}") from error
        description["opset"] = _opset_of(model_file)
        examples = [example]
        if dynamic_size and example_size != (trained, trained):  # and the training size, one image
            examples.append(torch.randn(1, 3, trained, trained, generator=generator))
        difference = verify(model_file, wrapper, examples, names, tolerance)
        processor.save_pretrained(staging)
        config.to_json_file(staging / "config.json")
        (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        give_default_permissions(staging)  # mkdtemp's folder is private; the export is an ordinary folder
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Exported %s (%s) to %s; largest difference to PyTorch %.2g", config.model_type, tasks, output_dir,
                difference)  # fmt: skip
    return OnnxExport(output_dir, output_dir / MODEL_FILE, description, difference)


def _first_lines(error: BaseException, lines: int = 6) -> str:
    return "\n".join(str(error).strip().splitlines()[:lines])


def _opset_of(model_file: Path) -> int:
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False)
    return next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))


def verify(
    model_file: Path, wrapper: nn.Module, examples: list[torch.Tensor], names: list[str], tolerance: float
) -> float:
    """Run the graph in ONNX Runtime on every input of `examples` and compare every output with PyTorch's; the
    largest absolute difference, or `OnnxExportError` naming the output and input above `tolerance`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    largest = 0.0
    for example in examples:
        where = f"input {tuple(example.shape)}"
        with torch.no_grad():
            expected = wrapper(example)
        try:
            got = session.run(names, {"pixel_values": example.numpy()})
        except Exception as error:
            raise OnnxExportError(f"ONNX Runtime cannot run the exported graph on {where}: {_first_lines(error)}")
        for name, value, reference in zip(names, got, expected):
            reference = reference.float().numpy()
            if value.shape != reference.shape:
                raise OnnxExportError(
                    f"Output {name} on {where}: ONNX Runtime gives shape {value.shape}, PyTorch {reference.shape}."
                )
            difference = float(np.abs(value - reference).max()) if value.size else 0.0
            if not difference <= tolerance:
                raise OnnxExportError(
                    f"Output {name} on {where}: ONNX Runtime differs from PyTorch by {difference:.3g} (> "
                    f"{tolerance:g}); the exported graph is not faithful."
                )
            largest = max(largest, difference)
    return largest


__all__ = ["OnnxExport", "OnnxExportError", "export_onnx", "output_names", "verify"]
