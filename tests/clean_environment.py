"""A virtual environment holding only torch, transformers, numpy and pillow (and what transformers itself requires), at
the versions of the test environment: what a transformers user runs remote code with. Not a test module.

It is built once and kept (`.clean-venv/` beside the repository's `.venv`, ignored by git), keyed by those versions,
so that a test session pays for it only the first time (about a minute: torch comes from the same wheel as the test
environment's). Built under a temporary name and renamed when complete, under a lock, so concurrent sessions never
use a half-built one.
"""

import fcntl
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "numpy", "pillow")
# Modules a snippet may import to run in the clean environment (the standard library aside).
CLEAN_MODULES = {"torch", "transformers", "numpy", "PIL", "huggingface_hub", "safetensors"}


def _pins() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]


def clean_python() -> Path:
    """The interpreter of the clean environment, built on first use."""
    pins = _pins()
    key = hashlib.sha256(" ".join(pins).encode()).hexdigest()[:12]
    root = REPO / ".clean-venv"
    folder = root / key
    python = folder / "bin" / "python"
    if python.is_file():
        return python
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if python.is_file():
            return python
        building = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
            pip = [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            # torch first and alone, so that nothing resolves another (CUDA) build of it.
            subprocess.run([*pip, pins[0]], check=True, timeout=1200)
            subprocess.run([*pip, *pins], check=True, timeout=1200)
            # Only `bin/python` is used (a link to the base interpreter; the venv is found beside it), so the folder
            # can move; the pip scripts' shebangs keep the temporary name, and are never run.
            building.rename(folder)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return python


def clean_environment_packages(python: Path) -> set[str]:
    """The distributions installed in the environment of `python` (lower case)."""
    listing = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    return {name.strip().lower() for name in listing.stdout.split()}
