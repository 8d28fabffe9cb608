"""Before/after: the MMoE + heads time of one model under two revisions of the model code, measured in one run.

    python bench/compare_revisions.py --before REV [--preset vit-b --size 512 --rounds 5 --output bench/before_after.json]

`REV` (a commit, tag or branch) is checked out into a temporary git worktree; the working tree is "after". The same
model (config, seed, input) is timed with the backbone replayed (`bench.models.replay_backbone`), so only the MMoE
layers and heads are measured. A process can import only one version of the package, so every measurement runs in
its own process, alternating before / after for `--rounds` rounds; the ratio is the median over rounds of
after / before. Each process also reports its outputs, and the two revisions must agree on them (the change is a
speed-up, not a different model). `make bench` puts the recorded result in `docs/benchmarks.md`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "before_after.json"


def _import_from(root: Path) -> None:
    """Make `modeling_taskexpert` and `bench` resolve to `root` (an editable install would otherwise win)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in type(finder).__module__]
    sys.path[:0] = [str(root)]


def worker(root: Path, preset: str, size: int, calls: int) -> dict:
    """Time `calls` MMoE + heads forwards with the code of `root`; returns the times and an output fingerprint."""
    _import_from(root)
    import torch

    from bench.models import build_model, inference_call, load_config, random_pixels, replay_backbone

    import modeling_taskexpert

    if not Path(modeling_taskexpert.__file__).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"Imported {modeling_taskexpert.__file__}, not the code under {root}.")
    model = build_model(load_config(preset))
    pixels = random_pixels(1, size)
    replay_backbone(model, pixels)
    call = inference_call(model, pixels)
    with torch.inference_mode():
        logits = model(pixels).logits
    call()  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    fingerprint = {task: [float(value.double().sum()), float(value.double().abs().sum())] for task, value in logits.items()}
    return {"times_s": times, "fingerprint": fingerprint}


def _run_worker(root: Path, args) -> dict:
    command = [sys.executable, __file__, "--worker", str(root), "--preset", args.preset, "--size", str(args.size),
               "--calls", str(args.calls)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"Measuring {root} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _fingerprints_match(first: dict, second: dict, tolerance: float = 1e-4) -> bool:
    return first.keys() == second.keys() and all(
        abs(a - b) <= tolerance * max(1.0, abs(b)) for task in first for a, b in zip(first[task], second[task])
    )


def compare(before: str, args) -> dict:
    commit = _git("rev-parse", "--verify", f"{before}^{{commit}}")
    after_commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="taskexpert-before-") as scratch:
        worktree = Path(scratch) / "before"
        _git("worktree", "add", "--detach", str(worktree), commit)
        try:
            rounds = {"before": [], "after": []}
            fingerprints = {}
            for index in range(args.rounds):
                # Alternate which revision goes first, so that a drift of the machine hits both alike.
                order = (("before", worktree), ("after", REPO_ROOT))
                for name, root in order if index % 2 == 0 else reversed(order):
                    result = _run_worker(root, args)
                    rounds[name].append(statistics.median(result["times_s"]))
                    fingerprints[name] = result["fingerprint"]
        finally:
            _git("worktree", "remove", "--force", str(worktree))
    ratios = [a / b for a, b in zip(rounds["after"], rounds["before"])]
    return {
        "before": commit,
        "after": after_commit + (" (with uncommitted changes)" if dirty else ""),
        "setting": {"preset": args.preset, "image_size": args.size, "batch": 1, "part": "MMoE layers + heads"},
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
        "before_median_s": statistics.median(rounds["before"]),
        "after_median_s": statistics.median(rounds["after"]),
        "after_vs_before_ratio": statistics.median(ratios),
        "outputs_match": _fingerprints_match(fingerprints["before"], fingerprints["after"]),
        "round_medians_s": rounds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="the revision to compare the working tree with")
    parser.add_argument("--preset", default="vit-b", help="model preset of bench/models.py (default: vit-b)")
    parser.add_argument("--size", type=int, default=512, help="image size (default: 512)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating before/after rounds (default: 5)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per process (default: 5)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the JSON result is written")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.size, args.calls)))
        return 0
    if not args.before:
        parser.error("--before REV is required")
    # Imported here, not at the top: a worker must import the package from its own revision (`_import_from`).
    from modeling_taskexpert.training import write_json_atomic

    result = compare(args.before, args)
    write_json_atomic(args.output, result)
    print(json.dumps({key: value for key, value in result.items() if key != "round_medians_s"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
