"""onnxsparse: ONNX-to-ONNX post-training sparsity."""

from onnxsparse.errors import OnnxSparseError

__version__ = "0.1.0"

__all__ = ["OnnxSparseError", "__version__"]
