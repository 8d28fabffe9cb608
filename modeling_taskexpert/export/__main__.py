"""Command line of the exports.

    python -m modeling_taskexpert.export onnx --model outputs/taskexpert-synthetic-tiny --output onnx/tiny \
        [--tasks semseg depth] [--opset 18] [--dynamic-size] [--gates]

`--model` is a model folder or a Hub id (this package's model types; remote code is never run). The output folder
gets `model.onnx`, `onnx_export.json`, `config.json` and `preprocessor_config.json` (see `onnx_export`).
"""

import argparse
import logging
import sys

from .onnx_export import DEFAULT_MAX_SIZE, DEFAULT_TOLERANCE, OnnxExportError, export_onnx


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_taskexpert.export", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    onnx = commands.add_parser("onnx", help="export to ONNX and verify the graph in ONNX Runtime")
    onnx.add_argument("--model", required=True, help="model folder or Hub id")
    onnx.add_argument("--output", required=True, help="output folder (must be new or empty, or use --overwrite)")
    onnx.add_argument("--tasks", nargs="+", default=None, help="the tasks in the graph (default: all)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    onnx.add_argument(
        "--dynamic-size", action="store_true",
        help="dynamic height and width (multiples of the patch size up to --max-size); default: fixed to --size",
    )  # fmt: skip
    onnx.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        default=None,
        help="fixed input size (default: the processor's canvas); the example size with --dynamic-size",
    )
    onnx.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="largest side with --dynamic-size")
    onnx.add_argument("--gates", action="store_true", help="add the routing report (gates) as outputs")
    onnx.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                      help="largest accepted |ONNX Runtime - PyTorch| on the verification inputs")  # fmt: skip
    onnx.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ..image_processing_dense_multitask import DenseMultiTaskImageProcessor
    from ..loading import load_dense_model

    try:
        model = load_dense_model(args.model)
        try:
            processor = DenseMultiTaskImageProcessor.from_pretrained(args.model)
        except OSError:
            processor = None  # a folder without preprocessor_config.json: the default processor
        result = export_onnx(
            model, args.output, tasks=args.tasks, opset=args.opset, dynamic_size=args.dynamic_size,
            size=tuple(args.size) if args.size else None, gates=args.gates, processor=processor,
            max_size=args.max_size, tolerance=args.tolerance, overwrite=args.overwrite,
        )  # fmt: skip
    except (OnnxExportError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"Wrote {result.model_file} (tasks {', '.join(result.description['tasks'])}; opset "
        f"{result.description['opset']}); ONNX Runtime matches PyTorch within {result.max_abs_difference:.1g}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
