"""The measurements. Each suite takes a `BenchPlan` and returns a JSON-ready section of `results.json`."""

import gc
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from modeling_taskexpert import (
    ModSquadConfig,
    ModSquadForDensePrediction,
    MultiTaskDensePredictionPipeline,
    TaskExpertImageProcessor,
)
from modeling_taskexpert.modeling_taskexpert import TaskExpertExperts
from modeling_taskexpert.testing_utils import taskexpert_experts_loop

from .measure import (
    count_flops,
    interleaved_times,
    median,
    median_ratio,
    flops_and_peak_memory,
    resident_memory_bytes,
    summarize,
)
from .models import (
    MODEL_CONFIG_DIR,
    build_model,
    build_variants,
    count_parameters,
    inference_call,
    load_config,
    random_labels,
    random_pixels,
    replay_backbone,
    train_step,
)


@dataclass(frozen=True)
class Setting:
    """A model preset (see `models.MODEL_PRESETS`) at an image size and batch size."""

    preset: str
    image_size: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.preset} {self.image_size}² b{self.batch}"


@dataclass
class BenchPlan:
    """What one run measures and how long it may spend on each comparison (seconds of timed rounds)."""

    grid: list[Setting]
    train_grid: list[Setting]
    headline: Setting
    expert_counts: tuple[int, ...] = (4, 8, 16)
    loop_settings: list[Setting] = field(default_factory=list)
    sweep: Setting = Setting("vit-s", 256, 1)
    sweep_experts: tuple[int, ...] = (2, 4, 8, 16)
    sweep_tasks: tuple[int, ...] = (1, 3, 5)
    sweep_mmoe_layers: tuple[tuple[int, ...], ...] = ((12,), (6, 12), (3, 6, 9, 12))
    sweep_image_sizes: tuple[int, ...] = (128, 256, 512)
    subset_task: str = "semseg"
    pipeline_settings: list[Setting] = field(default_factory=list)
    memory_setting: Setting = Setting("tiny", 128, 1)
    modsquad_image_size: int = 128
    modsquad_batch: int = 1
    modsquad_tasks: tuple[str, ...] = ("semseg", "depth")
    memory_model_calls: int = 1000
    memory_pipeline_calls: int = 200
    data_samples: int = 200
    data_image_size: int = 128
    data_batch: int = 8
    data_workers: tuple[int, ...] = (0, 2)
    forward_budget_s: float = 6.0
    train_budget_s: float = 6.0
    small_budget_s: float = 2.0
    min_rounds: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def default_plan() -> BenchPlan:
    """`make bench` on a 2-core CPU: under 10 minutes. Training steps of the larger settings are left to `--full`
    (minutes each on such a machine)."""
    grid = [Setting(p, s, 1) for p in ("tiny", "vit-s", "vit-b") for s in (256, 512)]
    return BenchPlan(
        grid=grid,
        train_grid=[Setting("tiny", 256, 1), Setting("vit-s", 256, 1)],
        headline=Setting("vit-b", 512, 1),
        loop_settings=[Setting("vit-b", 512, 1), Setting("tiny", 128, 8)],
        pipeline_settings=[Setting("tiny", 128, 1), Setting("vit-s", 256, 1)],
    )


def full_plan() -> BenchPlan:
    """The default plan plus training steps of every grid setting (about an hour on a 2-core CPU)."""
    plan = default_plan()
    plan.train_grid = list(plan.grid)
    return plan


def quick_plan() -> BenchPlan:
    """Tiny sizes that exercise every suite in seconds (the smoke test; the numbers mean nothing)."""
    tiny = Setting("tiny", 32, 2)
    return BenchPlan(
        grid=[tiny],
        train_grid=[tiny],
        headline=tiny,
        expert_counts=(2, 4),
        loop_settings=[tiny],
        sweep=Setting("tiny", 32, 1),
        sweep_experts=(2,),
        sweep_tasks=(1,),
        sweep_mmoe_layers=((4,),),
        sweep_image_sizes=(32,),
        pipeline_settings=[Setting("tiny", 32, 1)],
        memory_setting=Setting("tiny", 32, 1),
        modsquad_image_size=32,
        memory_model_calls=20,
        memory_pipeline_calls=5,
        data_samples=4,
        data_image_size=32,
        data_batch=2,
        forward_budget_s=0.0,
        train_budget_s=0.0,
        small_budget_s=0.0,
        min_rounds=2,
    )


# ---------------------------------------------------------------------------------------------------------------
def compare_variants(setting: Setting, plan: BenchPlan, train: bool) -> dict:
    """Forward latency (and, with `train`, training-step throughput) of TaskExpert, the bare backbone and the
    shared-decoder baseline, interleaved; FLOPs, parameters and peak tensor memory of each (from the warm-up call)."""
    config = load_config(setting.preset)
    variants = build_variants(config)
    pixels = random_pixels(setting.batch, setting.image_size)
    result = {
        "setting": asdict(setting),
        "num_tasks": len(config.tasks),
        "num_experts": config.num_experts,
        "parameters": {name: count_parameters(module) for name, module in variants.items()},
    }
    calls = {name: inference_call(module, pixels) for name, module in variants.items()}
    result.update(_compare(calls, "forward", setting, plan.forward_budget_s, plan.min_rounds))
    if train:
        labels = random_labels(config, setting.batch, setting.image_size)
        # Fresh modules: each variant gets its own optimizer and the inference modules stay untouched.
        variants = build_variants(config)
        steps = {name: train_step(module, pixels, labels) for name, module in variants.items()}
        result.update(_compare(steps, "train_step", setting, plan.train_budget_s, plan.min_rounds))
    del variants
    gc.collect()
    return result


def _compare(calls: dict, kind: str, setting: Setting, budget_s: float, min_rounds: int) -> dict:
    """Interleaved timing of the variants' calls; the first call of each also counts FLOPs and peak memory."""
    flops, peaks = {}, {}

    def profile_warm_up(name, function):
        flops[name], peaks[name] = flops_and_peak_memory(function)

    times = interleaved_times(calls, budget_s, min_rounds, warmup_hook=profile_warm_up)
    # Time ratio to the backbone: above 1 means slower; the throughput ratio is its inverse.
    ratios = {name: median_ratio(times[name], times["backbone"]) for name in calls if name != "backbone"}
    return {
        kind: {name: summarize(values, setting.batch) for name, values in times.items()},
        f"{kind}_flops": flops,
        f"{kind}_peak_memory_bytes": peaks,
        f"{kind}_time_ratio_to_backbone": ratios,
    }


def headline_decomposition(plan: BenchPlan, backbone_times: list[float]) -> dict:
    """At the headline setting: the MMoE + heads time measured alone (backbone replayed), for all tasks and for one
    task, against `backbone_times` (the backbone's forward times of the same run). Low-noise complement of the
    direct forward ratio, and the source of the subset ratio with its FLOP bound."""
    setting = plan.headline
    config = load_config(setting.preset)
    model = build_model(config)
    pixels = random_pixels(setting.batch, setting.image_size)
    meta_model = build_model(config, device="meta")
    meta_pixels = pixels.to("meta")
    flops = {
        "backbone": count_flops(inference_call(meta_model.taskexpert.backbone, meta_pixels)),
        "all_tasks": count_flops(inference_call(meta_model, meta_pixels)),
        "one_task": count_flops(inference_call(meta_model, meta_pixels, tasks=[plan.subset_task])),
    }
    replay_backbone(model, pixels)
    calls = {
        "all_tasks": inference_call(model, pixels),
        "one_task": inference_call(model, pixels, tasks=[plan.subset_task]),
    }
    post = interleaved_times(calls, plan.small_budget_s, max(plan.min_rounds, 5), max_rounds=30)
    backbone_s = median(backbone_times)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        calls["all_tasks"]()
    operators = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total_us = sum(event.self_cpu_time_total for event in operators)
    return {
        "setting": asdict(setting),
        "num_tasks": len(config.tasks),
        "subset_task": plan.subset_task,
        "backbone": summarize(backbone_times, setting.batch),
        "mmoe_and_heads_all_tasks": summarize(post["all_tasks"], setting.batch),
        "mmoe_and_heads_one_task": summarize(post["one_task"], setting.batch),
        "overhead_ratio_decomposed": 1.0 + median(post["all_tasks"]) / backbone_s,
        "subset_vs_all_ratio": median_ratio(post["one_task"], post["all_tasks"]),
        # The same ratio in counted FLOPs: what the work itself allows, whatever the machine.
        "subset_vs_all_flops_ratio": (flops["one_task"] - flops["backbone"]) / (flops["all_tasks"] - flops["backbone"]),
        "overhead_flops_ratio": flops["all_tasks"] / flops["backbone"],
        # Where the MMoE + heads time goes (one profiled call): operator, share of the self CPU time, calls.
        "mmoe_and_heads_profile": [
            {"operator": event.key, "share": event.self_cpu_time_total / total_us, "calls": event.count}
            for event in operators[:8]
        ],
    }


def batched_vs_loop(plan: BenchPlan) -> list[dict]:
    """The batched experts (`TaskExpertExperts.forward`) against the per-expert reference loop
    (`testing_utils.taskexpert_experts_loop`), same weights, on the tokens of an MMoE layer of each setting."""
    rows = []
    for setting in plan.loop_settings:
        config = load_config(setting.preset)
        channels = config.backbone_config.hidden_size
        grid = (setting.image_size // config.patch_size,) * 2
        tokens = torch.randn(setting.batch, grid[0] * grid[1], channels, generator=torch.Generator().manual_seed(0))
        for experts in plan.expert_counts:
            torch.manual_seed(0)
            module = TaskExpertExperts(load_config(setting.preset, num_experts=experts), channels).eval()
            for weight in (module.fc1_weight, module.fc2_weight):
                torch.nn.init.normal_(weight, std=0.02)
            with torch.inference_mode():
                batched, looped = module(tokens, grid), taskexpert_experts_loop(module, tokens, grid)
                max_difference = float((batched - looped).abs().max())
                times = interleaved_times(
                    {"batched": lambda: module(tokens, grid), "loop": lambda: taskexpert_experts_loop(module, tokens, grid)},
                    plan.small_budget_s,
                    max(plan.min_rounds, 5),
                    max_rounds=50,
                )
            rows.append({
                "setting": asdict(setting),
                "num_experts": experts,
                "in_channels": channels,
                "expert_hidden_size": config.expert_hidden_size,
                "num_tokens": grid[0] * grid[1],
                "outputs_match": bool(torch.allclose(batched, looped, rtol=1e-4, atol=1e-5)),
                "max_abs_difference": max_difference,
                "batched": summarize(times["batched"]),
                "loop": summarize(times["loop"]),
                "speedup": median_ratio(times["loop"], times["batched"]),
            })  # fmt: skip
    return rows


def scaling(plan: BenchPlan) -> dict:
    """MMoE + heads cost as the number of experts, tasks, MMoE layers and the image size grow.

    The backbone is timed once per image size; the MMoE + heads part is timed alone (backbone replayed), and the
    overhead ratio is 1 + part / backbone. FLOPs are counted on the meta device.
    """
    base = plan.sweep
    all_tasks = list(load_config(base.preset).tasks)
    extra_tasks = [task for task in ("semseg", "human_parts", "saliency", "normals", "edge", "depth") if task not in all_tasks]
    task_pool = all_tasks + extra_tasks
    sweeps = {
        "num_experts": [(value, {"num_experts": value}, base.image_size) for value in plan.sweep_experts],
        "num_tasks": [(value, {"tasks": task_pool[:value]}, base.image_size) for value in plan.sweep_tasks],
        "num_mmoe_layers": [(len(value), {"mmoe_layers": list(value)}, base.image_size) for value in plan.sweep_mmoe_layers],
        "image_size": [(value, {}, value) for value in plan.sweep_image_sizes],
    }
    backbone_cache = {}
    result = {"setting": asdict(base)}
    for axis, points in sweeps.items():
        rows = []
        for value, overrides, size in points:
            config = load_config(base.preset, **overrides)
            model = build_model(config)
            pixels = random_pixels(base.batch, size)
            key = (size, config.mmoe_layers[-1])
            meta_model = build_model(config, device="meta")
            meta_pixels = pixels.to("meta")
            if key not in backbone_cache:
                times = interleaved_times(
                    {"backbone": inference_call(model.taskexpert.backbone, pixels)}, plan.small_budget_s, plan.min_rounds
                )
                backbone_flops = count_flops(inference_call(meta_model.taskexpert.backbone, meta_pixels))
                backbone_cache[key] = (median(times["backbone"]), backbone_flops)
            backbone_s, backbone_flops = backbone_cache[key]
            flops = count_flops(inference_call(meta_model, meta_pixels))
            replay_backbone(model, pixels)
            times = interleaved_times({"part": inference_call(model, pixels)}, plan.small_budget_s, max(plan.min_rounds, 3))
            part_s = median(times["part"])
            rows.append({
                "value": value,
                "image_size": size,
                "mmoe_and_heads_s": part_s,
                "backbone_s": backbone_s,
                "overhead_ratio": 1.0 + part_s / backbone_s,
                "flops_ratio": flops / backbone_flops,
                "parameters": count_parameters(model),
            })  # fmt: skip
        result[axis] = rows
    return result


def data_pipeline(plan: BenchPlan) -> dict:
    """Samples per second of the training data pipeline (synthetic dataset, protocol train transforms, collate)
    with 0 and 2 workers, against the tiny model's training-step rate at the same batch size and image size."""
    from modeling_taskexpert.data import (
        build_transforms,
        collate_dense_batch,
        generate_synthetic_dataset,
        read_dataset_metadata,
        load_multitask_dataset,
    )

    with tempfile.TemporaryDirectory(prefix="taskexpert-bench-") as scratch:
        folder = Path(scratch) / "synthetic"
        generate_synthetic_dataset(
            folder, train_size=plan.data_samples, val_size=1, image_size=plan.data_image_size, num_workers=1
        )
        metadata = read_dataset_metadata(folder)
        dataset = load_multitask_dataset(folder, "train", cache_dir=str(Path(scratch) / "cache"))
        dataset = dataset.with_transform(build_transforms(metadata, train=True, seed=0))

        def epoch(workers: int):
            loader = DataLoader(
                dataset, batch_size=plan.data_batch, shuffle=True, num_workers=workers, collate_fn=collate_dense_batch
            )
            return lambda: sum(len(batch["ids"]) for batch in loader)

        calls = {f"{workers}_workers": epoch(workers) for workers in plan.data_workers}
        times = interleaved_times(calls, plan.train_budget_s, plan.min_rounds, max_rounds=5)
    loader_rates = {name: summarize(values, plan.data_samples) for name, values in times.items()}

    config = load_config(plan.memory_setting.preset, tasks=list(metadata["tasks"]), task_id2label=_id2label(metadata))
    model = build_model(config)
    pixels = random_pixels(plan.data_batch, plan.data_image_size)
    labels = random_labels(config, plan.data_batch, plan.data_image_size)
    step_times = interleaved_times({"train_step": train_step(model, pixels, labels)}, plan.small_budget_s, plan.min_rounds)
    train_rate = summarize(step_times["train_step"], plan.data_batch)
    most_workers = f"{max(plan.data_workers)}_workers"
    return {
        "samples": plan.data_samples,
        "image_size": plan.data_image_size,
        "batch": plan.data_batch,
        "loader": loader_rates,
        "train_step": train_rate,
        "loader_vs_train_rate": {
            name: rate["items_per_s"] / train_rate["items_per_s"] for name, rate in loader_rates.items()
        },
        "target_workers": most_workers,
    }


def _id2label(metadata: dict) -> dict:
    return {task: info["id2label"] for task, info in metadata["tasks"].items() if info.get("id2label")}


def pipeline_end_to_end(plan: BenchPlan) -> list[dict]:
    """Latency of `pipeline` calls (pre-processing, forward, post-processing and rendering) against the model
    forward alone on the processed input."""
    rows = []
    for setting in plan.pipeline_settings:
        pipe, image = _build_pipeline(setting)
        model_inputs = pipe.preprocess(image)
        target_size = model_inputs["target_size"]
        pixels = model_inputs["pixel_values"]
        calls = {
            "pipeline": lambda: pipe(image),
            "model_forward": inference_call(pipe.model, pixels),
            "preprocess": lambda: pipe.preprocess(image),
            "postprocess": lambda: pipe.postprocess(
                {"logits": pipe.model(pixel_values=pixels).logits, "target_size": target_size}
            ),
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
    processor = TaskExpertImageProcessor(
        size={"height": setting.image_size, "width": setting.image_size}, size_divisor=config.patch_size
    )
    pipe = MultiTaskDensePredictionPipeline(model=model, image_processor=processor)
    # A landscape photo-sized image larger than the canvas, so the processor resizes and pads.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (setting.image_size * 3 // 4 + 8, setting.image_size + 40, 3), dtype=np.uint8))
    return pipe, image


def memory_growth(plan: BenchPlan) -> dict:
    """Resident memory before and after many inference calls, through the model and through the pipeline.

    Runs on one thread: the check is about memory, and on a shared machine a second thread makes every small
    operator wait for it to be scheduled, which multiplies the time of the many calls.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _memory_growth(plan)
    finally:
        torch.set_num_threads(threads)


def _memory_growth(plan: BenchPlan) -> dict:
    setting = plan.memory_setting
    config = load_config(setting.preset)
    model = build_model(config)
    pixels = random_pixels(setting.batch, setting.image_size)
    pipe, image = _build_pipeline(setting)
    result = {"setting": asdict(setting)}
    for name, call, count in (
        ("model", inference_call(model, pixels), plan.memory_model_calls),
        ("pipeline", lambda: pipe(image), plan.memory_pipeline_calls),
    ):
        for _ in range(max(count // 20, 2)):  # warm-up: allocator caches and lazy initialisation settle first
            call()
        gc.collect()
        trace = [resident_memory_bytes()]
        checkpoints = max(count // 10, 1)
        for index in range(count):
            call()
            if (index + 1) % checkpoints == 0:
                if index + 1 == count:
                    gc.collect()  # the final reading without collectable garbage, like the first
                trace.append(resident_memory_bytes())
        result[name] = {
            "calls": count,
            "rss_before_bytes": trace[0],
            "rss_after_bytes": trace[-1],
            "growth_bytes": trace[-1] - trace[0],
            "rss_trace_bytes": trace,
        }
    return result



# ---------------------------------------------------------------------------------------------------------------
MODSQUAD_CONFIG = MODEL_CONFIG_DIR / "modsquad-tiny.json"


def build_specialised_modsquad(seed: int = 0) -> ModSquadForDensePrediction:
    """The tiny Mod-Squad (published config, random init) with routers that prefer half of each layer's experts,
    a different half per task, as the mutual-information loss makes them after training.

    Random routers alone spread every task over all experts, so extraction would drop nothing but the other heads.
    Every MoE layer's input norm gets a bias `u` (a shared component of all its tokens) and each task's router
    adds `+u` to the columns of its preferred experts and `-u` to the others: the logit gap (2 |u|² = 72) dwarfs the
    random part (std about 7), so every token picks its top-k among the task's preferred experts. The task embedding
    is scaled down to 0.02: at initialisation its standard-normal rows dominate every token of a task, which would
    then all pick the same k experts (a trained model's tokens differ).
    """
    config = ModSquadConfig.from_json_file(MODSQUAD_CONFIG)
    torch.manual_seed(seed)
    model = ModSquadForDensePrediction(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.modsquad.task_embedding.mul_(0.02)
        for block in model.modsquad.blocks:
            for norm, layer in ((block.norm1, block.attention), (block.norm2, block.mlp)):
                if not hasattr(layer, "router_weight"):
                    continue
                direction = torch.nn.functional.normalize(torch.randn(config.hidden_size, generator=generator), dim=0)
                norm.bias.copy_(6.0 * direction)
                layer.router_weight.normal_(std=0.5, generator=generator)
                for task_index in range(len(config.tasks)):
                    preferred = torch.randperm(layer.num_experts, generator=generator)[: layer.num_experts // 2]
                    sign = -torch.ones(layer.num_experts)
                    sign[preferred] = 1.0
                    layer.router_weight[task_index] += 6.0 * direction[:, None] * sign[None]
    return model


def modsquad_extraction(plan: BenchPlan) -> dict:
    """Mod-Squad single-task extraction (`extract_task_model(task, by="router")`): for each task of the plan,
    parameters, experts kept and forward latency of the extracted model against the full model asked for that
    task alone (interleaved), and the largest difference of their outputs on images other than the calibration
    batch."""
    model = build_specialised_modsquad()
    calibration = random_pixels(2, plan.modsquad_image_size, seed=1)
    pixels = random_pixels(plan.modsquad_batch, plan.modsquad_image_size)
    full_experts = [layer.num_experts for _, layer in model.modsquad.moe_layers]
    rows = []
    for task in plan.modsquad_tasks:
        extracted = model.extract_task_model(task, by="router", calibration_pixel_values=calibration).eval()

        def full_call(task=task):
            with torch.inference_mode():
                return model(pixels, tasks=[task]).logits[task]

        def extracted_call(extracted=extracted, task=task):
            with torch.inference_mode():
                return extracted(pixels).logits[task]

        max_difference = float((extracted_call() - full_call()).abs().max())
        times = interleaved_times(
            {"full": full_call, "extracted": extracted_call}, plan.small_budget_s, max(plan.min_rounds, 9), max_rounds=50
        )
        rows.append({
            "task": task,
            "experts_per_layer_full": full_experts,
            "experts_per_layer_extracted": extracted.config.num_experts_per_layer,
            "parameters_full": count_parameters(model),
            "parameters_extracted": count_parameters(extracted),
            "max_abs_difference": max_difference,
            "full": summarize(times["full"], plan.modsquad_batch),
            "extracted": summarize(times["extracted"], plan.modsquad_batch),
            "time_ratio_extracted_to_full": median_ratio(times["extracted"], times["full"]),
        })  # fmt: skip
    return {
        "config": MODSQUAD_CONFIG.name,
        "image_size": plan.modsquad_image_size,
        "batch": plan.modsquad_batch,
        "calibration_images": int(calibration.shape[0]),
        "tasks": rows,
    }
