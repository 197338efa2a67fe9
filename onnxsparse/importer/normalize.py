"""Normalising a *copy* of the graph so onnx2torch can convert it.

The original ModelProto is never touched: the exporter writes back into it by tensor name, so the
output graph keeps its nodes, names and opsets. This copy only feeds onnx2torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import onnx
from onnx import version_converter

from onnxsparse.graph import TensorSource
from onnxsparse.importer.load import model_opset

logger = logging.getLogger(__name__)

# onnx2torch is tested on these opsets; models outside are version-converted for the torch copy only.
TORCH_OPSET_RANGE = (9, 16)


@dataclass
class NormalizedGraph:
    model: onnx.ModelProto  # the copy onnx2torch converts; nodes renamed n0, n1, ...
    original_nodes: dict[str, tuple[str, str]]  # copy node name -> (original node name, op type)
    sources: dict[str, TensorSource]  # value name in the copy -> where the tensor lives in the original
    consumers: Counter = field(default_factory=Counter)  # source -> number of node inputs (and outputs) reading it
    opset: int = 0
    torch_opset: int = 0
    notes: list[str] = field(default_factory=list)


def _is_default_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def normalize_for_torch(model: onnx.ModelProto, *, convert_opset: bool = True) -> NormalizedGraph:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    graph_outputs = {o.name for o in g.output}

    original_nodes: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(g.node):
        new_name = f"n{i}"
        original_nodes[new_name] = (node.name, node.op_type)
        node.name = new_name

    sources = {init.name: TensorSource("initializer", init.name) for init in g.initializer}
    notes: list[str] = []

    # Weights held in Constant nodes (Paddle exports every weight this way) become initializers of the copy;
    # the exporter writes them back into the Constant node's `value` attribute.
    kept = []
    folded = 0
    for node in g.node:
        if (
            node.op_type == "Constant"
            and _is_default_domain(node.domain)
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
            and node.output[0] not in graph_outputs
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            g.initializer.append(tensor)
            sources[node.output[0]] = TensorSource("constant", node.output[0])
            folded += 1
            continue
        kept.append(node)
    if folded:
        notes.append(f"{folded} Constant node(s) read as initializers")

    # Identity nodes over constants (PyTorch's exporter emits them for shared initializers) are bypassed.
    alias: dict[str, str] = {}
    final = []
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        if (
            node.op_type == "Identity"
            and _is_default_domain(node.domain)
            and node.input[0] in sources
            and node.output[0] not in graph_outputs
        ):
            alias[node.output[0]] = node.input[0]
            continue
        final.append(node)
    if alias:
        notes.append(f"{len(alias)} Identity node(s) over constants bypassed")
    del g.node[:]
    g.node.extend(final)

    consumers: Counter = Counter()
    for node in final:
        for name in node.input:
            if name in sources:
                consumers[sources[name]] += 1
    for name in graph_outputs:
        if name in sources:
            consumers[sources[name]] += 1

    opset = model_opset(model)
    torch_opset = opset
    lo, hi = TORCH_OPSET_RANGE
    if convert_opset and not lo <= opset <= hi:
        target = min(max(opset, lo), hi)
        try:
            converted = version_converter.convert_version(copy, target)
            copy = converted
            torch_opset = target
            notes.append(f"opset {opset} converted to {target} for the torch copy (the output keeps opset {opset})")
        except Exception as exc:  # noqa: BLE001 - the converter raises many types; native conversion may still work
            logger.warning("could not convert opset %d to %d (%s); converting at opset %d", opset, target, exc, opset)
            notes.append(f"opset {opset} kept for the torch copy: version conversion failed ({exc})")
    return NormalizedGraph(
        model=copy,
        original_nodes=original_nodes,
        sources=sources,
        consumers=consumers,
        opset=opset,
        torch_opset=torch_opset,
        notes=notes,
    )
