"""Converting a raw dataset archive: a `DatasetSource` describes the archive, `convert` does the rest.

A source is a description, not a subclass: its name, tasks, class names, sizes, boundary
tolerance and card text, where the archive's root is, where its split lists are, and a picklable
`make_row(root, split, sample_id)` that derives the labels of one sample. `convert(source, ...)`
finds the root, reads and checks the split ids (safe names, no duplicates, no sample in two
splits), converts every sample over worker processes and writes the dataset folder of the
schema. PASCAL-Context (`pascal_context.py`) and NYUD-v2 (`nyud.py`) are such descriptions; a new
source is one file with its label derivation and one `DatasetSource`, listed in `SOURCES`
(`data/__init__.py`).
"""

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from ..task_definitions import PRESET_TASKS, check_task_name, make_task_spec
from .schema import SPLITS, build_features, build_metadata, render_card
from .writer import DEFAULT_MAX_SHARD_BYTES, write_dataset


def check_sample_id(sample_id: str, where: str) -> str:
    """Refuse a sample id that could make a reader leave the raw folder or name an odd file; return it.

    Raw files are found as `<root>/<folder>/<id>.<ext>`, so an id must be one plain file-name
    stem: no path separator, no drive or absolute path, not `.` or `..`, no control character.
    """
    problem = None
    if not sample_id:
        problem = "is empty"
    elif sample_id in (".", ".."):
        problem = "is a relative folder reference"
    elif any(sep in sample_id for sep in ("/", "\\", os.sep, os.altsep or "/")):
        problem = "contains a path separator (ids are file names inside the archive's folders)"
    elif ":" in sample_id:
        problem = "contains ':' (a drive or stream name)"
    elif any(ord(char) < 32 or ord(char) == 127 for char in sample_id):
        problem = "contains a control character"
    if problem:
        raise ValueError(f"{where}: the sample id {sample_id!r} {problem}; it cannot name a raw file.")
    return sample_id


def read_id_list(path: Path) -> list[str]:
    """Sample ids of a split list file (one id per line, blank lines skipped), checked and without duplicates."""
    if not path.is_file():
        raise FileNotFoundError(f"Missing split list {path} (one image id per line).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read the split list {path} as UTF-8 text ({error}).") from error
    ids, first_line = [], {}
    for number, line in enumerate(lines, start=1):
        sample_id = line.strip()
        if not sample_id:
            continue
        check_sample_id(sample_id, f"{path}, line {number}")
        if sample_id in first_line:
            raise ValueError(
                f"{path}, line {number}: the sample id {sample_id!r} is listed twice (first on line "
                f"{first_line[sample_id]}); a sample must be converted once."
            )
        first_line[sample_id] = number
        ids.append(sample_id)
    if not ids:
        raise ValueError(f"The split list {path} is empty.")
    return ids


@dataclass(frozen=True)
class DatasetSource:
    """What `convert` needs to know about one raw dataset archive.

    Args:
        name: the dataset's name in its metadata and the command line (`pascal-context`).
        title: the title of the dataset card.
        archive: the folder name of the extracted archive (`PASCALContext`); `convert` accepts it or its parent.
        root_markers: paths inside the archive folder that identify it (checked to exist).
        split_lists: split -> path of its id list inside the archive folder (one id per line); its keys are the
            source's splits.
        tasks: the task columns: preset task names of `task_definitions` or tasks declared in `task_kinds` (stored
            presets first, in their canonical order).
        class_names: segmentation task -> class names, in id order (every segmentation task, no other).
        train_size, eval_size: (height, width) of the training crop and the evaluation canvas.
        boundary_tolerance: the boundary scorer's matching tolerance, a fraction of the image diagonal.
        card_body: markdown for the card: what the source is and how its labels are derived. The column
            encodings, class names and sizes follow, generated from the description.
        card_licence: markdown closing the card: the licence terms and the citation.
        make_row: picklable `(root, split, sample_id) -> row` of the schema's columns; raises
            `writer.RawDataError` (use `writer.read_raw`) for a missing or bad raw file.
        license_id: the licence id of the card's YAML header (a Hub licence identifier).
        read_split_ids: optional `(root, split) -> ids` for archives without one-id-per-line lists; the ids
            are checked like those of a list file.
        task_kinds: the declaration (`{"kind": ..., parameter: value}`) of every task that is not a preset.
        geometry: the transform geometry of the dataset when it is not the protocol's (`transforms.check_geometry`).
    """

    name: str
    title: str
    archive: str
    root_markers: tuple[str, ...]
    split_lists: Mapping[str, str]
    tasks: tuple[str, ...]
    class_names: Mapping[str, Sequence[str]]
    train_size: tuple[int, int]
    eval_size: tuple[int, int]
    boundary_tolerance: float
    card_body: str
    card_licence: str
    make_row: Callable[[Path, str, str], dict]
    license_id: str = "other"
    read_split_ids: Optional[Callable[[Path, str], list[str]]] = field(default=None)
    task_kinds: Mapping[str, Mapping] = field(default_factory=dict)
    geometry: Optional[Mapping] = None

    def __post_init__(self):
        where = f"DatasetSource {self.name!r}"
        for task in self.tasks:
            check_task_name(task, where=f"task of the {self.name!r} source")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"{where}: `tasks` has duplicates: {list(self.tasks)}.")
        declarations = {task: self.task_kinds.get(task, PRESET_TASKS.get(task)) for task in self.tasks}
        undeclared = [task for task, declared in declarations.items() if not declared]
        if undeclared:
            raise ValueError(
                f"{where}: Task {undeclared[0]!r} is not one of the preset tasks ({', '.join(PRESET_TASKS)}); "
                "declare its kind in `task_kinds`."
            )
        segmentation = {task for task, declared in declarations.items() if declared.get("kind") == "segmentation"}
        if set(self.class_names) != segmentation:
            raise ValueError(f"{where}: `class_names` must name exactly the segmentation tasks {sorted(segmentation)}.")
        unknown = set(self.split_lists) - set(SPLITS)
        if unknown or not self.split_lists:
            raise ValueError(f"{where}: `split_lists` must map some of the splits {list(SPLITS)}, got {list(self.split_lists)}.")
        for size in (self.train_size, self.eval_size):
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise ValueError(f"{where}: sizes must be (height, width) of positive integers, got {size!r}.")
        try:
            self.task_specs  # every declaration and class list, checked now rather than after a conversion
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def find_root(self, raw_dir) -> Path:
        """The archive folder: `raw_dir` itself or its `<archive>/` subfolder."""
        raw_dir = Path(raw_dir)
        for root in (raw_dir / self.archive, raw_dir):
            if all((root / marker).exists() for marker in self.root_markers):
                return root
        expected = " and ".join(f"{marker}/" for marker in self.root_markers)
        raise FileNotFoundError(
            f"{raw_dir} is not an extracted {self.archive} archive: expected {expected} in it (or in its "
            f"{self.archive}/ subfolder)."
        )

    def split_ids(self, root: Path, split: str) -> list[str]:
        """The checked sample ids of `split`, in stored order."""
        if split not in self.split_lists:
            raise ValueError(f"The {self.name} source has no {split!r} split (it has {list(self.split_lists)}).")
        if self.read_split_ids is None:
            return read_id_list(Path(root) / self.split_lists[split])
        ids = list(self.read_split_ids(Path(root), split))
        where = f"{self.name} {split!r} split"
        for sample_id in ids:
            check_sample_id(sample_id, where)
        duplicates = sorted(sample_id for sample_id, count in Counter(ids).items() if count > 1)
        if duplicates:
            raise ValueError(f"{where}: the sample ids {duplicates[:5]} are listed more than once.")
        if not ids:
            raise ValueError(f"{where}: no sample ids.")
        return ids

    def finalize(self, split_sizes: dict) -> tuple[dict, str]:
        """The metadata and the dataset card of a converted dataset with these split sizes."""
        metadata = build_metadata(
            self.name, self.task_specs, self.train_size, self.eval_size, self.boundary_tolerance, split_sizes,
            geometry=self.geometry,
        )  # fmt: skip
        card = render_card(
            metadata, build_features(self.task_specs), self.title, self.card_body, self.license_id, self.card_licence
        )
        return metadata, card

    @property
    def task_specs(self) -> dict:
        """The source's tasks (presets of the protocol) with its class names."""
        return {task: make_task_spec(task, self.task_kinds.get(task), self.class_names.get(task)) for task in self.tasks}


def check_disjoint_splits(split_ids: Mapping[str, Sequence[str]], where: str) -> None:
    """Refuse a sample listed in two splits (a validation score on training samples would be silently wrong)."""
    splits = list(split_ids)
    for i, first in enumerate(splits):
        first_ids = set(split_ids[first])
        for second in splits[i + 1 :]:
            shared = [sample_id for sample_id in split_ids[second] if sample_id in first_ids]
            if shared:
                raise ValueError(
                    f"{where}: {len(shared)} sample id(s) are in both the {first!r} and the {second!r} split "
                    f"(e.g. {shared[:5]}); the splits must be disjoint."
                )


def convert(
    source: DatasetSource,
    raw_dir,
    output_dir,
    num_workers: Optional[int] = None,
    on_error: str = "stop",
    overwrite: bool = False,
    splits: Sequence[str] = SPLITS,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert the extracted archive of `source` at `raw_dir` to a dataset folder at `output_dir`.

    Args:
        num_workers: conversion processes (None = all cores); the output does not depend on it.
        on_error: "stop" at the first missing/corrupt raw file (nothing is written), or "skip" such samples.
        overwrite: replace an existing `output_dir`.
        splits: the splits to convert.
        max_shard_bytes: a parquet shard ends once its rows hold this many bytes (or 1000 rows).
    """
    root = source.find_root(raw_dir)
    split_ids = {split: source.split_ids(root, split) for split in splits}
    check_disjoint_splits(split_ids, f"{source.title} at {root}")
    return write_dataset(
        output_dir, split_ids, partial(source.make_row, root), source.task_specs, source.finalize,
        num_workers=num_workers, on_error=on_error, overwrite=overwrite, description=source.title,
        max_shard_bytes=max_shard_bytes,
    )  # fmt: skip
