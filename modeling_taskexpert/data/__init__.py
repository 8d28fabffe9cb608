"""Multi-task dense datasets: one schema for every source, converters, the synthetic benchmark,
transforms and the batch collate.

Sources (each writes a dataset folder in the Hub's dataset layout, see `docs/architecture.md`):
`convert_pascal_context`, `convert_nyud`, `generate_synthetic_dataset`; the command line is
`python -m modeling_taskexpert.data --help`.
"""

from .nyud import convert_nyud
from .pascal_context import convert_pascal_context
from .schema import (
    METADATA_FILENAME,
    SPLITS,
    DatasetNotAvailableError,
    load_dataset_metadata,
    load_multitask_dataset,
    push_dataset_to_hub,
)
from .synthetic import generate_synthetic_dataset
from .transforms import IMAGE_MEAN, IMAGE_STD, DenseTransform, build_transforms, collate_dense_batch
from .writer import DatasetConversionError, RawDataError

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "METADATA_FILENAME",
    "SPLITS",
    "DatasetConversionError",
    "DatasetNotAvailableError",
    "DenseTransform",
    "RawDataError",
    "build_transforms",
    "collate_dense_batch",
    "convert_nyud",
    "convert_pascal_context",
    "generate_synthetic_dataset",
    "load_dataset_metadata",
    "load_multitask_dataset",
    "push_dataset_to_hub",
]
