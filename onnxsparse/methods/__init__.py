"""Pruning methods behind one interface (:class:`PruningMethod`), registered by name."""

from onnxsparse.methods import magnitude, reconstruct, unipts  # noqa: F401 - registration
from onnxsparse.methods.base import MethodResult, PruneContext, PruningMethod, available_methods, get_method, register_method

__all__ = ["MethodResult", "PruneContext", "PruningMethod", "available_methods", "get_method", "register_method"]
