"""The code style is checked, not hoped for: `ruff format --check` and the lint rules of pyproject.toml's
[tool.ruff] (pyflakes: unused imports, undefined names, f-strings without placeholders)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ruff(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *arguments], cwd=REPO_ROOT, capture_output=True, text=True)


@pytest.mark.parametrize(
    "arguments", [("format", "--check", "--diff", "."), ("check", ".")], ids=["ruff-format", "ruff-check"]
)
def test_ruff_finds_nothing(arguments):
    completed = _ruff(*arguments)
    assert "No module named ruff" not in completed.stderr, "ruff is part of the test extra: pip install -e '.[test]'"
    assert completed.returncode == 0, f"ruff {' '.join(arguments)}:\n{completed.stdout}{completed.stderr}"
