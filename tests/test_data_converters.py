"""PASCAL-Context and NYUD-v2 converters on tiny raw fixtures: exact values, error policy, atomicity."""

import dataclasses
import hashlib
import io
import json
import logging

import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image
from skimage.morphology import thin

from modeling_taskexpert.data import (
    PASCAL_CONTEXT,
    DatasetConversionError,
    convert,
    convert_nyud,
    convert_pascal_context,
    read_dataset_metadata,
    load_multitask_dataset,
)
from modeling_taskexpert.data import pascal_context
from modeling_taskexpert.data.__main__ import main

from raw_datasets import INVALID_NORMAL_IDS, PART_IDS, VALID_NORMAL_IDS, parts_struct, write_png  # noqa: F401


def _expected_edges(label_map):
    """Four-neighbour Laplacian with reflect-101 borders (numpy 'reflect'), non-zero, thinned."""
    padded = np.pad(label_map.astype(np.float64), 1, mode="reflect")
    center = padded[1:-1, 1:-1]
    laplacian = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * center
    return thin(laplacian != 0).astype(np.uint8)


def _expected_parts(objects, shape):
    parts = np.zeros(shape, dtype=np.uint8)
    for _, index, _, object_parts in objects:
        if index == 15:
            for name, mask in object_parts:
                parts[mask] = PART_IDS[name]
    return parts if parts.any() else None


def test_pascal_context_values_are_exact(pascal_raw, tmp_path):
    raw_dir, root, samples = pascal_raw
    output = convert_pascal_context(raw_dir, tmp_path / "out", num_workers=2)
    metadata = read_dataset_metadata(output)
    assert metadata["splits"] == {"train": 2, "validation": 1}
    assert metadata["train_size"] == [512, 512] and metadata["boundary_tolerance"] == 0.0075
    assert (
        len(metadata["tasks"]["semseg"]["id2label"]) == 21 and metadata["tasks"]["semseg"]["id2label"]["15"] == "person"
    )
    assert list(metadata["tasks"]) == ["semseg", "human_parts", "saliency", "edge", "normals"]

    rows = [*load_multitask_dataset(output, "train", cache_dir=str(tmp_path / "cache")),
            *load_multitask_dataset(output, "validation", cache_dir=str(tmp_path / "cache"))]  # fmt: skip
    assert [row["id"] for row in rows] == ["2008_000001", "2008_000002", "2008_000003"]
    for row in rows:
        raw = samples[row["id"]]
        jpeg = (root / "JPEGImages" / f"{row['id']}.jpg").read_bytes()
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(Image.open(io.BytesIO(jpeg))))
        np.testing.assert_array_equal(np.asarray(row["semseg"]), raw["semseg"])
        expected_saliency = (raw["saliency"] >= 128).astype(np.uint8)  # v / 255 > 0.5
        assert list(expected_saliency[0, :3]) == [0, 1, 1]
        np.testing.assert_array_equal(np.asarray(row["saliency"]), expected_saliency)
        valid = np.isin(raw["label_map"], VALID_NORMAL_IDS)
        assert valid.any() and (~valid).any()
        np.testing.assert_array_equal(np.asarray(row["normals"]), np.where(valid[..., None], raw["normals"], 0))
        np.testing.assert_array_equal(np.asarray(row["edge"]), _expected_edges(raw["label_map"]))
        expected_parts = _expected_parts(raw["objects"], raw["semseg"].shape)
        if expected_parts is None:
            assert row["human_parts"] is None
        else:
            np.testing.assert_array_equal(np.asarray(row["human_parts"]), expected_parts)
    assert rows[0]["human_parts"] is not None and rows[1]["human_parts"] is None
    # The JPEG is stored byte for byte.
    import pyarrow.parquet as pq

    table = pq.read_table(next((output / "data").glob("train-*.parquet")))
    assert table.column("image")[0].as_py()["bytes"] == (root / "JPEGImages" / "2008_000001.jpg").read_bytes()


def test_pascal_missing_file_stops_with_path_and_id(pascal_raw, tmp_path):
    raw_dir, root, _ = pascal_raw
    missing = root / "sal_distill" / "2008_000002.png"
    missing.unlink()
    with pytest.raises(DatasetConversionError) as error:
        convert_pascal_context(raw_dir, tmp_path / "out", num_workers=0)
    assert (
        str(missing) in str(error.value)
        and "2008_000002" in str(error.value)
        and "missing saliency" in str(error.value)
    )
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # temporary folder removed


def test_pascal_corrupt_file_is_skipped_and_counted(pascal_raw, tmp_path, caplog):
    raw_dir, root, _ = pascal_raw
    corrupt = root / "JPEGImages" / "2008_000001.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    with caplog.at_level(logging.WARNING):
        output = convert_pascal_context(raw_dir, tmp_path / "out", num_workers=0, on_error="skip")
    assert read_dataset_metadata(output)["splits"] == {"train": 1, "validation": 1}
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert str(corrupt) in messages and "2008_000001" in messages and "Skipped 1 bad samples" in messages


def test_pascal_unknown_part_name_is_reported(pascal_raw, tmp_path):
    raw_dir, root, _ = pascal_raw
    mask = np.ones((16, 12), dtype=bool)
    scipy.io.savemat(root / "human_parts" / "2008_000003.mat",
                     parts_struct([("person", 15, mask, [("tail", mask)])], "2008_000003"))  # fmt: skip
    with pytest.raises(DatasetConversionError, match="unknown person part name 'tail'"):
        convert_pascal_context(raw_dir, tmp_path / "out", num_workers=0)


def test_interrupted_conversion_leaves_nothing(pascal_raw, tmp_path):
    raw_dir, _, _ = pascal_raw
    calls = []

    def interrupted(root, split, sample_id):
        calls.append(sample_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return pascal_context.make_row(root, split, sample_id)

    with pytest.raises(KeyboardInterrupt):
        convert(dataclasses.replace(PASCAL_CONTEXT, make_row=interrupted), raw_dir, tmp_path / "out", num_workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PASCALContext"]


def test_cli_reports_bad_raw_dir_and_bad_input(pascal_raw, tmp_path, capsys):
    raw_dir, root, _ = pascal_raw
    assert main(["pascal-context", "--raw-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not an extracted PASCALContext archive" in capsys.readouterr().err
    (root / "pascal-context" / "trainval" / "2008_000003.mat").write_bytes(b"not a mat file")
    args = ["pascal-context", "--raw-dir", str(raw_dir), "--output-dir", str(tmp_path / "o"), "--num-workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2008_000003.mat" in err and "'2008_000003'" in err and "Context label map" in err
    assert not (tmp_path / "o").exists()
    assert main(args + ["--on-error", "skip"]) == 2  # the only validation sample is bad: nothing is written
    assert "No sample of the 'validation' split" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nyud_values_are_exact(nyud_raw, tmp_path):
    raw_dir, _, samples = nyud_raw
    output = convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    metadata = read_dataset_metadata(output)
    assert metadata["splits"] == {"train": 2, "validation": 1} and metadata["eval_size"] == [448, 576]
    assert metadata["tasks"]["semseg"]["id2label"]["0"] == "wall" and len(metadata["tasks"]["semseg"]["id2label"]) == 40
    assert "human_parts" not in metadata["tasks"]
    rows = [*load_multitask_dataset(output, "train", cache_dir=str(tmp_path / "cache")),
            *load_multitask_dataset(output, "validation", cache_dir=str(tmp_path / "cache"))]  # fmt: skip
    for row in rows:
        raw = samples[row["id"]]
        np.testing.assert_array_equal(np.asarray(row["image"]), raw["image"])
        expected_semseg = raw["semseg"].astype(np.int64) - 1
        expected_semseg[expected_semseg == -1] = 255
        np.testing.assert_array_equal(np.asarray(row["semseg"]), expected_semseg)
        assert row["depth"].mode == "F"
        depth = np.asarray(row["depth"])
        assert depth.dtype == np.float32 and np.array_equal(depth, raw["depth"])  # bit-exact metres
        np.testing.assert_array_equal(np.asarray(row["normals"]), raw["normals"])
        np.testing.assert_array_equal(np.asarray(row["edge"]), raw["edge"] / 255)
    assert list(np.asarray(rows[0]["semseg"])[0, :3]) == [255, 0, 39]


def test_nyud_bad_values_name_file_and_sample(nyud_raw, tmp_path):
    raw_dir, root, _ = nyud_raw
    np.save(root / "depth" / "0002.npy", np.full((10, 8), np.nan, dtype=np.float32))
    with pytest.raises(DatasetConversionError) as error:
        convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    assert "0002.npy" in str(error.value) and "'0002'" in str(error.value) and "finite" in str(error.value)
    np.save(root / "depth" / "0002.npy", np.ones((10, 8), dtype=np.float32))
    write_png(root / "edge" / "0001.png", np.full((9, 12), 7, dtype=np.uint8))
    with pytest.raises(DatasetConversionError, match=r"0001\.png.*'0001'.*only 0 and 255"):
        convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    output = convert_nyud(raw_dir, tmp_path / "out", num_workers=0, on_error="skip")
    assert read_dataset_metadata(output)["splits"] == {"train": 1, "validation": 1}


def test_existing_output_needs_overwrite(nyud_raw, tmp_path):
    raw_dir, _, _ = nyud_raw
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert_nyud(raw_dir, tmp_path / "out", num_workers=0, overwrite=True)
    assert (
        not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "dense_multitask_dataset.json").is_file()
    )


# ----------------------------------------------------------------------------- pinned content


def _legacy_metadata(metadata: dict) -> dict:
    """The metadata as written before task kinds: a task entry held only its class names. Since then every entry also
    declares its task's kind (and a preset's parameters and wording), by design; the pin below covers the rest."""
    tasks = {task: {k: v for k, v in entry.items() if k == "id2label"} for task, entry in metadata["tasks"].items()}
    return {**metadata, "tasks": tasks}


def _content_hash(folder, skip_columns=()) -> str:
    """sha256 over the metadata and every decoded cell (mode, dtype, shape, pixels) of every row, in stored order.

    Decoded pixels rather than file bytes, so that a different PNG encoder build does not move the hash."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256(json.dumps(_legacy_metadata(read_dataset_metadata(folder)), sort_keys=True).encode())
    for split in ("train", "validation"):
        for shard in sorted((folder / "data").glob(f"{split}-*.parquet")):
            for row in pq.read_table(shard).to_pylist():
                digest.update(f"|{split}|{row['id']}".encode())
                for column in sorted(set(row) - {"id", *skip_columns}):
                    if row[column] is None:
                        digest.update(f"|{column}:none".encode())
                        continue
                    image = Image.open(io.BytesIO(row[column]["bytes"]))
                    array = np.asarray(image)
                    digest.update(f"|{column}:{image.mode}:{array.dtype}:{array.shape}".encode())
                    digest.update(array.tobytes())
    return digest.hexdigest()


def test_converted_fixtures_keep_their_pinned_content(pascal_raw, nyud_raw, tmp_path):
    """Refactors of the converters keep every converted value (and the metadata) identical. PASCAL's JPEG is stored
    byte for byte (tested above), so its decoded pixels, which depend on the JPEG codec build, stay out of the hash."""
    pascal = convert_pascal_context(pascal_raw[0], tmp_path / "pascal", num_workers=0)
    nyud = convert_nyud(nyud_raw[0], tmp_path / "nyud", num_workers=0)
    assert (_content_hash(pascal, skip_columns=("image",)), _content_hash(nyud)) == (
        PINNED_PASCAL_HASH,
        PINNED_NYUD_HASH,
    )


PINNED_PASCAL_HASH = "96322930800fdbd8213e53a62c5f2223e35f78550a1d16ed6e8e6b4b8ea7dc69"
PINNED_NYUD_HASH = "574b7f7d48ca8e8daed7cf76b4843fe84207eff90eec34c80b52279ed892e838"


# ----------------------------------------------------------------------------- refused and normalised raw values


def test_pascal_semseg_ids_beyond_the_class_count_are_refused(pascal_raw, tmp_path):
    """A Context-59/459 map in the VOC folder (ids > 20) would train a 21-way head on wrong targets."""
    raw_dir, root, samples = pascal_raw
    semseg = samples["2008_000003"]["semseg"].copy()
    semseg[0, 0] = 21
    semseg[1, 1] = 59
    write_png(root / "semseg" / "VOC12" / "2008_000003.png", semseg)
    with pytest.raises(DatasetConversionError) as error:
        convert_pascal_context(raw_dir, tmp_path / "out", num_workers=0)
    message = str(error.value)
    assert "2008_000003.png" in message and "'2008_000003'" in message
    assert "class ids must be 0 to 20 (21 classes) or 255 (ignore), found [21, 59]" in message
    assert not (tmp_path / "out").exists()


def test_nyud_depth_in_millimetres_is_refused(nyud_raw, tmp_path):
    raw_dir, root, samples = nyud_raw
    np.save(root / "depth" / "0003.npy", samples["0003"]["depth"] * 1000)  # float millimetres
    with pytest.raises(DatasetConversionError, match=r"0003\.npy.*'0003'.*looks like millimetres"):
        convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    np.save(root / "depth" / "0003.npy", (samples["0003"]["depth"] * 1000).astype(np.uint16))  # the Kinect's integers
    with pytest.raises(DatasetConversionError, match=r"0003\.npy.*integer depth usually holds millimetres"):
        convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    assert not (tmp_path / "out").exists()


def test_nyud_images_are_made_rgb_like_the_image_processor(nyud_raw, tmp_path):
    """16-bit grayscale is scaled (not clipped to white) and RGBA composited on white, exactly as the processor does
    for the same file, so a model sees the same pixels in training and at inference."""
    from modeling_taskexpert.image_processing_dense_multitask import load_rgb_image

    raw_dir, root, samples = nyud_raw
    gray16 = np.random.default_rng(5).integers(0, 65536, (9, 12), dtype=np.uint16)
    Image.fromarray(gray16).save(root / "images" / "0001.png")
    rgba = np.random.default_rng(6).integers(0, 256, (10, 8, 4), dtype=np.uint8)
    write_png(root / "images" / "0002.png", rgba)
    output = convert_nyud(raw_dir, tmp_path / "out", num_workers=0)
    rows = {row["id"]: row for row in load_multitask_dataset(output, "train", cache_dir=str(tmp_path / "cache"))}

    stored_gray = np.asarray(rows["0001"]["image"])
    assert stored_gray.shape == (9, 12, 3) and rows["0001"]["image"].mode == "RGB"
    np.testing.assert_array_equal(stored_gray, load_rgb_image(root / "images" / "0001.png"))
    np.testing.assert_array_equal(stored_gray[..., 0], np.floor(gray16 / 257 + 0.5).astype(np.uint8))
    assert (stored_gray < 255).mean() > 0.9  # PIL's convert("RGB") clips these 16-bit values to white

    stored_rgba = np.asarray(rows["0002"]["image"]).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    expected = np.floor(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha) + 0.5)
    np.testing.assert_array_equal(stored_rgba, expected)


def test_pascal_photo_with_an_exif_orientation_keeps_its_stored_grid(pascal_raw, tmp_path):
    """The labels are drawn on the file's pixel grid (the reference loaders ignore EXIF); `datasets` would rotate a
    JPEG stored with its orientation tag, so such a photo is stored as PNG of the unrotated pixels."""
    raw_dir, root, samples = pascal_raw
    path = root / "JPEGImages" / "2008_000001.jpg"
    pixels = np.asarray(Image.open(path))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    decoded = np.asarray(Image.open(path))
    output = convert_pascal_context(raw_dir, tmp_path / "out", num_workers=0)
    row = next(iter(load_multitask_dataset(output, "train", cache_dir=str(tmp_path / "cache"))))
    assert row["id"] == "2008_000001"
    np.testing.assert_array_equal(np.asarray(row["image"]), decoded)
    assert (
        np.asarray(row["image"]).shape[:2] == np.asarray(row["semseg"]).shape == samples["2008_000001"]["semseg"].shape
    )


def test_cards_list_class_names_and_the_encoding_of_every_column(pascal_raw, nyud_raw, tmp_path):
    """Issue 16: a dataset card documents each of its own columns and the names of every segmentation class."""
    from modeling_taskexpert.data.schema import dataset_task_specs

    pascal = convert_pascal_context(pascal_raw[0], tmp_path / "pascal", num_workers=0)
    nyud = convert_nyud(nyud_raw[0], tmp_path / "nyud", num_workers=0)
    for folder, columns, absent in (
        (pascal, ["id", "image", "semseg", "human_parts", "saliency", "edge", "normals"], "depth"),
        (nyud, ["id", "image", "semseg", "edge", "normals", "depth"], "human_parts"),
    ):
        card = (folder / "README.md").read_text()
        header = yaml.safe_load(card.split("---\n")[1])
        table = [line for line in card.splitlines() if line.startswith("| `")]
        assert [line.split("`")[1] for line in table] == columns  # one row per column, in stored order
        specs = dataset_task_specs(read_dataset_metadata(folder))
        for line, column in zip(table[2:], columns[2:]):  # the task columns: their kind's encoding and values
            spec = specs[column]
            assert spec.kind.stored_as in line and spec.kind.stored_values(spec) in line and spec.kind.name in line
        assert f"| `{absent}` |" not in card
        for task, info in read_dataset_metadata(folder)["tasks"].items():
            if "id2label" in info:
                listing = ", ".join(f"{i} {name}" for i, name in info["id2label"].items())
                assert f"- `{task}` ({len(info['id2label'])} classes, 255 = ignore): {listing}" in card
        assert ("depth-estimation" in header["task_categories"]) == (absent != "depth")
        assert card.rstrip().endswith("```")  # the licence and citation close the card
    pascal_card = (pascal / "README.md").read_text()
    assert (
        "15 person" in pascal_card
        and "6 lleg" in pascal_card
        and "23 refridgerator" in (nyud / "README.md").read_text()
    )
