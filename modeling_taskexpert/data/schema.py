"""The dataset schema shared by every source: features, metadata file, dataset card, loading, pushing.

A dataset is a folder in the Hub's dataset layout (see `docs/architecture.md`): a card
`README.md` whose YAML `configs` point at `data/<split>-XXXXX-of-YYYYY.parquet`, and the metadata
file `dense_multitask_dataset.json` (tasks, class names, input sizes, split sizes), read by
`read_dataset_metadata`. The same folder loads with `datasets.load_dataset(folder)` and can be
pushed to the Hub as it is.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

import datasets
import yaml

from ..file_utils import looks_like_repo_id, write_json_atomic
from ..task_definitions import IGNORE_INDEX, KINDS, PRESET_TASKS, TaskSpec, as_specs, check_task_name, make_task_spec
from .labels import CODECS

METADATA_FILENAME = "dense_multitask_dataset.json"
# The package's convention for local dataset folders (`data/<name>`, as the recipes name them): never a Hub id.
LOCAL_DATA_ROOT = "data"
# Earlier name of the metadata file (it named one model; the datasets serve both); still read, never written.
LEGACY_METADATA_FILENAME = "taskexpert_dataset.json"
CARD_FILENAME = "README.md"
DATA_DIRNAME = "data"
SPLITS = ("train", "validation")
METADATA_KEYS = ("name", "tasks", "train_size", "eval_size", "boundary_tolerance", "splits")


class DatasetNotAvailableError(FileNotFoundError):
    """A dataset (or its metadata) cannot be found locally and cannot be fetched."""


def ordered_tasks(tasks) -> list[str]:
    """Task names in the stored column order: the protocol's preset tasks in their canonical order, then any other
    task in the order given."""
    tasks = list(tasks)
    for task in tasks:
        check_task_name(task)
    return [task for task in PRESET_TASKS if task in tasks] + [task for task in tasks if task not in PRESET_TASKS]


def as_task_specs(tasks) -> dict[str, TaskSpec]:
    """{task: TaskSpec} in stored column order, from such a mapping or from preset task names."""
    specs = as_specs(tasks)
    return {task: specs[task] for task in ordered_tasks(specs)}


def dataset_task_specs(metadata: Mapping) -> dict[str, TaskSpec]:
    """Every task a dataset declares in its metadata, as a `TaskSpec`, in stored order. A task entry is the task's
    declaration (`{"kind": ..., parameter: value, "id2label": {...}, "column": ...}`); an entry without `kind` (as
    written before task kinds) is the preset of the task's name with the entry's class names."""
    specs = {}
    for task, entry in metadata["tasks"].items():
        entry = dict(entry or {})
        id2label = entry.pop("id2label", None)
        declaration = entry if "kind" in entry else ({**PRESET_TASKS[task], **entry} if task in PRESET_TASKS else entry)
        if not declaration.get("kind"):
            raise ValueError(
                f"Task {task!r} is not a preset task ({', '.join(PRESET_TASKS)}) and its metadata entry has no "
                f"'kind' (one of {', '.join(KINDS)})."
            )
        specs[task] = make_task_spec(task, declaration, id2label)
    return {task: specs[task] for task in ordered_tasks(specs)}


def task_columns(metadata: Mapping) -> dict[str, str]:
    """The dataset column of every task (the task's name unless its entry names a `column`)."""
    return {task: (entry or {}).get("column", task) for task, entry in metadata["tasks"].items()}


def build_features(tasks, columns: Optional[Mapping[str, str]] = None) -> datasets.Features:
    """Features of a dataset with the given tasks (a {task: TaskSpec} mapping, or preset task names): `id`, `image`,
    then one column per task with its kind's storage feature."""
    columns = columns or {}
    features = {"id": datasets.Value("string"), "image": datasets.Image()}
    for task, spec in as_task_specs(tasks).items():
        features[columns.get(task, task)] = CODECS[spec.kind.name].feature(spec)
    return datasets.Features(features)


def build_metadata(
    name,
    tasks,
    train_size,
    eval_size,
    boundary_tolerance,
    split_sizes,
    crop_balance_task: Optional[str] = None,
    geometry: Optional[Mapping] = None,
) -> dict:
    """The content of the metadata file (`METADATA_FILENAME`).

    `tasks` maps every task of the dataset to its `TaskSpec` (or lists preset task names); each is stored as its
    declaration, with the class names of a segmentation task as `id2label` (string keys, as in model configs).
    `crop_balance_task` names the segmentation task whose class balance guides the training crops (default: `semseg`
    when the dataset has it, as in the protocol). `geometry`: the dataset's transform geometry when it is not the
    protocol's (see `transforms.check_geometry`)."""
    stored = {}
    for task, spec in as_task_specs(tasks).items():
        entry = spec.declaration()
        if spec.class_names is not None:
            entry["id2label"] = {str(i): label for i, label in enumerate(spec.class_names)}
        stored[task] = entry
    metadata = {
        "name": name,
        "tasks": stored,
        "train_size": [int(v) for v in train_size],
        "eval_size": [int(v) for v in eval_size],
        "boundary_tolerance": float(boundary_tolerance),
        "splits": {split: int(split_sizes[split]) for split in SPLITS if split in split_sizes},
    }
    if crop_balance_task is not None:
        metadata["crop_balance_task"] = crop_balance_task
    if geometry is not None:
        metadata["geometry"] = dict(geometry)
    return metadata


def crop_balance_task(metadata: Mapping) -> Optional[str]:
    """The segmentation task whose class balance guides the random training crops, if any."""
    task = metadata.get("crop_balance_task", "semseg")
    return task if task in metadata["tasks"] else None


def validate_metadata(metadata: dict, source: str) -> dict:
    """Check the keys and task declarations of a metadata dict read from `source`; return it."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{source}: dataset metadata lacks the keys {missing}; expected {list(METADATA_KEYS)}.")
    if not isinstance(metadata["tasks"], dict) or not metadata["tasks"]:
        raise ValueError(f"{source}: 'tasks' must map task names to their declarations, got {metadata['tasks']!r}.")
    try:
        specs = dataset_task_specs(metadata)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    balance = metadata.get("crop_balance_task")
    if balance is not None and (balance not in specs or specs[balance].kind.name != "segmentation"):
        raise ValueError(f"{source}: 'crop_balance_task' must name a segmentation task of the dataset, got {balance!r}.")
    for key in ("train_size", "eval_size"):
        size = metadata[key]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(f"{source}: {key!r} must be [height, width] of positive integers, got {size!r}.")
    return metadata


def _download_from_hub(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download, is_offline_mode

    try:
        return hf_hub_download(repo_id, filename, repo_type="dataset")
    except Exception as error:  # offline, unknown repository, missing file, network failure
        hint = (
            "The Hub is in offline mode (HF_HUB_OFFLINE=1) and the file is not in the local cache. "
            if is_offline_mode()
            else ""
        )
        raise DatasetNotAvailableError(
            f"Cannot get {filename!r} of the Hub dataset {repo_id!r} ({type(error).__name__}: {error}). {hint}"
            "Convert or generate the dataset into a local folder first (`python -m modeling_taskexpert.data "
            "--help`) and pass that folder, or download the dataset while online."
        ) from error


def _hub_metadata_path(repo_id: str) -> str:
    """The metadata file of a Hub dataset repository, under its current name or else its earlier one."""
    try:
        return _download_from_hub(repo_id, METADATA_FILENAME)
    except DatasetNotAvailableError as error:
        try:
            return _download_from_hub(repo_id, LEGACY_METADATA_FILENAME)
        except DatasetNotAvailableError:
            raise error from None  # report the current name's failure


def has_dataset_metadata(folder) -> bool:
    """Whether the local `folder` holds a metadata file (under its current or earlier name)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in (METADATA_FILENAME, LEGACY_METADATA_FILENAME))


def read_dataset_metadata(path_or_repo_id) -> dict:
    """Read and validate the metadata of a local dataset folder or a Hub dataset repository.

    The file is `dense_multitask_dataset.json`; folders written by earlier versions hold it as
    `taskexpert_dataset.json`, which is read when the current name is absent.
    """
    if os.path.isdir(path_or_repo_id):
        candidates = [os.path.join(path_or_repo_id, name) for name in (METADATA_FILENAME, LEGACY_METADATA_FILENAME)]
        metadata_path = next((path for path in candidates if os.path.isfile(path)), None)
        if metadata_path is None:
            raise DatasetNotAvailableError(
                f"{path_or_repo_id} is not a dense multi-task dataset folder: {METADATA_FILENAME} is missing. "
                "Create one with `python -m modeling_taskexpert.data synthetic|pascal-context|nyud ...`."
            )
    elif looks_like_repo_id(path_or_repo_id) and Path(str(path_or_repo_id)).parts[0] != LOCAL_DATA_ROOT:
        metadata_path = _hub_metadata_path(str(path_or_repo_id))
    else:
        raise DatasetNotAvailableError(
            f"The dataset folder {path_or_repo_id} does not exist. Create it first: `python -m modeling_taskexpert.data "
            "synthetic|pascal-context|nyud|folder ... --output-dir <folder>` (docs/data.md says where the benchmark "
            "archives are published and gives the exact commands), or name a Hub dataset as 'user/name'."
        )
    try:
        with open(metadata_path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{metadata_path}: cannot read the dataset metadata ({error}).") from error
    return validate_metadata(metadata, str(metadata_path))


CACHE_SUBDIR = "taskexpert"
CACHE_INDEX = "index.json"


def _content_fingerprint(folder: Path, index: dict) -> str:
    """A hash of the names and contents of every shard of a dataset folder. The hash of each shard is remembered in
    `index` by (path, size, modification time), so a folder is read in full only when it changed."""
    digest = hashlib.sha256()
    shards = index.setdefault("shards", {})
    for shard in sorted(folder.resolve().glob("data/*.parquet")):
        status = shard.stat()
        key = f"{shard}|{status.st_size}|{status.st_mtime_ns}"
        if key not in shards:
            content = hashlib.sha256()
            with open(shard, "rb") as stream:
                while chunk := stream.read(16 * 1024 * 1024):
                    content.update(chunk)
            shards[key] = content.hexdigest()
        digest.update(f"{shard.name}|{shards[key]}\n".encode())
    return digest.hexdigest()[:16]


def _describes_a_current_file(key: str) -> bool:
    """Whether a shard memo key `path|size|mtime_ns` still describes the file at that path."""
    path, size, mtime = key.rsplit("|", 2)
    try:
        status = os.stat(path)
    except OSError:
        return False
    return str(status.st_size) == size and str(status.st_mtime_ns) == mtime


def local_dataset_cache(folder: Path) -> str:
    """The `datasets` cache folder of a local dataset folder, keyed by its content: a copy, a move or a touch of the
    folder reuses its entry, and a regenerated folder replaces its superseded entry (removed here), so the cache
    holds one entry per folder content in use. (`datasets` itself keys a local parquet folder by its name only, so
    two folders named alike would share a stale cache.)"""
    root = Path(datasets.config.HF_DATASETS_CACHE) / CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / CACHE_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}  # a memo only: rebuilt when missing or damaged
    key = _content_fingerprint(folder, index)
    source = str(folder.resolve())
    entries = index.setdefault("entries", {})
    for old_key, old in list(entries.items()):
        if old_key != key and old.get("source") == source:  # this folder's earlier content
            shutil.rmtree(root / old_key, ignore_errors=True)
            del entries[old_key]
    entries[key] = {"source": source}
    index["shards"] = {k: v for k, v in index["shards"].items() if _describes_a_current_file(k)}
    write_json_atomic(index_path, index)
    return str(root / key)


def load_multitask_dataset(
    path_or_repo_id, split: str, cache_dir: Optional[str] = None, streaming: bool = False
) -> Union[datasets.Dataset, datasets.IterableDataset]:
    """Load one split (`train` or `validation`) of a dataset folder or Hub dataset repository.

    `cache_dir` is where `datasets` caches the prepared split (default: its usual cache). `streaming`: an
    `IterableDataset` reading the parquet shards as it goes (nothing prepared or cached; see `data/streaming.py`).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the splits of the schema are {list(SPLITS)}.")
    metadata = read_dataset_metadata(path_or_repo_id)
    if split not in metadata["splits"]:
        raise ValueError(f"{path_or_repo_id}: the dataset has no {split!r} split (it has {list(metadata['splits'])}).")
    local = Path(str(path_or_repo_id))
    if cache_dir is None and local.is_dir() and not streaming:
        cache_dir = local_dataset_cache(local)
    try:
        dataset = datasets.load_dataset(str(path_or_repo_id), split=split, cache_dir=cache_dir, streaming=streaming)
    except Exception as error:
        cause = error
        while cause.__cause__ is not None:  # `datasets` wraps the real reason (e.g. a shard's wrong columns)
            cause = cause.__cause__
        reason = f"{type(error).__name__}: {error}" + (
            f"; cause: {type(cause).__name__}: {' '.join(str(cause).split())[:600]}" if cause is not error else ""
        )
        raise DatasetNotAvailableError(f"Cannot load the {split!r} split of {path_or_repo_id} ({reason}).") from error
    expected = set(build_features(dataset_task_specs(metadata), task_columns(metadata)))
    if set(dataset.column_names) != expected:
        raise ValueError(
            f"{path_or_repo_id}: the {split!r} split has columns {sorted(dataset.column_names)}, but its metadata "
            f"describes {sorted(expected)}."
        )
    return dataset


def _task_categories(specs: Mapping[str, TaskSpec]) -> list[str]:
    """The Hub task categories the dataset's tasks belong to."""
    categories = []
    for spec in specs.values():
        if spec.kind.hub_category and spec.kind.hub_category not in categories:
            categories.append(spec.kind.hub_category)
    return categories


def render_card(
    metadata: dict, features: datasets.Features, title: str, body: str, license_id: str, licence_text: str = ""
) -> str:
    """The dataset card: YAML header (configs, features, task categories, licence) and a markdown body.

    `body` describes the source and how its labels are derived; then come, from the metadata, the
    encoding of every column (from its task's kind), the class names of every segmentation column,
    the sizes and how to load the dataset; `licence_text` (licence and citation) closes the card.
    """
    specs = dataset_task_specs(metadata)
    columns = {column: task for task, column in task_columns(metadata).items()}
    header = {
        "pretty_name": title,
        "license": license_id,
        "task_categories": _task_categories(specs),
        "tags": ["multi-task", "dense-prediction", "taskexpert", "mod-squad"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"{DATA_DIRNAME}/{split}-*"} for split in metadata["splits"]],
            }
        ],
        "dataset_info": {"features": features._to_yaml_list()},
    }
    lines = [f"# {title}", "", body.strip(), "", "## Columns", "", "| column | task | stored as | values |", "|---|---|---|---|"]
    lines.append("| `id` |  | string | the sample id of the source |")
    lines.append("| `image` |  | RGB image, 8 bits per channel (JPEG or PNG) | the input photo |")
    for column in features:
        if column not in columns:
            continue
        spec = specs[columns[column]]
        what = f"{spec.name}: {spec.description or spec.kind.description} ({spec.kind.name})"
        values = spec.kind.stored_values(spec) + "; empty (None) where the sample has no label"
        lines.append(f"| `{column}` | {what} | {spec.kind.storage(spec)} | {values} |")
    lines += ["", "Maps are aligned pixel for pixel with the image (same height and width).", ""]
    segmentation = {task: spec.class_names for task, spec in specs.items() if spec.class_names is not None}
    if segmentation:
        lines += ["## Class names", ""]
    for task, class_names in segmentation.items():
        names = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
        lines += [f"- `{task}` ({len(class_names)} classes, {IGNORE_INDEX} = ignore): {names}", ""]
    lines += [
        "## Sizes",
        "",
        f"Splits: {', '.join(f'{split} {count}' for split, count in metadata['splits'].items())}. "
        f"Training crop {metadata['train_size'][0]}x{metadata['train_size'][1]}, evaluation canvas "
        f"{metadata['eval_size'][0]}x{metadata['eval_size'][1]} (H x W), boundary matching tolerance "
        f"{metadata['boundary_tolerance']} of the image diagonal. Machine-readable metadata: `{METADATA_FILENAME}`.",
        "",
        "## Loading",
        "",
        "`datasets.load_dataset(<folder or repo id>)` reads it as it is; to train or evaluate, use",
        "`modeling_taskexpert.data` (`load_multitask_dataset`, `read_dataset_metadata`, `build_transforms`,",
        "`collate_dense_batch`).",
        "",
    ]
    if licence_text:
        lines += [licence_text.strip(), ""]
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + "\n".join(lines)


def push_dataset_to_hub(folder, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Upload a dataset folder as it is to the Hub dataset repository `repo_id`; return its URL.

    The folder must be a complete dataset (its metadata file is written last). In offline mode
    the call fails before anything is uploaded.
    """
    from huggingface_hub import HfApi, is_offline_mode

    folder = Path(folder)
    read_dataset_metadata(folder)  # refuses folders that are not complete datasets
    if not (folder / CARD_FILENAME).is_file():
        raise DatasetNotAvailableError(f"{folder} has no dataset card {CARD_FILENAME}; it is not a complete dataset.")
    if is_offline_mode():
        raise ConnectionError(
            f"Cannot push {folder} to {repo_id!r}: the Hub is in offline mode (HF_HUB_OFFLINE=1). "
            "Unset HF_HUB_OFFLINE and make sure the Hub can be reached."
        )
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                      commit_message="Upload TaskExpert multi-task dataset")
    return str(url)
