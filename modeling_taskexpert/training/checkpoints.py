"""Training checkpoints that are complete or absent, verifiable, and never a reason to run a pickle.

A checkpoint is a folder `checkpoints/step_NNNNNNNN` of the output folder, written under a temporary name and renamed
once complete. It holds accelerate's model (safetensors) and optimiser state (`optimizer.bin`, a torch file read with
`weights_only=True`), and our own state in JSON and safetensors: the trainer state (step, epoch, the recipe's
fingerprint), the learning-rate schedule, the loss weighting and every process's random generators. accelerate's
pickled random states are removed (ours replace them) and no object is registered with accelerate for pickling.
`manifest.json`, written last, lists the size and SHA-256 of every other file: a checkpoint whose files do not match
it (truncated, edited, or holding a file train.py did not write) is reported by name and never loaded, and `latest`
falls back to the previous complete checkpoint.
"""

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..file_utils import give_default_permissions

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
SCHEDULER_FILE = "scheduler.json"
LOSS_WEIGHTING_FILE = "loss_weighting.safetensors"
RNG_FILE = "rng_state_{}.json"
# accelerate pickles the random states of each process under this name; train.py stores them as JSON instead.
ACCELERATE_RNG_FILE = "random_states_{}.pkl"
HASH_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged, incomplete, of another recipe, or not written by train.py.
    The message names the folder, the file and what is wrong."""


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_folders(output_dir: str) -> list[Path]:
    """Every `step_NNNNNNNN` folder, complete or not, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def list_checkpoints(output_dir: str) -> list[Path]:
    """Checkpoints whose manifest was written (the last step of a save), oldest first. Their files are checked only
    when one is loaded (`verify_checkpoint`)."""
    return [p for p in checkpoint_folders(output_dir) if (p / MANIFEST_FILE).is_file()]


# The JSON files of a checkpoint (manifest, trainer state) are small; anything larger is not one of ours.
MAX_JSON_BYTES = 64 * 1024 * 1024


def _sha256(path: Path, size: Optional[int] = None) -> str:
    """SHA-256 of `path`, reading no more than `size` + 1 bytes (default: its size now), so that a file that grew, or
    a device behind a link, cannot keep the reader busy."""
    size = os.stat(path).st_size if size is None else size
    digest, remaining = hashlib.sha256(), size + 1
    with open(path, "rb") as stream:
        while remaining > 0 and (chunk := stream.read(min(HASH_CHUNK, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest() if remaining == 1 else "size changed while reading"


def _regular_file(path: Path) -> os.stat_result:
    """The status of `path` when it is a regular file of its folder itself (not a link, a device or a folder);
    otherwise a CheckpointError naming it."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: {path.name} is missing.") from None
    if not stat.S_ISREG(status.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(status.st_mode) else "not a regular file"
        raise CheckpointError(
            f"{path.parent}: {path.name} is {what}; train.py writes only regular files into checkpoints, so the "
            "checkpoint is refused."
        )
    return status


def _read_json(path: Path, what: str):
    status = _regular_file(path)
    if status.st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path.parent}: {what} {path.name} is {status.st_size} bytes, not a file of ours.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: {what} {path.name} is missing.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path.parent}: {what} {path.name} is not valid JSON ({error}).") from None


def verify_checkpoint(path: Path) -> dict:
    """Check every file of a checkpoint against its manifest and return its trainer state.

    Raises `CheckpointError` naming the file when one is missing, truncated, changed or unexpected."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder.")
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointError(
            f"{path} is incomplete (no {MANIFEST_FILE}: its writing was interrupted, or an older train.py wrote it)."
        )
    manifest = _read_json(path / MANIFEST_FILE, "the manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise CheckpointError(f"{path}: the manifest {MANIFEST_FILE} does not list the checkpoint's files.")
    present = {item.name for item in path.iterdir()} - {MANIFEST_FILE}
    pickles = sorted(name for name in present | set(files) if name.endswith(".pkl"))
    if pickles:
        raise CheckpointError(
            f"{path} holds {', '.join(pickles)}: train.py never writes pickles into checkpoints, and loading one could "
            "run code; refusing the checkpoint."
        )
    unexpected = sorted(present - set(files))
    if unexpected:
        raise CheckpointError(
            f"{path} holds {', '.join(unexpected)}, which train.py did not write there; refusing to load the checkpoint "
            "(a planted pickle could run code)."
        )
    for name, entry in sorted(files.items()):
        file = path / name
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{path}: the manifest names {name!r}, which is not a file of the checkpoint folder.")
        size = _regular_file(file).st_size  # sizes are compared before anything is read
        if not isinstance(entry, dict) or size != entry.get("size"):
            recorded = entry.get("size") if isinstance(entry, dict) else None
            raise CheckpointError(f"{path}: {name} is damaged ({size} bytes, {recorded} were written).")
        if _sha256(file, size) != entry.get("sha256"):
            raise CheckpointError(
                f"{path}: {name} is damaged or was modified (its SHA-256 differs from the manifest's)."
            )
    state = _read_json(path / STATE_FILE, "the trainer state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: {STATE_FILE} has no integer `step`.")
    return state


def check_fingerprint(path: Path, state: dict, fingerprint: str, fields: dict) -> None:
    """Refuse a checkpoint of another recipe, naming the fields that differ."""
    if state.get("recipe_sha256") == fingerprint:
        return
    stored = state.get("recipe") or {}
    differences = [f"{name}: {stored.get(name)!r} there, {fields.get(name)!r} now"
                   for name in sorted(set(stored) | set(fields)) if stored.get(name) != fields.get(name)]  # fmt: skip
    detail = "; ".join(differences[:8]) if differences else "its recipe fingerprint differs"
    raise CheckpointError(
        f"{path} belongs to another recipe ({detail}). Resume with the recipe it was trained with, or start afresh "
        "in another --output_dir (or with --overwrite_output_dir, which deletes it)."
    )


def resolve_checkpoint(
    output_dir: str, request: Optional[str], fingerprint: str, fields: dict, warn: Callable[[str], None] = print
) -> Optional[tuple[Path, dict]]:
    """The checkpoint to resume from and its trainer state, or None to start from scratch.

    `None` -> None. "latest" -> the newest checkpoint that verifies; damaged ones are reported through `warn` and
    skipped; None when the folder has no checkpoint at all; `CheckpointError` when it has some but none is complete.
    A path -> that checkpoint, which must verify. Either way the checkpoint must carry `fingerprint`."""
    if request is None:
        return None
    if request != "latest":
        path = Path(request)
        state = verify_checkpoint(path)
        check_fingerprint(path, state, fingerprint, fields)
        return path, state
    problems = []
    for path in reversed(checkpoint_folders(output_dir)):
        try:
            state = verify_checkpoint(path)
        except CheckpointError as error:
            warn(f"Skipping checkpoint {path}: {error}")
            problems.append(str(error))
            continue
        check_fingerprint(path, state, fingerprint, fields)
        return path, state
    if problems:
        raise CheckpointError(
            f"No complete checkpoint under {checkpoint_root(output_dir)} to resume from: " + " | ".join(problems)
            + " Start afresh with --overwrite_output_dir (which deletes them) or in another --output_dir."
        )  # fmt: skip
    return None


def rng_state() -> dict:
    """The random generators of this process (Python, NumPy, torch CPU and CUDA) as JSON-compatible data."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [generator.tolist() for generator in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(generator, dtype=torch.uint8) for generator in state["cuda"]])


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` inside is `weights_only=True`, even where a library asks for False (torch's own switch)."""
    saved = {
        name: os.environ.pop(name, None)
        for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the temporary folder is removed."""


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, keep: int, scheduler, loss_weighting) -> Path:
    """Save everything a run needs to continue exactly at `step`.

    Every process takes part in `save_state` and writes its random generators; the main process then writes the
    schedule, the loss weighting, the trainer state and the manifest last, renames the temporary folder and prunes to
    the newest `keep`. An interrupted write never looks like a checkpoint; a failed one (a full disk) removes its
    temporary folder and raises `CheckpointWriteError` naming the step and the cause.
    """
    root = checkpoint_root(output_dir)
    temporary = root / f".tmp_step_{step:08d}"
    try:
        return _save_checkpoint(accelerator, output_dir, step, state, keep, scheduler, loss_weighting)
    except (OSError, SafetensorError, RuntimeError) as error:
        if isinstance(error, CheckpointWriteError):
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        reason = (
            "the disk is full" if getattr(error, "errno", None) == 28 or "No space left" in str(error) else str(error)
        )
        raise CheckpointWriteError(
            f"Cannot write the checkpoint of step {step} under {root} ({reason}); its partial files were removed and "
            "the checkpoints before it are intact. Free space, then continue with --resume_from_checkpoint latest."
        ) from error


def _save_checkpoint(
    accelerator, output_dir: str, step: int, state: dict, keep: int, scheduler, loss_weighting
) -> Path:
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    index = accelerator.process_index
    (temporary / ACCELERATE_RNG_FILE.format(index)).unlink(missing_ok=True)
    (temporary / RNG_FILE.format(index)).write_text(json.dumps(rng_state()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict(), indent=2))
        tensors = {name: value.detach().cpu().contiguous() for name, value in loss_weighting.state_dict().items()}
        save_file(tensors, temporary / LOSS_WEIGHTING_FILE)
        state = {**state, "step": step, "world_size": accelerator.num_processes, "accelerator_step": accelerator.step}
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        files = {
            item.name: {"size": item.stat().st_size, "sha256": _sha256(item)} for item in sorted(temporary.iterdir())
        }
        (temporary / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2))
        for item in [temporary, *temporary.iterdir()]:  # safetensors writes its files private (0o600)
            give_default_permissions(item)
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for old in checkpoint_folders(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _own_entries(saved: dict, loss_weighting) -> dict:
    """The saved loss-weighting state this strategy holds. Checkpoints written when every strategy carried every
    buffer (before one class per strategy) hold more; what the strategy needs must be there (else a KeyError)."""
    return {name: saved[name] for name in loss_weighting.state_dict()}


def load_checkpoint(
    accelerator, checkpoint: Path, state: dict, scheduler, loss_weighting, warn: Callable[[str], None] = print
) -> None:
    """Restore a verified checkpoint (`resolve_checkpoint`): model and optimiser through accelerate, with every
    `torch.load` forced to `weights_only=True`; the schedule, loss weighting and random generators from our files."""
    try:
        with weights_only_loads():
            accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        scheduler.load_state_dict(json.loads((checkpoint / SCHEDULER_FILE).read_text()))
        loss_weighting.load_state_dict(
            _own_entries(load_file(checkpoint / LOSS_WEIGHTING_FILE, device="cpu"), loss_weighting)
        )
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError) as error:
        # weights_only refuses anything but tensors and plain containers; a size mismatch means another model.
        raise CheckpointError(
            f"{checkpoint} cannot be loaded safely into this run: {type(error).__name__}: {error}"
        ) from None
    rng_file = checkpoint / RNG_FILE.format(accelerator.process_index)
    if state.get("world_size") != accelerator.num_processes:
        warn(
            f"{checkpoint} was written by {state.get('world_size')} process(es), this run has {accelerator.num_processes}: "
            "the data order and random draws after the resume differ from an uninterrupted run."
        )
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    accelerator.step = state.get("accelerator_step", accelerator.step)


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())
