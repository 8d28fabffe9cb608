"""Raw PASCAL-Context and NYUD-v2 archives in miniature, written in their original formats (the protocol's layouts), for
the converter, recipe and bad-input tests. The pytest fixtures `pascal_raw` and `nyud_raw` are registered in
conftest.py."""

import numpy as np
import pytest
import scipy.io
from PIL import Image

# A few Context ids from the protocol's list of classes with valid normals, and a few outside it.
VALID_NORMAL_IDS = [3, 4, 427]
INVALID_NORMAL_IDS = [0, 1, 2, 5]
PART_IDS = {"head": 1, "hair": 1, "neck": 2, "torso": 2, "luarm": 3, "rlarm": 4, "rhand": 4, "luleg": 5, "lfoot": 6}


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def parts_struct(objects, image_name):
    """A PASCAL-Part `anno` struct: objects given as (class name, class index, mask, [(part, mask)])."""
    part_dtype = [("part_name", "O"), ("mask", "O")]
    object_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    records = np.zeros((1, len(objects)), dtype=object_dtype)
    for i, (name, index, mask, parts) in enumerate(objects):
        if parts:
            part_records = np.zeros((1, len(parts)), dtype=part_dtype)
            for j, (part_name, part_mask) in enumerate(parts):
                part_records[0, j] = (part_name, part_mask.astype(np.uint8))
        else:
            part_records = np.zeros((0, 0))
        records[0, i] = (name, np.array([[index]], dtype=np.uint8), mask.astype(np.uint8), part_records)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (image_name, records)
    return {"anno": anno}


def write_pascal_sample(root, sample_id, rng, shape, person, semseg_folder="VOC12"):
    """Write the six raw files of one sample; return the raw arrays to derive expectations from."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(
        root / "JPEGImages" / f"{sample_id}.jpg", quality=90
    )
    semseg = rng.choice(np.array([0, 7, 15, 20, 255], dtype=np.uint8), size=shape)
    write_png(root / "semseg" / semseg_folder / f"{sample_id}.png", semseg)
    label_map = np.zeros(shape, dtype=np.uint16)
    label_map[:, : shape[1] // 2] = 3
    label_map[shape[0] // 3 :, shape[1] // 3 :] = 427
    label_map[shape[0] // 2 :, : shape[1] // 4] = 5
    label_map[2:4, 2:4] = 2
    label_map[-3:, -3:] = 4
    (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{sample_id}.mat", {"LabelMap": label_map})
    normals = rng.integers(1, 256, (*shape, 3), dtype=np.uint8)
    write_png(root / "normals_distill" / f"{sample_id}.png", normals)
    saliency = rng.integers(0, 256, shape, dtype=np.uint8)
    saliency[0, :3] = (127, 128, 129)
    write_png(root / "sal_distill" / f"{sample_id}.png", saliency)

    full = np.ones(shape, dtype=bool)
    objects = []
    if person:
        head, torso, arm, foot, hair = (np.zeros(shape, dtype=bool) for _ in range(5))
        head[1:4, 1:5] = True
        hair[1:2, 1:6] = True  # overlaps the head; painted later, same group
        torso[4:9, 2:6] = True
        arm[5:8, 5:8] = True  # overlaps the torso; painted later, wins
        foot[-2:, 1:3] = True
        second_torso = np.zeros(shape, dtype=bool)
        second_torso[2:6, -4:] = True
        objects = [
            ("cat", 8, full, [("head", head)]),  # another category's parts are ignored
            ("person", 15, full, [("head", head), ("hair", hair), ("torso", torso), ("rlarm", arm)]),
            ("person", 15, full, []),  # a person without part annotations
            ("person", 15, full, [("neck", second_torso), ("lfoot", foot)]),
        ]
    else:
        objects = [("dog", 12, full, [("head", full)])]
    parts_dir = root / "human_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(parts_dir / f"{sample_id}.mat", parts_struct(objects, sample_id))
    return {"semseg": semseg, "label_map": label_map, "normals": normals, "saliency": saliency, "objects": objects}


@pytest.fixture()
def pascal_raw(tmp_path):
    root = tmp_path / "PASCALContext"
    rng = np.random.default_rng(0)
    samples = {
        "2008_000001": write_pascal_sample(root, "2008_000001", rng, (14, 17), person=True),
        "2008_000002": write_pascal_sample(
            root, "2008_000002", rng, (12, 10), person=False, semseg_folder="pascal-context"
        ),
        "2008_000003": write_pascal_sample(root, "2008_000003", rng, (16, 12), person=True),
    }
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("2008_000001\n2008_000002\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text("2008_000003\n")
    return tmp_path, root, samples


@pytest.fixture()
def nyud_raw(tmp_path):
    root = tmp_path / "NYUDv2"
    rng = np.random.default_rng(1)
    samples = {}
    for sample_id, shape in (("0001", (9, 12)), ("0002", (10, 8)), ("0003", (7, 7))):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        semseg = rng.integers(0, 41, shape, dtype=np.uint8)
        semseg[0, :3] = (0, 1, 40)
        depth = rng.uniform(0.5, 9.0, shape).astype(np.float32)
        depth[1, 1] = 0.0
        normals = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        edge = (rng.random(shape) < 0.2).astype(np.uint8) * 255
        write_png(root / "images" / f"{sample_id}.png", image)
        write_png(root / "segmentation" / f"{sample_id}.png", semseg)
        write_png(root / "normals" / f"{sample_id}.png", normals)
        write_png(root / "edge" / f"{sample_id}.png", edge)
        (root / "depth").mkdir(exist_ok=True)
        np.save(root / "depth" / f"{sample_id}.npy", depth[..., None] if sample_id == "0002" else depth)
        samples[sample_id] = {"image": image, "semseg": semseg, "depth": depth, "normals": normals, "edge": edge}
    (root / "gt_sets").mkdir()
    (root / "gt_sets" / "train.txt").write_text("0001\n0002\n")
    (root / "gt_sets" / "val.txt").write_text("0003\n")
    return tmp_path, root, samples
