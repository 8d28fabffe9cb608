"""Fixed-seed outputs of tiny models, the processor and the evaluator, pinned so that refactors provably keep them.

`compute_pinned()` builds every pinned quantity from fixed seeds; `tests/test_pinned_outputs.py` compares it with
the stored copy in `tests/fixtures/pinned_outputs.safetensors` (tensors) and `pinned_outputs.json` (metrics and the
machine the copy was made on). Regenerate only for an intended change of behaviour, saying why in the commit:

    python tests/pinned_outputs.py
"""

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import ALL_TASKS, make_labels, tiny_config  # noqa: E402

FIXTURES = HERE / "fixtures"
TENSORS = FIXTURES / "pinned_outputs.safetensors"
METADATA = FIXTURES / "pinned_outputs.json"
LABELS = {"semseg": {0: "floor", 1: "wall", 2: "box"}, "human_parts": {0: "background", 1: "head", 2: "torso"}}


def machine() -> dict:
    """What decides whether float results can be expected bit for bit (kernels differ between CPU generations)."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "arch": platform.machine(),
        # One instruction set, different vendors or generations: reductions can still round differently (seen: one
        # ulp in a Mod-Squad routing loss between two AVX512 machines).
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def taskexpert_configs() -> dict:
    return {
        "taskexpert": tiny_config(),
        "taskexpert_variant": tiny_config(
            expert_type="conv", gate_granularity="image", use_memory=False, head_uses_all_layers=True, gate_top_k=2
        ),
    }


def modsquad_configs() -> dict:
    from modeling_taskexpert import ModSquadConfig

    common = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        num_attention_experts=6, attention_top_k=2, attention_head_dim=16, num_mlp_experts=5, mlp_top_k=2,
        tasks=ALL_TASKS, task_id2label=LABELS, head_hidden_size=16,
    )  # fmt: skip
    # `modsquad_legacy`: the fields that give the behaviour of the versions before the model followed the authors'
    # code; it reproduces the values those versions pinned under `modsquad/*` bit for bit.
    legacy = dict(
        use_task_embedding=False, renormalize_gates=True, routing_epsilon=0.0, attention_expert_bias=True,
        dense_attention_head_dim=16, mutual_information_estimator="exact", aux_loss_min_tasks=1,
    )  # fmt: skip
    return {"modsquad": ModSquadConfig(**common), "modsquad_legacy": ModSquadConfig(**common, **legacy)}


def _model_outputs(prefix: str, model_class, config, output_kwargs: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = model_class(config).eval()
    pinned = {f"{prefix}/init/{name}": value.detach().clone() for name, value in model.state_dict().items()}
    # Non-zero routing/gate weights, drawn from a generator of their own so that init order does not matter here.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "router" in name or "gates." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    inputs = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 3, 32, 48, generator=inputs)
    labels = make_labels(2, 32, 48, inputs)
    with torch.no_grad():
        out = model(pixel_values, **output_kwargs)
        for task, value in out.logits.items():
            pinned[f"{prefix}/logits/{task}"] = value
        for layer, gates in enumerate(getattr(out, "gates", None) or ()):
            for task, value in gates.items():
                pinned[f"{prefix}/gates/{layer}/{task}"] = value
        for name, value in (getattr(out, "aux_losses", None) or {}).items():
            pinned[f"{prefix}/aux_losses/{name}"] = value.reshape(1)
        subset = model(pixel_values, tasks=["depth", "semseg"])
        for task, value in subset.logits.items():
            pinned[f"{prefix}/subset_logits/{task}"] = value
    model.train()
    out = model(pixel_values, labels=labels)
    pinned[f"{prefix}/loss"] = out.loss.detach().reshape(1)
    for task, value in out.task_losses.items():
        pinned[f"{prefix}/task_losses/{task}"] = value.detach().reshape(1)
    out.loss.backward()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.grad is not None and ("heads." in name or "router" in name or "gates." in name):
            pinned[f"{prefix}/grad/{name}"] = parameter.grad.detach().clone()
    return pinned


def processor_outputs() -> dict[str, torch.Tensor]:
    from modeling_taskexpert import DenseMultiTaskImageProcessor

    rng = np.random.default_rng(3)
    processor = DenseMultiTaskImageProcessor(size={"height": 48, "width": 64}, size_divisor=16)
    images = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), rng.integers(0, 256, (60, 20, 3), dtype=np.uint8)]
    batch = processor(images, return_tensors="pt")
    pinned = {f"processor/{key}": value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    generator = torch.Generator().manual_seed(4)
    logits = {
        "semseg": torch.randn(2, 3, *batch["pixel_values"].shape[-2:], generator=generator),
        "depth": torch.rand(2, 1, *batch["pixel_values"].shape[-2:], generator=generator) * 4,
        "normals": torch.randn(2, 3, *batch["pixel_values"].shape[-2:], generator=generator),
        "saliency": torch.randn(2, 1, *batch["pixel_values"].shape[-2:], generator=generator),
    }
    original_sizes = [image.shape[:2] for image in images]
    maps = processor.post_process_dense_predictions({"logits": logits}, target_sizes=original_sizes)
    for index, sample in enumerate(maps):
        for task, value in sample.items():
            pinned[f"processor/post/{index}/{task}"] = torch.as_tensor(value).detach()
    return pinned


def evaluator_metrics() -> dict[str, float]:
    from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator

    generator = torch.Generator().manual_seed(5)
    labels = make_labels(3, 40, 40, generator)
    labels["semseg"][:, :4] = 255
    labels["edge"] = (torch.rand(3, 40, 40, generator=generator) > 0.9).float()
    predictions = {
        "semseg": torch.randint(0, 3, (3, 40, 40), generator=generator),
        "human_parts": torch.randint(0, 3, (3, 40, 40), generator=generator),
        "saliency": torch.rand(3, 40, 40, generator=generator),
        "edge": torch.rand(3, 40, 40, generator=generator),
        "normals": torch.nn.functional.normalize(torch.randn(3, 3, 40, 40, generator=generator), dim=1),
        "depth": torch.rand(3, 40, 40, generator=generator) * 5 + 0.5,
    }
    evaluator = DenseMultiTaskEvaluator(
        tasks=ALL_TASKS, num_classes={"semseg": 3, "human_parts": 3}, dataset="synthetic", boundary_tolerance=0.02,
        boundary_mode="approximate",
    )  # fmt: skip
    evaluator.update(predictions, labels)
    return {key: float(value) for key, value in evaluator.compute(sync=False).items()}


def compute_pinned() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    from modeling_taskexpert import ModSquadForDensePrediction, TaskExpertForDensePrediction

    tensors = {}
    for name, config in taskexpert_configs().items():
        tensors.update(_model_outputs(name, TaskExpertForDensePrediction, config, {"output_gates": True}))
    for name, config in modsquad_configs().items():
        tensors.update(_model_outputs(name, ModSquadForDensePrediction, config, {"output_gates": True}))
    tensors.update(processor_outputs())
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    return tensors, evaluator_metrics()


def main() -> None:
    from safetensors.torch import save_file

    tensors, metrics = compute_pinned()
    FIXTURES.mkdir(exist_ok=True)
    save_file(tensors, TENSORS)
    METADATA.write_text(json.dumps({"machine": machine(), "metrics": metrics}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(tensors)} tensors and {len(metrics)} metrics")


if __name__ == "__main__":
    main()
