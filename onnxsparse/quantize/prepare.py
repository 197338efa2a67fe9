"""The model int8 candidates are made from: Constant-node tensors as initializers, BatchNormalization folded into
the Conv in front of it. Both are what onnxruntime does when it loads a float model, so the float model runs the
same either way; quantized, they are another matter.

- ``quantize_static`` quantizes initializers as weights (int8, per channel) but treats a ``Constant`` node's tensor
  as an activation: exporters that write weights as Constant nodes (paddle2onnx: the PP-OCR models) get no int8
  weights at all. The initializers keep the Constant's output name, the name the importer records the weight by.
- ``quantize_static`` leaves BatchNormalization in float between a DequantizeLinear and a QuantizeLinear, so every
  such Conv pays a round trip through float, and the file keeps four float tensors per channel. onnxruntime's own
  advice is to pre-process (fold) before quantizing; this is that fold, limited to what keeps the weights' names:
  the Conv's weight is rescaled per output channel in place (a zero stays exactly zero) and its bias is rewritten
  or added, so every pruned weight is still found, and counted, by name.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, version_converter

logger = logging.getLogger(__name__)


def attribute(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default``."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def names_in_use(graph: onnx.GraphProto) -> set[str]:
    """Every initializer, node, value and graph-input name of ``graph``: what a new name must avoid."""
    return ({init.name for init in graph.initializer} | {n.name for n in graph.node}
            | {v for n in graph.node for v in (*n.input, *n.output)} | {v.name for v in graph.input})


def prepend_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Put ``nodes`` first in ``graph`` (so every reader, subgraphs included, sees their outputs defined)."""
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_K`` with the first K that is not taken; the name returned is added to ``taken``."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def prepare_for_int8(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None
                     ) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with Constant-node tensors as initializers and BatchNormalization folded, and what was
    done. Per-channel int8 weights need opset 13 (DequantizeLinear's ``axis``): an older model is converted with
    onnx's version converter first, kept only where onnxruntime gives the same outputs on ``feed``; where it is
    not, the Constant nodes stay (their tensors are then quantized as activations, as before)."""
    info: dict = {"opset": _opset(model)}
    if info["opset"] < MIN_OPSET:
        converted = _converted(model, feed)
        if converted is None:
            info.update(constants_as_initializers=0, batchnorm_folded=0,
                        opset_note=f"opset {info['opset']} could not be converted to {MIN_OPSET} with the same outputs")
            return _copy(model), info
        info["opset_converted_to"] = MIN_OPSET
        model = converted
    converted, constants = constants_as_initializers(model)
    folded, names = fold_batchnorm(converted)
    info.update(constants_as_initializers=constants, batchnorm_folded=len(names))
    return folded, info


MIN_OPSET = 13


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _converted(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None) -> onnx.ModelProto | None:
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; the model is then left as it is
        logger.info("int8: opset conversion to %d failed: %s", MIN_OPSET, exc)
        return None
    if feed is None:
        return converted
    try:
        runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
                for m in (model, converted)]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors are not one type
        logger.info("int8: the opset-%d model does not load: %s", MIN_OPSET, exc)
        return None
    for a, b in zip(*runs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape or np.abs(a - b).max(initial=0.0) > 1e-4 * max(1.0, np.abs(a).max(initial=0.0)):
            return None
    return converted


def constants_as_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` in which every main-graph ``Constant`` node holding a tensor (its ``value`` attribute) is
    an initializer named by the node's output; how many were converted."""
    out = _copy(model)
    graph = out.graph
    taken = {init.name for init in graph.initializer} | {v.name for v in graph.input}
    moved = []
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        attr = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if attr is None or len(node.attribute) != 1 or node.output[0] in taken or attr.t.data_location:
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved.append(node)
    for node in moved:
        graph.node.remove(node)
    return out, len(moved)


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every inference-mode BatchNormalization whose input is the output of a Conv read
    by nothing else folded into that Conv, and the names of the BatchNormalization nodes folded. A pair is left
    as it is where the Conv's weight or bias is not a float initializer of its own, the Conv's output is a graph
    output, or the normalisation's tensors are not constant."""
    out = _copy(model)
    graph = out.graph
    inits = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for value in node.input:
            readers[value] = readers.get(value, 0) + 1
    producer = {o: node for node in graph.node for o in node.output}
    outputs = {v.name for v in graph.output}
    taken = set(inits) | {v for n in graph.node for v in (*n.input, *n.output)} | {n.name for n in graph.node}
    folded: list[str] = []
    drop: list[onnx.NodeProto] = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.input) != 5 or any(o for o in bn.output[1:]):
            continue
        if attribute(bn, "training_mode", 0) or not attribute(bn, "spatial", 1):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or readers.get(bn.input[0]) != 1 or bn.input[0] in outputs:
            continue
        params = [inits.get(name) for name in bn.input[1:]]
        weight = inits.get(conv.input[1])
        bias = inits.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if any(p is None or p.data_type != onnx.TensorProto.FLOAT for p in params) or weight is None:
            continue
        if weight.data_type != onnx.TensorProto.FLOAT or readers.get(weight.name) != 1:
            continue
        if len(conv.input) > 2 and conv.input[2] and (bias is None or readers.get(bias.name) != 1):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(p).astype(np.float64) for p in params)
        w = numpy_helper.to_array(weight)
        if gamma.shape != (w.shape[0],):
            continue
        scale = gamma / np.sqrt(var + float(attribute(bn, "epsilon", 1e-5)))
        w_new = (w.astype(np.float64) * scale.reshape([-1] + [1] * (w.ndim - 1))).astype(np.float32)
        b = numpy_helper.to_array(bias).astype(np.float64) if bias is not None else np.zeros_like(mean)
        b_new = ((b - mean) * scale + beta).astype(np.float32)
        weight.CopyFrom(numpy_helper.from_array(w_new, weight.name))
        if bias is not None:
            bias.CopyFrom(numpy_helper.from_array(b_new, bias.name))
        else:
            name = unique_name(f"{weight.name}_folded_bias", taken)
            graph.initializer.append(numpy_helper.from_array(b_new, name))
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = name
        conv.output[0] = bn.output[0]
        drop.append(bn)
        folded.append(bn.name)
    if not folded:
        return out, []
    for bn in drop:
        graph.node.remove(bn)
    used = {v for n in graph.node for v in n.input} | outputs
    stale = {name for bn in drop for name in bn.input[1:]} - used  # the normalisation's own tensors
    for init in [init for init in graph.initializer if init.name in stale]:
        graph.initializer.remove(init)
    for value in [value for value in graph.input if value.name in stale]:  # IR < 4 lists initializers as inputs
        graph.input.remove(value)
    names = {v for n in graph.node for v in n.output} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    keep = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return out, folded
