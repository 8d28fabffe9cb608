"""The earlier module name of `image_processing_dense_multitask`, kept for code and remote-code `auto_map` entries
that name it (`image_processing_taskexpert.TaskExpertImageProcessor`)."""

from .image_processing_dense_multitask import *  # noqa: F403
from .image_processing_dense_multitask import TaskExpertImageProcessor, __all__  # noqa: F401
