"""Every Python snippet of README.md and space_app/README.md runs on its own, copy-pasted into a fresh process,
offline.

Each snippet runs in a scratch folder laid out like the repository root after `make train`:
`outputs/taskexpert-synthetic-tiny` holds a tiny random TaskExpert saved the way train.py saves a model (weights,
config, image processor, remote code), and `space_app/examples/` the example images. Hub ids in a snippet are served
from an offline Hugging Face cache holding the same tiny model (see tests/markdown_snippets.py); the snippet's text
is never changed. A snippet that does not import `modeling_taskexpert` runs with that package unimportable.

The Space's API snippet talks to a running Space: the test starts `space_app/app.py` on a free port with the tiny
model, and the one substitution made in any snippet is declared here: the Space's default address
`http://127.0.0.1:7860` becomes that port's address.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from markdown_snippets import Snippet, fill_hub_cache, hub_ids, python_snippets, run_snippet

from modeling_taskexpert import TaskExpertForDensePrediction, DenseMultiTaskImageProcessor

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
MAKE_TRAIN_MODEL = "outputs/taskexpert-synthetic-tiny"
SNIPPETS = python_snippets(REPO_ROOT / "README.md", "README.md")
SPACE_SNIPPETS = python_snippets(REPO_ROOT / "space_app" / "README.md", "space_app/README.md")
SPACE_DEFAULT_URL = "http://127.0.0.1:7860"


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("readme") / "model"
    TaskExpertForDensePrediction(tiny_config()).eval().save_pretrained(folder)
    DenseMultiTaskImageProcessor(size={"height": 64, "width": 64}, size_divisor=8).save_pretrained(folder)
    return folder


def test_the_snippets_are_found():
    assert [snippet.line for snippet in SNIPPETS] == sorted(snippet.line for snippet in SNIPPETS)
    assert len(SNIPPETS) >= 2 and all(snippet.code.strip() for snippet in SNIPPETS)


def repository_like_folder(folder: Path, model_folder: Path) -> Path:
    """A scratch folder with what the README's snippets name: the `make train` model and the example images."""
    shutil.copytree(model_folder, folder / MAKE_TRAIN_MODEL)
    shutil.copytree(REPO_ROOT / "space_app" / "examples", folder / "space_app" / "examples")
    return folder


def run_in_repository_like_folder(snippet: Snippet, model_folder: Path, tmp_path: Path):
    workdir = repository_like_folder(tmp_path / "repo", model_folder)
    cache = tmp_path / "hub_cache"
    for repo_id in hub_ids(snippet, workdir):
        fill_hub_cache(cache, repo_id, model_folder)
    completed = run_snippet(snippet, workdir, cache)
    assert completed.returncode == 0, f"{snippet.label} failed:\n{snippet.code}\n{completed.stderr[-4000:]}"
    return completed


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[snippet.label for snippet in SNIPPETS])
def test_readme_snippet_runs(snippet, tiny_model_folder, tmp_path):
    run_in_repository_like_folder(snippet, tiny_model_folder, tmp_path)


def test_hub_ids_are_served_from_the_offline_cache(tiny_model_folder, tmp_path):
    """The mechanism for snippets that load a Hub id: the id resolves offline from the cache, the folder does not
    exist, and the snippet's text is the one a user would run."""
    code = (
        "from transformers import AutoConfig, AutoImageProcessor\n"
        'config = AutoConfig.from_pretrained("your-name/taskexpert-tiny", trust_remote_code=True)\n'
        'processor = AutoImageProcessor.from_pretrained("your-name/taskexpert-tiny", trust_remote_code=True)\n'
        "print(config.model_type, sorted(config.tasks), processor.size)\n"
    )
    snippet = Snippet("inline", 1, code)
    assert hub_ids(snippet, tmp_path) == {"your-name/taskexpert-tiny"}
    completed = run_in_repository_like_folder(snippet, tiny_model_folder, tmp_path)
    assert "taskexpert" in completed.stdout and "'height': 64" in completed.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def space_url(tiny_model_folder, tmp_path_factory):
    """`python space_app/app.py` serving the tiny model on a free port of 127.0.0.1, stopped (process group) after."""
    port = _free_port()
    env = dict(
        os.environ, TASKEXPERT_MODEL=str(tiny_model_folder), GRADIO_SERVER_PORT=str(port),
        GRADIO_SERVER_NAME="127.0.0.1", GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")),
        GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
    )  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "space_app" / "app.py")], cwd=REPO_ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"the Space exited during start-up with code {server.returncode}"
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the Space did not answer within 240 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.parametrize("snippet", SPACE_SNIPPETS, ids=[snippet.label for snippet in SPACE_SNIPPETS])
def test_space_readme_snippet_runs(snippet, space_url, tiny_model_folder, tmp_path):
    run_in_repository_like_folder(replace(snippet, code=snippet.code.replace(SPACE_DEFAULT_URL, space_url)),
                                  tiny_model_folder, tmp_path)  # fmt: skip
