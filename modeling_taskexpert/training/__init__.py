"""Training support for `train.py`: recipes, loss weighting, schedules, checkpoints, provenance, logs, curves and
model cards."""

from .checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    list_checkpoints,
    load_checkpoint,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .loss_weighting import LossWeighting, build_loss_weighting
from .provenance import (
    STAGING_PREFIX,
    claim_output_dir,
    lock_output_dir,
    read_provenance,
    recipe_fingerprint,
    write_provenance,
)
from .recipe import RecipeError, TrainingRecipe, dump_recipe, hub_recipe, load_recipe, parse_command_line
from .reporting import JsonLinesLogger, build_model_card, plot_training_curves, read_log, write_example_maps
from .schedules import cosine_schedule, lr_factor, poly_schedule

__all__ = [
    "STAGING_PREFIX",
    "lock_output_dir",
    "CheckpointError",
    "CheckpointWriteError",
    "JsonLinesLogger",
    "LossWeighting",
    "RecipeError",
    "TrainingRecipe",
    "build_loss_weighting",
    "build_model_card",
    "claim_output_dir",
    "dump_recipe",
    "hub_recipe",
    "list_checkpoints",
    "load_checkpoint",
    "load_recipe",
    "parse_command_line",
    "plot_training_curves",
    "write_example_maps",
    "cosine_schedule",
    "lr_factor",
    "poly_schedule",
    "read_log",
    "read_provenance",
    "read_state",
    "recipe_fingerprint",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "write_provenance",
]
