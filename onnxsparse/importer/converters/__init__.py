"""The importer's own ONNX -> torch converters, one module per op family, consulted before onnx2torch's."""

from onnxsparse.importer.converters import batch_norm, comparisons, quantization, shape_ops  # noqa: F401 - register
from onnxsparse.importer.converters.registry import REGISTRY, ConverterError, ConverterKey, Registry, installed

__all__ = ["REGISTRY", "ConverterError", "ConverterKey", "Registry", "installed"]
