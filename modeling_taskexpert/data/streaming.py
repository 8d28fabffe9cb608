"""Streaming a split: the training samples of one process read from the parquet shards as they go, transformed exactly
as the map-style path transforms them (`DenseTransform.transform_sample`), so that the same order gives the same
batches.

`StreamingSamples` wraps a `datasets.IterableDataset` (a local folder or a Hub id, `load_multitask_dataset(...,
streaming=True)`): shuffled with a buffer and shard shuffling seeded by (seed, epoch) (`set_epoch`), then split across
the processes of the run with `datasets.distributed.split_dataset_by_node` (whole shards per process when the shard
count divides by the world size, otherwise every world_size-th sample), so the processes see disjoint samples whose
union is the split. DataLoader workers split the process's shards among themselves (the `datasets` iterable does it).

An epoch of a streamed split has a fixed length in batches, the same on every process (`batches_per_epoch`): a process
never waits in a collective for another that ran out of samples, and a resumed run knows where it stood. Resuming
restarts the epoch's stream (same seed, same order) and skips the batches already trained on (`skip_batches`), which
reproduces the uninterrupted run exactly; the skipped batches are read and transformed again, a cost proportional to
the position in the epoch. (`datasets` pauses 5 s when a shuffled stream's prefetch threads end, once per epoch: noise
for a real epoch, noticeable only on toy datasets.)
"""

import itertools
from typing import Iterator

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from .transforms import DenseTransform


class StreamingSamples(torch.utils.data.IterableDataset):
    """This process's share of a streamed split, shuffled per epoch and transformed as the map-style path does.

    Args:
        dataset: the streamed split (`load_multitask_dataset(..., streaming=True)`).
        transform: the split's `DenseTransform` (with a seed: augmentations are a function of (seed, epoch, id)).
        rank, world_size: this process and the number of processes.
        seed: the shuffle's seed (the epoch is added by `set_epoch`).
        shuffle_buffer_size: samples in the shuffle buffer; 0 keeps the stored order (no shuffling).
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        transform: DenseTransform,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
    ):
        super().__init__()
        if shuffle_buffer_size:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.transform.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        columns = self.transform.columns
        for row in self.dataset:
            stored = {"id": row["id"], "image": row["image"]}
            stored.update({task: row[column] for task, column in columns.items()})
            yield self.transform.transform_sample(stored)


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every process takes from a streamed split of `num_samples` per epoch: what the smallest share allows
    (each process gets at least num_samples // world_size samples), the incomplete last batch dropped."""
    return (num_samples // world_size) // batch_size


def epoch_batches(loader, num_batches: int, skip_batches: int = 0) -> Iterator:
    """The batches `skip_batches` .. `num_batches` of one pass over a streaming loader."""
    return itertools.islice(iter(loader), skip_batches, num_batches)


__all__ = ["StreamingSamples", "batches_per_epoch", "epoch_batches"]
