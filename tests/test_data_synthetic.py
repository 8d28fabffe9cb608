"""The embedded synthetic benchmark: determinism, label consistency, schema round trip, CLI."""

import json
import platform
from pathlib import Path

import datasets
import numpy as np
import pytest

from modeling_taskexpert.data import generate_synthetic_dataset, read_dataset_metadata, load_multitask_dataset
from modeling_taskexpert.data.__main__ import main
from modeling_taskexpert.data.synthetic import SEMSEG_CLASSES, render_sample
from modeling_taskexpert.task_definitions import IGNORE_INDEX

SIZE = 48
PERSON, SKY = SEMSEG_CLASSES.index("person"), SEMSEG_CLASSES.index("sky")
SALIENT = [SEMSEG_CLASSES.index(name) for name in ("sphere", "box", "cylinder", "person")]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic") / "dataset"
    generate_synthetic_dataset(folder, train_size=8, val_size=3, image_size=SIZE, seed=3, num_workers=0)
    return folder


@pytest.fixture(scope="module")
def samples():
    """Decoded samples rendered directly (more of them than the small dataset holds)."""
    return [render_sample(seed=11, split="train", index=i, image_size=64) for i in range(24)]


def _rows(folder, split, cache_dir):
    return list(load_multitask_dataset(folder, split, cache_dir=str(cache_dir)))


def test_load_dataset_round_trip(dataset_dir, tmp_path):
    loaded = datasets.load_dataset(str(dataset_dir), cache_dir=str(tmp_path))
    assert loaded["train"].num_rows == 8 and loaded["validation"].num_rows == 3
    assert set(loaded["train"].column_names) == {
        "id",
        "image",
        "semseg",
        "human_parts",
        "saliency",
        "edge",
        "normals",
        "depth",
    }
    row = loaded["validation"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (SIZE, SIZE)
    assert row["depth"].mode == "F" and row["normals"].mode == "RGB" and row["semseg"].mode == "L"

    metadata = read_dataset_metadata(dataset_dir)
    assert metadata["splits"] == {"train": 8, "validation": 3}
    assert metadata["train_size"] == metadata["eval_size"] == [SIZE, SIZE]
    assert metadata["tasks"]["semseg"]["id2label"] == {str(i): name for i, name in enumerate(SEMSEG_CLASSES)}
    assert list(metadata["tasks"]["human_parts"]["id2label"].values())[1:] == [
        "head",
        "torso",
        "uarm",
        "larm",
        "uleg",
        "lleg",
    ]
    card = (dataset_dir / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: default" in card and "path: data/train-*" in card


def test_same_output_for_any_worker_count(dataset_dir, tmp_path):
    other = tmp_path / "again"
    generate_synthetic_dataset(other, train_size=8, val_size=3, image_size=SIZE, seed=3, num_workers=2)
    for split in ("train", "validation"):
        first, second = _rows(dataset_dir, split, tmp_path / "c1"), _rows(other, split, tmp_path / "c2")
        assert [r["id"] for r in first] == [r["id"] for r in second]
        for a, b in zip(first, second):
            for column in ("image", "semseg", "normals", "edge", "depth", "human_parts"):
                if a[column] is None:
                    assert b[column] is None
                else:
                    np.testing.assert_array_equal(np.asarray(a[column]), np.asarray(b[column]))


def test_seed_and_split_change_the_scenes():
    base = render_sample(seed=0, split="train", index=0, image_size=32)["image"]
    assert not np.array_equal(base, render_sample(seed=1, split="train", index=0, image_size=32)["image"])
    assert not np.array_equal(base, render_sample(seed=0, split="validation", index=0, image_size=32)["image"])
    assert np.array_equal(base, render_sample(seed=0, split="train", index=0, image_size=32)["image"])


def test_normals_and_depth_are_consistent(samples):
    for sample in samples:
        raw = sample["normals"].astype(np.float64)
        valid = ~(sample["normals"] == 0).all(axis=-1)
        normals = 2 * raw / 255 - 1
        lengths = np.linalg.norm(normals[valid], axis=-1)
        # 8-bit quantisation moves each component by at most 1/255.
        assert np.all(np.abs(lengths - 1) < 0.01)
        np.testing.assert_array_equal(valid, sample["depth"] > 0)
        np.testing.assert_array_equal(valid, sample["semseg"] != SKY)
        assert sample["depth"].dtype == np.float32 and np.all(sample["depth"][valid] < 40)


def test_floor_normals_point_up_in_the_camera_frame(samples):
    # The camera looks slightly down at a level floor: floor normals have y > 0 (y up) and z > 0
    # (the floor faces the camera), x small (camera roll is zero).
    floor = SEMSEG_CLASSES.index("floor")
    for sample in samples:
        normals = 2 * sample["normals"].astype(np.float64) / 255 - 1
        on_floor = normals[sample["semseg"] == floor]
        assert np.all(on_floor[:, 1] > 0.9) and np.all(on_floor[:, 2] > 0) and np.all(np.abs(on_floor[:, 0]) < 0.01)


def test_edges_are_one_sided_occlusion_boundaries(samples):
    for sample in samples:
        semseg, edge, instance = sample["semseg"], sample["edge"].astype(bool), sample["instance"]
        distance = np.where(sample["depth"] > 0, sample["depth"], np.inf)
        assert set(np.unique(sample["edge"])) <= {0, 1}
        has_other_neighbour = np.zeros_like(edge)
        for first, second in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                              ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):  # fmt: skip
            # Every instance change (so every class change) is marked on the nearer pixel.
            changes = instance[first] != instance[second]
            assert np.all(changes[semseg[first] != semseg[second]])
            nearer_is_first = distance[first] < distance[second]
            nearer_is_second = distance[second] < distance[first]
            assert np.all(edge[first][changes & nearer_is_first]) and np.all(edge[second][changes & nearer_is_second])
            assert np.all((edge[first] | edge[second])[changes])
            has_other_neighbour[first] |= changes
            has_other_neighbour[second] |= changes
        assert not np.any(edge & ~has_other_neighbour)  # nothing marked inside a region


def test_parts_and_saliency_follow_the_semantics(samples):
    with_figures = 0
    for sample in samples:
        person = sample["semseg"] == PERSON
        if sample["human_parts"] is None:
            assert not person.any()
            continue
        with_figures += 1
        parts = sample["human_parts"]
        np.testing.assert_array_equal(parts > 0, person)
        assert parts.max() <= 6 and IGNORE_INDEX not in parts
        np.testing.assert_array_equal(sample["saliency"], np.isin(sample["semseg"], SALIENT).astype(np.uint8))
    assert with_figures >= 5  # figures are common enough to learn the part task


def test_cli_generates_and_skips_existing(tmp_path, capsys):
    output = tmp_path / "cli"
    args = ["synthetic", "--output-dir", str(output), "--train-size", "2", "--val-size", "1", "--image-size", "32",
            "--num-workers", "0"]  # fmt: skip
    assert main(args) == 0
    metadata = json.loads((output / "dense_multitask_dataset.json").read_text())
    assert metadata["splits"] == {"train": 2, "validation": 1} and metadata["train_size"] == [32, 32]
    stamp = (output / "dense_multitask_dataset.json").stat().st_mtime_ns

    assert main(args + ["--skip-if-exists"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (output / "dense_multitask_dataset.json").stat().st_mtime_ns == stamp

    assert main(args) == 2  # exists, and no --overwrite: bad input
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--train-size", "3"]) == 0
    assert json.loads((output / "dense_multitask_dataset.json").read_text())["splits"]["train"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temporary folders left


def test_invalid_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_dataset(tmp_path / "x", train_size=1, val_size=1, image_size=4)
    assert not (tmp_path / "x").exists()


def test_figures_are_large_enough_for_their_parts_to_be_learnable(samples):
    """Figures stand close to the camera, in its view: where one is visible, its parts cover several percent of the
    image (at 1-2 % a small model predicts background everywhere), and every part group appears."""
    part_maps = [sample["human_parts"] for sample in samples if sample["human_parts"] is not None]
    assert len(part_maps) >= len(samples) // 2
    assert np.mean([(parts > 0).mean() for parts in part_maps]) > 0.03
    assert set(np.unique(np.concatenate([parts.ravel() for parts in part_maps]))) == set(range(7))


# ----------------------------------------------------------------------------- pinned scenes

PINNED_SCENES = Path(__file__).resolve().parent / "fixtures" / "pinned_synthetic.npz"
PINNED_SAMPLES = [("train", 0), ("train", 1), ("train", 2), ("validation", 0)]


def _scene_machine() -> str:
    """What decides whether float rendering is bit for bit the same (numpy build, CPU architecture and SIMD family)."""
    import torch

    return json.dumps(
        {"numpy": np.__version__, "arch": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability()}
    )


def _pinned_scene_arrays() -> dict:
    arrays = {}
    for split, index in PINNED_SAMPLES:
        sample = render_sample(seed=5, split=split, index=index, image_size=40)
        arrays.update({f"{split}/{index}/{key}": value for key, value in sample.items() if value is not None})
    return arrays


def test_rendered_scenes_match_the_pinned_copy():
    """Refactors of the generator keep its scenes: bit for bit on a machine like the one that made the copy
    (regenerate only for an intended change: `python tests/test_data_synthetic.py`); elsewhere float rounding may
    move a pixel at a shading or silhouette threshold, so at most 0.5 % of the values of a map may differ."""
    with np.load(PINNED_SCENES, allow_pickle=False) as stored:
        stored = dict(stored)
    exact = str(stored.pop("machine")) == _scene_machine()
    actual = _pinned_scene_arrays()
    assert sorted(actual) == sorted(stored)
    assert any(key.endswith("/human_parts") for key in stored)  # a figure is among the pinned scenes
    for key, expected in stored.items():
        assert actual[key].dtype == expected.dtype and actual[key].shape == expected.shape, key
        if exact:
            np.testing.assert_array_equal(actual[key], expected, err_msg=key)
        else:
            assert np.mean(actual[key] != expected) <= 0.005, key


if __name__ == "__main__":
    np.savez_compressed(PINNED_SCENES, machine=np.array(_scene_machine()), **_pinned_scene_arrays())
    print(f"wrote {PINNED_SCENES}")
