"""Mod-Squad single-task extraction: parameters, experts kept, latency and outputs of the extracted models."""

import torch

from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction

from .measure import interleaved_times, median_ratio, summarize
from .models import MODEL_CONFIG_DIR, count_parameters, random_pixels
from .plan import BenchPlan, SuiteContext
from .formatting import millions, ratio, table

KEY = "modsquad_extraction"
TITLE = "Mod-Squad: extracted single-task models"
MODSQUAD_CONFIG = MODEL_CONFIG_DIR / "modsquad-tiny.json"


def measure(context: SuiteContext) -> dict:
    return modsquad_extraction(context.plan)


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
            {"full": full_call, "extracted": extracted_call},
            plan.small_budget_s,
            max(plan.min_rounds, 9),
            max_rounds=50,
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


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    return [(TITLE, _modsquad_text(section))]


def _modsquad_text(extraction: dict) -> str:
    rows = [[row["task"],
             f"{' / '.join(map(str, row['experts_per_layer_extracted']))} of {' / '.join(map(str, row['experts_per_layer_full']))}",
             f"{millions(row['parameters_full'])} / {millions(row['parameters_extracted'])}",
             ratio(row["time_ratio_extracted_to_full"]), f"{row['max_abs_difference']:.1e}"]
            for row in extraction["tasks"]]  # fmt: skip
    return "\n\n".join([
        f"`ModSquadForDensePrediction.extract_task_model(task, by=\"router\")` on the `{extraction['config']}` config "
        f"(random init) whose routers are set to prefer half of each layer's experts, a different half per task (as "
        f"training with the mutual-information loss specialises them; random routers alone use every expert). "
        f"Calibration: {extraction['calibration_images']} random images; latency and outputs on other images, "
        f"{extraction['image_size']}² batch {extraction['batch']}, the extracted model against the full model asked "
        "for the same task alone (interleaved, median of per-round ratios).",
        table(["task", "experts kept per MoE layer", "params full / extracted", "latency extracted / full",
                "max abs diff"], rows),
        "The extracted model drops the other tasks' heads, routers and task-embedding rows and the unused experts. Every token runs the "
        "same experts as in the full model, so the expert FLOPs are the same; the latency difference comes from the "
        "routing and dispatch over fewer experts.",
    ])  # fmt: skip
