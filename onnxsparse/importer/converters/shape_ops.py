"""Flatten: onnx2torch's module flattens from dim 1 whatever the rank, which is wrong for inputs of rank < 2,
``axis=0`` and negative axes (transformers' attention-mask code flattens a rank-1 tensor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math

import onnx
import torch
from torch import nn

from onnxsparse.importer.converters.registry import REGISTRY, module_result

if TYPE_CHECKING:
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult


class Flatten(nn.Module):
    """ONNX Flatten: a 2-D tensor of shape (prod(dims[:axis]), prod(dims[axis:]))."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@REGISTRY.add("Flatten", 1, onnx.defs.onnx_opset_version())
def convert_flatten(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult | None:
    return module_result(node, Flatten(int(node.attributes.get("axis", 1))))
