"""Benchmark machinery (bench/): instruments against hand-computed values, the compared variants, batched == loop
experts, and a quick end-to-end run writing the results, report and plots. No timed assertions."""

import json
from types import SimpleNamespace

import pytest
import torch

from bench import batched_vs_loop, gpu, measure, models, modsquad_extraction, plan, targets
from bench.run import SUITES, main, parse_args, run


def test_interleaved_times_rotates_the_order_and_fits_the_rounds():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    hooked = []
    times = measure.interleaved_times(
        functions, budget_s=0.0, min_rounds=3, max_rounds=10, warmup_hook=lambda name, fn: (hooked.append(name), fn())
    )
    assert hooked == ["a", "b", "c"]
    # Warm-up in order, then rounds a b c, b c a, c a b.
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(value >= 0 for values in times.values() for value in values)


def test_interleaved_times_caps_the_rounds_at_the_maximum():
    times = measure.interleaved_times({"a": lambda: None}, budget_s=1e9, min_rounds=2, max_rounds=4)
    assert len(times["a"]) == 4


def test_median_ratio_and_summary():
    assert measure.median_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(2.0)  # ratios 2, 3, 1.5
    summary = measure.summarize([0.5, 0.25, 1.0], items_per_call=4)
    assert summary == {
        "median_s": 0.5, "min_s": 0.25, "max_s": 1.0, "rounds": 3, "items_per_s": 8.0, "times_s": [0.5, 0.25, 1.0],
    }  # fmt: skip


def test_count_flops_of_a_matmul():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert measure.count_flops(lambda: a @ b) == 2 * 3 * 5 * 7


def test_peak_tensor_memory_counts_live_storages_once():
    def work():
        first = torch.ones(1000)  # 4000 bytes
        view = first.view(10, 100)  # same storage: not counted again
        second = view * 2  # +4000 -> 8000 live
        del first, view
        third = torch.ones(1000, dtype=torch.float64)  # 4000 + 8000 = 12000 live, the peak
        del second, third
        return torch.ones(10)  # 40 bytes

    flops, peak = measure.flops_and_peak_memory(work)
    # 16000 if the freed storage of `first` were still counted, 20000 if the view were counted as new.
    assert peak == 12_000
    assert flops == 0


def test_machine_info_has_no_paths():
    info = measure.machine_info()
    assert info["cpu_count"] >= 1 and info["torch"] == torch.__version__
    assert not any(isinstance(value, str) and value.startswith("/") for value in info.values())


def test_shared_decoder_baseline_config():
    config = models.load_config("tiny")
    baseline = models.shared_decoder_config(config)
    assert (baseline.num_experts, baseline.use_memory, baseline.gating) == (1, False, "uniform")
    assert baseline.backbone_config.to_dict() == config.backbone_config.to_dict()
    assert baseline.tasks == config.tasks and baseline.mmoe_layers == config.mmoe_layers
    variants = models.build_variants(config)
    # The bare backbone is the very module inside TaskExpert.
    assert variants["backbone"] is variants["taskexpert"].taskexpert.backbone
    sizes = {name: models.count_parameters(module) for name, module in variants.items()}
    assert sizes["backbone"] < sizes["shared_decoder"] < sizes["taskexpert"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model preset 'vit-z'"):
        models.load_config("vit-z")


def test_replayed_backbone_gives_the_same_outputs():
    config = models.load_config("tiny")
    model = models.build_model(config)
    pixels = models.random_pixels(2, 32)
    with torch.inference_mode():
        expected = model(pixels).logits
        models.replay_backbone(model, pixels)
        replayed = model(pixels).logits
    for task in config.tasks:
        torch.testing.assert_close(replayed[task], expected[task])


def test_train_step_updates_every_variant():
    config = models.load_config("tiny")
    pixels = models.random_pixels(1, 32)
    labels = models.random_labels(config, 1, 32)
    for name, module in models.build_variants(config).items():
        before = [parameter.detach().clone() for parameter in module.parameters()]
        models.train_step(module, pixels, labels)()
        changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))
        assert changed > 0, name


def test_batched_experts_match_the_loop():
    quick = plan.quick_plan()
    rows = batched_vs_loop.batched_vs_loop(quick)
    assert [row["num_experts"] for row in rows] == list(quick.num_experts_sweep)
    for row in rows:
        assert row["outputs_match"] and row["max_abs_difference"] < 1e-5
        assert row["speedup"] > 0


def test_gpu_part_is_skipped_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    context = plan.SuiteContext(plan.quick_plan(), {}, SimpleNamespace(gpu=True, quick=True))
    assert gpu.measure(context) == {"skipped": "--gpu was given but no CUDA device is available"}
    assert (
        "not requested" in gpu.measure(plan.SuiteContext(plan.quick_plan(), {}, SimpleNamespace(gpu=False)))["skipped"]
    )


@pytest.mark.slow
def test_gpu_suite_code_path_on_cpu():
    result = gpu.gpu_suite(
        plan.Setting("tiny", 32, 1), device="cpu", compile_options=(False,), budget_s=0.0, min_rounds=1
    )
    assert set(result["train_step"]) == {"sdpa", "eager"}
    assert result["train_step_flops"] > 0 and result["train_step"]["sdpa"]["mfu"] is None
    assert set(result["forward_bf16"]) == {"taskexpert", "backbone", "one_task"}


@pytest.mark.slow
def test_quick_run_writes_results_report_and_plots(tmp_path):
    args = parse_args(
        ["--quick", "--results", str(tmp_path / "results.json"), "--report", str(tmp_path / "docs" / "benchmarks.md"),
         "--plots-dir", str(tmp_path / "plots")]
    )  # fmt: skip
    returned = run(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "quick"
    for key in ("mmoe_overhead_ratio", "batched_vs_loop_speedup", "subset_vs_all_ratio", "data_vs_train_rate_ratio"):
        assert isinstance(results[key], float) and results[key] > 0, key
        assert results["targets"][key]["met"] == returned["targets"][key]["met"]
    assert results["targets"]["mmoe_overhead_ratio"] == {
        "value": results["mmoe_overhead_ratio"], "comparison": "<=", "bound": 1.15,
        "met": results["mmoe_overhead_ratio"] <= 1.15,
    }  # fmt: skip
    sections = results["sections"]
    assert set(sections) == {
        "variants", "headline", "batched_vs_loop", "scaling", "data_pipeline", "pipeline", "memory_growth", "gpu",
        "modsquad_extraction", "boundary_cost", "onnx_runtime", "scale_rehearsal",
    }  # fmt: skip
    assert "--only scale_rehearsal" in sections["scale_rehearsal"]["skipped"]  # heavy: only when asked for
    (onnx_row,) = sections["onnx_runtime"]["rows"]  # the quick plan: one export
    assert onnx_row["max_abs_difference"] <= 1e-4 and onnx_row["ratio_all"] > 0
    assert set(onnx_row) >= {"pytorch", "onnxruntime_basic", "onnxruntime_all"}
    cost = sections["boundary_cost"]["one_threshold"]
    assert {row["map"] for row in cost} == {"structured", "random"} and all(
        row["seconds_one_threshold"] > 0 for row in cost
    )
    # What drives the cost: a random map has far more candidates (and pairs in reach) than a structured one.
    by_map = {(row["size"], row["map"]): row for row in cost}
    size = cost[-1]["size"]
    assert by_map[(size, "random")]["candidates"] > 2 * by_map[(size, "structured")]["candidates"]
    variant = sections["variants"][0]
    assert set(variant["forward"]) == {"taskexpert", "backbone", "shared_decoder"}
    assert variant["forward_flops"]["taskexpert"] > variant["forward_flops"]["backbone"] > 0
    assert variant["train_step_flops"]["taskexpert"] > variant["forward_flops"]["taskexpert"]
    assert all(row["outputs_match"] for row in sections["batched_vs_loop"])
    assert set(sections["scaling"]) == {"setting", "num_experts", "num_tasks", "num_mmoe_layers", "image_size"}
    assert sections["memory_growth"]["model"]["calls"] == plan.quick_plan().memory_model_calls
    assert "skipped" in sections["gpu"]

    report = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Targets" in report and "python bench/run.py --gpu" in report
    for name in ("scaling", "variants", "batched_vs_loop", "memory_growth"):
        plot = tmp_path / "plots" / f"{name}.png"
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(../plots/{name}.png)" in report  # linked relatively
    assert str(tmp_path) not in report
    assert not list(tmp_path.rglob("*.tmp"))
    # Every suite's sections are on the page, in the order of SUITES.
    titles = [title for suite in SUITES for title, _ in suite.sections(sections[suite.KEY], {
        "scaling": "s", "variants": "v", "batched_vs_loop": "b", "memory_growth": "m"}, results)]  # fmt: skip
    positions = [report.index(f"## {title}\n") for title in titles]
    assert positions == sorted(positions)

    # --render rewrites the page from the recorded results alone, identically.
    (tmp_path / "docs" / "benchmarks.md").unlink()
    argv = ["--render", "--results", str(tmp_path / "results.json"), "--report", str(tmp_path / "docs" / "benchmarks.md"),
            "--plots-dir", str(tmp_path / "plots")]  # fmt: skip
    assert main(argv) == 0 and (tmp_path / "docs" / "benchmarks.md").read_text() == report
    assert main(["--render", "--results", str(tmp_path / "missing.json")]) == 2


@pytest.mark.slow
def test_modsquad_extraction_keeps_outputs_with_fewer_parameters():
    quick = plan.quick_plan()
    result = modsquad_extraction.modsquad_extraction(quick)
    model = modsquad_extraction.build_specialised_modsquad()
    assert [row["task"] for row in result["tasks"]] == list(quick.modsquad_tasks)
    for row in result["tasks"]:
        # The specialised routers send every token to the task's preferred half of the experts.
        assert row["experts_per_layer_full"] == [8, 8, 8, 8]
        assert row["experts_per_layer_extracted"] == [4, 4, 4, 4]
        assert row["parameters_full"] == models.count_parameters(model)
        # Dropped: half of every MoE layer's experts, the other tasks' routers, task-embedding rows and heads (the
        # task keeps its whole router).
        dropped = sum(
            sum(getattr(layer, name)[0].numel() for name in layer.expert_parameters) * 4
            + layer.router_weight.numel()
            - layer.router_weight[0].numel()
            for _, layer in model.modsquad.moe_layers
        ) + sum(models.count_parameters(head) for task, head in model.heads.items() if task != row["task"])
        dropped += model.modsquad.task_embedding.numel() - model.modsquad.task_embedding[0, 0].numel()
        assert row["parameters_full"] - row["parameters_extracted"] == dropped
        assert row["max_abs_difference"] < 1e-5
        assert row["time_ratio_extracted_to_full"] > 0
        assert row["full"]["rounds"] == row["extracted"]["rounds"] >= 9


def test_compare_revisions_times_both_revisions_and_checks_their_outputs(tmp_path):
    """Against HEAD itself: two processes per round import their own revision's code; the outputs must agree, the
    recorded result renders into the report."""
    import subprocess

    from bench import compare_revisions

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=compare_revisions.REPO_ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    output = tmp_path / "before_after.json"
    argv = [
        "--before",
        "HEAD",
        "--preset",
        "tiny",
        "--size",
        "64",
        "--rounds",
        "1",
        "--calls",
        "1",
        "--output",
        str(output),
    ]
    assert compare_revisions.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["outputs_match"] is True and result["rounds"] == 1
    assert len(result["round_medians_s"]["before"]) == len(result["round_medians_s"]["after"]) == 1
    assert result["after_vs_before_ratio"] == pytest.approx(
        result["round_medians_s"]["after"][0] / result["round_medians_s"]["before"][0]
    )
    text = compare_revisions.before_after_text(output)
    assert f"`{result['before'][:7]}`" in text and "outputs match" in text
    assert compare_revisions.before_after_text(tmp_path / "missing.json") == ""
    with pytest.raises(SystemExit):
        compare_revisions.main(["--preset", "tiny"])  # --before is required


def test_targets_compare_against_their_bounds():
    assert targets.meets(1.15, "<=", 1.15) and not targets.meets(1.2, "<=", 1.15)
    assert targets.meets(3.0, ">=", 3.0) and not targets.meets(2.9, ">=", 3.0)
    assert targets.meets(None, "<=", 1.0) is None
    values = {key: bound for key, (_, bound) in targets.TARGETS.items()}
    assert all(target["met"] for target in targets.assess(values).values())
    assert set(targets.TARGET_DESCRIPTIONS) == set(targets.TARGETS)
