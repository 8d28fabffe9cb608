"""Write a complete Space repository for the demo: the app, the package modules it imports, pinned requirements and a
README with the Spaces front matter; optionally push it to a Space.

    python -m space_app.bundle --model outputs/taskexpert-synthetic-tiny --output dist/space   # make space-bundle
    python -m space_app.bundle --model your-name/taskexpert-vitb --output dist/space
    python -m space_app.bundle --model outputs/taskexpert-synthetic-tiny --output dist/space \\
        --push-to your-name/taskexpert-demo                                                    # and upload it

What the folder holds, so that a Space builds it without anything from this repository:
- the app's modules and example images;
- `modeling_taskexpert/`: the package's flat modules (model classes, image processor, colour maps, loading), which
  are all the app imports and need only torch, transformers, numpy and Pillow (plus matplotlib and PyYAML for the
  app). They are copied rather than installed as a wheel: the wheel would declare the whole training stack
  (datasets, accelerate, scipy, scikit-image) as dependencies, which the Space never imports;
- `requirements.txt`: those dependencies pinned to the versions installed here (the ones the tests ran with); gradio
  is left to the Space's `sdk_version`, which is the installed gradio's version;
- `space_settings.json`: the model the Space serves unless the Space variable `TASKEXPERT_MODEL` names another.

A local model folder is embedded (`model/`, without checkpoints or hidden files): the default, because the tiny
synthetic model is a few MB and the Space then starts without Hub access. A Hub id is referenced instead (the Space
downloads it at start; the README's `models:` names it), which is the way for real models of hundreds of MB.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

import yaml

from modeling_taskexpert.file_utils import give_default_permissions

SPACE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SPACE_DIR.parent
PACKAGE_DIR = REPO_ROOT / "modeling_taskexpert"
APP_FILES = ("app.py", "experts_tab.py", "inference.py", "model_loading.py", "rendering.py", "resources.py")
# What the app imports at run time (gradio and its own dependencies come with the SDK).
REQUIREMENTS = ("torch", "transformers", "huggingface_hub", "safetensors", "numpy", "pillow", "pyyaml", "matplotlib")
MODEL_IGNORE = ("checkpoints", ".*")  # as train.py's push: no training checkpoints, no hidden files
EMBEDDED_MODEL_DIR = "model"


class BundleError(Exception):
    """The bundle cannot be written as asked; nothing was written."""


def installed_version(distribution: str) -> str:
    """The installed version without a local label (`2.13.0+cpu` -> `2.13.0`: the index has no local builds)."""
    try:
        return metadata.version(distribution).split("+")[0]
    except metadata.PackageNotFoundError:
        raise BundleError(f"{distribution} is not installed here; the bundle pins the installed versions.") from None


def requirements_text() -> str:
    lines = [
        "# Written by `python -m space_app.bundle`: what the app imports, pinned to the versions it was tested with.",
        "# gradio comes from the Space's sdk_version (README.md).",
    ]
    return "\n".join(lines + [f"{name}=={installed_version(name)}" for name in REQUIREMENTS]) + "\n"


def _front_matter_and_body(readme: str) -> tuple[dict, str]:
    _, front, body = readme.split("---\n", 2)
    return yaml.safe_load(front), body


def readme_text(model: str, hub_id: Optional[str], embedded: bool) -> str:
    """The Space README: the demo's front matter with this gradio's version and the model id, then how to use the
    bundle."""
    front, body = _front_matter_and_body((SPACE_DIR / "README.md").read_text())
    front["sdk_version"] = installed_version("gradio")
    front["app_file"] = "app.py"
    if hub_id:
        front["models"] = [hub_id]
    else:
        front.pop("models", None)
    from resources import ENV_PREFIX, ResourceLimits  # the app's own settings, listed from their definition

    limits = "\n".join(
        f"| `{ENV_PREFIX}{name.upper()}` | `{value:g}` |" for name, value in vars(ResourceLimits()).items()
    )
    served = (
        f"the model embedded in `{EMBEDDED_MODEL_DIR}/` (copied from `{Path(model).name}`)"
        if embedded
        else f"the Hub model [`{model}`](https://huggingface.co/{model}), downloaded when the Space starts"
    )
    intro = body.split("\n## ", 1)[0].strip()
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}
---

{intro}

## This repository

Written by `python -m space_app.bundle` of the `modeling_taskexpert` project: the app, the package modules it imports
(`modeling_taskexpert/`), `requirements.txt` pinned to the versions it was tested with, and `space_settings.json`.
It serves {served}. The model is loaded with the package's own classes; remote code is never run.

## Settings (Space variables)

| variable | value here |
|---|---|
| `TASKEXPERT_MODEL` | unset: the model of `space_settings.json`; set it to another Hub model id to serve that one |
{limits}

## Pushing it

```bash
python -m space_app.bundle --model {"path/to/model-folder" if embedded else model} --output dist/space --push-to your-name/taskexpert-demo
```

or, from this folder, with `huggingface_hub` (after `hf auth login`):

```python
from huggingface_hub import HfApi

api = HfApi()
api.create_repo("your-name/taskexpert-demo", repo_type="space", space_sdk="gradio", exist_ok=True)
api.upload_folder(repo_id="your-name/taskexpert-demo", repo_type="space", folder_path=".")
```
"""


def _copy_model(source: Path, target: Path) -> None:
    if not (source / "config.json").is_file():
        raise BundleError(f"{source} holds no model (no config.json); train one (make train) or give a Hub id.")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*MODEL_IGNORE))


def _is_hub_id(name: str) -> bool:
    from modeling_taskexpert.file_utils import looks_like_repo_id

    return looks_like_repo_id(name)


def write_bundle(model: str, output, hub_id: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the Space repository for `model` (a local model folder, embedded, or a Hub id) to `output`; `hub_id`
    names the model on the Hub for the README's `models:` when a local folder is embedded. Written to a temporary
    folder first: a failure leaves nothing."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise BundleError(f"{output} exists and is not empty; choose another folder or pass --overwrite.")
    local = Path(model).expanduser()
    embedded = local.is_dir()
    if not embedded and not _is_hub_id(model):
        raise BundleError(f"--model {model!r} is neither a model folder nor a Hub id (namespace/name).")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name in APP_FILES:
            shutil.copy2(SPACE_DIR / name, staging / name)
        shutil.copytree(SPACE_DIR / "examples", staging / "examples")
        package = staging / "modeling_taskexpert"
        package.mkdir()
        for module in sorted(PACKAGE_DIR.glob("*.py")):  # the flat modules; data/, evaluation/, ... stay out
            shutil.copy2(module, package / module.name)
        if embedded:
            _copy_model(local, staging / EMBEDDED_MODEL_DIR)
        settings = {"model": EMBEDDED_MODEL_DIR if embedded else model}
        (staging / "space_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        (staging / "requirements.txt").write_text(requirements_text())
        (staging / "README.md").write_text(readme_text(model, hub_id or (None if embedded else model), embedded))
        give_default_permissions(staging)  # mkdtemp's folder is private; the bundle is an ordinary folder
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def push_bundle(folder, repo_id: str, private: bool = False) -> str:
    """Create the Space repository (gradio SDK) if needed and upload the bundle folder; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="space", folder_path=str(folder), commit_message="Space bundle"
        )
    except HfHubHTTPError as error:
        raise BundleError(f"Pushing {folder} to the Space {repo_id} failed: {error}") from error
    except Exception as error:  # offline mode, no connection: huggingface_hub raises several types
        if "offline" in str(error).lower() or type(error).__name__ in ("OfflineModeIsEnabled", "ConnectError"):
            raise BundleError(
                f"Cannot push to the Space {repo_id}: the Hub is not reachable ({error}). Unset HF_HUB_OFFLINE and "
                "check the connection, or push the folder later with the README's commands."
            ) from error
        raise
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="outputs/taskexpert-synthetic-tiny",
        help="a model folder (embedded) or a Hub model id (referenced); default: the folder `make train` writes",
    )  # fmt: skip
    parser.add_argument("--output", default="dist/space", help="the Space repository folder to write")
    parser.add_argument("--hub-id", default=None, help="the Hub id of an embedded model, for the README's `models:`")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--push-to", metavar="SPACE_ID", default=None, help="then upload it to this Space")
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    args = parser.parse_args(argv)
    try:
        folder = write_bundle(args.model, args.output, hub_id=args.hub_id, overwrite=args.overwrite)
        print(f"Wrote the Space repository {folder}")
        if args.push_to:
            print(f"Pushed: {push_bundle(folder, args.push_to, private=args.private)}")
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(SPACE_DIR))  # `resources` is a top-level module of the app
    sys.exit(main())
