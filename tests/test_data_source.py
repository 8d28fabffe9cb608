"""`DatasetSource` and `convert`: a source is a description; split lists are checked before anything is read."""

import dataclasses

import numpy as np
import pytest

from modeling_taskexpert.data import SOURCES, DatasetSource, convert, load_multitask_dataset, read_dataset_metadata
from modeling_taskexpert.data.__main__ import main
from modeling_taskexpert.data.labels import encode_png
from modeling_taskexpert.data.raw_files import read_gray_map
from modeling_taskexpert.data.writer import read_raw


def _toy_row(root, split, sample_id):
    """A row of a one-task source: the image is the saliency map's gray values, saliency thresholded at 128."""
    gray = read_raw(root / "maps" / f"{sample_id}.png", sample_id, read_gray_map, "map")
    return {
        "id": sample_id,
        "image": encode_png(np.repeat(gray[..., None], 3, axis=2)),
        "saliency": encode_png((gray >= 128).astype(np.uint8)),
    }


TOY = DatasetSource(
    name="toy",
    title="Toy source",
    archive="ToyArchive",
    root_markers=("maps", "lists"),
    split_lists={"train": "lists/train.txt", "validation": "lists/val.txt"},
    tasks=("saliency",),
    class_names={},
    train_size=(8, 8),
    eval_size=(8, 8),
    boundary_tolerance=0.01,
    card_body="A toy source of the tests.",
    card_licence="## Licence\nNone.",
    make_row=_toy_row,
)


@pytest.fixture()
def toy_raw(tmp_path):
    from PIL import Image

    root = tmp_path / "ToyArchive"
    (root / "maps").mkdir(parents=True)
    (root / "lists").mkdir()
    rng = np.random.default_rng(0)
    for sample_id in ("a1", "a2", "b1"):
        Image.fromarray(rng.integers(0, 256, (6, 7), dtype=np.uint8)).save(root / "maps" / f"{sample_id}.png")
    (root / "lists" / "train.txt").write_text("a1\n\na2\n")
    (root / "lists" / "val.txt").write_text("b1\n")
    return root


def test_a_source_is_a_description(toy_raw, tmp_path):
    output = convert(TOY, toy_raw.parent, tmp_path / "out", num_workers=0)
    metadata = read_dataset_metadata(output)
    assert metadata == {
        "name": "toy", "tasks": {"saliency": {"kind": "saliency", "description": "salient object detection"}},
        "train_size": [8, 8], "eval_size": [8, 8],
        "boundary_tolerance": 0.01, "splits": {"train": 2, "validation": 1},
    }  # fmt: skip
    rows = list(load_multitask_dataset(output, "train", cache_dir=str(tmp_path / "cache")))
    assert [row["id"] for row in rows] == ["a1", "a2"]
    gray = np.asarray(rows[1]["image"])[..., 0]
    np.testing.assert_array_equal(np.asarray(rows[1]["saliency"]), (gray >= 128).astype(np.uint8))
    card = (output / "README.md").read_text()
    assert "A toy source of the tests." in card and "| `saliency` |" in card and card.rstrip().endswith("None.")
    assert "## Class names" not in card  # no segmentation column
    # The archive folder itself works as well as its parent.
    assert convert(TOY, toy_raw, tmp_path / "again", num_workers=0, splits=("validation",)).is_dir()
    assert read_dataset_metadata(tmp_path / "again")["splits"] == {"validation": 1}


def test_the_command_line_lists_every_source():
    assert set(SOURCES) == {"pascal-context", "nyud"}
    for name, source in SOURCES.items():
        assert source.name == name
    with pytest.raises(SystemExit) as error:
        main(["--help"])
    assert error.value.code == 0


@pytest.mark.parametrize(
    "bad_id, problem",
    [
        ("../../outside", "path separator"),
        ("..", "relative folder reference"),
        ("/etc/passwd", "path separator"),
        ("sub/a1", "path separator"),
        ("sub\\a1", "path separator"),
        ("C:a1", "contains ':'"),
        ("a1\x1b[2J", "control character"),
    ],
)
def test_split_ids_cannot_leave_the_raw_folder(toy_raw, tmp_path, bad_id, problem):
    (toy_raw / "lists" / "train.txt").write_text(f"a1\n{bad_id}\n")
    with pytest.raises(ValueError) as error:
        convert(TOY, toy_raw, tmp_path / "out", num_workers=0)
    message = str(error.value)
    assert f"{toy_raw / 'lists' / 'train.txt'}, line 2" in message and repr(bad_id) in message and problem in message
    assert not (tmp_path / "out").exists()


def test_ids_from_a_custom_reader_are_checked_too(toy_raw, tmp_path):
    source = dataclasses.replace(
        TOY, read_split_ids=lambda root, split: ["a1", "../a2"] if split == "train" else ["b1"]
    )
    with pytest.raises(ValueError, match=r"toy 'train' split: the sample id '../a2' contains a path separator"):
        convert(source, toy_raw, tmp_path / "out", num_workers=0)
    source = dataclasses.replace(TOY, read_split_ids=lambda root, split: ["a1", "a1"] if split == "train" else ["b1"])
    with pytest.raises(ValueError, match=r"the sample ids \['a1'\] are listed more than once"):
        convert(source, toy_raw, tmp_path / "out", num_workers=0)


def test_duplicate_ids_and_split_overlap_are_refused(toy_raw, tmp_path, capsys):
    lists = toy_raw / "lists"
    lists.joinpath("train.txt").write_text("a1\na2\na1\n")
    with pytest.raises(ValueError, match=r"train\.txt, line 3: the sample id 'a1' is listed twice \(first on line 1\)"):
        convert(TOY, toy_raw, tmp_path / "out", num_workers=0)
    lists.joinpath("train.txt").write_text("a1\na2\nb1\n")
    with pytest.raises(
        ValueError, match=r"1 sample id\(s\) are in both the 'train' and the 'validation' split \(e\.g\. \['b1'\]\)"
    ):
        convert(TOY, toy_raw, tmp_path / "out", num_workers=0)
    assert not (tmp_path / "out").exists()


def test_the_cli_exits_2_for_bad_split_lists(tmp_path, capsys):
    root = tmp_path / "NYUDv2"
    (root / "images").mkdir(parents=True)
    (root / "gt_sets").mkdir()
    (root / "gt_sets" / "train.txt").write_text("0001\n../../../etc/passwd\n")
    (root / "gt_sets" / "val.txt").write_text("0002\n")
    assert main(["nyud", "--raw-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "'../../../etc/passwd' contains a path separator" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_description_is_checked_when_made():
    with pytest.raises(ValueError, match="`class_names` must name exactly the segmentation tasks \\['semseg'\\]"):
        dataclasses.replace(TOY, tasks=("semseg", "saliency"))
    with pytest.raises(ValueError, match="DatasetSource 'toy': Task 'sal' is not one of the preset tasks"):
        dataclasses.replace(TOY, tasks=("sal",))
    with pytest.raises(ValueError, match="`split_lists` must map some of the splits"):
        dataclasses.replace(TOY, split_lists={"test": "lists/test.txt"})
    with pytest.raises(ValueError, match="sizes must be \\(height, width\\)"):
        dataclasses.replace(TOY, train_size=(8,))
