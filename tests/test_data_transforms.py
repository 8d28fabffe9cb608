"""Training/evaluation transforms and the collate, on small hand-made datasets."""

import colorsys

import datasets
import numpy as np
import pytest
import torch

from modeling_taskexpert.data import IMAGE_MEAN, IMAGE_STD, build_transforms, collate_dense_batch
from modeling_taskexpert.data.labels import encode_depth, encode_png
from modeling_taskexpert.data.schema import build_features
from modeling_taskexpert.data.transforms import (
    flip_horizontal,
    photometric_distortion,
    rescale,
    resize_bilinear,
    rgb_to_hsv,
)

TASKS = ["semseg", "human_parts", "saliency", "edge", "normals", "depth"]
METADATA = {
    "name": "toy",
    "tasks": {"semseg": {"id2label": {"0": "a", "1": "b", "2": "c"}}, "human_parts": {"id2label": {"0": "bg", "1": "head"}},
              "saliency": {}, "edge": {}, "normals": {}, "depth": {}},
    "train_size": [24, 24], "eval_size": [32, 40], "boundary_tolerance": 0.01, "splits": {"train": 3},
}  # fmt: skip


def _raw_sample(rng, shape, with_parts=True):
    normals = rng.integers(1, 256, (*shape, 3), dtype=np.uint8)
    normals[0, 0] = 0  # invalid normal
    depth = rng.uniform(0.5, 5.0, shape).astype(np.float32)
    depth[0, 1] = 0.0  # invalid depth
    parts = rng.integers(0, 2, shape, dtype=np.uint8) if with_parts else None
    return {
        "image": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
        "semseg": rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), size=shape),
        "human_parts": parts,
        "saliency": rng.integers(0, 2, shape, dtype=np.uint8),
        "edge": rng.integers(0, 2, shape, dtype=np.uint8),
        "normals": normals,
        "depth": depth,
    }


def _dataset(raw_samples):
    rows = []
    for index, raw in enumerate(raw_samples):
        row = {"id": f"s{index}", "depth": encode_depth(raw["depth"])}
        row.update({key: None if raw[key] is None else encode_png(raw[key]) for key in raw if key != "depth"})
        rows.append(row)
    return datasets.Dataset.from_list(rows, features=build_features(TASKS))


@pytest.fixture()
def raw_samples():
    rng = np.random.default_rng(0)
    return [_raw_sample(rng, (20, 30)), _raw_sample(rng, (20, 30), with_parts=False), _raw_sample(rng, (18, 26))]


def test_flip_twice_is_identity_and_negates_normals_x():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (5, 7, 3)).astype(np.float32)
    normals = rng.uniform(-1, 1, (5, 7, 3)).astype(np.float32)
    labels = {"semseg": rng.integers(0, 5, (5, 7)).astype(np.uint8), "normals": normals, "human_parts": None}
    flipped_image, flipped = flip_horizontal(image, labels)
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_array_equal(flipped["semseg"], labels["semseg"][:, ::-1])
    np.testing.assert_array_equal(flipped["normals"][..., 0], -normals[:, ::-1, 0])
    np.testing.assert_array_equal(flipped["normals"][..., 1:], normals[:, ::-1, 1:])
    assert flipped["human_parts"] is None
    back_image, back = flip_horizontal(flipped_image, flipped)
    np.testing.assert_array_equal(back_image, image)
    np.testing.assert_array_equal(back["normals"], normals)
    np.testing.assert_array_equal(back["semseg"], labels["semseg"])


def test_rescale_divides_depth_and_uses_nearest_labels():
    depth = np.array([[1.0, 2.0], [4.0, 8.0]], dtype=np.float32)
    semseg = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    image = np.zeros((2, 2, 3), dtype=np.float32)
    _, labels = rescale(image, {"depth": depth, "semseg": semseg}, 2.0)
    np.testing.assert_array_equal(labels["depth"], np.repeat(np.repeat(depth, 2, 0), 2, 1) / 2)
    np.testing.assert_array_equal(labels["semseg"], np.repeat(np.repeat(semseg, 2, 0), 2, 1))
    _, labels = rescale(np.zeros((4, 6, 3), np.float32), {"depth": np.full((4, 6), 3.0, np.float32)}, 0.5)
    assert labels["depth"].shape == (2, 3) and np.all(labels["depth"] == 6.0)


def test_bilinear_matches_half_pixel_sampling():
    row = np.array([[[0.0], [10.0]]], dtype=np.float32)  # 1 x 2, one channel
    # Destination x samples source (x + 0.5) / 2 - 0.5, clamped: -0.25, 0.25, 0.75, 1.25.
    np.testing.assert_allclose(resize_bilinear(row, (1, 4))[0, :, 0], [0.0, 2.5, 7.5, 10.0])


def test_eval_transform_pads_without_resizing(raw_samples):
    dataset = _dataset(raw_samples).with_transform(build_transforms(METADATA, train=False))
    sample, raw = dataset[0], raw_samples[0]
    top, left = (32 - 20) // 2, (40 - 30) // 2
    assert sample["original_size"] == (20, 30) and sample["pad_offset"] == (top, left) and sample["id"] == "s0"
    inside = (slice(top, top + 20), slice(left, left + 30))
    expected = (raw["image"] / 255.0 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
    pixels = sample["pixel_values"].numpy()
    assert pixels.shape == (3, 32, 40) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[:, inside[0], inside[1]].transpose(1, 2, 0), expected, atol=1e-5)
    outside = np.ones((32, 40), dtype=bool)
    outside[inside] = False
    assert np.all(pixels[:, outside] == 0)

    labels = sample["labels"]
    assert labels["semseg"].dtype == torch.int64 and labels["normals"].shape == (3, 32, 40)
    np.testing.assert_array_equal(labels["semseg"].numpy()[inside], raw["semseg"])
    np.testing.assert_array_equal(labels["saliency"].numpy()[inside], raw["saliency"])
    np.testing.assert_array_equal(labels["edge"].numpy()[inside], raw["edge"])
    np.testing.assert_array_equal(labels["human_parts"].numpy()[inside], raw["human_parts"])
    depth = labels["depth"].numpy()[inside]
    assert depth[0, 1] == 255 and np.array_equal(np.delete(depth.ravel(), 1), np.delete(raw["depth"].ravel(), 1))
    normals = labels["normals"].numpy()[:, inside[0], inside[1]]
    assert np.all(normals[:, 0, 0] == 255)
    np.testing.assert_allclose(normals[:, 1, 1], 2 * raw["normals"][1, 1].astype(np.float64) / 255 - 1, atol=1e-6)
    for task in TASKS:
        values = labels[task].numpy()
        assert np.all((values[:, outside] if values.ndim == 3 else values[outside]) == 255), task

    assert dataset[1]["labels"]["human_parts"] is None


def test_eval_transform_refuses_larger_images(raw_samples):
    dataset = _dataset(raw_samples).with_transform(build_transforms(METADATA, train=False, size=(16, 40)))
    with pytest.raises(ValueError, match=r"'s0'.*20x30.*16x40"):
        dataset[0]


def test_part_map_without_parts_is_ignored(raw_samples):
    raw_samples[0]["human_parts"][:] = 0
    sample = _dataset(raw_samples[:1]).with_transform(build_transforms(METADATA, train=False))[0]
    assert torch.all(sample["labels"]["human_parts"] == 255)


def test_train_transform_crops_to_train_size_with_valid_values(raw_samples):
    dataset = _dataset(raw_samples).with_transform(build_transforms(METADATA, train=True))
    torch.manual_seed(0)
    first = [dataset[i] for i in range(3)]
    torch.manual_seed(0)
    again = [dataset[i] for i in range(3)]
    for sample, other in zip(first, again):
        assert sample["pixel_values"].shape == (3, 24, 24)
        assert torch.equal(sample["pixel_values"], other["pixel_values"])  # reproducible with torch's seed
        labels = sample["labels"]
        assert set(labels["semseg"].unique().tolist()) <= {0, 1, 2, 255}
        assert set(labels["edge"].unique().tolist()) <= {0.0, 1.0, 255.0}
        normals = labels["normals"]
        valid = (normals != 255).all(dim=0)
        assert torch.all((normals == 255).any(dim=0) == ~valid)  # invalid on all three channels at once
        assert torch.all(normals[:, valid].abs() <= 1)
        depth = labels["depth"]
        assert torch.all((depth[depth != 255] >= 0.25) & (depth[depth != 255] <= 10.0))  # 0.5..5 m / scale in [0.5, 2]
        height, width = sample["original_size"]
        top, left = sample["pad_offset"]
        assert height <= 24 and width <= 24 and top == (24 - height) // 2 and left == (24 - width) // 2


def test_photometric_distortion_changes_only_colours():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    outputs = [photometric_distortion(image, np.random.default_rng(seed)) for seed in range(20)]
    assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outputs)
    assert any(not np.array_equal(out, image) for out in outputs)


def test_hsv_follows_opencv_8bit_ranges():
    rng = np.random.default_rng(4)
    colors = rng.integers(0, 256, (500, 3), dtype=np.uint8)
    hsv = rgb_to_hsv(colors[None])[0].astype(np.int64)
    for (r, g, b), (h, s, v) in zip(colors, hsv):
        ref_h, ref_s, ref_v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert abs(v - round(ref_v * 255)) == 0
        assert abs(s - ref_s * 255) <= 0.5 + 1e-9
        if ref_s > 0:
            assert min(abs(h - ref_h * 180), 180 - abs(h - ref_h * 180)) <= 0.5 + 1e-9


def test_collate_fills_missing_labels(raw_samples):
    dataset = _dataset(raw_samples).with_transform(build_transforms(METADATA, train=False))
    batch = collate_dense_batch([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 40) and batch["ids"] == ["s0", "s1"]
    assert batch["labels"]["human_parts"].dtype == torch.int64 and torch.all(batch["labels"]["human_parts"][1] == 255)
    assert torch.equal(batch["labels"]["human_parts"][0], dataset[0]["labels"]["human_parts"])
    assert batch["labels"]["normals"].shape == (2, 3, 32, 40) and batch["labels"]["depth"].dtype == torch.float32
    assert batch["original_sizes"].tolist() == [[20, 30], [20, 30]] and batch["pad_offsets"].dtype == torch.int64


def test_dataloader_with_two_workers(raw_samples):
    dataset = _dataset(raw_samples).with_transform(build_transforms(METADATA, train=True, tasks=["semseg", "normals"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_dense_batch)
    batches = list(loader)
    assert [batch["ids"] for batch in batches] == [["s0", "s1"], ["s2"]]
    assert set(batches[0]["labels"]) == {"semseg", "normals"} and batches[0]["pixel_values"].shape == (2, 3, 24, 24)


def test_unknown_or_absent_tasks_are_rejected():
    with pytest.raises(ValueError, match="Task 'segm' is not in the dataset"):
        build_transforms(METADATA, train=True, tasks=["segm"])
    metadata = {**METADATA, "tasks": {"semseg": METADATA["tasks"]["semseg"]}}
    with pytest.raises(ValueError, match="'depth' is not in the dataset"):
        build_transforms(metadata, train=False, tasks=["depth"])


def test_seeded_augmentation_depends_only_on_seed_epoch_and_id(tmp_path):
    """With a seed, a sample's augmentation is reproducible whatever came before it, and changes with the epoch."""
    from modeling_taskexpert.data import generate_synthetic_dataset, read_dataset_metadata, load_multitask_dataset

    generate_synthetic_dataset(tmp_path / "syn", train_size=3, val_size=1, image_size=32, num_workers=0)
    metadata = read_dataset_metadata(tmp_path / "syn")
    rows = load_multitask_dataset(tmp_path / "syn", "train")[:3]
    transform = build_transforms(metadata, train=True, seed=7)
    first = transform(rows)["pixel_values"]
    torch.manual_seed(123)  # the global generator must not matter
    one_row = {key: value[2:] for key, value in rows.items()}
    assert torch.equal(transform(one_row)["pixel_values"][0], first[2])
    transform.set_epoch(1)
    assert not torch.equal(transform(rows)["pixel_values"][2], first[2])
    transform.set_epoch(0)
    assert torch.equal(transform(rows)["pixel_values"][2], first[2])
