"""TaskExpert (ICCV 2023) multi-task dense prediction models for the Hugging Face ecosystem.

Importing the package registers the model types with the transformers Auto classes and the
`multi-task-dense-prediction` pipeline, and marks the classes for remote code, so that `save_pretrained` writes the
code files and `auto_map` a fresh environment needs to load a checkpoint with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_modsquad import ModSquadConfig
from .configuration_taskexpert import TaskExpertConfig
from .dense_model_utils import DenseMultiTaskPreTrainedModel
from .image_processing_taskexpert import TaskExpertImageProcessor, logits_to_predictions
from .modeling_modsquad import (
    ModSquadForDensePrediction,
    ModSquadModel,
    ModSquadModelOutput,
    ModSquadOutput,
    ModSquadPreTrainedModel,
)
from .modeling_taskexpert import (
    TaskExpertForDensePrediction,
    TaskExpertModel,
    TaskExpertModelOutput,
    TaskExpertOutput,
    TaskExpertPreTrainedModel,
)
from .pipeline_taskexpert import MultiTaskDensePredictionPipeline
from .task_definitions import IGNORE_INDEX, PIPELINE_TASK, TASKS

AutoConfig.register(TaskExpertConfig.model_type, TaskExpertConfig, exist_ok=True)
# AutoModel gives the model with heads: a dense multi-task model has no task-specific Auto class.
AutoModel.register(TaskExpertConfig, TaskExpertForDensePrediction, exist_ok=True)
AutoImageProcessor.register(TaskExpertConfig, image_processor_classes={"pil": TaskExpertImageProcessor}, exist_ok=True)
TaskExpertConfig.register_for_auto_class()
TaskExpertForDensePrediction.register_for_auto_class("AutoModel")
TaskExpertImageProcessor.register_for_auto_class("AutoImageProcessor")
AutoConfig.register(ModSquadConfig.model_type, ModSquadConfig, exist_ok=True)
AutoModel.register(ModSquadConfig, ModSquadForDensePrediction, exist_ok=True)
AutoImageProcessor.register(ModSquadConfig, image_processor_classes={"pil": TaskExpertImageProcessor}, exist_ok=True)
ModSquadConfig.register_for_auto_class()
ModSquadForDensePrediction.register_for_auto_class("AutoModel")
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=MultiTaskDensePredictionPipeline, pt_model=AutoModel, type="image"
)

__all__ = [
    "DenseMultiTaskPreTrainedModel",
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
    "TaskExpertImageProcessor",
    "TaskExpertModel",
    "TaskExpertModelOutput",
    "TaskExpertOutput",
    "TaskExpertPreTrainedModel",
    "logits_to_predictions",
]
