"""Where a run comes from, and whose an output folder is: the recipe fingerprint and `provenance.json`.

`provenance.json` (in every output folder of `train.py`) records `git_commit`, `git_dirty`, `package_version`,
`recipe_sha256`, `torch_version` and `created` of the process that started the run, and one entry per resume under
`resumes`. `recipe_sha256` is the SHA-256 of the resolved recipe without the fields that do not change what is trained
(`FINGERPRINT_EXCLUDED`: where it is written, how it is logged, checkpointed, evaluated or published), with the model
config file's content in place of its path. Checkpoints carry it too, so a checkpoint of another recipe is never
resumed by accident.
"""

import datetime
import hashlib
import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from ..file_utils import write_json_atomic

PROVENANCE_FILE = "provenance.json"
FINGERPRINT_EXCLUDED = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_private",
    "report_to", "num_workers", "logging_steps", "save_steps", "save_total_limit", "eval_steps",
    "per_device_eval_batch_size", "max_eval_samples", "boundary_mode", "final_boundary_modes", "boundary_workers",
    "single_task_baselines",
})  # fmt: skip
REPOSITORY = Path(__file__).resolve().parents[2]
# Recipe fields added after runs existed: left out of the fingerprint at these values, so that those runs resume.
ADDED_FIELD_DEFAULTS = {"lr_schedule": "poly", "streaming": False, "shuffle_buffer_size": 1000}


def fingerprint_fields(recipe) -> dict:
    """The recipe fields that define what is trained, with the model config's content instead of its path."""
    fields = {name: value for name, value in recipe.to_dict().items() if name not in FINGERPRINT_EXCLUDED}
    for name, default in ADDED_FIELD_DEFAULTS.items():  # at their defaults, the fingerprint of earlier runs
        if name in fields and fields[name] == default:
            del fields[name]
    fields["model_config"] = json.loads(Path(recipe.model_config).read_text())
    return fields


def recipe_fingerprint(recipe) -> tuple[str, dict]:
    """(SHA-256 of the fingerprint fields as canonical JSON, the fields)."""
    fields = fingerprint_fields(recipe)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest(), fields


def _git(*arguments: str) -> Optional[str]:
    try:
        completed = subprocess.run(
            ["git", "-C", str(REPOSITORY), *arguments], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), e.g. to tell runs of different machines apart:
    the same code and seed give the same numbers on one machine, not bit for bit across CPU models."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def collect_provenance(recipe_sha256: str) -> dict:
    """Code, library versions and recipe fingerprint of this process (git fields are null outside a checkout)."""
    import torch

    try:
        from importlib.metadata import PackageNotFoundError, version

        package_version = version("modeling-taskexpert")
    except PackageNotFoundError:
        package_version = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "package_version": package_version,
        "recipe_sha256": recipe_sha256,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_provenance(output_dir) -> Optional[dict]:
    """The folder's provenance, or None when it has none (or an unreadable one)."""
    try:
        provenance = json.loads((Path(output_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return provenance if isinstance(provenance, dict) else None


def write_provenance(output_dir, recipe_sha256: str, resumed_at_step: Optional[int] = None) -> dict:
    """Write `provenance.json` for a fresh run, or add this process to the `resumes` of the existing one."""
    current = collect_provenance(recipe_sha256)
    previous = read_provenance(output_dir) if resumed_at_step is not None else None
    if previous is not None and previous.get("recipe_sha256") == recipe_sha256:
        provenance = {**previous, "resumes": [*previous.get("resumes", []), {**current, "step": resumed_at_step}]}
    else:
        provenance = current
    write_json_atomic(Path(output_dir) / PROVENANCE_FILE, provenance)
    return provenance


# What a finished or interrupted run leaves that a fresh run would replace, and what --overwrite_output_dir deletes.
RUN_RESULTS = ("model.safetensors", "metrics.json")
RUN_FILES = ("metrics.json", "model.safetensors", "train_log.jsonl", "training_curves.png", PROVENANCE_FILE)


LOCK_FILE = ".train.lock"
STAGING_PREFIX = ".final_"


def lock_output_dir(output_dir):
    """Claim `output_dir` for this run (the main process calls it once, before anything is written there) and return
    the open lock file, to keep open for the whole run: an exclusive `flock` on `<output_dir>/.train.lock`, which holds
    the holder's pid, host and start time. A second run (fresh or resumed) is refused with a `RecipeError` naming the
    holder; the kernel drops the lock of a process that died, so a stale lock is taken over by the next run. The
    holder then removes what its own earlier, killed runs left: final-model staging folders (`.final_*`)."""
    import fcntl
    import os
    import socket

    from .recipe import RecipeError

    path = Path(output_dir) / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        handle.close()
        raise RecipeError(
            f"--output_dir {output_dir} is in use by another train.py run (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}). Two runs in one folder would mix "
            "their logs, checkpoints and model: wait for it to end, or choose another --output_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
    handle.flush()
    for staging in Path(output_dir).glob(f"{STAGING_PREFIX}*"):  # ours: nobody else may write here now
        shutil.rmtree(staging, ignore_errors=True)
    return handle


def claim_output_dir(output_dir, recipe_sha256: str, overwrite: bool, accelerator=None) -> None:
    """Make sure a fresh run may write to `output_dir`: refuse (`RecipeError`) when it holds checkpoints or a model of
    another run (or of an earlier run of this recipe), unless `overwrite`, which deletes them.

    Called on every process: all check first, then the main process deletes, so no process sees a half-deleted folder."""
    from .checkpoints import checkpoint_folders, checkpoint_root
    from .recipe import RecipeError

    output_dir = Path(output_dir)
    found = (
        [f"checkpoints {', '.join(p.name for p in checkpoint_folders(output_dir))}"]
        if checkpoint_folders(output_dir)
        else []
    )
    found += [name for name in RUN_RESULTS if (output_dir / name).exists()]
    if found and not overwrite:
        provenance = read_provenance(output_dir)
        if provenance is None:
            owner = "a run of unknown recipe (no provenance.json)"
            advice = ""
        elif provenance.get("recipe_sha256") != recipe_sha256:
            owner = f"a run of another recipe (recipe_sha256 {str(provenance.get('recipe_sha256'))[:12]}…, this one {recipe_sha256[:12]}…)"
            advice = ""
        else:
            owner = "an earlier run of this recipe"
            advice = " --resume_from_checkpoint latest continues it;" if checkpoint_folders(output_dir) else ""
        raise RecipeError(
            f"--output_dir {output_dir} already holds {' and '.join(found)} of {owner}. A fresh run would replace "
            f"them:{advice} --overwrite_output_dir deletes them and starts afresh; or choose another --output_dir."
        )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if found and (accelerator is None or accelerator.is_main_process):
        shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)
        for name in RUN_FILES:
            (output_dir / name).unlink(missing_ok=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()


__all__ = [
    "LOCK_FILE",
    "STAGING_PREFIX",
    "lock_output_dir",
    "FINGERPRINT_EXCLUDED",
    "PROVENANCE_FILE",
    "claim_output_dir",
    "collect_provenance",
    "fingerprint_fields",
    "read_provenance",
    "recipe_fingerprint",
    "write_provenance",
]
