"""A smaller int8 file that onnxruntime runs exactly as it runs the standard one.

``quantize_static`` writes three things a QDQ file can do without:

- int32 biases with their own scale tensors. Given the float bias, onnxruntime's QDQ fusion quantizes it at load
  (input scale x weight scale, as the quantizer does) and builds the same ``QLinearConv``/``QGemm``.
- all-zero zero points of the symmetric int8 weights. ``DequantizeLinear``'s zero point defaults to 0 of the
  integer type.
- ``value_info`` shape annotations that the input model did not carry.

Whether a runtime fuses the smaller form the same way is not assumed: the compact file is kept only when
onnxruntime, with every optimisation on this machine, builds a graph of the same op types from it and returns
bit-identical outputs on the selection feeds. On the Fashion-MNIST sample at 0.7 the zipped file shrinks by 1.7%
(scales and int32 biases are most of what is not weights).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxsparse.exporter.save import zip_size

logger = logging.getLogger(__name__)


def weight_dequantizers(model: onnx.ModelProto) -> dict[str, set[str]]:
    """``DequantizeLinear`` nodes of int8 initializers with an all-zero int8 zero point, by name, with the op types
    that read their output."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for value in node.input:
            readers.setdefault(value, set()).add(node.op_type)
    inits = {init.name: init for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits:
            continue
        values, zero = inits[node.input[0]], inits.get(node.input[2])
        if values.data_type != onnx.TensorProto.INT8 or zero is None or zero.data_type != onnx.TensorProto.INT8:
            continue
        if not np.any(numpy_helper.to_array(zero) != 0):
            found[node.name] = readers.get(node.output[0], set())
    return found


def drop_weight_zero_points(model: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the ``DequantizeLinear`` nodes named in ``nodes`` (from
    :func:`weight_dequantizers`) have no zero-point input, with the zero-point initializers no node reads any more
    removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {init.name: init for init in out.graph.initializer}
    dropped: set[str] = set()
    for node in out.graph.node:
        if node.name not in nodes or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        dropped.add(node.input[2])
        del node.input[2]
    still = _read(out.graph) | {value.name for value in (*out.graph.input, *out.graph.output)}
    for name in dropped - still:
        if name in inits:
            out.graph.initializer.remove(inits[name])
    return out


def _read(graph: onnx.GraphProto) -> set[str]:
    """Every value a node of ``graph`` or of its subgraphs reads."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                read |= _read(sub)
    return read


def drop_added_value_info(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the ``value_info`` entries whose names ``original`` did not annotate."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = {value.name for value in original.graph.value_info}
    entries = [value for value in out.graph.value_info if value.name in kept]
    del out.graph.value_info[:]
    out.graph.value_info.extend(entries)
    return out


def deployed(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
             workdir: Path) -> tuple[list[np.ndarray], Counter]:
    """``model``'s outputs on ``feeds`` in onnxruntime's CPU session with every optimisation, and the op types of
    the graph that session runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = Path(workdir) / "compact-optimised.onnx"
    options.optimized_model_filepath = str(path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    path.unlink(missing_ok=True)
    names = [o.name for o in session.get_outputs()]
    outputs = [np.asarray(out) for feed in feeds for out in session.run(names, feed)]
    return outputs, ops


def same_when_deployed(a: onnx.ModelProto, b: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                       workdir: Path) -> bool:
    """Whether onnxruntime runs ``a`` and ``b`` as graphs of the same op types with bit-identical outputs."""
    outs_a, ops_a = deployed(a, feeds, workdir)
    outs_b, ops_b = deployed(b, feeds, workdir)
    return ops_a == ops_b and all(x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
                                  for x, y in zip(outs_a, outs_b))


def compact_int8(standard: onnx.ModelProto, float_bias: onnx.ModelProto | None, original: onnx.ModelProto,
                 feeds: Sequence[dict[str, np.ndarray]], workdir: Path) -> tuple[onnx.ModelProto, dict]:
    """The smallest of the compact forms of ``standard`` (the QDQ model as ``quantize_static`` writes it) that
    onnxruntime runs as it runs ``standard``, with a report entry.

    ``float_bias``: the same quantization with float biases (``QuantizeBias: False``), or None. ``original``: the
    float model both were made from (its ``value_info`` is what the compact form keeps). Candidates, smallest
    first: float biases without weight zero points, float biases, weight zero points dropped; else ``standard``.
    """
    def zipped(model: onnx.ModelProto) -> int:
        return zip_size(model.SerializeToString())

    bases = [("float biases", float_bias)] if float_bias is not None else []
    bases.append(("int32 biases", standard))
    candidates = []
    for label, base in bases:
        base = drop_added_value_info(base, original)
        # zero points dropped for every weight, then for the weights of one reading op type at a time (onnxruntime
        # fuses some op types without them and not others)
        found = weight_dequantizers(base)
        types = sorted({op for readers in found.values() for op in readers})
        subsets = [("every weight", set(found))] if found else []
        subsets += [(f"{op} weights", {n for n, readers in found.items() if readers == {op}}) for op in types]
        seen = set()
        for what, nodes in subsets:
            if nodes and frozenset(nodes) not in seen:
                seen.add(frozenset(nodes))
                candidates.append((f"{label}, zero points of {what} dropped ({len(nodes)})",
                                   drop_weight_zero_points(base, nodes)))
        candidates.append((label, base))
    before = zipped(standard)
    entry: dict = {"zip_bytes_before": before, "tried": []}
    for label, candidate in sorted(candidates, key=lambda c: zipped(c[1])):
        size = zipped(candidate)
        if size >= before:
            break
        same = same_when_deployed(standard, candidate, feeds, workdir)
        entry["tried"].append({"form": label, "zip_bytes": size, "same_when_deployed": same})
        if same:
            entry.update(kept=label, zip_bytes=size)
            return candidate, entry
    entry.update(kept="as quantize_static writes it", zip_bytes=before)
    return standard, entry
