"""The Space bundle (space_app/bundle.py): what the folder holds, that it installs and serves in a fresh virtual
environment without the project's checkout, and that it pushes to a Hub-compatible endpoint."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hub_server import hub_environment, local_hub
from PIL import Image
from space_support import free_port, make_model_folder

import bundle
from bundle import BundleError, write_bundle

REPO_ROOT = Path(__file__).resolve().parent.parent


def front_matter(readme: Path) -> dict:
    return yaml.safe_load(readme.read_text().split("---\n", 2)[1])


def bundle_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = make_model_folder(tmp_path_factory.mktemp("model") / "tiny")
    (folder / "checkpoints" / "step-1").mkdir(parents=True)
    (folder / "checkpoints" / "step-1" / "optimizer.safetensors").write_bytes(b"x")
    (folder / ".train.lock").write_text("")
    return folder


def test_the_bundle_holds_the_app_the_package_modules_the_model_and_pinned_requirements(model_folder, tmp_path):
    folder = write_bundle(str(model_folder), tmp_path / "space", hub_id="someone/tiny")
    files = bundle_files(folder)
    for name in bundle.APP_FILES:
        assert files[name] == (REPO_ROOT / "space_app" / name).read_bytes()
    assert "load_test.py" not in files and "bundle.py" not in files  # tools, not the app
    flat = {p.name for p in (REPO_ROOT / "modeling_taskexpert").glob("*.py")}
    assert {Path(p).name for p in files if p.startswith("modeling_taskexpert/")} == flat
    assert not any(p.startswith(("modeling_taskexpert/data/", "modeling_taskexpert/training/")) for p in files)
    assert files["model/model.safetensors"] == (model_folder / "model.safetensors").read_bytes()
    assert not any(p.startswith("model/checkpoints") or "/." in f"/{p}" for p in files)
    assert json.loads(files["space_settings.json"]) == {"model": "model"}
    requirements = [line for line in files["requirements.txt"].decode().splitlines() if not line.startswith("#")]
    assert requirements == [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in bundle.REQUIREMENTS]
    assert not any(line.startswith(("gradio", "modeling-taskexpert")) for line in requirements)
    front = front_matter(folder / "README.md")
    assert front["sdk"] == "gradio" and front["sdk_version"] == importlib.metadata.version("gradio")
    assert front["app_file"] == "app.py" and front["python_version"] == "3.11" and front["models"] == ["someone/tiny"]
    readme = (folder / "README.md").read_text()
    assert "upload_folder(" in readme and "TASKEXPERT_SPACE_CACHE_MAX_MB" in readme
    assert str(model_folder) not in readme and str(REPO_ROOT) not in readme

    # A Hub id is referenced, not embedded, and named in `models:`.
    by_id = write_bundle("someone/taskexpert-vitb", tmp_path / "by-id")
    assert json.loads((by_id / "space_settings.json").read_text()) == {"model": "someone/taskexpert-vitb"}
    assert not (by_id / "model").exists() and front_matter(by_id / "README.md")["models"] == ["someone/taskexpert-vitb"]
    assert "models" not in front_matter(write_bundle(str(model_folder), tmp_path / "no-id") / "README.md")


def test_bundle_errors_leave_nothing(model_folder, tmp_path):
    with pytest.raises(BundleError, match="neither a model folder nor a Hub id"):
        write_bundle(str(tmp_path / "missing"), tmp_path / "a")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(BundleError, match="holds no model"):
        write_bundle(str(empty), tmp_path / "b")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        write_bundle(str(model_folder), occupied)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-model", "occupied"]


def test_the_settings_file_names_the_model_unless_the_variable_does(model_folder, tmp_path, monkeypatch):
    import model_loading

    monkeypatch.delenv(model_loading.MODEL_ENV_VAR, raising=False)
    monkeypatch.setattr(model_loading, "SPACE_DIR", tmp_path)
    monkeypatch.setattr(model_loading, "SETTINGS_FILE", tmp_path / "space_settings.json")
    shutil.copytree(model_folder, tmp_path / "model")
    (tmp_path / "space_settings.json").write_text('{"model": "model"}')
    assert model_loading.resolve_model_source() == (str(tmp_path / "model"), True)
    (tmp_path / "space_settings.json").write_text('{"model": "someone/real-model"}')
    assert model_loading.resolve_model_source() == ("someone/real-model", False)
    monkeypatch.setenv(model_loading.MODEL_ENV_VAR, str(model_folder))  # a Space variable wins
    assert model_loading.resolve_model_source() == (str(model_folder), True)
    monkeypatch.delenv(model_loading.MODEL_ENV_VAR)
    (tmp_path / "space_settings.json").write_text('{"modle": "model"}')
    with pytest.raises(model_loading.ModelUnavailable, match="space_settings.json"):
        model_loading.resolve_model_source()


def _wait_for_server(process, url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer at {url} within {timeout:.0f} s")


@pytest.mark.slow
def test_the_bundle_installs_in_a_fresh_environment_and_serves_a_prediction(model_folder, tmp_path):
    """As a Space build: a new venv, `pip install -r requirements.txt` and the SDK's gradio, run `app.py` from the
    bundle folder (outside the checkout, nothing of it on the path), one prediction through gradio_client."""
    from gradio_client import Client, handle_file

    space = write_bundle(str(model_folder), tmp_path / "space")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    # torch alone first, as this machine needs (a Space takes it from the index); the same pinned version.
    torch_pin = next(line for line in (space / "requirements.txt").read_text().splitlines() if line.startswith("torch"))
    subprocess.run([*pip, torch_pin], check=True, cwd=space, env=env, timeout=1200)
    gradio = f"gradio=={front_matter(space / 'README.md')['sdk_version']}"
    subprocess.run([*pip, "-r", "requirements.txt", gradio], check=True, cwd=space, env=env, timeout=1200)
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                             env=env, check=True)  # fmt: skip
    installed = {item["name"].lower() for item in json.loads(listing.stdout)}
    assert "modeling-taskexpert" not in installed and not {"datasets", "accelerate", "scipy"} & installed

    port = free_port()
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    app_env = {**env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": ""}  # fmt: skip
    process = subprocess.Popen([str(python), "app.py"], cwd=space, env=app_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(process, url, timeout=180)
        client = Client(url, verbose=False)
        status, *maps, arrays = client.predict(handle_file(str(image)), ["semseg", "depth"], api_name="/predict")
        assert "2 task(s)" in status and "56×40" in status
        with np.load(arrays) as saved:
            assert saved["depth"].shape == (40, 56) and saved["semseg"].shape == (40, 56)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    # The app imported the bundle's copy of the package, not the checkout's.
    probe = subprocess.run([str(python), "-c", "import modeling_taskexpert; print(modeling_taskexpert.__file__)"],
                           cwd=space, env=app_env, capture_output=True, text=True, check=True)  # fmt: skip
    assert probe.stdout.strip() == str(space / "modeling_taskexpert" / "__init__.py")


@pytest.mark.slow
def test_the_bundle_pushes_to_a_space_and_a_second_push_updates_it(model_folder, tmp_path):
    space = tmp_path / "space"
    with local_hub() as hub:
        env = hub_environment(hub, os.environ)
        command = [sys.executable, "-m", "space_app.bundle", "--model", str(model_folder), "--output", str(space),
                   "--push-to", "tester/demo"]  # fmt: skip
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        repository = hub.repos[("space", "tester/demo")]
        assert repository.sdk == "gradio"
        assert repository.files == bundle_files(space)  # exactly the folder, byte for byte

        (space / "space_settings.json").write_text('{"model": "tester/other-model"}\n')
        (space / "NOTES.md").write_text("second push\n")
        push = [sys.executable, "-c", "import sys; sys.path.insert(0, 'space_app'); import bundle; "
                f"bundle.push_bundle({str(space)!r}, 'tester/demo')"]  # fmt: skip
        completed = subprocess.run(push, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert repository.files == bundle_files(space) and len(repository.commits) == 2
        assert json.loads(repository.files["space_settings.json"]) == {"model": "tester/other-model"}
        assert hub.unknown_requests == []

    # Offline, the push is refused with a message, after the folder is written.
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([*command[:-4], "--output", str(tmp_path / "again"), "--push-to", "tester/demo"],
                               cwd=REPO_ROOT, env=offline, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert completed.returncode == 1 and "Cannot push to the Space tester/demo" in completed.stderr
    assert "Traceback" not in completed.stderr and (tmp_path / "again" / "app.py").is_file()
