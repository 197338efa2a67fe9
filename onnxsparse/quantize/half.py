"""float16 storage of the float tensors an int8 file still holds: biases, norm parameters, the scales of weights
stored as int8, each stored as float16 and turned back into float32 by a ``Cast`` ahead of the graph.

Once the weights are int8, the float tensors left are a tenth of the zipped file (the PP-OCRv4 recogniser at 0.7:
0.012 of the dense file's 0.130), and float32 mantissas barely compress. Stored as float16 they take half the bytes;
onnxruntime's constant folding replaces each ``Cast`` by a float32 constant when it loads the model, so the model
runs the float graph with values rounded to float16 (relative error at most 2**-11, far below the int8 grid's).

Left alone, so that every check keeps reading them as before: the weight operands of Conv, ConvTranspose, Gemm and
MatMul (pruned weights are int8 or deliberately float), every tensor read by a QuantizeLinear / DequantizeLinear
node or by a node that reads a DequantizeLinear output (onnxruntime fuses those groups from initializers), graph
inputs, tensors of fewer than ``MIN_ELEMENTS`` values (a Cast node costs more than it saves) and tensors beyond
float16's range. Values below its normal range keep an absolute error under 2**-25; whether the rounding is harmless
is the selection split's to say (the caller keeps the form only where agreement holds).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse.quantize.prepare import names_in_use, prepend_nodes, unique_name
from onnxsparse.quantize.quantize import WEIGHT_OPS

MIN_ELEMENTS = 16
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_HALF_MAX = float(np.finfo(np.float16).max)


def _weight_positions(node: onnx.NodeProto) -> tuple[int, ...]:
    if node.op_type in ("Conv", "ConvTranspose"):
        return (1,)
    if node.op_type == "Gemm":
        return (0, 1)
    return (0, 1) if node.op_type == "MatMul" else ()


def half_candidates(model: onnx.ModelProto) -> list[str]:
    """Names of the float32 initializers of ``model``'s main graph that can be stored as float16 (see the module
    docstring for what is left alone), in initializer order."""
    graph = model.graph
    by_name = {init.name: init for init in graph.initializer
               if init.data_type == onnx.TensorProto.FLOAT and init.data_location != onnx.TensorProto.EXTERNAL}
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    excluded = {v.name for v in graph.input}
    for node in graph.node:
        if node.op_type in _QDQ or any(x in dequantized for x in node.input):
            excluded.update(node.input)
        elif node.op_type in WEIGHT_OPS:
            excluded.update(node.input[i] for i in _weight_positions(node) if i < len(node.input))
        for attr in node.attribute:  # a tensor a subgraph reads keeps its type where the subgraph declares it
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                for sub in (attr.g, *attr.graphs):
                    excluded.update(x for n in sub.node for x in n.input)
    names = []
    for name, init in by_name.items():
        if name in excluded or int(np.prod(init.dims)) < MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(init)
        if not np.all(np.isfinite(values)) or np.abs(values).max() > _HALF_MAX:
            continue
        names.append(name)
    return names


def store_float16(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which each float32 initializer in ``names`` is a float16 initializer restored to a
    float32 value of the same name by a ``Cast`` node placed first in the graph."""
    names = list(names)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_name = {init.name: init for init in graph.initializer}
    missing = [n for n in names if n not in by_name or by_name[n].data_type != onnx.TensorProto.FLOAT]
    if missing:
        raise ValueError(f"not a float32 initializer: {', '.join(missing)}")
    taken = names_in_use(graph)
    nodes = []
    for name in names:
        init = by_name[name]
        half_name = unique_name(f"{name}_fp16", taken)
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), half_name)
        graph.initializer.remove(init)
        graph.initializer.append(half)
        nodes.append(helper.make_node("Cast", [half_name], [name], name=unique_name(f"{name}_fp16_cast", taken),
                                      to=onnx.TensorProto.FLOAT))
    prepend_nodes(graph, nodes)
    return out

