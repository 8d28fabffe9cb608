"""Streaming (data/streaming.py, train.py with `streaming: true`): disjoint and complete shares per process, the same
samples as the map-style path for the same order, epochs of one length, and an exact resume of a killed streamed run
with two processes."""

import subprocess
import time

import pytest
import torch
from training_runs import kill_process_tree, run, start, train_command, train_records, wait_until_gone

from modeling_taskexpert.data import build_transforms, load_multitask_dataset, read_dataset_metadata
from modeling_taskexpert.data.streaming import StreamingSamples, batches_per_epoch, epoch_batches
from modeling_taskexpert.data.transforms import collate_dense_batch


@pytest.fixture(autouse=True)
def no_pause_at_the_end_of_a_shuffled_stream(monkeypatch):
    """`datasets` sleeps 5 s when a shuffled stream's prefetch threads end (once per epoch in training); these tests
    end dozens of streams."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def stream(folder, train: bool, rank=0, world_size=1, buffer=0, seed=0):
    metadata = read_dataset_metadata(folder)
    transform = build_transforms(metadata, train=train, seed=seed)
    dataset = load_multitask_dataset(folder, "train", streaming=True)
    return StreamingSamples(dataset, transform, rank, world_size, seed, buffer)


def test_the_shares_of_the_processes_are_disjoint_and_cover_the_split(synthetic_dataset):
    every_id = list(load_multitask_dataset(synthetic_dataset, "train")["id"])
    for buffer in (0, 8):
        for epoch in (0, 1):
            shares = []
            for rank in range(3):
                samples = stream(synthetic_dataset, train=False, rank=rank, world_size=3, buffer=buffer)
                samples.set_epoch(epoch)
                shares.append([sample["id"] for sample in samples])
            assert sum(len(share) for share in shares) == len(every_id)
            assert sorted(sum(shares, [])) == sorted(every_id)  # disjoint and complete
    # The shuffle depends on the epoch, and is the same for the same (seed, epoch).
    first = stream(synthetic_dataset, train=False, buffer=8)
    orders = []
    for epoch in (0, 1, 0):
        first.set_epoch(epoch)
        orders.append([sample["id"] for sample in first])
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == sorted(every_id)


def test_a_stream_in_stored_order_gives_the_map_style_samples(synthetic_dataset):
    """Same order, same samples: the training augmentation (seeded by id and epoch) and the evaluation transform give
    the same tensors and labels through the stream as through the prepared split, and the same collated batches."""
    metadata = read_dataset_metadata(synthetic_dataset)
    for train in (True, False):
        transform = build_transforms(metadata, train=train, seed=3)
        transform.set_epoch(2)
        mapped = load_multitask_dataset(synthetic_dataset, "train").with_transform(transform)
        streamed = stream(synthetic_dataset, train=train, seed=3)
        streamed.set_epoch(2)
        streamed_samples = list(streamed)
        assert len(streamed_samples) == len(mapped)
        for index in (0, 5, len(mapped) - 1):
            a, b = mapped[index], streamed_samples[index]
            assert a["id"] == b["id"] and torch.equal(a["pixel_values"], b["pixel_values"])
            for task, label in a["labels"].items():
                assert (label is None) == (b["labels"][task] is None), task
                if label is not None:
                    assert torch.equal(label, b["labels"][task]), task
        specs = transform.task_specs
        batch_a = collate_dense_batch([mapped[i] for i in range(4)], specs)
        batch_b = collate_dense_batch(streamed_samples[:4], specs)
        assert torch.equal(batch_a["pixel_values"], batch_b["pixel_values"]) and batch_a["ids"] == batch_b["ids"]


def test_an_epoch_has_the_same_number_of_batches_on_every_process(synthetic_dataset):
    from torch.utils.data import DataLoader

    assert batches_per_epoch(24, 2, 4) == 3 and batches_per_epoch(25, 3, 4) == 2 and batches_per_epoch(3, 2, 4) == 0
    counts = []
    for rank in range(3):
        samples = stream(synthetic_dataset, train=False, rank=rank, world_size=3, buffer=8)
        loader = DataLoader(samples, batch_size=3, collate_fn=lambda s: [x["id"] for x in s])
        batches = list(epoch_batches(loader, batches_per_epoch(24, 3, 3), skip_batches=1))
        counts.append(len(batches))
        full = list(epoch_batches(loader, batches_per_epoch(24, 3, 3)))
        assert batches == full[1:]  # skipping resumes in the same order
    assert counts == [1, 1, 1]


@pytest.mark.slow
def test_a_killed_streamed_run_resumes_exactly_with_two_processes(synthetic_dataset, tmp_path):
    streaming = ["--streaming", "true", "--shuffle_buffer_size", "8", "--per_device_train_batch_size", "2"]
    finished = tmp_path / "uninterrupted"
    completed = run(train_command(synthetic_dataset, finished, *streaming, processes=2))
    assert completed.returncode == 0, completed.stderr[-4000:]
    expected = train_records(finished)
    assert [r["step"] for r in expected] == list(range(1, 9)) and all(r["world_size"] == 2 for r in expected)
    assert {r["epoch"] for r in expected} == {0, 1}  # 24 samples, 2 x 2 per step: 6 steps an epoch

    output_dir = tmp_path / "interrupted"
    process = start(train_command(synthetic_dataset, output_dir, *streaming, processes=2),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (output_dir / "checkpoints" / "step_00000004" / "manifest.json").exists():
            assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        killed = kill_process_tree(process)
    assert killed and not wait_until_gone(killed)
    completed = run(train_command(synthetic_dataset, output_dir, *streaming, "--resume_from_checkpoint", "latest",
                                  processes=2))  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    actual = train_records(output_dir)
    assert [r["step"] for r in actual] == list(range(1, 9))
    for a, b in zip(expected, actual):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], (a["step"], a["loss"], b["loss"])


def test_bounded_shards_stream_and_split_by_shard(tmp_path):
    """`max_shard_bytes` bounds every shard (cells of its rows), row groups hold at most 100 rows, the split reads
    back whole and in order, and with an even number of shards the processes get whole shards, disjoint and
    complete."""
    import pyarrow.parquet as pq

    from modeling_taskexpert.data import generate_synthetic_dataset
    from modeling_taskexpert.data.writer import ROWS_PER_ROW_GROUP, row_bytes

    folder = generate_synthetic_dataset(
        tmp_path / "sharded", train_size=30, val_size=4, image_size=48, num_workers=0, max_shard_bytes=40_000
    )  # fmt: skip (15 shards)
    shards = sorted((folder / "data").glob("train-*.parquet"))
    assert len(shards) > 3 and all(f"-of-{len(shards):05d}.parquet" in shard.name for shard in shards)
    for shard in shards:
        rows = pq.read_table(shard).to_pylist()
        metadata = pq.ParquetFile(shard).metadata
        assert sum(row_bytes(row) for row in rows) <= 40_000 or len(rows) == 1
        assert all(metadata.row_group(i).num_rows <= ROWS_PER_ROW_GROUP for i in range(metadata.num_row_groups))
    ids = list(load_multitask_dataset(folder, "train")["id"])
    assert ids == [f"synthetic_train_{i:06d}" for i in range(30)]
    streamed = load_multitask_dataset(folder, "train", streaming=True)
    assert streamed.num_shards == len(shards)
    world_size = next(n for n in (5, 3, 2) if len(shards) % n == 0)  # a divisor: whole shards per process
    shares = [[s["id"] for s in stream(folder, False, rank, world_size, buffer=4)] for rank in range(world_size)]
    assert sorted(sum(shares, [])) == sorted(ids)
    shard_of = {row["id"]: index for index, shard in enumerate(shards) for row in pq.read_table(shard).to_pylist()}
    shard_sets = [{shard_of[i] for i in share} for share in shares]
    assert all(not (a & b) for k, a in enumerate(shard_sets) for b in shard_sets[k + 1 :])  # no shard on two ranks
