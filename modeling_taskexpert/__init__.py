"""TaskExpert (ICCV 2023) multi-task dense prediction models for the Hugging Face ecosystem.

Importing the package registers the model types with the transformers Auto classes and the
`multi-task-dense-prediction` pipeline, and marks the classes for remote code, so that `save_pretrained` writes the
code files and `auto_map` a fresh environment needs to load a checkpoint with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_common import DenseMultiTaskConfig
from .configuration_modsquad import ModSquadConfig
from .configuration_taskexpert import TaskExpertConfig
from .dense_model_utils import DenseMultiTaskModelOutput, DenseMultiTaskOutput, DenseMultiTaskPreTrainedModel
from .image_processing_dense_multitask import (
    DenseMultiTaskImageProcessor,
    TaskExpertImageProcessor,
    logits_to_predictions,
)
from .modeling_modsquad import (
    ModSquadForDensePrediction,
    ModSquadModel,
    ModSquadModelOutput,
    ModSquadOutput,
    ModSquadPreTrainedModel,
)
from .loss_weighting import LossWeighting, build_loss_weighting
from .model_types import MODEL_TYPES
from .modeling_taskexpert import (
    TaskExpertForDensePrediction,
    TaskExpertModel,
    TaskExpertModelOutput,
    TaskExpertOutput,
    TaskExpertPreTrainedModel,
)
from .pipeline_dense_multitask import MultiTaskDensePredictionPipeline
from .task_definitions import IGNORE_INDEX, PIPELINE_TASK, TASKS

for _entry in MODEL_TYPES.values():
    AutoConfig.register(_entry.name, _entry.config_class, exist_ok=True)
    # AutoModel gives the model with heads: a dense multi-task model has no task-specific Auto class.
    AutoModel.register(_entry.config_class, _entry.model_class, exist_ok=True)
    # The processor's earlier name is registered too, so that a `preprocessor_config.json` naming it finds it.
    AutoImageProcessor.register(
        _entry.config_class,
        image_processor_classes={"pil": DenseMultiTaskImageProcessor, "earlier_name": TaskExpertImageProcessor},
        exist_ok=True,
    )
    _entry.config_class.register_for_auto_class()
    _entry.model_class.register_for_auto_class("AutoModel")
DenseMultiTaskImageProcessor.register_for_auto_class("AutoImageProcessor")
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=MultiTaskDensePredictionPipeline, pt_model=AutoModel, type="image"
)

__all__ = [
    "DenseMultiTaskConfig",
    "DenseMultiTaskModelOutput",
    "DenseMultiTaskOutput",
    "DenseMultiTaskPreTrainedModel",
    "LossWeighting",
    "build_loss_weighting",
    "IGNORE_INDEX",
    "PIPELINE_TASK",
    "TASKS",
    "ModSquadConfig",
    "ModSquadForDensePrediction",
    "ModSquadModel",
    "ModSquadModelOutput",
    "ModSquadOutput",
    "ModSquadPreTrainedModel",
    "MultiTaskDensePredictionPipeline",
    "TaskExpertConfig",
    "TaskExpertForDensePrediction",
    "DenseMultiTaskImageProcessor",
    "TaskExpertImageProcessor",
    "TaskExpertModel",
    "TaskExpertModelOutput",
    "TaskExpertOutput",
    "TaskExpertPreTrainedModel",
    "logits_to_predictions",
]
