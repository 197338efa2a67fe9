"""int8 weights computed in float: a weight stored as int8 (per output channel, symmetric) and turned back into
float by ``Cast`` -> ``Mul`` by its scales ahead of the graph.

Where onnxruntime's int8 kernels are slower than float on a model, the int8 file would be refused for speed and
the model kept float at four bytes per weight. Stored this way, the file holds one byte per weight (and zips to
a fraction of that where weights are zero) while the model computes exactly what a float model with the
dequantized weights computes: onnxruntime's constant folding replaces each ``Cast`` -> ``Mul`` pair by a float
constant when it loads the model, so it runs at float speed. ``Cast`` and ``Mul`` are in every opset and every
runtime. Zeros stay exactly zero (round(0 / s) = 0 and 0 * s = 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxsparse.inspect import weight_operand
from onnxsparse.quantize.prepare import attribute, names_in_use, prepend_nodes, unique_name
from onnxsparse.quantize.quantize import WEIGHT_OPS


def output_axis(node: onnx.NodeProto, index: int, rank: int) -> int:
    """The axis of a weight operand that runs along its node's output channels (the per-channel scale axis)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return (0 if attribute(node, "transB", 0) else 1) if index == 1 else (1 if attribute(node, "transA", 0) else 0)
    return rank - 1 if index == 1 else rank - 2  # MatMul: B (.., K, N) along N; A (.., M, K) along M


def storable_weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, int]]:
    """Float weight initializers that can be stored as int8, by name, with the first node reading them as its
    weight operand and that operand's index. A tensor is left alone where any node reads it other than as the
    weight operand of a Conv/ConvTranspose/Gemm/MatMul, or where it is also a graph input (a caller may override
    it)."""
    inits = {init.name: init for init in model.graph.initializer}
    inputs = {value.name for value in model.graph.input}
    found: dict[str, tuple[onnx.NodeProto, int]] = {}
    refused: set[str] = set()
    for node in model.graph.node:
        direct = weight_operand(node, inits) if node.op_type in WEIGHT_OPS and len(node.input) > 1 else None
        for i, value in enumerate(node.input):
            if value not in inits:
                continue
            if value != direct:
                refused.add(value)
            elif value not in found:
                found[value] = (node, i)
    return {name: where for name, where in found.items()
            if name not in refused and name not in inputs and inits[name].data_type == onnx.TensorProto.FLOAT
            and len(inits[name].dims) >= 2}


def int8_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 integers of ``weight`` with one scale per index along ``axis`` (the scale keeps its
    dimensions, so ``values * scale`` is the dequantized weight). Zeros stay zero."""
    reduce = tuple(a for a in range(weight.ndim) if a != axis)
    scale = np.abs(weight).max(axis=reduce, keepdims=True).astype(np.float32) / np.float32(127)
    scale[scale == 0] = 1  # an all-zero channel: any scale keeps it zero
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8), scale


def storage_deltas(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Stored as :func:`store_int8_weights` stores them, each weight's dequantized value minus its float value."""
    where = storable_weights(model)
    inits = {init.name: init for init in model.graph.initializer}
    deltas = {}
    for name in names:
        node, index = where[name]
        weight = numpy_helper.to_array(inits[name])
        values, scale = int8_per_channel(weight, output_axis(node, index, weight.ndim))
        deltas[name] = values.astype(np.float32) * scale - weight
    return deltas


def store_int8_weights(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which each float initializer in ``names`` (from :func:`storable_weights`) is an int8
    initializer with per-output-channel scales, restored to a float value of the same name by ``Cast`` -> ``Mul``
    nodes placed first in the graph (so every reader, subgraphs included, sees it defined)."""
    names = list(names)
    where = storable_weights(model)
    missing = [n for n in names if n not in where]
    if missing:
        raise ValueError(f"not storable as int8: {', '.join(missing)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = names_in_use(graph)
    by_name = {init.name: init for init in graph.initializer}
    nodes = []
    for name in names:
        init = by_name[name]
        weight = numpy_helper.to_array(init)
        node, index = where[name]
        values, scale = int8_per_channel(weight, output_axis(node, index, weight.ndim))
        int_name, scale_name = unique_name(f"{name}_int8", taken), unique_name(f"{name}_int8_scale", taken)
        cast_out = unique_name(f"{name}_int8_float", taken)
        graph.initializer.remove(init)
        graph.initializer.extend([numpy_helper.from_array(values, int_name),
                                  numpy_helper.from_array(scale, scale_name)])
        nodes += [helper.make_node("Cast", [int_name], [cast_out], name=unique_name(f"{name}_int8_cast", taken),
                                   to=onnx.TensorProto.FLOAT),
                  helper.make_node("Mul", [cast_out, scale_name], [name], name=unique_name(f"{name}_int8_mul", taken))]
    prepend_nodes(graph, nodes)
    return out


def unfolded_at_load(model: onnx.ModelProto, names: Iterable[str], workdir: Path) -> list[str]:
    """The stored weights (``names``) whose ``Cast`` -> ``Mul`` pair onnxruntime's CPU session does not fold into a
    constant when it loads ``model`` (basic optimisations: constant folding), by weight name; empty when every
    pair is folded and the model computes exactly as its float form would."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    path = Path(workdir) / "storage-optimised.onnx"
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    produced = {out for node in onnx.load(str(path), load_external_data=False).graph.node for out in node.output}
    path.unlink(missing_ok=True)
    return [name for name in names if name in produced]
