"""Exports of the models to other runtimes: `python -m modeling_taskexpert.export onnx --help`."""

from .onnx_export import OnnxExport, OnnxExportError, export_onnx

__all__ = ["OnnxExport", "OnnxExportError", "export_onnx"]
