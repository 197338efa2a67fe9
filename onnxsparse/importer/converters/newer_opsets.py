"""Ops whose newer versions only widen the accepted element types (int4, float8, bfloat16, strings):
converted with onnx2torch's converter for the last version it knows. The ONNX version converter has no
down-adapters for some of them (ConstantOfShape 20, ...), so models of opset 19 and later reach onnx2torch
at their own opset; without these entries onnx2torch refuses every such op."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from onnxsparse.importer.converters.registry import REGISTRY, Converter, ConverterError, module_result

if TYPE_CHECKING:
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult

# op type -> (first newer version whose change is types only, onnx2torch's last registered version)
_TYPE_ONLY_BUMPS = {
    "Cast": (19, 13),  # 19: `saturate` (float8 targets only), 21: int4 types
    "Constant": (19, 13),
    "ConstantOfShape": (20, 9),
    "Equal": (19, 13),  # 19: strings
    "Identity": (19, 16),
    "IsInf": (20, 10),
    "IsNaN": (20, 13),
    "Reshape": (19, 14),
    "Shape": (19, 15),
    "Transpose": (21, 13),
    "Unsqueeze": (21, 13),
}
_FLOAT8_AND_INT4 = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "INT4", "UINT4")
    if hasattr(onnx.TensorProto, name)
)


def _older(op_type: str, version: int) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult | None:
        from onnx2torch.node_converters.registry import get_converter

        if op_type == "Cast" and int(node.attributes.get("to", 0)) in _FLOAT8_AND_INT4:
            raise ConverterError("Cast to a float8/int4 type is not supported")
        return get_converter(operation_type=op_type, version=version)(node, graph)

    return convert


for _op, (_first, _older_version) in _TYPE_ONLY_BUMPS.items():
    REGISTRY.add(_op, _first, onnx.defs.onnx_opset_version())(_older(_op, _older_version))


class Gelu(nn.Module):
    """ONNX Gelu (opset 20): exact (erf) or tanh approximation."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate=self.approximate)


@REGISTRY.add("Gelu", 20, onnx.defs.onnx_opset_version())
def convert_gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult | None:
    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    if approximate not in ("none", "tanh"):
        raise ConverterError(f"approximate={approximate!r}; ONNX allows 'none' or 'tanh'")
    return module_result(node, Gelu(approximate))
