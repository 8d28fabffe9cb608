"""The loss weighting strategies live beside the models (`modeling_taskexpert.loss_weighting`), which apply them in
their `forward`; this module keeps the training package's import path."""

from ..loss_weighting import (
    STRATEGIES,
    DynamicWeightAverage,
    FixedWeighting,
    LossWeighting,
    UncertaintyWeighting,
    build_loss_weighting,
)

__all__ = [
    "STRATEGIES",
    "DynamicWeightAverage",
    "FixedWeighting",
    "LossWeighting",
    "UncertaintyWeighting",
    "build_loss_weighting",
]
