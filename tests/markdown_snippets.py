"""Run the Python snippets of a Markdown file (README, model card) as a user would: each one on its own, copy-pasted
into a fresh Python process, offline. A helper module of the tests (not a test file), for every document whose
snippets must run.

How a snippet meets what it needs, without any change to its text:
- Files the snippet names by relative path (a model folder that `make train` writes, an example image) are
  prepared by the caller in the snippet's working directory, at those paths.
- Hub ids (`"namespace/name"` strings given to `from_pretrained(...)` or `model=`) are served from a Hugging Face
  cache that the caller fills with a local folder per id (`fill_hub_cache`), with `HF_HUB_OFFLINE=1` and
  `HF_HUB_CACHE` pointing at it: huggingface_hub's own offline mode reads the cache exactly as it would after a
  download, so the snippet's call is the one a user makes.
- A snippet that does not import `modeling_taskexpert` is run with that package made unimportable, because such a
  snippet claims to need only transformers (the model's remote code).
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
# A string literal given to from_pretrained(...) or as model=..., e.g. "your-name/taskexpert-synthetic-tiny".
_MODEL_ID = re.compile(r"""(?:from_pretrained\(\s*|model\s*=\s*)["']([^"'\s]+)["']""")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = "0" * 40  # the snapshot's revision name in the cache; `refs/main` points at it
_BLOCK_PACKAGE = (
    "import runpy, sys\nsys.modules['modeling_taskexpert'] = None\nrunpy.run_path(sys.argv[1], run_name='__main__')\n"
)


@dataclass(frozen=True)
class Snippet:
    source: str  # the document, for messages
    line: int  # the line of the opening fence
    code: str

    @property
    def label(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def imports_package(self) -> bool:
        return re.search(r"^\s*(import|from)\s+modeling_taskexpert\b", self.code, re.MULTILINE) is not None

    @property
    def imported_modules(self) -> set[str]:
        """The top-level modules the snippet imports."""
        import ast

        modules = set()
        for node in ast.walk(ast.parse(self.code)):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
        return modules

    @property
    def needs_only_transformers(self) -> bool:
        """Whether the snippet imports nothing beyond torch, transformers, numpy, PIL and the standard library: it
        then runs in the clean environment a transformers user has (`clean_environment.py`)."""
        from clean_environment import CLEAN_MODULES

        return self.imported_modules <= CLEAN_MODULES | set(sys.stdlib_module_names)

    def string_model_ids(self) -> set[str]:
        """The model ids or folders the snippet loads, when written as string literals."""
        return set(_MODEL_ID.findall(self.code))


def python_snippets(path: Path, source: str) -> list[Snippet]:
    """Every ```python block of a Markdown file, in order."""
    text = Path(path).read_text()
    return [Snippet(source, text.count("\n", 0, match.start()) + 1, match.group(1)) for match in _FENCE.finditer(text)]


def hub_ids(snippet: Snippet, cwd: Path) -> set[str]:
    """The ids the snippet loads that are Hub ids: `namespace/name` and no such folder in its working directory."""
    return {value for value in snippet.string_model_ids() if _REPO_ID.match(value) and not (cwd / value).exists()}


def fill_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Put the files of `folder` into the Hugging Face cache `cache` as the `main` revision of model `repo_id`."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / _COMMIT
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(_COMMIT)


def run_snippet(snippet: Snippet, cwd: Path, hub_cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the snippet in a fresh interpreter in `cwd`, offline, with `hub_cache` as the Hugging Face cache."""
    cwd = Path(cwd)
    script = cwd / f"snippet_{snippet.line}.py"
    script.write_text(snippet.code)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(hub_cache),
        HF_HOME=str(cwd / ".hf_home"),
        HF_MODULES_CACHE=str(cwd / ".hf_modules"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    command = [sys.executable, str(script)]
    if snippet.needs_only_transformers:  # what a transformers user has: not this package, not gradio or httpx
        from clean_environment import clean_python

        command = [str(clean_python()), str(script)]
    elif not snippet.imports_package:
        command = [sys.executable, "-c", _BLOCK_PACKAGE, str(script)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
