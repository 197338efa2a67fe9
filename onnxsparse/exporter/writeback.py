"""Writing changed torch tensors back into a copy of the original ModelProto, by tensor name."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, helper, numpy_helper
from torch import nn

from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import ImportedModel, TensorSource, TrackedTensor
from onnxsparse.importer.load import external_info, external_tensors

logger = logging.getLogger(__name__)


def _locate(model: onnx.ModelProto) -> dict[TensorSource, onnx.TensorProto]:
    found = {TensorSource("initializer", init.name): init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    found[TensorSource("constant", node.output[0])] = attr.t
    return found


# Offsets of tensors in a written external-data file are multiples of this (onnxruntime maps aligned data).
_EXTERNAL_ALIGN = 4096
_COPY_CHUNK = 64 << 20


def _changed_array(tracked: TrackedTensor, module: nn.Module, target: onnx.TensorProto) -> np.ndarray | None:
    """The ONNX value of ``tracked`` in ``module`` when it differs from the original, else None."""
    current = tracked.get(module).detach().to("cpu")
    if current.dtype == tracked.original.dtype and torch.equal(current, tracked.original):
        return None
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
    return array.astype(dtype, copy=False)


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _copy_external(out, tensor: onnx.TensorProto, base_dir: Path) -> None:
    info = external_info(tensor)
    source = base_dir / info["location"]
    with open(source, "rb") as src:
        src.seek(int(info.get("offset", 0)))
        left = int(info["length"]) if "length" in info else source.stat().st_size - src.tell()
        while left > 0:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OnnxSparseError(f"external data of tensor {tensor.name!r} ends early in {str(source)!r}")
            out.write(chunk)
            left -= len(chunk)


def _stream_external(model: onnx.ModelProto, base_dir: Path, data_file: Path,
                     streamed: dict[TensorSource, TrackedTensor], module: nn.Module, written: list[str]) -> None:
    """Write every external tensor of ``model`` into ``data_file`` and point the tensors at it.

    Unchanged tensors are copied byte for byte from the input's data files; changed ones are written from
    ``module`` one at a time, so at most one tensor's bytes are in memory beyond the module itself.
    """
    def place(out, tensor: onnx.TensorProto, tracked: TrackedTensor | None) -> None:
        pad = -out.tell() % _EXTERNAL_ALIGN
        if pad:
            out.write(b"\0" * pad)
        start = out.tell()
        array = _changed_array(tracked, module, tensor) if tracked is not None else None
        if array is not None:
            out.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            written.append(tracked.source.name)
            del array
        else:
            _copy_external(out, tensor, base_dir)
        _set_location(tensor, data_file.name, start, out.tell() - start)

    with open(data_file, "wb") as out:
        for source, tensor in _locate(model).items():
            if external_data_helper.uses_external_data(tensor):
                place(out, tensor, streamed.get(source))
        # external tensors outside initializers and Constant nodes (other attributes) are copied as they are
        for tensor, info in external_tensors(model):
            if info.get("location") != data_file.name:
                place(out, tensor, None)


def write_back(imported: ImportedModel, module: nn.Module, metadata: dict[str, str] | None = None, *,
               data_file: Path | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the original model where every changed tracked tensor is replaced, same dtype and shape.

    Unchanged tensors are left byte-for-byte as they were (pruning at sparsity 0 is a no-op).
    ``module`` must hold plain parameters (masks baked).

    Tensors the original keeps as external data (``imported.base_dir`` set): with ``data_file``, they are
    streamed into that file (the copy refers to it by name, as if saved in its folder) and stay out of
    memory; without it, the copy holds them in memory (small models only: a proto cannot pass 2 GB).
    """
    model = onnx.ModelProto()
    model.CopyFrom(imported.proto)
    external = imported.base_dir is not None
    if external and data_file is None:
        external_data_helper.load_external_data_for_model(model, str(imported.base_dir))
        external = False
    tensors = _locate(model)
    changed: list[str] = []
    streamed: dict[TensorSource, TrackedTensor] = {}
    for tracked in imported.tracked:
        if tracked.shared:
            continue
        target = tensors.get(tracked.source)
        if target is None:
            raise OnnxSparseError(f"internal error: tensor {tracked.source.name!r} not found in the original model")
        if external and external_data_helper.uses_external_data(target):
            streamed[tracked.source] = tracked
            continue
        array = _changed_array(tracked, module, target)
        if array is None:
            continue
        target.CopyFrom(numpy_helper.from_array(array, target.name))
        changed.append(tracked.source.name)
    if external:
        _stream_external(model, imported.base_dir, data_file, streamed, module, changed)
    for key, value in (metadata or {}).items():
        set_metadata(model, key, value)
    logger.info("wrote back %d changed tensor(s)", len(changed))
    return model, changed


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set one ``metadata_props`` entry in place: a model pruned again keeps one entry per key (the ONNX checker
    refuses duplicates), in its original position."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


_PLAIN = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_))


class _LazyArrays(Mapping):
    """Tensor name -> numpy value, read on access (external data from ``base_dir``): one tensor at a time."""

    def __init__(self, tensors: dict[str, onnx.TensorProto], base_dir: Path | None) -> None:
        self._tensors = tensors
        self._base_dir = "" if base_dir is None else str(base_dir)

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if external_data_helper.uses_external_data(tensor) and sys.byteorder == "little" and dtype in _PLAIN:
            # read straight into the array: numpy_helper holds the file's bytes and the array at once
            info = external_info(tensor)
            count = int(np.prod(tensor.dims, dtype=np.int64))
            with open(Path(self._base_dir) / info["location"], "rb") as fh:
                fh.seek(int(info.get("offset", 0)))
                array = np.fromfile(fh, dtype=dtype, count=count)
            if array.size != count:
                raise OnnxSparseError(f"external data of tensor {name!r} ends early")
            return array.reshape(tuple(tensor.dims))
        return numpy_helper.to_array(tensor, self._base_dir)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def tensor_arrays(model: onnx.ModelProto, names: list[TensorSource], base_dir: Path | None = None) -> Mapping[
    str, np.ndarray
]:
    """The values of the named tensors, each read when looked up (``base_dir``: where external data lives)."""
    tensors = _locate(model)
    return _LazyArrays({s.name: tensors[s] for s in names if s in tensors}, base_dir)


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors ``model`` keeps as external data."""
    return sum(int(info.get("length", 0)) for _, info in external_tensors(model))


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
