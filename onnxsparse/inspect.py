"""Per-layer sparsity and N:M pattern of any ONNX model, from the graph alone (no conversion).

Sparse initializers (``--save-format sparse-initializer``) are read as their dense values. A weight stored
quantized (a constant behind ``DequantizeLinear``, or behind ``Cast`` -> ``Mul`` by a constant scale: the two
forms ``--quantize int8`` writes) is read as its integers: a weight is zero where its integer equals its zero point.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxsparse.importer.load import INSPECT_MEMORY_FACTOR, load_model
from onnxsparse.importer.normalize import normalize_for_torch
from onnxsparse.sparsity.patterns import check_nm, format_pattern, onnx_group_axis, tightest_pattern
from onnxsparse.exporter.writeback import densify

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerInfo:
    node: str
    op: str
    tensor: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    nm: str = "-"  # tightest standard N:M pattern along the input-channel axis ("2:4", "1:4", ...), "-" if none
    satisfies_2_4: bool = False
    nm_axis: int | None = None  # the ONNX initializer axis the N:M groups run along (TensorRT's layout)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["sparsity"] = self.sparsity
        return d


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """``model``'s initializers by name, and the float32 value of each ``Cast(to=FLOAT)`` of a float16 initializer
    (the form ``--quantize int8`` stores biases and scales in) by its output name, as an initializer would hold it."""
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        source = constants.get(node.input[0]) if node.op_type == "Cast" and len(node.input) == 1 else None
        if (source is not None and source.data_type == onnx.TensorProto.FLOAT16
                and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)):
            values = numpy_helper.to_array(source).astype(np.float32)
            constants[node.output[0]] = numpy_helper.from_array(values, node.output[0])
    return constants


def weight_operand(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str | None:
    """The constant weight input of a prunable node, or None."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return node.input[1] if node.input[1] in constants else None
    a, b = node.input[0], node.input[1]
    if b in constants and len(constants[b].dims) == 2 and a not in constants:
        return b
    if a in constants and len(constants[a].dims) == 2 and b not in constants:
        return a
    return None


def integer_source(value: str, constants: dict[str, onnx.TensorProto],
                   producer: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The node that turns a constant integer tensor into the float ``value``, or None: a ``DequantizeLinear`` of
    a constant, or a ``Mul`` of a ``Cast`` of a constant integer tensor by a constant scale (int8 weights computed
    in float; onnxruntime folds the pair into a float constant when it loads the model)."""
    node = producer.get(value)
    if node is None:
        return None
    if node.op_type == "DequantizeLinear":
        return node if node.input[0] in constants else None
    if node.op_type == "Mul" and len(node.input) == 2:
        return node if _cast_integers(node, constants, producer) is not None else None
    return None


def _cast_integers(mul: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                   producer: dict[str, onnx.NodeProto]) -> tuple[str, str] | None:
    """(integer constant, scale constant) of ``Mul(Cast(integers), scale)`` in either input order, or None."""
    for i in (0, 1):
        cast, scale = producer.get(mul.input[i]), mul.input[1 - i]
        if (cast is not None and cast.op_type == "Cast" and cast.input[0] in constants and scale in constants
                and constants[cast.input[0]].data_type in _INTEGER_TYPES):
            return cast.input[0], scale
    return None


_INTEGER_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32)


def integer_parts(source: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                  producer: dict[str, onnx.NodeProto]) -> tuple[str, str, str | None, int | None]:
    """(integer tensor, scale tensor, zero-point tensor or None, axis or None) of an :func:`integer_source` node.
    ``axis`` is where a 1-D DequantizeLinear scale runs; for ``Mul`` the scale is shaped to broadcast (None)."""
    if source.op_type == "DequantizeLinear":
        axis = next((int(onnx.helper.get_attribute_value(a)) for a in source.attribute if a.name == "axis"), 1)
        zero = source.input[2] if len(source.input) > 2 and source.input[2] in constants else None
        return source.input[0], source.input[1], zero, axis
    integers, scale = _cast_integers(source, constants, producer)
    return integers, scale, None, None


def _quantized_operand(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                       producer: dict[str, onnx.NodeProto]) -> tuple[int, onnx.NodeProto] | None:
    """(input index, integer source node) of a prunable node's weight stored as integers, or None."""
    def integers(value: str) -> onnx.NodeProto | None:
        return integer_source(value, constants, producer)

    if node.op_type in ("Conv", "ConvTranspose"):
        source = integers(node.input[1]) if len(node.input) > 1 else None
        return (1, source) if source is not None else None
    found = [(i, integers(node.input[i])) for i in (0, 1) if i < len(node.input)]
    found = [(i, s) for i, s in found
             if s is not None and len(constants[integer_parts(s, constants, producer)[0]].dims) == 2]
    return found[0] if len(found) == 1 else None


def _centred(source: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
             producer: dict[str, onnx.NodeProto], base_dir: str) -> tuple[str, np.ndarray]:
    """The integer tensor's name and its integers minus the zero point (per tensor or along axis)."""
    integers, _, zero_name, axis = integer_parts(source, constants, producer)
    values = numpy_helper.to_array(constants[integers], base_dir).astype(np.int64)
    if zero_name is None:
        return integers, values
    zero = numpy_helper.to_array(constants[zero_name], base_dir).astype(np.int64)
    if zero.ndim == 1 and values.ndim > 1:
        zero = zero.reshape([-1 if i == axis % values.ndim else 1 for i in range(values.ndim)])
    return integers, values - zero


def inspect_model(model: str | os.PathLike | onnx.ModelProto) -> list[LayerInfo]:
    # Tensors stored as external data are read one at a time from the model's folder.
    if isinstance(model, onnx.ModelProto):
        proto, base_dir = model, ""
    else:
        proto = load_model(model, external_data=False, memory_factors=INSPECT_MEMORY_FACTOR,
                           purpose="inspecting it")
        base_dir = str(Path(model).resolve().parent)
    norm = normalize_for_torch(densify(proto), convert_opset=False)
    constants = constant_tensors(norm.model)
    producer = {out: node for node in norm.model.graph.node for out in node.output}
    rows = []
    for node in norm.model.graph.node:
        if node.op_type not in PRUNABLE_OPS:
            continue
        value = weight_operand(node, constants)
        layout = norm.layouts.get(value) if value is not None else None
        if value is None:
            quantized = _quantized_operand(node, constants, producer)
            if quantized is None:
                continue
            index, source = quantized
            value, array = _centred(source, constants, producer, base_dir)
            axis = onnx_group_axis(node, index, array.ndim)
        else:
            array = numpy_helper.to_array(constants[value], base_dir)
            axis = onnx_group_axis(node, list(node.input).index(value), array.ndim)
        if layout is not None and layout.perm is not None:  # a weight behind a Transpose: the stored layout
            array = np.ascontiguousarray(array.transpose(np.argsort(layout.perm)))
            axis = layout.perm[axis] if axis is not None else None
        tightest = tightest_pattern(array, axis)
        rows.append(
            LayerInfo(
                node=norm.original_nodes[node.name][0],
                op=node.op_type,
                tensor=norm.sources[value].name if value in norm.sources else value,
                shape=tuple(int(d) for d in array.shape),
                params=int(array.size),
                zeros=int(np.count_nonzero(array == 0)),
                nm=format_pattern(tightest) if tightest else "-",
                satisfies_2_4=axis is not None and check_nm(array, 2, 4, axis),
                nm_axis=axis,
            )
        )
    return rows
