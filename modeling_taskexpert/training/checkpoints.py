"""Training checkpoints that are either complete or absent: written to a temporary folder, renamed at the end."""

import json
import re
import shutil
from pathlib import Path
from typing import Optional

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints (a `step_NNNNNNNN` folder holding the trainer state), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_checkpoint(output_dir: str, request: Optional[str]) -> Optional[Path]:
    """`None` -> None; "latest" -> the newest complete checkpoint (None if there is none); a path -> that folder."""
    if request is None:
        return None
    if request == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(request)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}).")
    return path


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, keep: int) -> Path:
    """Save the accelerate state (model, optimiser, scheduler, RNG, registered objects) for `step`.

    Every process takes part in `save_state`; the main process then writes the trainer state last and renames the
    temporary folder, so an interrupted write never looks like a checkpoint, and prunes to the newest `keep`.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())
