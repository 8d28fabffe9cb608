"""Writing a dataset folder: parallel sample conversion, error policy, sharded parquet, atomic rename.

Every source (the converters and the synthetic generator) describes its samples as a list of
ids per split and a picklable function `make_row(split, sample_id) -> row`; `write_dataset` runs
it over worker processes with a progress bar and writes the folder of the schema. The folder is
built under a hidden temporary name next to the destination (`.<name>.incomplete-XXXX`) and
renamed at the very end, so an interrupted or failed run never leaves a partial dataset at the
destination. A killed run cannot remove its temporary folder; the next write to the same
destination does, once no process holds the folder's lock file (`.<name>.incomplete-XXXX.lock`):
the writer keeps an exclusive `flock` on it for as long as it runs, and the kernel drops that lock
when the process dies, so a concurrent writer's folder is never touched.
"""

import io
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from collections import Counter
from typing import Callable, Optional

import datasets
from PIL import Image
from tqdm.auto import tqdm

from ..file_utils import write_json_atomic, write_text_atomic
from ..process_utils import end_with_parent
from ..task_definitions import IGNORE_INDEX
from .labels import LabelError, decode_label
from .schema import CARD_FILENAME, DATA_DIRNAME, METADATA_FILENAME, SPLITS, as_task_specs, build_features

try:
    import fcntl
except ImportError:  # not on Windows: there, leftovers are recognised by age alone
    fcntl = None

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("stop", "skip")
# Rows per parquet shard: a few hundred MB for full-size PASCAL-Context samples.
ROWS_PER_SHARD = 1000
# A shard holds at most ROWS_PER_SHARD rows and this many bytes of cells: shards stream well and the writer holds at
# most one shard in memory.
DEFAULT_MAX_SHARD_BYTES = 500 * 2**20
# Rows per parquet row group: the unit a streaming reader fetches (datasets' own choice for image datasets).
ROWS_PER_ROW_GROUP = 100


def row_bytes(row: dict) -> int:
    """The approximate size of a row: the bytes of its encoded cells (images, label maps, arrays) and lists."""
    total = 0
    for value in row.values():
        if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
            total += len(value["bytes"])
        elif isinstance(value, (bytes, bytearray)):
            total += len(value)
        elif isinstance(value, list):
            total += 4 * len(value)
        elif isinstance(value, str):
            total += len(value)
    return total


def parse_size(text) -> int:
    """"500MB", "2GB", "64KB" or a number of bytes -> bytes (for `--max-shard-size`)."""
    if isinstance(text, int):
        return text
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    value = str(text).strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"A size must look like 500MB, 2GB or a number of bytes, got {text!r}.") from None
    if size < 1:
        raise ValueError(f"A size must be positive, got {text!r}.")
    return size
INCOMPLETE_MARK = ".incomplete-"
# A temporary folder without a lock file (the instant between its creation and its lock, or a run of a version
# without locks) counts as left over only after this long without any write in it.
UNLOCKED_STALE_SECONDS = 3600.0


class RawDataError(ValueError):
    """A raw file of one sample is missing or unreadable."""

    def __init__(self, path, sample_id: str, reason: str):
        super().__init__(str(path), sample_id, reason)
        self.path, self.sample_id, self.reason = str(path), sample_id, reason

    def __str__(self):
        return f"{self.path} (sample {self.sample_id!r}): {self.reason}"


class DatasetConversionError(RuntimeError):
    """A conversion stopped; nothing was written at the destination."""


def read_raw(path, sample_id: str, reader: Callable, what: str):
    """Run `reader(path)`, turning a missing or corrupt file into a `RawDataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise RawDataError(path, sample_id, f"missing {what} file")
    try:
        return reader(path)
    except RawDataError:
        raise
    except Exception as error:  # any decoder failure means a corrupt or unexpected file
        raise RawDataError(path, sample_id, f"cannot read the {what} file ({type(error).__name__}: {error})") from error


class LabelAudit:
    """Checks every label a source writes against its task's kind (all of them: the reader then only needs to check
    what it decodes), and what a whole split must hold: a saliency or boundary column whose split has pixels marked
    ignore (255) but not one positive pixel almost surely stored its positives as 255."""

    def __init__(self, specs: dict, dataset: str):
        self.specs, self.dataset = specs, dataset
        self.binary = [task for task, spec in specs.items() if spec.kind.name in ("saliency", "boundary")]
        self.positives, self.ignored = Counter(), Counter()

    def check_row(self, row: dict, split: str) -> None:
        for task, spec in self.specs.items():
            cell = row.get(task)
            if cell is None:
                continue
            where = f"{self.dataset}, split {split!r}, sample {row.get('id')!r}, column {task!r}"
            stored = Image.open(io.BytesIO(cell["bytes"])) if isinstance(cell, dict) and "bytes" in cell else cell
            label = decode_label(spec, stored, where)
            if task in self.binary:
                self.positives[task] += int((label == 1).sum())
                self.ignored[task] += int((label == IGNORE_INDEX).sum())

    def check_split(self, split: str) -> None:
        for task in self.binary:
            if self.positives[task] == 0 and self.ignored[task] > 0:
                raise DatasetConversionError(
                    f"{self.dataset}, split {split!r}, column {task!r}: no pixel of any sample is 1 (positive), but "
                    f"{self.ignored[task]} are {IGNORE_INDEX}, which means ignore. Positives must be stored as 1: if "
                    f"the label files mark positives with {IGNORE_INDEX} (0/255 masks), map them to 1 first (the "
                    "folder command's `positive_value: 255`). Nothing was written."
                )
        self.positives.clear()
        self.ignored.clear()


def _call(make_row, split, sample_id):
    try:
        return make_row(split, sample_id)
    except RawDataError as error:
        return error


def _resolve_workers(num_workers: Optional[int], num_samples: int) -> int:
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    return max(0, min(num_workers, num_samples))


def _rows(make_row, split, ids, num_workers):
    """Yield the result of `make_row` (a row or a `RawDataError`) for every id, in order."""
    if num_workers <= 1:
        for sample_id in ids:
            yield _call(make_row, split, sample_id)
        return
    # The workers end with this process, however it ends (killed, they would otherwise wait on forever).
    with multiprocessing.get_context().Pool(num_workers, initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        tasks = [(make_row, split, sample_id) for sample_id in ids]
        yield from pool.imap(_star_call, tasks, chunksize=4)


def _star_call(arguments):
    return _call(*arguments)


def _write_split(
    folder: Path, split: str, features, rows, rows_per_shard: int, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> int:
    """Write `rows` as `data/<split>-XXXXX-of-YYYYY.parquet` shards of at most `rows_per_shard` rows whose cells hold
    at most `max_shard_bytes` (a single larger row gets a shard of its own), in row groups of `ROWS_PER_ROW_GROUP`
    rows; return the number of rows. One shard's rows are in memory at a time."""
    data_dir = folder / DATA_DIRNAME
    data_dir.mkdir(exist_ok=True)
    shard_paths, buffer, count, buffered_bytes = [], [], 0, 0

    def flush():
        path = data_dir / f".{split}-{len(shard_paths):05d}.parquet"
        datasets.Dataset.from_list(buffer, features=features).to_parquet(str(path), batch_size=ROWS_PER_ROW_GROUP)
        shard_paths.append(path)
        buffer.clear()

    for row in rows:
        size = row_bytes(row)
        if buffer and buffered_bytes + size > max_shard_bytes:  # the row would overfill the shard: it starts the next
            flush()
            buffered_bytes = 0
        buffer.append(row)
        count += 1
        buffered_bytes += size
        if len(buffer) == rows_per_shard:
            flush()
            buffered_bytes = 0
    if buffer:
        flush()
    for index, path in enumerate(shard_paths):
        path.rename(data_dir / f"{split}-{index:05d}-of-{len(shard_paths):05d}.parquet")
    return count


def prepare_output_dir(output_dir, overwrite: bool) -> Path:
    """Check the destination before any work: it must not exist unless `overwrite` is set."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite (overwrite=True) to replace it.")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return output_dir


def _try_lock(path: Path):
    """An open file holding an exclusive lock on `path`, or None if another process holds it."""
    handle = open(path, "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _create_held_lock(path: Path):
    """Create the lock file `path` already locked by this process (locked under a temporary name, then renamed), so
    that no other process ever sees it unlocked while its writer runs; return the open file holding the lock."""
    handle_fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".lock-", suffix=".tmp")
    handle = os.fdopen(handle_fd, "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        os.replace(temporary, path)
    except BaseException:
        handle.close()
        Path(temporary).unlink(missing_ok=True)
        raise
    return handle


def _last_write(folder: Path) -> float:
    """The newest modification time of `folder` and everything in it."""
    times = [folder.stat().st_mtime]
    for path in folder.rglob("*"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:  # removed meanwhile
            pass
    return max(times)


def remove_stale_temporaries(output_dir) -> list[Path]:
    """Remove what interrupted writes to `output_dir` left beside it; return the removed paths.

    Only this destination's `.<name>.incomplete-*` folders (and their lock and `.old` companions)
    are considered, and only those no running writer holds: with `flock`, a folder whose lock file
    can be locked now; without it, or without a lock file, one untouched for `UNLOCKED_STALE_SECONDS`.
    When an interrupted overwrite left the previous dataset (`.old`) while the destination is
    missing, nothing is removed and a warning names both folders.
    """
    output_dir = Path(output_dir)
    parent, prefix = output_dir.parent, f".{output_dir.name}{INCOMPLETE_MARK}"
    if not parent.is_dir():
        return []
    bases = set()
    for path in parent.glob(f"{prefix}*"):
        name = path.name
        for suffix in (".lock", ".old"):
            name = name.removesuffix(suffix)
        bases.add(parent / name)
    removed = []
    for base in sorted(bases):
        lock_path, old_dir = base.with_name(base.name + ".lock"), base.with_name(base.name + ".old")
        handle = None
        if fcntl is not None and lock_path.exists():
            handle = _try_lock(lock_path)
            if handle is None:
                continue  # a running writer
        else:
            newest = max((_last_write(path) for path in (base, old_dir) if path.exists()), default=0.0)
            if time.time() - newest < UNLOCKED_STALE_SECONDS:
                continue
        try:
            if old_dir.exists() and not output_dir.exists():
                logger.warning(
                    "An interrupted overwrite of %s left the previous dataset at %s and the new one at %s; "
                    "move one of them to %s.", output_dir, old_dir, base, output_dir,
                )  # fmt: skip
                continue
            for path in (base, old_dir):
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            lock_path.unlink(missing_ok=True)
        finally:
            if handle is not None:
                handle.close()
    if removed:
        logger.info("Removed %d folder(s) left by interrupted writes: %s", len(removed), ", ".join(map(str, removed)))
    return removed


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_dataset(
    output_dir,
    split_ids: dict[str, list[str]],
    make_row: Callable,
    tasks,
    finalize: Callable[[dict], tuple[dict, str]],
    num_workers: Optional[int] = None,
    on_error: str = "stop",
    overwrite: bool = False,
    description: str = "samples",
    rows_per_shard: int = ROWS_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert every sample and write the dataset folder atomically at `output_dir`.

    Args:
        split_ids: sample ids per split, in the order they are stored.
        make_row: picklable `(split, sample_id) -> row dict` of the schema's columns; raises
            `RawDataError` for a bad raw file.
        tasks: the task columns of the dataset.
        finalize: `split_sizes -> (metadata, card_text)`, called once every split is written.
        num_workers: worker processes (None = all cores, 0 or 1 = in this process). The output
            does not depend on it.
        on_error: "stop" raises `DatasetConversionError` at the first bad sample, "skip" leaves
            bad samples out and reports how many.
        rows_per_shard, max_shard_bytes: a shard ends at this many rows or once its rows hold this many bytes.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}.")
    unknown = [split for split in split_ids if split not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown splits {unknown}; the schema has {list(SPLITS)}.")
    output_dir = prepare_output_dir(output_dir, overwrite)
    remove_stale_temporaries(output_dir)
    specs = as_task_specs(tasks)
    features = build_features(specs)
    audit = LabelAudit(specs, description)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}{INCOMPLETE_MARK}", dir=output_dir.parent))
    lock_path, lock = temp_dir.with_name(temp_dir.name + ".lock"), None
    try:
        if fcntl is not None:
            lock = _create_held_lock(lock_path)
        split_sizes, skipped = {}, []
        for split, ids in split_ids.items():
            workers = _resolve_workers(num_workers, len(ids))
            progress = tqdm(total=len(ids), desc=f"{description} ({split})", unit="sample")

            def accepted_rows(split=split, ids=ids, workers=workers, progress=progress):
                for result in _rows(make_row, split, ids, workers):
                    progress.update()
                    if not isinstance(result, RawDataError):
                        try:
                            audit.check_row(result, split)
                        except LabelError as error:
                            result = error
                    if isinstance(result, (RawDataError, LabelError)):
                        if on_error == "stop":
                            raise DatasetConversionError(
                                f"Bad raw input: {result}. Nothing was written to {output_dir}; fix or remove the "
                                "file, or pass --on-error skip (on_error='skip') to leave such samples out."
                            )
                        logger.warning("Skipping %s", result)
                        skipped.append(result)
                        continue
                    yield result

            try:
                split_sizes[split] = _write_split(
                    temp_dir, split, features, accepted_rows(), rows_per_shard, max_shard_bytes
                )
            finally:
                progress.close()
            if split_sizes[split] == 0:
                raise DatasetConversionError(f"No sample of the {split!r} split could be converted; nothing was written.")
            audit.check_split(split)
        metadata, card = finalize(split_sizes)
        write_text_atomic(temp_dir / CARD_FILENAME, card)
        write_json_atomic(temp_dir / METADATA_FILENAME, metadata)  # last: its presence marks a complete dataset
        os.chmod(temp_dir, _default_dir_mode())  # mkdtemp makes it private; the dataset gets the usual permissions
        _replace_dir(temp_dir, output_dir, temp_dir.with_name(temp_dir.name + ".old"))
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    finally:
        lock_path.unlink(missing_ok=True)
        if lock is not None:
            lock.close()
    if skipped:
        logger.warning("Skipped %d bad samples (see the warnings above); %s holds the others.", len(skipped), output_dir)
    return output_dir


def _replace_dir(new_dir: Path, output_dir: Path, old_dir: Path) -> None:
    """Move `new_dir` to `output_dir`, replacing an existing folder (moved to `old_dir`, then deleted) with as short
    a gap as possible."""
    if output_dir.exists():
        output_dir.rename(old_dir)
        new_dir.rename(output_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        new_dir.rename(output_dir)

