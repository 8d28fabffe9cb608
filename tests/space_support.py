"""Helpers of the Space tests (not a test module): tiny model folders, images, and an in-process server. (The Space's
modules are importable in tests: conftest.py puts its folder on the import path.)"""

import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

CANVAS = 64
PATCH = 8  # tiny_config's ViT patch size


def make_model_folder(folder: Path) -> Path:
    """A tiny random TaskExpert with non-uniform gates and a 64x64 processor canvas, saved like `make train` does
    (without a card: its training data is unrecorded)."""
    from conftest import tiny_config

    from modeling_taskexpert import TaskExpertForDensePrediction, DenseMultiTaskImageProcessor

    torch.manual_seed(0)
    model = TaskExpertForDensePrediction(tiny_config()).eval()
    for layer in model.taskexpert.mmoe_layers:  # zero-initialised gates would make every expert map constant
        torch.nn.init.normal_(layer.gates.token_weight, std=0.5)
    model.save_pretrained(folder)
    DenseMultiTaskImageProcessor(size={"height": CANVAS, "width": CANVAS}, size_divisor=PATCH).save_pretrained(folder)
    return folder


def make_modsquad_folder(folder: Path) -> Path:
    """A tiny random Mod-Squad model with varied routing and a 64x64 processor canvas."""
    from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction, DenseMultiTaskImageProcessor

    config = ModSquadConfig.from_json_file(str(REPO_ROOT / "hub_configs" / "models" / "modsquad-tiny.json"))
    torch.manual_seed(0)
    model = ModSquadForDensePrediction(config).eval()
    for _, layer in model.modsquad.moe_layers:  # zero-initialised routers would give every token the same experts
        torch.nn.init.normal_(layer.router_weight, std=0.5)
    model.save_pretrained(folder)
    DenseMultiTaskImageProcessor(
        size={"height": CANVAS, "width": CANVAS}, size_divisor=config.patch_size
    ).save_pretrained(folder)
    return folder


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_space(model_folder, limits=None):
    """The app on 127.0.0.1 in this process: yields (SpaceDemo, url); closed (and its files deleted) at the end.
    Set GRADIO_TEMP_DIR before the first Gradio import of the session to keep its files in a test folder."""
    import app

    space = app.build_demo(str(model_folder), limits)
    _, url, _ = app.launch(
        space, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True
    )
    try:
        yield space, url
    finally:
        space.close()
        space.janitor.delete_all()
