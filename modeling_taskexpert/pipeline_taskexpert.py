"""The earlier module name of `pipeline_dense_multitask`, kept for code and saved `custom_pipelines` entries that name
it (`pipeline_taskexpert.MultiTaskDensePredictionPipeline`)."""

from .pipeline_dense_multitask import *  # noqa: F403
from .pipeline_dense_multitask import MultiTaskDensePredictionPipeline  # noqa: F401
