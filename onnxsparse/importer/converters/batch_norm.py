"""BatchNormalization whose input rank onnx2torch cannot tell (shape inference lost it) or has no
``BatchNorm{1,2,3}d`` for."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from onnxsparse.importer.converters.registry import REGISTRY, ConverterError

if TYPE_CHECKING:
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult

_KNOWN_SPATIAL_RANKS = (0, 1, 2, 3)


class AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):  # noqa: SLF001 - statistics re-estimation needs _BatchNorm
    """Inference-mode ONNX BatchNormalization over axis 1 of an input of any rank >= 2."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() < 2:
            raise ValueError(f"BatchNormalization needs an input of rank >= 2 (N, C, ...), got rank {input.dim()}")


def _spatial_rank(node: OnnxNode, graph: OnnxGraph) -> int | None:
    from onnx2torch.utils.common import get_shape_from_value_info

    info = graph.value_info.get(node.input_values[0])
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return len(get_shape_from_value_info(info)) - 2


@REGISTRY.add("BatchNormalization", 9, onnx.defs.onnx_opset_version())
def convert_batchnorm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult | None:
    """Constant statistics and one output with an unknown or unusual input rank: an :class:`AnyRankBatchNorm`.

    Every other case (the rank is known, statistics computed at run time, training outputs) stays with
    onnx2torch, so the module types of already-supported models do not change.
    """
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    params = node.input_values[1:5]
    if len(params) != 4 or not all(name in graph.initializers for name in params) or len(node.output_values) != 1:
        return None
    if _spatial_rank(node, graph) in _KNOWN_SPATIAL_RANKS:
        return None
    attrs = node.attributes
    if attrs.get("training_mode", 0):
        raise ConverterError("training_mode=1 is not supported (inference graphs only)")
    scale, bias, mean, var = (graph.initializers[name].to_torch() for name in params)
    module = AnyRankBatchNorm(
        num_features=int(scale.shape[0]), eps=float(attrs.get("epsilon", 1e-5)),
        momentum=1.0 - float(attrs.get("momentum", 0.9)),
    )
    with torch.no_grad():
        module.weight.data = scale
        module.bias.data = bias
        module.running_mean.data = mean
        module.running_var.data = var
    return OperationConverterResult(
        torch_module=module, onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    )
