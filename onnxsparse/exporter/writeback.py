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
        if tracked.layout.onnx_dtype is not None and tracked.layout.onnx_dtype != target.data_type:
            raise OnnxSparseError(
                f"internal error: tensor {tracked.source.name!r} was read as element type {tracked.layout.onnx_dtype}, "
                f"the model stores type {target.data_type}"
            )
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


# -- sparse initializers (``--save-format sparse-initializer``) --------------------------------------------
# ONNX SparseTensorProto in COO form: ``values`` (nnz,) and ``indices`` (nnz,) linear int64 positions in the
# row-major dense tensor. The ONNX checker requires int64 indices; onnxruntime densifies them at load time.
_INDEX_BYTES = 8
_SPARSE_OVERHEAD = 64  # proto framing of one SparseTensorProto, generous


def sparse_initializer_bytes(array: np.ndarray) -> int:
    """Approximate size of ``array`` stored as a SparseTensorProto with linear int64 indices."""
    nnz = int(np.count_nonzero(array))
    return nnz * (array.dtype.itemsize + _INDEX_BYTES) + _SPARSE_OVERHEAD


def to_sparse_initializers(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` where each named initializer moves to ``graph.sparse_initializer`` (COO, linear
    int64 indices) when that makes it smaller. Constants in nodes, graph inputs (overridable initializers)
    and tensors held as external data stay dense. Returns the copy and the names converted.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    wanted = set(names)
    inputs = {i.name for i in g.input}
    converted: list[str] = []
    keep: list[onnx.TensorProto] = []
    for init in g.initializer:
        if (
            init.name not in wanted
            or init.name in inputs
            or init.data_location == onnx.TensorProto.EXTERNAL
            or init.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED)
        ):
            keep.append(init)
            continue
        array = numpy_helper.to_array(init)
        if array.ndim == 0 or sparse_initializer_bytes(array) >= array.nbytes:
            keep.append(init)
            continue
        flat = array.reshape(-1)
        nz = np.flatnonzero(flat)
        values = numpy_helper.from_array(np.ascontiguousarray(flat[nz]), init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), "")
        g.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        converted.append(init.name)
    if converted:
        del g.initializer[:]
        g.initializer.extend(keep)
    logger.info("%d initializer(s) stored as sparse tensors", len(converted))
    return out, converted


def sparse_to_array(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense numpy value of a COO SparseTensorProto (linear or ``(nnz, rank)`` indices)."""
    values = numpy_helper.to_array(sparse.values)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if values.size:
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        if indices.ndim == 2:
            indices = np.ravel_multi_index(tuple(indices.T), dims)
        dense.reshape(-1)[indices.reshape(-1)] = values.reshape(-1)
    return dense


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when it has no sparse initializers, else a copy with them as dense initializers."""
    if not len(model.graph.sparse_initializer):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for sparse in g.sparse_initializer:
        g.initializer.append(numpy_helper.from_array(sparse_to_array(sparse), sparse.values.name))
    del g.sparse_initializer[:]
    return out
