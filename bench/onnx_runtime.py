"""ONNX Runtime against eager PyTorch on the same machine: the exported graph (`python -m modeling_taskexpert.export
onnx`, fixed size) run with ONNX Runtime's basic graph optimisations and with all of them (its default), against the
PyTorch forward (inference mode), interleaved, batch 1, for all tasks and for one task. TaskExpert at the headline
ViT-B 512² setting and at the tiny one; Mod-Squad's published tiny config, whose experts run densely in the graph
(every expert on every token, the selected outputs gathered), which is where its ONNX cost comes from.
"""

import tempfile
from pathlib import Path

import torch

from .measure import interleaved_times, median_ratio, summarize
from .models import build_model, load_config, random_pixels
from .plan import SuiteContext
from .formatting import ms, table

KEY = "onnx_runtime"
TITLE = "ONNX Runtime against eager PyTorch"
MODSQUAD_CONFIG = Path(__file__).resolve().parent.parent / "hub_configs" / "models" / "modsquad-tiny.json"


def _modsquad(seed: int = 0):
    from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction

    torch.manual_seed(seed)
    model = ModSquadForDensePrediction(ModSquadConfig.from_json_file(MODSQUAD_CONFIG)).eval()
    for _, layer in model.modsquad.moe_layers:  # routers that depend on the input, as after training
        torch.nn.init.normal_(layer.router_weight, std=0.5)
    return model


def _sessions(model_file: Path, threads: int) -> dict:
    import onnxruntime

    sessions = {}
    for name, level in (("basic", onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                        ("all", onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)):  # fmt: skip
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads
        sessions[name] = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    return sessions


def compare(model, label: str, image_size: int, tasks, budget_s: float, min_rounds: int) -> dict:
    from modeling_taskexpert.export import export_onnx
    from modeling_taskexpert.image_processing_dense_multitask import DenseMultiTaskImageProcessor

    pixels = random_pixels(1, image_size)
    processor = DenseMultiTaskImageProcessor(size=image_size, size_divisor=model.config.patch_size)
    with tempfile.TemporaryDirectory() as folder:
        result = export_onnx(model, Path(folder) / "onnx", tasks=tasks, processor=processor)
        sessions = _sessions(result.model_file, torch.get_num_threads())
        feed = {"pixel_values": pixels.numpy()}

        def eager():
            with torch.inference_mode():
                return model(pixels, tasks=tasks)

        calls = {"pytorch": eager}
        for name, session in sessions.items():
            calls[f"onnxruntime_{name}"] = lambda session=session: session.run(None, feed)
        times = interleaved_times(calls, budget_s, max(min_rounds, 3), max_rounds=15)
    return {
        "model": label,
        "image_size": image_size,
        "tasks": "all" if tasks is None else ",".join(tasks),
        "max_abs_difference": result.max_abs_difference,
        **{name: summarize(values) for name, values in times.items()},
        "ratio_basic": median_ratio(times["pytorch"], times["onnxruntime_basic"]),
        "ratio_all": median_ratio(times["pytorch"], times["onnxruntime_all"]),
    }


def measure(context: SuiteContext) -> dict:
    try:
        import onnxruntime
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install 'modeling-taskexpert[export]')"}
    plan = context.plan
    if not plan.onnx_settings:  # the quick plan: one export, the machinery only
        model = build_model(load_config(plan.headline.preset))
        rows = [compare(model, f"TaskExpert {plan.headline.preset}", plan.headline.image_size, None, 0.0, 2)]
        return {"rows": rows, "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads()}
    rows = []
    for setting in plan.onnx_settings:
        model = build_model(load_config(setting.preset))
        for tasks in (None, [plan.subset_task]):
            rows.append(compare(model, f"TaskExpert {setting.preset}", setting.image_size, tasks,
                                plan.forward_budget_s, plan.min_rounds))  # fmt: skip
    rows.append(compare(_modsquad(), "Mod-Squad tiny", plan.modsquad_image_size, None, plan.forward_budget_s,
                        plan.min_rounds))  # fmt: skip

    return {"rows": rows, "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads()}


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    if "skipped" in section:
        return [(TITLE, f"Not measured: {section['skipped']}.")]
    rows = [[r["model"], f"{r['image_size']}²", r["tasks"], ms(r["pytorch"]["median_s"]),
             ms(r["onnxruntime_basic"]["median_s"]), ms(r["onnxruntime_all"]["median_s"]),
             f"{r['ratio_basic']:.2f}×", f"{r['ratio_all']:.2f}×", f"{r['max_abs_difference']:.1e}"]
            for r in section["rows"]]  # fmt: skip
    machine = section.get("measured_on") or results.get("machine", {})
    text = "\n\n".join([
        __doc__.split("\n\n")[0].replace("\n", " "),
        table(["model", "image", "tasks", "PyTorch eager (ms)", "ORT basic (ms)", "ORT all (ms)", "speed-up basic",
               "speed-up all", "largest difference to PyTorch"], rows),
        "Speed-ups are medians of per-round ratios (PyTorch time / ONNX Runtime time) of one interleaved run, batch "
        f"1, {section['threads']} threads, onnxruntime {section['onnxruntime']}; above 1 ONNX Runtime is faster. Int8 "
        "dynamic quantisation of the graph is not measured here.",
        f"Measured {machine.get('date', '')} on {machine.get('cpu_model', 'this machine')}, "
        f"{machine.get('cpu_count', '?')} cores.",
    ])  # fmt: skip
    return [(TITLE, text)]
