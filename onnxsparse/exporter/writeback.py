"""Writing changed torch tensors back into a copy of the original ModelProto, by tensor name."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import ImportedModel, TensorSource

logger = logging.getLogger(__name__)


def _locate(model: onnx.ModelProto) -> dict[TensorSource, onnx.TensorProto]:
    found = {TensorSource("initializer", init.name): init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    found[TensorSource("constant", node.output[0])] = attr.t
    return found


def write_back(imported: ImportedModel, module: nn.Module, metadata: dict[str, str] | None = None) -> tuple[
    onnx.ModelProto, list[str]
]:
    """A copy of the original model where every changed tracked tensor is replaced, same dtype and shape.

    Unchanged tensors are left byte-for-byte as they were (pruning at sparsity 0 is a no-op).
    ``module`` must hold plain parameters (masks baked).
    """
    model = onnx.ModelProto()
    model.CopyFrom(imported.proto)
    tensors = _locate(model)
    changed: list[str] = []
    for tracked in imported.tracked:
        if tracked.shared:
            continue
        current = tracked.get(module).detach().to("cpu")
        if current.dtype == tracked.original.dtype and torch.equal(current, tracked.original):
            continue
        target = tensors.get(tracked.source)
        if target is None:
            raise OnnxSparseError(f"internal error: tensor {tracked.source.name!r} not found in the original model")
        dtype = helper.tensor_dtype_to_np_dtype(target.data_type)
        array = tracked.layout.to_onnx(current)
        if tuple(array.shape) != tuple(target.dims):
            raise OnnxSparseError(
                f"internal error: tensor {tracked.source.name!r} has shape {tuple(array.shape)} after the layout "
                f"transform, the model declares {tuple(target.dims)}"
            )
        if not np.isfinite(array).all():
            raise OnnxSparseError(f"tensor {tracked.source.name!r} holds NaN or Inf: refusing to write the model")
        if tracked.role == "bn_var":
            array = np.maximum(array, 0.0)
        replacement = numpy_helper.from_array(array.astype(dtype), target.name)
        target.CopyFrom(replacement)
        changed.append(tracked.source.name)
    if metadata:
        props = {p.key: p.value for p in model.metadata_props}
        props.update(metadata)
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    logger.info("wrote back %d changed tensor(s)", len(changed))
    return model, changed


def tensor_arrays(model: onnx.ModelProto, names: list[TensorSource]) -> dict[str, np.ndarray]:
    tensors = _locate(model)
    return {s.name: numpy_helper.to_array(tensors[s]) for s in names if s in tensors}
