"""The importer's own ONNX -> torch converters, one module per op family, consulted before onnx2torch's."""

from onnxsparse.importer.converters import (  # noqa: F401 - importing registers the converters
    batch_norm,
    comparisons,
    newer_opsets,
    quantization,
    shape_ops,
)
from onnxsparse.importer.converters.registry import REGISTRY, ConverterError, ConverterKey, Registry, installed

__all__ = ["REGISTRY", "ConverterError", "ConverterKey", "Registry", "installed"]
