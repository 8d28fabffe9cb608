"""Run the TaskExpert benchmarks and write `bench/results.json`, `docs/benchmarks.md` and the plots.

    python bench/run.py                 # the CPU benchmark (`make bench`), about 10 minutes on 2 cores
    python bench/run.py --full          # also the training steps of the 512² ViT settings
    python bench/run.py --gpu           # adds the accelerator part (bf16 training, MFU, torch.compile, SDPA)
    python bench/run.py --quick         # every suite on tiny sizes in seconds (a smoke test; numbers mean nothing)
"""

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import report, suites
from bench.measure import machine_info

logger = logging.getLogger("bench")
REPOSITORY = Path(__file__).resolve().parent.parent

# Targets of the issue, as (results key, comparison, bound).
TARGETS = {
    "mmoe_overhead_ratio": ("<=", 1.15),
    "batched_vs_loop_speedup": (">=", 3.0),
    "subset_vs_all_ratio": ("<=", 0.5),
    "data_vs_train_rate_ratio": (">=", 2.0),
    "memory_growth_mib": ("<=", 1.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks the machinery only")
    mode.add_argument("--full", action="store_true", help="also time the training steps of the 512² ViT settings")
    parser.add_argument("--gpu", action="store_true", help="add the accelerator part (needs a CUDA device)")
    parser.add_argument("--gpu-peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for the MFU")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile in the accelerator part")
    parser.add_argument("--results", type=Path, default=REPOSITORY / "bench" / "results.json")
    parser.add_argument("--report", type=Path, default=REPOSITORY / "docs" / "benchmarks.md")
    parser.add_argument("--plots-dir", type=Path, default=REPOSITORY / "bench" / "plots")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run every suite of the plan and return the results (also written to the files of `args`)."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    plan = suites.quick_plan() if args.quick else suites.full_plan() if args.full else suites.default_plan()
    results = {"mode": "quick" if args.quick else "full" if args.full else "default", "machine": machine_info()}
    results["plan"] = plan.to_dict()

    sections = {}
    train_settings = set(plan.train_grid)
    for setting in plan.grid:
        logger.info("variants: %s", setting.label)
        sections.setdefault("variants", []).append(suites.compare_variants(setting, plan, setting in train_settings))
    headline = next(row for row in sections["variants"] if row["setting"] == asdict(plan.headline))
    logger.info("headline decomposition and task subset")
    sections["headline"] = suites.headline_decomposition(plan, headline["forward"]["backbone"]["times_s"])
    logger.info("batched experts vs loop")
    sections["batched_vs_loop"] = suites.batched_vs_loop(plan)
    logger.info("scaling sweeps")
    sections["scaling"] = suites.scaling(plan)
    logger.info("data pipeline")
    sections["data_pipeline"] = suites.data_pipeline(plan)
    logger.info("pipeline end to end")
    sections["pipeline"] = suites.pipeline_end_to_end(plan)
    logger.info("memory growth")
    sections["memory_growth"] = suites.memory_growth(plan)
    logger.info("Mod-Squad extraction")
    sections["modsquad_extraction"] = suites.modsquad_extraction(plan)
    sections["gpu"] = run_gpu(args, plan)
    results["sections"] = sections

    loop_rows = [row for row in sections["batched_vs_loop"] if row["setting"] == asdict(plan.loop_settings[0])]
    middle_experts = plan.expert_counts[len(plan.expert_counts) // 2]
    growth = sections["memory_growth"]
    results.update(
        mmoe_overhead_ratio=headline["forward_time_ratio_to_backbone"]["taskexpert"],
        shared_decoder_overhead_ratio=headline["forward_time_ratio_to_backbone"]["shared_decoder"],
        mmoe_overhead_ratio_decomposed=sections["headline"]["overhead_ratio_decomposed"],
        batched_vs_loop_speedup=next(row["speedup"] for row in loop_rows if row["num_experts"] == middle_experts),
        subset_vs_all_ratio=sections["headline"]["subset_vs_all_ratio"],
        data_vs_train_rate_ratio=sections["data_pipeline"]["loader_vs_train_rate"][sections["data_pipeline"]["target_workers"]],
        memory_growth_mib=max(growth[name]["growth_bytes"] for name in ("model", "pipeline")) / 2**20,
    )
    results["targets"] = {
        key: {"value": results[key], "comparison": comparison, "bound": bound, "met": _meets(results[key], comparison, bound)}
        for key, (comparison, bound) in TARGETS.items()
    }
    results["duration_s"] = time.perf_counter() - started

    report.write_json(results, args.results)
    plots = report.write_plots(results, args.plots_dir)
    report.write_markdown(results, args.report, plots)
    return results


def run_gpu(args: argparse.Namespace, plan: suites.BenchPlan) -> dict:
    """The accelerator part when asked for and possible; otherwise the reason it was skipped."""
    if not args.gpu:
        return {"skipped": "not requested (run with --gpu on a machine with a CUDA device)"}
    if not torch.cuda.is_available():
        return {"skipped": "--gpu was given but no CUDA device is available"}
    from bench.gpu import gpu_suite

    logger.info("accelerator part")
    setting = suites.Setting(plan.headline.preset, plan.headline.image_size, 2 if args.quick else 8)
    peak = args.gpu_peak_tflops * 1e12 if args.gpu_peak_tflops else None
    return gpu_suite(setting, "cuda", compile_options=(False,) if args.no_compile else (False, True), peak_flops=peak)


def _meets(value: Optional[float], comparison: str, bound: float) -> Optional[bool]:
    if value is None:
        return None
    return value <= bound if comparison == "<=" else value >= bound


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    results = run(args)
    for key, target in results["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        logger.info("%s = %.3f (target %s %s): %s", key, target["value"], target["comparison"], target["bound"], verdict)
    logger.info("done in %.0f s; wrote %s and %s", results["duration_s"], args.results.name, args.report.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
