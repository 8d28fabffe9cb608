"""Run the TaskExpert benchmarks and write `bench/results.json`, `docs/benchmarks.md` and the plots.

    python bench/run.py                 # the CPU benchmark (`make bench`), about 10 minutes on 2 cores
    python bench/run.py --full          # also the training steps of the 512² ViT settings
    python bench/run.py --gpu           # adds the accelerator part (bf16 training, MFU, torch.compile, SDPA)
    python bench/run.py --quick         # every suite on tiny sizes in seconds (a smoke test; numbers mean nothing)
    python bench/run.py --render        # rewrite the report and plots from bench/results.json, measuring nothing

Every suite is one module of `bench/` holding its measurement, its plot and its text (`SUITES`, in the order they
run and appear in the report): `measure(context)` returns its JSON section, `write_plots(section, folder)` (when it
has a plot) writes its PNG, `sections(section, plots, results)` returns its titled Markdown. `targets.py` reads the
targets from the sections.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import (
    batched_vs_loop,
    boundary_cost,
    data_pipeline,
    gpu,
    headline,
    memory_growth,
    modsquad_extraction,
    onnx_runtime,
    pipeline_end_to_end,
    report,
    scale_rehearsal,
    scaling,
    targets,
    variants,
)
from bench.measure import machine_info
from bench.plan import SuiteContext, default_plan, full_plan, quick_plan

logger = logging.getLogger("bench")
REPOSITORY = Path(__file__).resolve().parent.parent

# The suites, in the order they run (a suite may read the sections of those before it: `headline` reads `variants`).
SUITES = (
    variants,
    headline,
    batched_vs_loop,
    scaling,
    data_pipeline,
    pipeline_end_to_end,
    memory_growth,
    modsquad_extraction,
    boundary_cost,
    onnx_runtime,
    scale_rehearsal,
    gpu,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks the machinery only")
    mode.add_argument("--full", action="store_true", help="also time the training steps of the 512² ViT settings")
    mode.add_argument(
        "--render", action="store_true", help="rewrite the report and plots from --results, measuring nothing"
    )
    parser.add_argument(
        "--only", metavar="SUITE", help="measure this suite alone into the existing results, and render the page again"
    )
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
    plan = quick_plan() if args.quick else full_plan() if args.full else default_plan()
    results = {"mode": "quick" if args.quick else "full" if args.full else "default", "machine": machine_info()}
    results["plan"] = plan.to_dict()

    sections = {}
    for suite in SUITES:
        logger.info("%s", suite.KEY.replace("_", " "))
        sections[suite.KEY] = suite.measure(SuiteContext(plan, sections, args))
    results["sections"] = sections
    results.update(targets.target_values(sections, plan))
    results["targets"] = targets.assess(results)
    results["duration_s"] = time.perf_counter() - started
    report.write_json(results, args.results)
    write_report(results, args)
    return results


def write_report(results: dict, args: argparse.Namespace) -> None:
    """Each suite's plots, then the Markdown report."""
    plots = {}
    for suite in SUITES:
        if hasattr(suite, "write_plots"):
            plots.update(suite.write_plots(results["sections"][suite.KEY], args.plots_dir))
    report.write_markdown(results, SUITES, args.report, plots)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render:
        try:
            results = json.loads(args.results.read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f"bench/run.py: cannot read the results to render ({args.results}): {error}", file=sys.stderr)
            return 2
        write_report(results, args)
        logger.info("rendered %s from %s", args.report.name, args.results.name)
        return 0
    if args.only:
        suite = next((suite for suite in SUITES if suite.KEY == args.only), None)
        if suite is None:
            print(f"bench/run.py: --only {args.only}: the suites are {[s.KEY for s in SUITES]}.", file=sys.stderr)
            return 2
        results = json.loads(args.results.read_text())
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
        plan = quick_plan() if args.quick else full_plan() if args.full else default_plan()
        results["sections"][suite.KEY] = suite.measure(SuiteContext(plan, results["sections"], args))
        results["sections"][suite.KEY]["measured_on"] = machine_info()  # the page's machine measured the rest
        report.write_json(results, args.results)
        write_report(results, args)
        logger.info("measured %s; wrote %s and %s", suite.KEY, args.results.name, args.report.name)
        return 0
    results = run(args)
    for key, target in results["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        logger.info(
            "%s = %.3f (target %s %s): %s", key, target["value"], target["comparison"], target["bound"], verdict
        )
    logger.info("done in %.0f s; wrote %s and %s", results["duration_s"], args.results.name, args.report.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
