"""Command line: `python -m modeling_taskexpert.data {pascal-context,nyud,taskonomy,synthetic,folder,push} ...`.

Exit status: 0 on success, 2 for bad input or usage (arguments, a missing or damaged raw archive, an
existing output folder without --overwrite), 1 for a failure while running (the Hub unreachable, a
disk error), 130 when interrupted.
"""

import argparse
import logging
import sys
from pathlib import Path

from . import SOURCES
from . import folder as folder_module
from . import taskonomy
from .schema import DatasetNotAvailableError, has_dataset_metadata, push_dataset_to_hub, read_dataset_metadata
from .source import convert
from .synthetic import DEFAULT_IMAGE_SIZE, DEFAULT_TRAIN_SIZE, DEFAULT_VAL_SIZE, generate_synthetic_dataset
from .writer import DEFAULT_MAX_SHARD_BYTES, ON_ERROR_CHOICES, DatasetConversionError, parse_size


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, type=Path, help="dataset folder to create")
    parser.add_argument("--num-workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
        help="a parquet shard ends once its rows hold this much (e.g. 500MB, the default; or 1000 rows)",
    )  # fmt: skip


def _add_converter(subparsers, name: str, archive: str) -> None:
    parser = subparsers.add_parser(name, help=f"convert the extracted {archive} archive")
    parser.add_argument("--raw-dir", required=True, type=Path, help=f"the extracted {archive} folder (or its parent)")
    _add_output_options(parser)
    parser.add_argument(
        "--on-error", choices=ON_ERROR_CHOICES, default="stop",
        help="on a missing or corrupt raw file: stop (default, nothing is written) or skip the sample",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_taskexpert.data",
        description="Create multi-task dense datasets in the Hub's dataset layout, or push one to the Hub.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for source in SOURCES.values():
        _add_converter(subparsers, source.name, source.archive)

    source = subparsers.add_parser(
        "taskonomy", help="convert the raw Taskonomy layout (rgb/, <task>/, splits_taskonomy/)",
        description=taskonomy.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    source.add_argument("--raw-dir", required=True, type=Path, help="the Taskonomy root (holding rgb/ and the tasks)")
    _add_output_options(source)
    source.add_argument("--split-size", choices=taskonomy.SPLIT_SIZES, default="tiny",
                        help="which splits_taskonomy/train_val_test_<size>.csv to use")  # fmt: skip
    source.add_argument("--tasks", nargs="+", default=None, help=f"a subset of {', '.join(taskonomy.TASKS)}")
    source.add_argument("--buildings", nargs="+", default=None, help="convert only these buildings")
    source.add_argument("--max-views-per-building", type=int, default=None, help="at most this many views each")
    source.add_argument("--exclude-buildings", nargs="*", default=list(taskonomy.DEFAULT_EXCLUDED_BUILDINGS),
                        help="buildings left out (default: the reference's woodbine and wiconisco)")  # fmt: skip
    source.add_argument(
        "--on-error", choices=ON_ERROR_CHOICES, default="stop",
        help="on a corrupt raw file: stop (default, nothing is written) or skip the sample (a missing task file is "
        "not an error: the view has no label for that task)",
    )  # fmt: skip

    synthetic = subparsers.add_parser("synthetic", help="generate the embedded synthetic benchmark (no download)")
    _add_output_options(synthetic)
    synthetic.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help="train samples")
    synthetic.add_argument("--val-size", type=int, default=DEFAULT_VAL_SIZE, help="validation samples")
    synthetic.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="side of the square images")
    synthetic.add_argument("--seed", type=int, default=0, help="dataset seed")
    synthetic.add_argument(
        "--skip-if-exists", action="store_true", help="do nothing if a complete dataset is already at --output-dir"
    )
    synthetic.add_argument(
        "--style", choices=("pascal", "taskonomy"), default="pascal",
        help="pascal: the six tasks of PASCAL-Context/NYUD-v2 (default); taskonomy: Taskonomy's 13 tasks",
    )  # fmt: skip

    folder = subparsers.add_parser(
        "folder",
        help="convert your own folder of images and label files (described by its tasks.yaml)",
        description=folder_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    folder.add_argument("--input-dir", required=True, type=Path, help="the folder with tasks.yaml, images/, <task>/")
    _add_output_options(folder)
    folder.add_argument(
        "--on-error", choices=ON_ERROR_CHOICES, default="stop",
        help="on a missing, corrupt or invalid file: stop (default, nothing is written) or skip the sample",
    )  # fmt: skip

    push = subparsers.add_parser("push", help="upload a dataset folder to a Hub dataset repository")
    push.add_argument("folder", type=Path, help="dataset folder")
    push.add_argument("--repo-id", required=True, help="Hub dataset repository, user/name")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: the stored login)")
    return parser


def run(args: argparse.Namespace) -> str:
    """Execute a parsed command; return a one-line summary."""
    if args.command == "push":
        url = push_dataset_to_hub(args.folder, args.repo_id, private=args.private, token=args.token)
        return f"Pushed {args.folder} to {url}"
    if args.command == "synthetic":
        if args.skip_if_exists and has_dataset_metadata(args.output_dir):
            splits = read_dataset_metadata(args.output_dir)["splits"]
            return f"{args.output_dir} already holds a dataset ({splits}); nothing to do."
        generate_synthetic_dataset(
            args.output_dir, train_size=args.train_size, val_size=args.val_size, image_size=args.image_size,
            seed=args.seed, num_workers=args.num_workers, overwrite=args.overwrite, style=args.style,
            max_shard_bytes=args.max_shard_size,
        )  # fmt: skip
    elif args.command == "taskonomy":
        if args.max_views_per_building is not None and args.max_views_per_building < 1:
            raise ValueError("--max-views-per-building must be at least 1.")
        taskonomy.convert_taskonomy(
            args.raw_dir, args.output_dir, split_size=args.split_size, tasks=args.tasks, buildings=args.buildings,
            max_views_per_building=args.max_views_per_building, excluded=args.exclude_buildings,
            num_workers=args.num_workers, on_error=args.on_error, overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_size,
        )  # fmt: skip
    elif args.command == "folder":
        folder_module.convert_folder(args.input_dir, args.output_dir, num_workers=args.num_workers,
                                     on_error=args.on_error, overwrite=args.overwrite,
                                     max_shard_bytes=args.max_shard_size)  # fmt: skip
    else:
        convert(SOURCES[args.command], args.raw_dir, args.output_dir, num_workers=args.num_workers,
                on_error=args.on_error, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size)  # fmt: skip
    splits = read_dataset_metadata(args.output_dir)["splits"]
    return f"Wrote {args.output_dir} ({', '.join(f'{split}: {count}' for split, count in splits.items())})"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        print(run(args))
    except KeyboardInterrupt:
        written = "" if args.command == "push" else "; the output folder was not created or changed"
        print(f"Interrupted{written}.", file=sys.stderr)
        return 130
    except (DatasetConversionError, DatasetNotAvailableError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
