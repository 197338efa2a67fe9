"""Per-layer sparsity and N:M pattern of any ONNX model, from the graph alone (no conversion).

Sparse initializers (``--save-format sparse-initializer``) are read as their dense values.
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


def inspect_model(model: str | os.PathLike | onnx.ModelProto) -> list[LayerInfo]:
    from onnxsparse.exporter.writeback import densify

    # Tensors stored as external data are read one at a time from the model's folder.
    if isinstance(model, onnx.ModelProto):
        proto, base_dir = model, ""
    else:
        proto = load_model(model, external_data=False, memory_factors=INSPECT_MEMORY_FACTOR,
                           purpose="inspecting it")
        base_dir = str(Path(model).resolve().parent)
    norm = normalize_for_torch(densify(proto), convert_opset=False)
    constants = {init.name: init for init in norm.model.graph.initializer}
    rows = []
    for node in norm.model.graph.node:
        if node.op_type not in PRUNABLE_OPS:
            continue
        value = weight_operand(node, constants)
        if value is None:
            continue
        array = numpy_helper.to_array(constants[value], base_dir)
        axis = onnx_group_axis(node, list(node.input).index(value), array.ndim)
        layout = norm.layouts.get(value)
        if layout is not None and layout.perm is not None:  # a weight behind a Transpose: the stored layout
            array = np.ascontiguousarray(array.transpose(np.argsort(layout.perm)))
            axis = layout.perm[axis] if axis is not None else None
        tightest = tightest_pattern(array, axis)
        rows.append(
            LayerInfo(
                node=norm.original_nodes[node.name][0],
                op=node.op_type,
                tensor=norm.sources[value].name,
                shape=tuple(int(d) for d in array.shape),
                params=int(array.size),
                zeros=int(np.count_nonzero(array == 0)),
                nm=format_pattern(tightest) if tightest else "-",
                satisfies_2_4=axis is not None and check_nm(array, 2, 4, axis),
                nm_axis=axis,
            )
        )
    return rows
