"""The dataset schema shared by every source: features, metadata file, dataset card, loading, pushing.

A dataset is a folder in the Hub's dataset layout (see `docs/architecture.md`): a card
`README.md` whose YAML `configs` point at `data/<split>-XXXXX-of-YYYYY.parquet`, and the metadata
file `taskexpert_dataset.json` (tasks, class names, input sizes, split sizes). The same folder
loads with `datasets.load_dataset(folder)` and can be pushed to the Hub as it is.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import datasets
import yaml

from ..task_definitions import TASKS, check_task_name

METADATA_FILENAME = "taskexpert_dataset.json"
CARD_FILENAME = "README.md"
DATA_DIRNAME = "data"
SPLITS = ("train", "validation")
METADATA_KEYS = ("name", "tasks", "train_size", "eval_size", "boundary_tolerance", "splits")


class DatasetNotAvailableError(FileNotFoundError):
    """A dataset (or its metadata) cannot be found locally and cannot be fetched."""


def ordered_tasks(tasks) -> list[str]:
    """Validate task names and return them in the canonical order of `task_definitions.TASKS`."""
    tasks = list(tasks)
    for task in tasks:
        check_task_name(task)
    return [task for task in TASKS if task in tasks]


def build_features(tasks) -> datasets.Features:
    """Features of a dataset with the given tasks: `id`, `image`, then one `Image()` per task."""
    features = {"id": datasets.Value("string"), "image": datasets.Image()}
    features.update({task: datasets.Image() for task in ordered_tasks(tasks)})
    return datasets.Features(features)


def build_metadata(name, task_labels, train_size, eval_size, boundary_tolerance, split_sizes) -> dict:
    """The content of `taskexpert_dataset.json`.

    `task_labels` maps every task of the dataset to its class names (a list, segmentation tasks)
    or None; class names are stored as `id2label` with string keys, as in model configs.
    """
    tasks = {}
    for task in ordered_tasks(task_labels):
        names = task_labels[task]
        tasks[task] = {} if names is None else {"id2label": {str(i): label for i, label in enumerate(names)}}
    return {
        "name": name,
        "tasks": tasks,
        "train_size": [int(v) for v in train_size],
        "eval_size": [int(v) for v in eval_size],
        "boundary_tolerance": float(boundary_tolerance),
        "splits": {split: int(split_sizes[split]) for split in SPLITS if split in split_sizes},
    }


def validate_metadata(metadata: dict, source: str) -> dict:
    """Check the keys and task names of a metadata dict read from `source`; return it."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{source}: dataset metadata lacks the keys {missing}; expected {list(METADATA_KEYS)}.")
    for task in metadata["tasks"]:
        check_task_name(task, where=f"task in {source}")
    for key in ("train_size", "eval_size"):
        size = metadata[key]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(f"{source}: {key!r} must be [height, width] of positive integers, got {size!r}.")
    return metadata


def _looks_like_repo_id(value) -> bool:
    parts = str(value).split("/")
    return len(parts) == 2 and all(parts) and not str(value).startswith((".", "/", "~"))


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


def load_dataset_metadata(path_or_repo_id) -> dict:
    """Read `taskexpert_dataset.json` of a local dataset folder or a Hub dataset repository."""
    if os.path.isdir(path_or_repo_id):
        metadata_path = os.path.join(path_or_repo_id, METADATA_FILENAME)
        if not os.path.isfile(metadata_path):
            raise DatasetNotAvailableError(
                f"{path_or_repo_id} is not a TaskExpert dataset folder: {METADATA_FILENAME} is missing. "
                "Create one with `python -m modeling_taskexpert.data synthetic|pascal-context|nyud ...`."
            )
    elif _looks_like_repo_id(path_or_repo_id):
        metadata_path = _download_from_hub(str(path_or_repo_id), METADATA_FILENAME)
    else:
        raise DatasetNotAvailableError(
            f"{path_or_repo_id!r} is neither an existing dataset folder nor a Hub repository id ('user/name')."
        )
    try:
        with open(metadata_path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{metadata_path}: cannot read the dataset metadata ({error}).") from error
    return validate_metadata(metadata, str(metadata_path))


def _folder_fingerprint(folder: Path) -> str:
    """A hash of the absolute path, size and modification time of every shard of a dataset folder."""
    digest = hashlib.sha256()
    for shard in sorted(folder.resolve().glob("data/*.parquet")):
        stat = shard.stat()
        digest.update(f"{shard}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_multitask_dataset(path_or_repo_id, split: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Load one split (`train` or `validation`) of a dataset folder or Hub dataset repository.

    `cache_dir` is where `datasets` caches the prepared split (default: its usual cache).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the splits of the schema are {list(SPLITS)}.")
    metadata = load_dataset_metadata(path_or_repo_id)
    if split not in metadata["splits"]:
        raise ValueError(f"{path_or_repo_id}: the dataset has no {split!r} split (it has {list(metadata['splits'])}).")
    local = Path(str(path_or_repo_id))
    if cache_dir is None and local.is_dir():
        # `datasets` keys the cache of a local parquet folder by the folder's name only, so two folders named alike
        # (or a folder rewritten in place) would share a stale cache. Key it by the shards' identity instead.
        cache_dir = str(Path(datasets.config.HF_DATASETS_CACHE) / "taskexpert" / _folder_fingerprint(local))
    try:
        dataset = datasets.load_dataset(str(path_or_repo_id), split=split, cache_dir=cache_dir)
    except Exception as error:
        cause = error
        while cause.__cause__ is not None:  # `datasets` wraps the real reason (e.g. a shard's wrong columns)
            cause = cause.__cause__
        reason = f"{type(error).__name__}: {error}" + (
            f"; cause: {type(cause).__name__}: {' '.join(str(cause).split())[:600]}" if cause is not error else ""
        )
        raise DatasetNotAvailableError(f"Cannot load the {split!r} split of {path_or_repo_id} ({reason}).") from error
    expected = set(build_features(metadata["tasks"]))
    if set(dataset.column_names) != expected:
        raise ValueError(
            f"{path_or_repo_id}: the {split!r} split has columns {sorted(dataset.column_names)}, but its metadata "
            f"describes {sorted(expected)}."
        )
    return dataset


def render_card(metadata: dict, features: datasets.Features, title: str, body: str, license_id: str) -> str:
    """The dataset card: YAML header (configs, features, split sizes, licence) and a markdown body.

    The body should describe the source, its licence and citation, and the label encodings; the
    class names of every segmentation task are appended from the metadata.
    """
    header = {
        "pretty_name": title,
        "license": license_id,
        "task_categories": ["image-segmentation", "depth-estimation"],
        "tags": ["multi-task", "dense-prediction", "taskexpert"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"{DATA_DIRNAME}/{split}-*"} for split in metadata["splits"]],
            }
        ],
        "dataset_info": {"features": features._to_yaml_list()},
    }
    lines = [f"# {title}", "", body.strip(), "", "## Class names", ""]
    for task, info in metadata["tasks"].items():
        if "id2label" in info:
            names = ", ".join(f"{i} {name}" for i, name in info["id2label"].items())
            lines += [f"- `{task}` ({len(info['id2label'])} classes, 255 = ignore): {names}", ""]
    lines += [
        "## Sizes",
        "",
        f"Splits: {', '.join(f'{split} {count}' for split, count in metadata['splits'].items())}. "
        f"Training crop {metadata['train_size'][0]}x{metadata['train_size'][1]}, evaluation canvas "
        f"{metadata['eval_size'][0]}x{metadata['eval_size'][1]} (H x W). Machine-readable metadata: "
        f"`{METADATA_FILENAME}`.",
        "",
    ]
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + "\n".join(lines)


SCHEMA_DESCRIPTION = """\
## Schema

| column | encoding |
|---|---|
| `id` | sample id of the source |
| `image` | RGB, 8-bit |
| `semseg` | 8-bit PNG, class id, 255 = ignore |
| `human_parts` | 8-bit PNG, part id (0 = background), 255 = ignore; empty (None) where the image has no annotated person |
| `saliency` | 8-bit PNG, {0, 1}, 255 = ignore |
| `normals` | RGB PNG, `n = 2 v / 255 - 1` per channel; (0, 0, 0) = invalid |
| `edge` | 8-bit PNG, {0, 1}, 255 = ignore |
| `depth` | float32 TIFF (mode `F`), metres, 0 = invalid |

Only the tasks of this dataset are columns. Load it with `datasets.load_dataset(<folder or repo id>)`
and train or evaluate with `modeling_taskexpert.data` (`load_multitask_dataset`, `build_transforms`,
`collate_dense_batch`)."""


def push_dataset_to_hub(folder, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Upload a dataset folder as it is to the Hub dataset repository `repo_id`; return its URL.

    The folder must be a complete dataset (its metadata file is written last). In offline mode
    the call fails before anything is uploaded.
    """
    from huggingface_hub import HfApi, is_offline_mode

    folder = Path(folder)
    load_dataset_metadata(folder)  # refuses folders that are not complete datasets
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
