"""Normalising a *copy* of the graph so onnx2torch can convert it.

The original ModelProto is never touched: the exporter writes back into it by tensor name, so the
output graph keeps its nodes, names and opsets. This copy only feeds onnx2torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from onnxsparse.graph import Layout, TensorSource
from onnxsparse.importer.load import model_opset

logger = logging.getLogger(__name__)

# onnx2torch is tested on these opsets; models outside are version-converted for the torch copy only.
TORCH_OPSET_RANGE = (9, 16)
_LAYER_NORM_OPSET = 17


@dataclass
class NormalizedGraph:
    model: onnx.ModelProto  # the copy onnx2torch converts; nodes renamed n0, n1, ...
    original_nodes: dict[str, tuple[str, str]]  # copy node name -> (original node name, op type)
    sources: dict[str, TensorSource]  # value name in the copy -> where the tensor lives in the original
    consumers: Counter = field(default_factory=Counter)  # source -> number of node inputs (and outputs) reading it
    # value name in the copy -> how it derives from its source (Transpose/Cast folded); absent: stored as is
    layouts: dict[str, Layout] = field(default_factory=dict)
    opset: int = 0
    torch_opset: int = 0
    notes: list[str] = field(default_factory=list)


def _is_default_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")


_FOLDABLE_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


def _fold_weight_transforms(
    g: onnx.GraphProto,
    nodes: list[onnx.NodeProto],
    sources: dict[str, TensorSource],
    layouts: dict[str, Layout],
    graph_outputs: set[str],
) -> tuple[list[onnx.NodeProto], int]:
    """Fold ``Transpose`` and float-to-float ``Cast`` nodes over weights into initializers of the copy.

    A transformer export often stores a weight as ``initializer -> Transpose -> MatMul`` or ``fp16
    initializer -> Cast -> MatMul``. The folded value keeps the source of the stored tensor and records the
    transform in ``layouts``, so the exporter writes pruned values back into the stored tensor, in its
    own layout and element type. Returns the remaining nodes and the number folded.
    """
    inits = {init.name: init for init in g.initializer}
    kept: list[onnx.NodeProto] = []
    folded_from: set[str] = set()
    for node in nodes:
        value = node.input[0] if node.input else ""
        init = inits.get(value)
        if (
            node.op_type not in ("Transpose", "Cast")
            or not _is_default_domain(node.domain)
            or value not in sources
            or init is None
            or node.output[0] in graph_outputs
            or init.data_type not in _FOLDABLE_FLOATS
        ):
            kept.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        base = layouts.get(value, Layout())
        array = numpy_helper.to_array(init)
        if node.op_type == "Cast":
            to = int(attrs.get("to", 0))
            if to not in _FOLDABLE_FLOATS:
                kept.append(node)
                continue
            array = array.astype(helper.tensor_dtype_to_np_dtype(to))
            stored = base.onnx_dtype if base.onnx_dtype is not None else init.data_type
            layout = Layout(perm=base.perm, onnx_dtype=None if stored == to else stored)
        else:
            perm = tuple(int(p) for p in attrs.get("perm", range(array.ndim - 1, -1, -1)))
            array = np.ascontiguousarray(array.transpose(perm))
            # permute(permute(x, p0), p1) == permute(x, p0[p1])
            combined = perm if base.perm is None else tuple(base.perm[p] for p in perm)
            layout = Layout(perm=None if combined == tuple(range(len(combined))) else combined,
                            onnx_dtype=base.onnx_dtype)
        out = numpy_helper.from_array(array, node.output[0])
        g.initializer.append(out)
        inits[out.name] = out
        sources[out.name] = sources[value]
        if layout != Layout():
            layouts[out.name] = layout
        folded_from.add(value)
    if folded_from:
        # Drop the stored tensors only the folded nodes read: the copy need not hold both forms.
        # An initializer also listed as a graph input (IR < 4 models) stays, or it would become a real input.
        read = {name for node in kept for name in node.input} | graph_outputs | {i.name for i in g.input}
        unused = folded_from - read
        if unused:
            remaining = [init for init in g.initializer if init.name not in unused]
            del g.initializer[:]
            g.initializer.extend(remaining)
    return kept, len(nodes) - len(kept)


def normalize_for_torch(model: onnx.ModelProto, *, convert_opset: bool = True) -> NormalizedGraph:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    graph_outputs = {o.name for o in g.output}
    original_nodes: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(g.node):
        original_nodes[f"n{i}"] = (node.name, node.op_type)
        node.name = f"n{i}"  # methods.signals and sparsity.allocation rely on n<i> = the i-th original node
    sources = {init.name: TensorSource("initializer", init.name) for init in g.initializer}
    layouts: dict[str, Layout] = {}
    notes: list[str] = []
    kept = _constants_as_initializers(g, sources, graph_outputs, notes)
    final = _bypass_identities(kept, sources, graph_outputs, notes)
    final, folded_values = _fold_weight_transforms(g, final, sources, layouts, graph_outputs)
    if folded_values:
        notes.append(f"{folded_values} Transpose/Cast node(s) over weights read as transformed initializers")
    del g.node[:]
    g.node.extend(final)
    consumers: Counter = Counter()
    for name in [name for node in final for name in node.input] + list(graph_outputs):
        if name in sources:
            consumers[sources[name]] += 1
    opset = model_opset(model)
    copy, torch_opset = _torch_opset(copy, opset, notes) if convert_opset else (copy, opset)
    return NormalizedGraph(model=copy, original_nodes=original_nodes, sources=sources, consumers=consumers,
                           layouts=layouts, opset=opset, torch_opset=torch_opset, notes=notes)


def _constants_as_initializers(g: onnx.GraphProto, sources: dict[str, TensorSource], graph_outputs: set[str],
                               notes: list[str]) -> list[onnx.NodeProto]:
    """Weights held in Constant nodes (Paddle exports every weight this way) become initializers of the copy;
    the exporter writes them back into the Constant node's ``value`` attribute. Returns the other nodes."""
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
    return kept


def _bypass_identities(nodes: list[onnx.NodeProto], sources: dict[str, TensorSource], graph_outputs: set[str],
                       notes: list[str]) -> list[onnx.NodeProto]:
    """Identity nodes over constants (PyTorch's exporter emits them for shared initializers) are bypassed."""
    alias: dict[str, str] = {}
    final = []
    for node in nodes:
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
    return final


def _torch_opset(copy: onnx.ModelProto, opset: int, notes: list[str]) -> tuple[onnx.ModelProto, int]:
    """The copy at an opset onnx2torch converts (TORCH_OPSET_RANGE), or as it is where conversion fails."""
    lo, hi = TORCH_OPSET_RANGE
    if lo <= opset <= hi:
        return copy, opset
    target = min(max(opset, lo), hi)
    # LayerNormalization (opset 17) has no earlier version: such models go down to 17 instead, which
    # onnx2torch also converts (it resolves every op to its newest schema at or below the opset).
    targets = [target] + ([_LAYER_NORM_OPSET] if target < _LAYER_NORM_OPSET < opset else [])
    failures = []
    for candidate in targets:
        try:
            converted = version_converter.convert_version(copy, candidate)
        except Exception as exc:  # noqa: BLE001 - the converter raises many types; native conversion may still work
            failures.append(f"to {candidate}: {exc}")
            continue
        notes.append(f"opset {opset} converted to {candidate} for the torch copy (the output keeps opset {opset})")
        return converted, candidate
    # onnx2torch converts opset 17 natively (LayerNormalization included): nothing to warn about there.
    logger.log(logging.INFO if opset <= _LAYER_NORM_OPSET else logging.WARNING,
               "could not convert opset %d (%s); converting at opset %d", opset, "; ".join(failures), opset)
    notes.append(f"opset {opset} kept for the torch copy: version conversion failed ({'; '.join(failures)})")
    return copy, opset
