"""Latency of `pipeline` calls (pre-processing, forward, post-processing and rendering) against the model forward."""

import numpy as np
import torch
from PIL import Image

from modeling_taskexpert import MultiTaskDensePredictionPipeline, DenseMultiTaskImageProcessor

from dataclasses import asdict

from .measure import interleaved_times, median_ratio, summarize
from .models import build_model, inference_call, load_config
from .plan import BenchPlan, Setting, SuiteContext
from .formatting import ms, ratio, setting_label, table

KEY = "pipeline"
TITLE = "`pipeline` end to end"


def measure(context: SuiteContext) -> list[dict]:
    return pipeline_end_to_end(context.plan)


def pipeline_end_to_end(plan: BenchPlan) -> list[dict]:
    """Latency of `pipeline` calls (pre-processing, forward, post-processing and rendering) against the model
    forward alone on the processed input."""
    rows = []
    for setting in plan.pipeline_settings:
        pipe, image = _build_pipeline(setting)
        model_inputs = pipe.preprocess(image)
        pixels = model_inputs["pixel_values"]
        calls = {
            "pipeline": lambda: pipe(image),
            "model_forward": inference_call(pipe.model, pixels),
            "preprocess": lambda: pipe.preprocess(image),
            "postprocess": lambda: pipe.postprocess(pipe.forward(model_inputs)),
        }
        with torch.inference_mode():
            times = interleaved_times(calls, plan.small_budget_s, max(plan.min_rounds, 3))
        rows.append({
            "setting": asdict(setting),
            "image_size_in": list(image.size[::-1]),
            "pipeline": summarize(times["pipeline"]),
            "model_forward": summarize(times["model_forward"]),
            "preprocess": summarize(times["preprocess"]),
            "forward_and_postprocess": summarize(times["postprocess"]),
            "pipeline_vs_forward_ratio": median_ratio(times["pipeline"], times["model_forward"]),
        })  # fmt: skip
    return rows


def _build_pipeline(setting: Setting) -> tuple[MultiTaskDensePredictionPipeline, Image.Image]:
    config = load_config(setting.preset)
    model = build_model(config)
    processor = DenseMultiTaskImageProcessor(
        size={"height": setting.image_size, "width": setting.image_size}, size_divisor=config.patch_size
    )
    pipe = MultiTaskDensePredictionPipeline(model=model, image_processor=processor)
    # A landscape photo-sized image larger than the canvas, so the processor resizes and pads.
    rng = np.random.default_rng(0)
    image = Image.fromarray(
        rng.integers(0, 256, (setting.image_size * 3 // 4 + 8, setting.image_size + 40, 3), dtype=np.uint8)
    )
    return pipe, image


def sections(section: list[dict], plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _pipeline_text(section))]


def _pipeline_text(rows: list[dict]) -> str:
    return "\n\n".join([
        "`MultiTaskDensePredictionPipeline` on one image larger than the canvas (so it is resized and padded), against "
        "the model forward on the processed input. Post-processing crops, resizes and renders every task.",
        table(
            ["setting", "input (h, w)", "pipeline / forward", "preprocess ms", "forward ms", "forward + postprocess ms"],
            [[setting_label(row["setting"]), tuple(row["image_size_in"]), ratio(row["pipeline_vs_forward_ratio"]),
              ms(row["preprocess"]["median_s"]), ms(row["model_forward"]["median_s"]),
              ms(row["forward_and_postprocess"]["median_s"])] for row in rows],
        ),
        "(milliseconds are context for this machine.)",
    ])  # fmt: skip
