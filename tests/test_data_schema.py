"""Dataset metadata loading, Hub access in offline mode, and pushing guards."""

import json

import huggingface_hub.constants
import pytest

from modeling_taskexpert.data import (
    DatasetNotAvailableError,
    has_dataset_metadata,
    load_multitask_dataset,
    push_dataset_to_hub,
    read_dataset_metadata,
)
from modeling_taskexpert.data.__main__ import main


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _metadata_folder(tmp_path, **changes):
    folder = tmp_path / "dataset"
    folder.mkdir()
    metadata = {"name": "x", "tasks": {"semseg": {"id2label": {"0": "a", "1": "b"}}}, "train_size": [8, 8],
                "eval_size": [8, 8], "boundary_tolerance": 0.01, "splits": {"train": 1}}  # fmt: skip
    metadata.update(changes)
    (folder / "dense_multitask_dataset.json").write_text(json.dumps(metadata))
    return folder


def test_hub_id_offline_says_to_convert_first(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(
        DatasetNotAvailableError, match=r"(?s)'someone/some-dataset'.*offline mode.*Convert or generate"
    ):
        read_dataset_metadata("someone/some-dataset")


def test_missing_folder_or_metadata_is_explained(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="missing/deeper does not exist. Create it first"):
        read_dataset_metadata(tmp_path / "missing" / "deeper")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotAvailableError, match="dense_multitask_dataset.json is missing"):
        read_dataset_metadata(tmp_path / "empty")


def test_malformed_metadata_names_the_field(tmp_path):
    folder = _metadata_folder(tmp_path, train_size=[8])
    with pytest.raises(ValueError, match="'train_size' must be \\[height, width\\]"):
        read_dataset_metadata(folder)
    (folder / "dense_multitask_dataset.json").write_text(json.dumps({"name": "x", "tasks": {"depht": {}}}))
    with pytest.raises(ValueError, match="lacks the keys"):
        read_dataset_metadata(folder)


def test_unknown_split_is_rejected(tmp_path):
    folder = _metadata_folder(tmp_path)
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        load_multitask_dataset(folder, "test")
    with pytest.raises(ValueError, match="has no 'validation' split"):
        load_multitask_dataset(folder, "validation")


def test_push_offline_fails_before_uploading(offline, tmp_path, capsys):
    folder = _metadata_folder(tmp_path)
    with pytest.raises(DatasetNotAvailableError, match="no dataset card"):
        push_dataset_to_hub(folder, "someone/x")
    (folder / "README.md").write_text("---\n---\n")
    with pytest.raises(ConnectionError, match="offline mode"):
        push_dataset_to_hub(folder, "someone/x")
    assert main(["push", str(folder), "--repo-id", "someone/x"]) == 1
    assert "offline mode" in capsys.readouterr().err


def test_two_folders_with_the_same_name_never_share_a_cache(tmp_path):
    """`datasets` caches local folders by name; loading must still return each folder's own rows."""
    from modeling_taskexpert.data import generate_synthetic_dataset, load_multitask_dataset

    first, second = tmp_path / "a" / "synthetic", tmp_path / "b" / "synthetic"
    generate_synthetic_dataset(first, train_size=2, val_size=1, image_size=32, num_workers=0)
    generate_synthetic_dataset(second, train_size=3, val_size=1, image_size=32, num_workers=0)
    assert len(load_multitask_dataset(first, "train")) == 2
    assert len(load_multitask_dataset(second, "train")) == 3


def test_metadata_under_its_earlier_name_is_read(tmp_path):
    """Folders written before the rename hold `taskexpert_dataset.json`; the current name wins when both exist."""
    folder = _metadata_folder(tmp_path)
    (folder / "dense_multitask_dataset.json").rename(folder / "taskexpert_dataset.json")
    assert read_dataset_metadata(folder)["name"] == "x"
    assert has_dataset_metadata(folder)
    current = json.loads((folder / "taskexpert_dataset.json").read_text()) | {"name": "current"}
    (folder / "dense_multitask_dataset.json").write_text(json.dumps(current))
    assert read_dataset_metadata(folder)["name"] == "current"


def test_hub_repository_with_the_earlier_metadata_name(tmp_path, monkeypatch):
    """A Hub dataset pushed before the rename is read through its `taskexpert_dataset.json`."""
    from modeling_taskexpert.data import schema

    legacy = _metadata_folder(tmp_path) / "taskexpert_dataset.json"
    (legacy.parent / "dense_multitask_dataset.json").rename(legacy)
    requested = []

    def fake_download(repo_id, filename, repo_type):
        requested.append(filename)
        if filename != "taskexpert_dataset.json":
            raise FileNotFoundError(f"{filename} is not in {repo_id}")
        return str(legacy)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert schema.read_dataset_metadata("someone/old-dataset")["name"] == "x"
    assert requested == ["dense_multitask_dataset.json", "taskexpert_dataset.json"]
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DatasetNotAvailableError, match="Cannot get 'dense_multitask_dataset.json'"):
        schema.read_dataset_metadata("someone/old-dataset")


def test_a_missing_local_looking_folder_is_a_local_error_at_once(tmp_path, monkeypatch):
    """`data/pascal-context` (the recipes' folder) is never looked up on the Hub, with or without a `data/` folder;
    nor is `x/y` when `x/` is a local folder. The message names the conversion commands and docs/data.md."""
    import modeling_taskexpert.data.schema as schema

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(schema, "_hub_metadata_path", lambda repo_id: pytest.fail(f"looked up {repo_id} on the Hub"))
    for path in ("data/pascal-context", "outputs/thing"):
        if path.startswith("outputs"):
            (tmp_path / "outputs").mkdir()
        with pytest.raises(DatasetNotAvailableError, match=f"{path} does not exist.*docs/data.md"):
            read_dataset_metadata(path)


def test_the_cache_keeps_one_entry_per_content_in_use(tmp_path, monkeypatch):
    """Round-3 probe: the cache key held the path, size and mtime of the shards, so every regeneration, copy or touch
    added a full copy (2 entries, 118 MB -> 17 entries, 481 MB in an afternoon). Keyed by content: a copy and a touch
    reuse the entry, a regenerated folder replaces its own superseded entry."""
    import os
    import shutil

    import datasets

    from modeling_taskexpert.data import generate_synthetic_dataset, load_multitask_dataset
    from modeling_taskexpert.data.schema import CACHE_SUBDIR

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / CACHE_SUBDIR

    def entries():
        return sorted(path.name for path in root.iterdir() if path.is_dir())

    folder = tmp_path / "data" / "synthetic"
    generate_synthetic_dataset(folder, train_size=2, val_size=1, image_size=32, num_workers=0)
    assert len(load_multitask_dataset(folder, "train")) == 2
    first = entries()
    assert len(first) == 1
    for shard in folder.glob("data/*.parquet"):  # a touch: same content
        os.utime(shard)
    copy = tmp_path / "copy" / "synthetic"
    shutil.copytree(folder, copy)  # a copy: same content
    assert len(load_multitask_dataset(folder, "train")) == 2 and len(load_multitask_dataset(copy, "train")) == 2
    assert entries() == first
    generate_synthetic_dataset(folder, train_size=3, val_size=1, image_size=32, num_workers=0, overwrite=True)
    assert len(load_multitask_dataset(folder, "train")) == 3
    # The regenerated folder's old entry is gone; the copy (another folder, the old content) keeps its own.
    assert len(entries()) == 2 and first[0] in entries()
    generate_synthetic_dataset(copy, train_size=4, val_size=1, image_size=32, num_workers=0, overwrite=True)
    assert len(load_multitask_dataset(copy, "train")) == 4
    assert len(entries()) == 2 and first[0] not in entries()
