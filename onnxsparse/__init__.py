"""onnxsparse: ONNX-to-ONNX post-training sparsity (UniPTS), verified with onnxruntime.

Public API::

    from onnxsparse import PruneConfig, prune
    result = prune("model.onnx", "model-sparse.onnx", "images/", PruneConfig(sparsity=0.9))
"""

from onnxsparse.errors import OnnxSparseError

__version__ = "0.1.0"

_LAZY = {
    "prune": ("onnxsparse.pipeline", "prune"),
    "PruneResult": ("onnxsparse.pipeline", "PruneResult"),
    "PruneConfig": ("onnxsparse.config", "PruneConfig"),
    "UniPTSConfig": ("onnxsparse.config", "UniPTSConfig"),
    "PreprocessConfig": ("onnxsparse.data", "PreprocessConfig"),
    "load_calibration": ("onnxsparse.data", "load_calibration"),
    "import_model": ("onnxsparse.importer", "import_model"),
    "inspect_model": ("onnxsparse.inspect", "inspect_model"),
}

__all__ = ["OnnxSparseError", "__version__", *_LAZY]


def __getattr__(name: str):
    # torch and onnx2torch are heavy: import them when the API is first used, not at `import onnxsparse`.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'onnxsparse' has no attribute {name!r}")
