"""GreaterOrEqual / LessOrEqual at opset 16 and later (bfloat16 added; the semantics are those of opset
12, which onnx2torch registers only for that version)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from onnxsparse.importer.converters.registry import REGISTRY, module_result

if TYPE_CHECKING:
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult


class Compare(nn.Module):
    def __init__(self, op_type: str) -> None:
        super().__init__()
        self.op_type = op_type

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.greater_equal(x, y) if self.op_type == "GreaterOrEqual" else torch.less_equal(x, y)


def _convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult | None:
    return module_result(node, Compare(node.operation_type))


REGISTRY.add("GreaterOrEqual", 16, onnx.defs.onnx_opset_version())(_convert)
REGISTRY.add("LessOrEqual", 16, onnx.defs.onnx_opset_version())(_convert)
