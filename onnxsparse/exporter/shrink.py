"""Physical channel removal in a ModelProto, by tensor name, from the groups of :mod:`onnxsparse.structured`.

:func:`shrink` slices every parameter a removed channel owns (producer rows, per-channel constants, BatchNorm
parameters, depthwise filters, consumer columns), lowers depthwise ``group`` attributes and the shape constants of
flattening Reshapes, re-runs shape inference and the ONNX checker. :func:`mask_consumers` is the reference it
must equal: the same graph, dense, with the removed channels' consumer columns set to zero.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.structured.groups import ChannelAnalysis, tensors_of

logger = logging.getLogger(__name__)


def _removals(analysis: ChannelAnalysis, removed: Mapping[int, Sequence[int]], roles: tuple[str, ...]
              ) -> dict[str, dict[int, set[int]]]:
    """Tensor name -> axis -> indices owned by removed channels."""
    out: dict[str, dict[int, set[int]]] = {}
    for index, channels in removed.items():
        channels = list(channels)
        if not channels:
            continue
        group = analysis.groups[index]
        if not group.prunable:
            raise OnnxSparseError(f"internal error: channel group {index} is not prunable ({group.reason})")
        if max(channels) >= group.channels or min(channels) < 0 or len(set(channels)) == group.channels:
            raise OnnxSparseError(f"internal error: group {index} has {group.channels} channels; asked to remove "
                                  f"{len(set(channels))} of them")
        for param in group.params:
            if param.role in roles:
                out.setdefault(param.name, {}).setdefault(param.axis, set()).update(
                    group.indices(param, channels).tolist())
    return out


def mask_consumers(model: onnx.ModelProto, analysis: ChannelAnalysis,
                   removed: Mapping[int, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose consumers read zero from every removed channel (same shapes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensors = tensors_of(out)
    for name, axes in _removals(analysis, removed, ("consumer",)).items():
        array = numpy_helper.to_array(tensors[name]).copy()
        for axis, idx in axes.items():
            index = [slice(None)] * array.ndim
            index[axis] = sorted(idx)
            array[tuple(index)] = 0
        tensors[name].CopyFrom(numpy_helper.from_array(array, tensors[name].name))
    return out


def shrink(model: onnx.ModelProto, analysis: ChannelAnalysis, removed: Mapping[int, Sequence[int]], *,
           check: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` without the channels ``removed[group] = [channel, ...]`` (external data loaded)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensors = tensors_of(out)
    for name, axes in _removals(analysis, removed, ("producer", "channelwise", "consumer")).items():
        if name not in tensors:
            raise OnnxSparseError(f"internal error: tensor {name!r} not found in the model")
        array = numpy_helper.to_array(tensors[name])
        for axis, idx in axes.items():
            array = np.delete(array, sorted(idx), axis=axis)
        tensors[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensors[name].name))
    group_drop: dict[str, int] = {}
    shape_drop: dict[tuple[str, int], int] = {}
    for index, channels in removed.items():
        n = len(set(channels))
        if not n:
            continue
        group = analysis.groups[index]
        for node in group.group_convs:
            group_drop[node] = group_drop.get(node, 0) + n
        for edit in group.shape_edits:
            shape_drop[(edit.name, edit.index)] = shape_drop.get((edit.name, edit.index), 0) + n * edit.repeat
    for node in out.graph.node:
        drop = group_drop.get(node.output[0]) if node.output else None
        if drop:
            for attr in node.attribute:
                if attr.name == "group":
                    attr.CopyFrom(helper.make_attribute("group", int(attr.i) - drop))
    for (name, index), drop in shape_drop.items():
        array = numpy_helper.to_array(tensors[name]).copy()
        array[index] -= drop
        tensors[name].CopyFrom(numpy_helper.from_array(array, tensors[name].name))
    # intermediate shapes are stale: drop them and infer again (graph inputs and outputs keep theirs)
    del out.graph.value_info[:]
    if check:
        out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
        onnx.checker.check_model(out, full_check=True)
    logger.info("removed %d channel(s) from %d group(s)", sum(len(set(c)) for c in removed.values()),
                sum(1 for c in removed.values() if len(c)))
    return out
