"""DequantizeLinear (QDQ models): onnx2torch has no converter. Weights behind it stay quantized and are
reported as skipped by the importer; this only lets the rest of the model convert."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from onnxsparse.importer.converters.registry import REGISTRY, ConverterError, module_result

if TYPE_CHECKING:
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult


class DequantizeLinear(nn.Module):
    """``(x - zero_point) * scale``, per tensor or per ``axis`` (ONNX DequantizeLinear without blocks)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
        centred = x.to(scale.dtype)
        if zero_point is not None:
            centred = centred - self._along_axis(zero_point.to(scale.dtype), x)
        return centred * self._along_axis(scale, x)

    def _along_axis(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-axis (1-D) ``t`` shaped to broadcast along ``axis`` of ``x``; a per-tensor one as it is."""
        if t.dim() == 1 and x.dim() > 1:
            return t.reshape([-1 if i == self.axis % x.dim() else 1 for i in range(x.dim())])
        return t


@REGISTRY.add("DequantizeLinear", 10, onnx.defs.onnx_opset_version())
def convert_dequantize_linear(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult | None:
    if node.attributes.get("block_size", 0):
        raise ConverterError("blocked quantization (block_size) is not supported")
    return module_result(node, DequantizeLinear(int(node.attributes.get("axis", 1))))
