"""Multi-task dense datasets: one schema for every source, converters, the synthetic benchmark,
transforms and the batch collate.

Sources (each writes a dataset folder in the Hub's dataset layout, see `docs/architecture.md`):
the raw archives described in `SOURCES` (`convert(source, raw_dir, output_dir)`, or
`convert_pascal_context` / `convert_nyud`) and `generate_synthetic_dataset`; the command line is
`python -m modeling_taskexpert.data --help`.
"""

from .nyud import NYUD, convert_nyud
from .pascal_context import PASCAL_CONTEXT, convert_pascal_context
from .schema import (
    METADATA_FILENAME,
    SPLITS,
    DatasetNotAvailableError,
    dataset_task_specs,
    has_dataset_metadata,
    load_multitask_dataset,
    push_dataset_to_hub,
    read_dataset_metadata,
)
from .source import DatasetSource, convert
from .synthetic import generate_synthetic_dataset
from .transforms import IMAGE_MEAN, IMAGE_STD, DenseTransform, build_transforms, collate_dense_batch
from .writer import DatasetConversionError, RawDataError

# The raw archives the converter knows, by name (also the command-line subcommands). A new source is one module with
# its `DatasetSource`, added here.
SOURCES = {source.name: source for source in (PASCAL_CONTEXT, NYUD)}

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "METADATA_FILENAME",
    "NYUD",
    "PASCAL_CONTEXT",
    "SOURCES",
    "SPLITS",
    "DatasetConversionError",
    "DatasetNotAvailableError",
    "DatasetSource",
    "DenseTransform",
    "RawDataError",
    "build_transforms",
    "collate_dense_batch",
    "convert",
    "convert_nyud",
    "convert_pascal_context",
    "dataset_task_specs",
    "generate_synthetic_dataset",
    "has_dataset_metadata",
    "load_multitask_dataset",
    "push_dataset_to_hub",
    "read_dataset_metadata",
]
