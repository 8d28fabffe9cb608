"""Writing files so that a reader never sees half of one, and telling Hub ids from local paths. Standard library only;
used by the data, evaluation, training, experiment and benchmark code (the model files do not need it)."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def _default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give (0o666 less the umask); `mkstemp` makes 0o600 files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` for a temporary file beside `path`, then rename it over `path`.

    A crash or an exception leaves `path` as it was (or absent) and removes the temporary file; the finished file
    gets the user's normal permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomic(path: PathLike, data: Any, sort_keys: bool = False) -> Path:
    """Write `data` as indented JSON with a final newline to `path` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def give_default_permissions(path: PathLike) -> Path:
    """Give `path` the mode a plain `open(path, "w")` or `mkdir` would have given (0o666 or 0o777 less the umask): for
    files and folders made private (0o600, 0o700) by `mkstemp`, `mkdtemp` or a library, in a folder meant to be shared
    or uploaded."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return path


def looks_like_repo_id(value: PathLike) -> bool:
    """Whether `value` reads as a Hub id `namespace/name` rather than a local path: an existing path never does, nor
    one whose first part is an existing local folder (`data/nyud` beside a `data/` folder)."""
    text = str(value)
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "/", "~"))
        and not Path(text).exists()
        and not Path(parts[0]).is_dir()
    )


__all__ = ["atomic_write", "give_default_permissions", "looks_like_repo_id", "write_json_atomic", "write_text_atomic"]
