"""Data-parallel evaluation over 2 gloo processes gives exactly the single-process result."""

import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modeling_taskexpert.data import collate_dense_batch
from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator, evaluate_model, sum_across_processes

TASKS = ["semseg", "saliency", "normals", "edge", "depth"]
CHANNELS = {"semseg": 4, "saliency": 1, "normals": 3, "edge": 1, "depth": 1}
NUM_SAMPLES = 5  # with 2 processes and batches of 2, the last round is padded with a repeated sample
SIZE = 20


class StubModel(nn.Module):
    """Deterministic per-task 1x1 convolutions with the TaskExpert call signature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleDict({task: nn.Conv2d(3, channels, 1) for task, channels in CHANNELS.items()})
        self.config = SimpleNamespace(tasks=TASKS)

    def forward(self, pixel_values, tasks):
        return SimpleNamespace(logits={task: self.heads[task](pixel_values) for task in tasks})


def make_samples():
    """Samples as the transforms produce them (image, labels with ignored padding, sizes)."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for index in range(NUM_SAMPLES):
        labels = {
            "semseg": torch.randint(0, 4, (SIZE, SIZE), generator=g),
            "saliency": (torch.rand(SIZE, SIZE, generator=g) < 0.5).float(),
            "normals": torch.nn.functional.normalize(torch.randn(3, SIZE, SIZE, generator=g), dim=0),
            "edge": torch.zeros(SIZE, SIZE),
            "depth": torch.rand(SIZE, SIZE, generator=g) * 5 + 0.5,
        }
        labels["edge"][6 + index, 3:17] = 1
        for task in ("semseg", "saliency", "edge", "depth"):
            labels[task][-2:] = 255  # bottom padding
        labels["normals"][:, -2:] = 255
        samples.append({
            "pixel_values": torch.randn(3, SIZE, SIZE, generator=g),
            "labels": labels,
            "id": f"sample_{index}",
            "original_size": (SIZE - 2, SIZE),
            "pad_offset": (0, 0),
        })  # fmt: skip
    return samples


def make_evaluator():
    return DenseMultiTaskEvaluator(TASKS, num_classes={"semseg": 4}, boundary_tolerance=0.05, dataset="synthetic")


def make_loader(samples):
    return torch.utils.data.DataLoader(samples, batch_size=2, shuffle=False, collate_fn=collate_dense_batch)


def evaluate_shard(evaluator, model, samples):
    batch = collate_dense_batch(samples)
    from modeling_taskexpert.image_processing_dense_multitask import logits_to_predictions

    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"], tasks=TASKS).logits
    evaluator.update(logits_to_predictions(logits), batch["labels"], meta=batch)


def _worker(rank, port, output):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and torch.distributed.get_world_size() == 2
    samples, model = make_samples(), StubModel()

    # The evaluator alone, on uneven shards (3 and 2 samples).
    evaluator = make_evaluator()
    evaluate_shard(evaluator, model, samples[:3] if rank == 0 else samples[3:])
    sharded = evaluator.compute()

    # The evaluation loop on an accelerate-prepared dataloader, whose last round is padded.
    loader = accelerator.prepare_data_loader(make_loader(samples))
    iterated = sum_across_processes([torch.tensor([sum(len(batch["ids"]) for batch in loader)])])[0]
    evaluator = make_evaluator()
    looped = evaluate_model(model, loader, evaluator, accelerator=accelerator, progress=False)
    counted = sum_across_processes([evaluator.num_samples])[0]
    if rank == 0:
        with open(output, "w") as stream:
            json.dump(
                {"sharded": sharded, "looped": looped, "iterated": int(iterated), "counted": int(counted)}, stream
            )
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    samples, model = make_samples(), StubModel()
    evaluator = make_evaluator()
    evaluate_shard(evaluator, model, samples)
    expected = evaluator.compute()
    assert evaluate_model(model, make_loader(samples), make_evaluator(), progress=False) == pytest.approx(expected)

    output = tmp_path / "results.json"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(output)), nprocs=2, join=True)
    results = json.loads(output.read_text())

    # 2 rounds of 2 batches of 2: accelerate repeated 3 samples to even out the last round...
    assert results["iterated"] == 8
    assert results["counted"] == NUM_SAMPLES  # ...and none of them was counted
    for name in ("sharded", "looped"):
        assert results[name].keys() == expected.keys()
        for key, value in expected.items():
            assert results[name][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, key)
