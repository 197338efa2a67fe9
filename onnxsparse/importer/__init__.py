"""Importer: ONNX file -> trainable torch copy plus the map back to the original tensors."""

from onnxsparse.importer.convert import import_model
from onnxsparse.importer.load import load_model, model_opset

__all__ = ["import_model", "load_model", "model_opset"]
