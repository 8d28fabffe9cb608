"""Loading a saved model of this package by folder or Hub id, for the entry points that take either model type (the
evaluation CLI, the Space, the study report).

A `config.json` of this package carries `auto_map` (the remote-code declaration `save_pretrained` writes). When its
`model_type` is missing or misspelt, transformers' Auto classes cannot match it to the installed classes and treat the
folder as unknown remote code: they stop at an interactive "Do you wish to run the custom code? [y/N]" prompt (a hang
in a server or a batch job) or fail with advice to pass `trust_remote_code=True`. `load_dense_model` reads the config
first and names the problem instead. (Class-specific loading, `TaskExpertForDensePrediction.from_pretrained(...)`,
knows its type and loads such a file as it is.) No model file imports this module, so it is not part of the remote
code a checkpoint ships.
"""

from pathlib import Path

from transformers import AutoModel, PretrainedConfig

from .dense_model_utils import check_model_folder
from .model_types import MODEL_TYPES as _REGISTRY

MODEL_TYPES = tuple(_REGISTRY)  # the model_type names this package loads


def read_model_config(source, trust_remote_code: bool = False, **hub_kwargs) -> dict:
    """The `config.json` of a folder or Hub id as a dict; a ValueError naming the file when it has no `model_type`,
    or (unless `trust_remote_code`) one that is not a model type of this package, and an OSError saying so when a
    local folder does not exist (transformers would call it a malformed repository id)."""
    check_model_folder(source)
    config, _ = PretrainedConfig.get_config_dict(str(source), **hub_kwargs)
    local = Path(str(source)) / "config.json"
    where = str(local) if local.is_file() else f"The config.json of {source}"
    expected = " or ".join(repr(name) for name in MODEL_TYPES)
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(
            f"{where} has no `model_type`: a model of this package names its type there ({expected}). Without it "
            f'transformers cannot match the file to the installed classes. Add "model_type": {MODEL_TYPES[0]!r} (or '
            f"{MODEL_TYPES[1]!r}) to the file, or load it with "
            + " or ".join(f"{entry.model_class.__name__}.from_pretrained(...)" for entry in _REGISTRY.values())
            + "."
        )
    if model_type not in MODEL_TYPES and not trust_remote_code:
        raise ValueError(f"{where} has `model_type` {model_type!r}; this package loads {expected}.")
    return config


def load_dense_model(source, trust_remote_code: bool = False, **kwargs):
    """`AutoModel.from_pretrained(source, ...)` for a model of this package, after `read_model_config` has checked its
    config: never an interactive prompt, never remote code unless `trust_remote_code=True` is passed."""
    hub_kwargs = {key: kwargs[key] for key in ("revision", "cache_dir", "token", "local_files_only") if key in kwargs}
    read_model_config(source, trust_remote_code=trust_remote_code, **hub_kwargs)
    return AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)


__all__ = ["MODEL_TYPES", "check_model_folder", "load_dense_model", "read_model_config"]
