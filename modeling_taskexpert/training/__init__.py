"""Training support for `train.py`: recipes, loss weighting, atomic checkpoints, logs, curves and model cards."""

from .checkpoints import list_checkpoints, read_state, resolve_checkpoint, save_checkpoint
from .loss_weighting import LossWeighting, poly_schedule
from .recipe import RecipeError, TrainingRecipe, dump_recipe, load_recipe, parse_command_line
from .reporting import JsonLinesLogger, build_model_card, plot_training_curves, read_log, write_json_atomic

__all__ = [
    "JsonLinesLogger",
    "LossWeighting",
    "RecipeError",
    "TrainingRecipe",
    "build_model_card",
    "dump_recipe",
    "list_checkpoints",
    "load_recipe",
    "parse_command_line",
    "plot_training_curves",
    "poly_schedule",
    "read_log",
    "read_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_json_atomic",
]
