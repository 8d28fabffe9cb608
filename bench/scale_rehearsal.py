"""Scale rehearsal: a synthetic dataset generated to 50,000 samples in bounded shards, then a streamed training run on
it with 2 processes (CPU data parallel), killed after a checkpoint and resumed, against a map-style run of the same
recipe: training throughput of each (one run each, so the ratio is of two runs of the same machine back to back), the
time from the launch to the first logged step, and the resident memory of the training processes over the run. The
converter's peak memory is measured generating 5,000 and 50,000 samples (it should not grow with the size).

Heavy (about 20-30 minutes on 2 cores): measured only with `python bench/run.py --only scale_rehearsal`.
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .plan import SuiteContext
from .formatting import table

KEY = "scale_rehearsal"
TITLE = "Scale rehearsal: 50,000 streamed samples, 2 processes, a kill and a resume"
REPOSITORY = Path(__file__).resolve().parent.parent
SAMPLES, SMALL_SAMPLES, IMAGE_SIZE, SHARD_SIZE = 50_000, 5_000, 32, "4MB"
STEPS, KILL_AFTER, BATCH, LOGGING_STEPS = 240, 120, 8, 10


def _generate(folder: Path, samples: int) -> dict:
    """Generate in a child process; its wall time and the peak RSS of the generator and its workers (sampled)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_taskexpert.data", "synthetic", "--output-dir", str(folder), "--train-size",
         str(samples), "--val-size", "64", "--image-size", str(IMAGE_SIZE), "--max-shard-size", SHARD_SIZE],
        cwd=REPOSITORY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _process_tree_rss(process.pid))
        time.sleep(0.2)
    if process.returncode != 0:
        raise RuntimeError(f"generating {samples} samples failed ({process.returncode})")
    shards = len(list((folder / "data").glob("train-*.parquet")))
    return {"samples": samples, "seconds": time.perf_counter() - started, "shards": shards, "peak_rss_mib": peak}


def _process_tree_rss(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20
    except psutil.Error:
        return float("nan")


def _train(data: Path, output: Path, streaming: bool, steps: int, resume: bool = False, kill_at=None) -> dict:
    """One launch of train.py (2 processes); returns its timings, RSS samples and whether it was killed."""
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
        "--config", "hub_configs/synthetic-tiny.yaml", "--dataset", str(data), "--output_dir", str(output),
        "--max_steps", str(steps), "--warmup_steps", "0", "--eval_steps", "0", "--save_steps", str(KILL_AFTER),
        "--logging_steps", str(LOGGING_STEPS), "--per_device_train_batch_size", str(BATCH), "--num_workers", "1",
        "--max_eval_samples", "16", "--boundary_mode", "approximate", "--final_boundary_modes", "[approximate]",
        "--streaming", "true" if streaming else "false", "--shuffle_buffer_size", "1000",
    ] + (["--resume_from_checkpoint", "latest"] if resume else [])  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = output / "train_log.jsonl"
    seen = len(log.read_text().splitlines()) if log.exists() else 0
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
    first_step, rss, killed = None, [], False
    while process.poll() is None:
        time.sleep(0.5)
        rss.append((time.perf_counter() - started, _process_tree_rss(process.pid)))
        if first_step is None and log.exists() and len(log.read_text().splitlines()) > seen:
            first_step = time.perf_counter() - started
        checkpoint = output / "checkpoints" / f"step_{kill_at:08d}" / "manifest.json" if kill_at else None
        if checkpoint is not None and checkpoint.exists():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed = True
            break
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if not killed and process.returncode != 0:
        raise RuntimeError(f"train.py failed ({process.returncode}): {stderr[-2000:]}")
    return {"seconds": time.perf_counter() - started, "first_logged_step_s": first_step, "rss_mib": rss,
            "killed": killed}  # fmt: skip


def _throughput(output: Path) -> float:
    """Median images/s over the logged windows, leaving out the first window of each launch (start-up, and the
    batches a resumed stream replays)."""
    first_windows = {LOGGING_STEPS, KILL_AFTER + LOGGING_STEPS}
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    values = [r["images_per_second"] for r in records if r.get("kind") == "train" and r["step"] not in first_windows]
    return statistics.median(values)


def measure(context: SuiteContext) -> dict:
    if getattr(context.args, "only", None) != KEY:
        return {"skipped": "heavy (20-30 minutes): python bench/run.py --only scale_rehearsal"}
    with tempfile.TemporaryDirectory(prefix="scale-rehearsal-") as scratch:
        scratch = Path(scratch)
        generation = [_generate(scratch / "small", SMALL_SAMPLES), _generate(scratch / "data", SAMPLES)]
        shutil.rmtree(scratch / "small")
        streamed, mapped = scratch / "streamed", scratch / "mapped"
        first = _train(scratch / "data", streamed, True, STEPS, kill_at=KILL_AFTER)
        resumed = _train(scratch / "data", streamed, True, STEPS, resume=True)
        map_style = _train(scratch / "data", mapped, False, STEPS)
        records = [json.loads(line) for line in (streamed / "train_log.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if r.get("kind") == "train"]
        return {
            "samples": SAMPLES, "image_size": IMAGE_SIZE, "shard_size": SHARD_SIZE, "steps": STEPS,
            "kill_after": KILL_AFTER, "batch_per_process": BATCH, "generation": generation,
            "streamed_first": {k: v for k, v in first.items() if k != "rss_mib"},
            "streamed_resumed": {k: v for k, v in resumed.items() if k != "rss_mib"},
            "map_style": {k: v for k, v in map_style.items() if k != "rss_mib"},
            "logged_steps": steps,
            "images_per_second": {"streamed": _throughput(streamed), "map_style": _throughput(mapped)},
            "rss_mib": {"streamed": first["rss_mib"] + resumed["rss_mib"], "map_style": map_style["rss_mib"]},
        }  # fmt: skip


def _rss_summary(samples: list) -> str:
    values = [v for _, v in samples if v == v]
    if len(values) < 4:
        return "n/a"
    quarter = len(values) // 4
    return " / ".join(f"{statistics.median(values[i * quarter : (i + 1) * quarter]):.0f}" for i in range(4))


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    if "skipped" in section:
        return [(TITLE, f"Not measured in this run: {section['skipped']}.")]
    small, large = section["generation"]
    speed = section["images_per_second"]
    rows = [
        ["streamed", f"{speed['streamed']:.1f}", f"{section['streamed_first']['first_logged_step_s']:.1f}",
         _rss_summary(section["rss_mib"]["streamed"])],
        ["map-style", f"{speed['map_style']:.1f}", f"{section['map_style']['first_logged_step_s']:.1f}",
         _rss_summary(section["rss_mib"]["map_style"])],
    ]  # fmt: skip
    machine = section.get("measured_on") or results.get("machine", {})
    text = "\n\n".join([
        __doc__.split("\n\n")[0].replace("\n", " "),
        f"Generation ({section['image_size']}² images, shards of at most {section['shard_size']}): {small['samples']:,} "
        f"samples in {small['seconds']:.0f} s with a peak RSS of {small['peak_rss_mib']:.0f} MiB; {large['samples']:,} "
        f"in {large['seconds']:.0f} s ({large['shards']} shards) with a peak RSS of {large['peak_rss_mib']:.0f} MiB.",
        f"Training: {section['steps']} steps of batch {section['batch_per_process']} per process, 2 processes; the "
        f"streamed run was killed after its step-{section['kill_after']} checkpoint and resumed "
        f"(logged steps {section['logged_steps'][0]}-{section['logged_steps'][-1]}, each once).",
        table(["training split", "images/s (median over the logged windows after the first of each launch)", f"launch to step {LOGGING_STEPS} (s)",
               "RSS of the run's processes, MiB (medians of its quarters)"], rows),
        f"Streamed / map-style throughput: {speed['streamed'] / speed['map_style']:.2f} (two runs back to back). The "
        "map-style run prepares the split (an Arrow copy of the parquet shards) before its first step; the streamed one "
        "reads the shards as it goes.",
        f"Measured {machine.get('date', '')} on {machine.get('cpu_model', 'this machine')}, "
        f"{machine.get('cpu_count', '?')} cores.",
    ])  # fmt: skip
    return [(TITLE, text)]
