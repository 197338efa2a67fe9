"""Channel dependency groups of an ONNX graph: channels that can only be removed together.

A *channel space* starts at the output channels of a Conv (group 1), Gemm or MatMul whose weight is a constant.
Walking the graph forward, every tensor carries a *channel map*: along one axis, a list of segments, each a whole
space or a fixed run of channels nobody may remove (a graph input, an unsupported producer). Per-channel ops
(BatchNormalization, activations, per-channel constants, pooling, depthwise Conv) pass the map on; residual
``Add``/``Mul`` of two mapped tensors merge their spaces (union-find); ``Concat`` on the channel axis joins the
maps; ``Flatten``/``Reshape`` into ``[N, C*H*W]`` keep the map with ``H*W`` entries per channel. A consumer that
reduces over channels (Conv input channels, Gemm/MatMul rows) ends the walk and is where the channel's value is
read: removing the channel from every parameter listed in its group computes exactly what the dense graph computes
with those consumer columns set to zero.

Anything else that reads a mapped tensor (an unknown op, a graph output, a shared weight, a grouped Conv, a
reshape that cannot be proven to be a flatten) marks the spaces involved as whole, with the op that stopped them.
The result is plain data (:class:`ChannelAnalysis`); nothing here changes a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

# Elementwise ops of one tensor input: channel c of the output depends on channel c of the input alone.
_UNARY = frozenset({
    "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Mish",
    "ThresholdedRelu", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Swish",
})
# Spatial ops of an NCHW tensor that treat every channel alone (extra inputs are constants checked below).
_SPATIAL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
_BINARY = frozenset({"Add", "Mul", "Sub", "Div", "Max", "Min", "Pow"})
_PRODUCERS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class ParamSlice:
    """Entries of a stored tensor that belong to the group's channels.

    Channel ``c`` of the group owns indices ``(offset + c) * repeat + r`` (``0 <= r < repeat``) along ``axis`` of
    the tensor ``name`` (an initializer, or the output of a ``Constant`` node).
    """

    name: str
    axis: int
    offset: int
    repeat: int
    role: str  # "producer" (output channels), "channelwise" (per-channel op), "consumer" (input columns)
    node: str  # first output name of the node that reads it


@dataclass(frozen=True)
class Tap:
    """A tensor where consumers read the group's channels (same index rule as :class:`ParamSlice`)."""

    tensor: str
    axis: int
    offset: int
    repeat: int
    consumer: str  # node (first output name) that reads it
    op_type: str


@dataclass(frozen=True)
class ShapeEdit:
    """An entry of a shape constant that counts ``repeat`` entries per channel of the group."""

    name: str
    index: int
    repeat: int


@dataclass(frozen=True)
class ChannelGroup:
    index: int
    channels: int
    producers: tuple[str, ...]  # nodes (first output names) whose output channels these are
    params: tuple[ParamSlice, ...]
    taps: tuple[Tap, ...]
    group_convs: tuple[str, ...]  # depthwise Conv nodes whose ``group`` attribute counts these channels
    shape_edits: tuple[ShapeEdit, ...]
    prunable: bool
    reason: str | None = None  # why it stays whole
    stopped_by: str | None = None  # "<op> <node>" that stopped it

    def indices(self, param: ParamSlice | Tap, channels) -> np.ndarray:
        """Indices along ``param.axis`` owned by ``channels`` of this group."""
        ch = np.asarray(sorted(int(c) for c in channels), dtype=np.int64)
        return ((param.offset + ch)[:, None] * param.repeat + np.arange(param.repeat)[None, :]).reshape(-1)


@dataclass(frozen=True)
class LayerMacs:
    """Multiply-accumulates of one Conv/Gemm/MatMul with a constant weight, at batch 1."""

    node: str
    op_type: str
    weight: str
    macs: int
    out_segments: tuple[tuple[int | None, int], ...]  # (group or None, channels)
    in_segments: tuple[tuple[int | None, int], ...] | None  # None: the input carries no channel map
    depthwise: bool


@dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]
    layers: list[LayerMacs]
    notes: list[str] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def whole(self) -> list[ChannelGroup]:
        return [g for g in self.groups if not g.prunable]

    def macs_after(self, kept: dict[int, int]) -> float:
        """MACs once group ``i`` keeps ``kept[i]`` channels (groups not named keep all)."""
        sizes = {g.index: g.channels for g in self.groups}

        def fraction(segments) -> float:
            if segments is None:
                return 1.0
            total = sum(n for _, n in segments)
            left = sum(n if g is None else n * kept.get(g, sizes[g]) / sizes[g] for g, n in segments)
            return left / total if total else 1.0

        out = 0.0
        for layer in self.layers:
            f_out = fraction(layer.out_segments)
            out += layer.macs * (f_out if layer.depthwise else f_out * fraction(layer.in_segments))
        return out

    def report(self) -> list[dict]:
        return [{"group": g.index, "channels": g.channels, "producers": list(g.producers), "prunable": g.prunable,
                 "reason": g.reason, "stopped_by": g.stopped_by} for g in self.groups]


@dataclass
class _Space:
    channels: int
    producers: list[str] = field(default_factory=list)
    params: list[ParamSlice] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)
    group_convs: list[str] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    reason: str | None = None
    stopped_by: str | None = None


@dataclass(frozen=True)
class _Map:
    """Channels of a tensor along ``axis``: segments of (space or None, channels), ``repeat`` entries each."""

    axis: int
    segments: tuple[tuple[int | None, int], ...]
    repeat: int = 1

    def offsets(self):
        start = 0
        for space, n in self.segments:
            yield space, start, n
            start += n

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.segments)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= _subgraph_reads(inner)
    return names


def _with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose named graph inputs have these fixed shapes (symbolic dimensions bound)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        shape = shapes.get(vi.name)
        if shape is None or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for d, n in zip(dims, shape):
            d.Clear()
            d.dim_value = int(n)
    return out


class _Walker:
    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 observed: dict[str, tuple[int, ...]] | None = None) -> None:
        if input_shapes:
            model = _with_input_shapes(model, input_shapes)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - analysis degrades to "unknown shapes", never fails the run
            logger.warning("shape inference failed (%s): channel groups need shapes, none are prunable", exc)
            inferred = model
        g = inferred.graph
        self.graph = g
        self.shapes: dict[str, tuple] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                             for d in t.shape.dim)
        for name, shape in (observed or {}).items():
            known = self.shapes.get(name)
            if known is None or any(not isinstance(d, int) for d in known):
                self.shapes[name] = tuple(int(d) for d in shape)
        self.consts: dict[str, np.ndarray] = {}
        for init in g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init) if init.data_location != onnx.TensorProto.EXTERNAL \
                else None
            self.shapes.setdefault(init.name, tuple(init.dims))
        graph_inputs = {i.name for i in g.input}
        for name in graph_inputs & set(self.consts):
            del self.consts[name]  # an initializer a caller may override is not a constant
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
                        self.shapes[node.output[0]] = tuple(attr.t.dims)
        self.uses: dict[str, list[onnx.NodeProto]] = {}
        self.producer = {out: node for node in g.node for out in node.output if out}
        for node in g.node:
            for name in node.input:
                if name:
                    self.uses.setdefault(name, []).append(node)
        for out in g.output:
            self.uses.setdefault(out.name, [])
        self.outputs = {o.name for o in g.output}
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.maps: dict[str, _Map] = {}
        # folded constant -> (1-D source tensor, (shape constant, index) to rewrite or None)
        self.alias: dict[str, tuple[str, tuple[str, int] | None]] = {}
        self.layers: list[tuple] = []

    # -- union-find ---------------------------------------------------------------------------------------
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        sa, sb = self.spaces[ra], self.spaces[rb]
        sa.producers += sb.producers
        sa.params += sb.params
        sa.taps += sb.taps
        sa.group_convs += sb.group_convs
        sa.shape_edits += sb.shape_edits
        if sa.reason is None and sb.reason is not None:
            sa.reason, sa.stopped_by = sb.reason, sb.stopped_by

    def new_space(self, channels: int) -> int:
        self.spaces.append(_Space(channels))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def space(self, i: int) -> _Space:
        return self.spaces[self.find(i)]

    def stop(self, m: _Map | None, node: onnx.NodeProto | None, reason: str) -> None:
        if m is None:
            return
        where = f"{node.op_type} {node.name or node.output[0]!r}" if node is not None else "graph output"
        for space, _ in m.segments:
            if space is not None:
                s = self.space(space)
                if s.reason is None:
                    s.reason, s.stopped_by = reason, where

    # -- helpers ------------------------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def single_use(self, name: str) -> bool:
        return len(self.uses.get(name, [])) == 1 and name not in self.outputs

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    @staticmethod
    def key(node: onnx.NodeProto) -> str:
        return node.output[0]

    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def produce(self, node: onnx.NodeProto, channels: int, params: list[tuple[str, int]], axis: int) -> _Map:
        sid = self.new_space(channels)
        s = self.spaces[sid]
        s.producers.append(self.key(node))
        for name, p_axis in params:
            s.params.append(ParamSlice(name, p_axis, 0, 1, "producer", self.key(node)))
        return _Map(axis, ((sid, channels),))

    def consume(self, node: onnx.NodeProto, m: _Map, tensor: str, weight: str, w_axis: int) -> None:
        for space, start, n in m.offsets():
            if space is None:
                continue
            s = self.space(space)
            s.params.append(ParamSlice(weight, w_axis, start, m.repeat, "consumer", self.key(node)))
            s.taps.append(Tap(tensor, m.axis, start, m.repeat, self.key(node), node.op_type))

    def channelwise(self, node: onnx.NodeProto, m: _Map, name: str, axis: int) -> None:
        for space, start, n in m.offsets():
            if space is not None:
                self.space(space).params.append(ParamSlice(name, axis, start, m.repeat, "channelwise", self.key(node)))

    def weight_ok(self, node: onnx.NodeProto, name: str, m: _Map | None) -> bool:
        """A weight that can be sliced: a constant read by this node alone."""
        if self.const(name) is None:
            self.stop(m, node, f"weight {name!r} is not a constant")
            return False
        if not self.single_use(name):
            self.stop(m, node, f"weight {name!r} is shared by several nodes")
            return False
        return True

    def per_channel_const(self, node: onnx.NodeProto, m: _Map, tensor: str, name: str) -> bool:
        """A constant operand of an elementwise op: broadcast over channels, or sliceable along them."""
        value = self.const(name)
        rank = self.rank(tensor)
        if value is None or rank is None:
            return False
        if value.ndim > rank:
            return False
        lead = rank - value.ndim
        if m.axis < lead or value.shape[m.axis - lead] == 1:
            return True
        if value.shape[m.axis - lead] == m.channels * m.repeat:
            source = self.alias.get(name)
            if not self.single_use(name) or (source is not None and not self.single_use(source[0])):
                self.stop(m, node, f"per-channel constant {name!r} is shared by several nodes")
                return True
            if source is None:
                self.channelwise(node, m, name, m.axis - lead)
                return True
            if m.repeat != 1:
                self.stop(m, node, f"per-channel constant {name!r} reshaped from {source[0]!r} on flattened channels")
                return True
            self.channelwise(node, m, source[0], 0)
            if source[1] is not None:
                for space, _, _ in m.offsets():
                    if space is not None:
                        self.space(space).shape_edits.append(ShapeEdit(source[1][0], source[1][1], 1))
            return True
        return False

    # -- the walk -----------------------------------------------------------------------------------------
    def fold(self, node: onnx.NodeProto) -> None:
        """A Reshape/Unsqueeze of a 1-D constant into one non-1 axis (a bias written ``[C] -> [1, C, 1, 1]``) is
        a per-channel constant whose entries live in the 1-D source: record the value and where it comes from."""
        if node.op_type not in ("Reshape", "Unsqueeze") or not node.output or not node.input:
            return
        src = self.const(node.input[0])
        if src is None or src.ndim != 1 or src.size < 2:
            return
        if node.op_type == "Reshape":
            shape = self.const(node.input[1]) if len(node.input) > 1 else None
            if shape is None:
                return
            try:
                value = src.reshape([int(d) if d != 0 else src.shape[0] for d in shape.reshape(-1)])
            except ValueError:
                return
        else:
            axes = self.attr(node, "axes")
            if axes is None and len(node.input) > 1:
                axes = self.const(node.input[1])
            if axes is None:
                return
            value = src
            for a in sorted(int(a) for a in np.asarray(axes).reshape(-1)):
                value = np.expand_dims(value, a)
        big = [i for i, d in enumerate(value.shape) if d != 1]
        if len(big) != 1:
            return
        edit = None
        if node.op_type == "Reshape":
            shape = self.const(node.input[1]).reshape(-1)
            if int(shape[big[0]]) == -1 or int(shape[big[0]]) == 0:
                edit = None
            elif self.single_use(node.input[1]):
                edit = (node.input[1], big[0])
            else:
                return
        self.consts[node.output[0]] = value
        self.shapes[node.output[0]] = tuple(value.shape)
        self.alias[node.output[0]] = (node.input[0], edit)

    def run(self) -> None:
        for node in self.graph.node:
            self.fold(node)
            for name in _subgraph_reads(node):  # If/Loop/Scan bodies read outer tensors by name
                self.stop(self.maps.get(name), node, f"{node.op_type} reads the channels inside a subgraph")
            maps = [self.maps.get(name) if name else None for name in node.input]
            mapped = [m for m in maps if m is not None]
            try:
                out = self.visit(node, maps)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                for m in mapped:
                    self.stop(m, node, f"could not analyse ({type(exc).__name__}: {exc})")
                out = None
            if out is not None and node.output and node.output[0]:
                self.maps[node.output[0]] = out
                self.check_shape(node, node.output[0], out)
        for name in self.outputs:
            self.stop(self.maps.get(name), None, f"graph output {name!r} keeps its shape")

    def check_shape(self, node: onnx.NodeProto, name: str, m: _Map) -> None:
        shape = self.shapes.get(name)
        size = shape[m.axis] if shape is not None and len(shape) > m.axis else None
        if not isinstance(size, int) or size != m.channels * m.repeat:
            self.stop(m, node, f"output {name!r} has {size!r} entries on axis {m.axis}, the walk counted "
                               f"{m.channels * m.repeat}")

    def visit(self, node: onnx.NodeProto, maps: list[_Map | None]) -> _Map | None:
        op = node.op_type
        x = maps[0] if maps else None
        if node.domain not in ("", "ai.onnx"):
            for m in maps:
                self.stop(m, node, f"custom-domain op {node.domain}.{op}")
            return None
        if op == "Conv":
            return self.conv(node, x, maps)
        if op in ("Gemm", "MatMul"):
            return self.matmul(node, x, maps)
        if op in _UNARY:
            for m in maps[1:]:
                self.stop(m, node, f"{op} reads the channels as a parameter")
            return x
        if op in ("BatchNormalization", "InstanceNormalization"):
            if x is None:
                return None
            names = node.input[1:5] if op == "BatchNormalization" else node.input[1:3]
            if (op == "BatchNormalization" and len(node.output) > 1) or x.axis != 1 or x.repeat != 1:
                self.stop(x, node, f"{op} in training mode or not on axis 1")
                return None
            for name in names:
                if self.const(name) is None or not self.single_use(name):
                    self.stop(x, node, f"{op} parameter {name!r} is not a constant of this node alone")
                    return None
                self.channelwise(node, x, name, 0)
            return x
        if op == "PRelu":
            if x is None:
                self.stop(maps[1] if len(maps) > 1 else None, node, "PRelu slope computed from the channels")
                return None
            if not self.per_channel_const(node, x, node.input[0], node.input[1]):
                self.stop(x, node, "PRelu slope is neither scalar nor per channel")
                return None
            return x
        if op in _SPATIAL:
            if x is None:
                return None
            if x.axis != 1 or x.repeat != 1:
                self.stop(x, node, f"{op} on a tensor whose channel axis is {x.axis}")
                return None
            return x
        if op in ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL2", "ReduceL1"):
            return self.reduce(node, x, maps)
        if op in _BINARY:
            return self.binary(node, maps)
        if op == "Concat":
            return self.concat(node, maps)
        if op in ("Flatten", "Reshape"):
            return self.flatten(node, x, maps)
        if op == "Transpose":
            if x is None:
                return None
            perm = self.attr(node, "perm")
            if perm is None or x.repeat != 1:
                self.stop(x, node, "Transpose without perm, or of flattened channels")
                return None
            return _Map(list(perm).index(x.axis), x.segments)
        if op == "Softmax" or op == "LogSoftmax":
            rank = self.rank(node.input[0])
            axis = self.attr(node, "axis", -1)
            if x is not None and rank is not None and (axis % rank) != x.axis:
                return x
            self.stop(x, node, f"{op} normalises over the channels")
            return None
        if op == "Shape":
            return self.shape_of(node, x)
        if op in ("Pad", "Resize", "Upsample"):
            return self.resize(node, x, maps)
        for m in maps:
            self.stop(m, node, f"{op} is not known to keep channels apart")
        return None

    def conv(self, node: onnx.NodeProto, x: _Map | None, maps: list[_Map | None]) -> _Map | None:
        for m in maps[1:]:
            self.stop(m, node, "Conv weight computed from the channels")
        w_name = node.input[1]
        w = self.const(w_name)
        group = int(self.attr(node, "group", 1))
        if w is None:
            self.stop(x, node, f"Conv weight {w_name!r} is not a constant")
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out_shape = self.shapes.get(node.output[0])
        spatial = int(np.prod([d if isinstance(d, int) else 0 for d in out_shape[2:]])) if out_shape else 0
        macs = spatial * int(np.prod(w.shape))  # per output element: Cin/group * prod(kernel); batch 1
        c_out, c_in_g = int(w.shape[0]), int(w.shape[1])
        if x is not None and (x.axis != 1 or x.repeat != 1):
            self.stop(x, node, "Conv input channels are not on axis 1")
            x = None
        c_in = x.channels if x is not None else (self.shapes.get(node.input[0]) or (None, None))[1]
        if group > 1 and group == c_in and c_in_g == 1 and c_out == c_in:
            # depthwise: channel c in -> channel c out; the group count follows the kept channels
            if x is None:
                self.layers.append((self.key(node), "Conv", w_name, macs, ((None, c_out),), None, True))
                return None
            if not self.weight_ok(node, w_name, x) or (bias and not self.weight_ok(node, bias, x)):
                self.layers.append((self.key(node), "Conv", w_name, macs, x.segments, x.segments, True))
                return x
            self.channelwise(node, x, w_name, 0)
            if bias:
                self.channelwise(node, x, bias, 0)
            for space, _, _ in x.offsets():
                if space is not None:
                    self.space(space).group_convs.append(self.key(node))
            self.layers.append((self.key(node), "Conv", w_name, macs, x.segments, x.segments, True))
            return x
        if group > 1:
            self.stop(x, node, f"grouped Conv (group={group}, {c_in_g} input channels per group)")
            self.layers.append((self.key(node), "Conv", w_name, macs, ((None, c_out),), None, False))
            return None
        in_segments = None
        if x is not None:
            in_segments = x.segments
            if self.weight_ok(node, w_name, x):
                self.consume(node, x, node.input[0], w_name, 1)
        owned = self.single_use(w_name) and (bias is None or (self.const(bias) is not None and self.single_use(bias)))
        if owned:
            out = self.produce(node, c_out, [(w_name, 0)] + ([(bias, 0)] if bias else []), 1)
        else:
            out = _Map(1, ((None, c_out),))
        self.layers.append((self.key(node), "Conv", w_name, macs, out.segments, in_segments, False))
        return out

    def matmul(self, node: onnx.NodeProto, x: _Map | None, maps: list[_Map | None]) -> _Map | None:
        op = node.op_type
        for m in maps[1:]:
            self.stop(m, node, f"{op} with the channels as its second operand")
        w_name = node.input[1]
        w = self.const(w_name)
        if w is None or w.ndim != 2:
            self.stop(x, node, f"{op} weight {w_name!r} is not a constant matrix")
            return None
        trans_b = op == "Gemm" and int(self.attr(node, "transB", 0)) == 1
        if op == "Gemm" and int(self.attr(node, "transA", 0)) == 1:
            self.stop(x, node, "Gemm with transA=1")
            x = None
        rank = self.rank(node.input[0])
        if x is not None and (rank is None or x.axis != rank - 1):
            self.stop(x, node, f"{op} reduces over axis {None if rank is None else rank - 1}, channels are on "
                               f"axis {x.axis}")
            x = None
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        n_out = int(w.shape[n_axis])
        out_shape = self.shapes.get(node.output[0])
        rows = int(np.prod([d if isinstance(d, int) else 1 for d in out_shape[:-1]])) if out_shape else 1
        macs = rows * int(w.shape[0]) * int(w.shape[1])
        in_segments = None
        if x is not None:
            in_segments = x.segments
            if self.weight_ok(node, w_name, x):
                self.consume(node, x, node.input[0], w_name, k_axis)
        params = [(w_name, n_axis)]
        owned = self.single_use(w_name)
        if op == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            if c is None or not self.single_use(node.input[2]):
                owned = False
            elif c.ndim >= 1 and c.shape[-1] == n_out and n_out > 1:
                params.append((node.input[2], c.ndim - 1))
        out_rank = len(out_shape) if out_shape else 2
        out = self.produce(node, n_out, params, out_rank - 1) if owned else _Map(out_rank - 1, ((None, n_out),))
        self.layers.append((self.key(node), op, w_name, macs, out.segments, in_segments, False))
        return out

    def binary(self, node: onnx.NodeProto, maps: list[_Map | None]) -> _Map | None:
        a, b = maps[0], maps[1]
        op = node.op_type
        if a is not None and b is not None:
            if a.axis != b.axis or a.repeat != b.repeat or [n for _, n in a.segments] != [n for _, n in b.segments] \
                    or self.rank(node.input[0]) != self.rank(node.input[1]):
                self.stop(a, node, f"{op} of two tensors whose channels do not line up")
                self.stop(b, node, f"{op} of two tensors whose channels do not line up")
                return None
            segments = []
            for (sa, n), (sb, _) in zip(a.segments, b.segments):
                if sa is not None and sb is not None:
                    self.union(sa, sb)
                    segments.append((sa, n))
                elif sa is None and sb is None:
                    segments.append((None, n))
                else:
                    fixed = _Map(a.axis, ((sa if sa is not None else sb, n),))
                    self.stop(fixed, node, f"{op} with a channel set that cannot be removed")
                    segments.append((sa if sa is not None else sb, n))
            return _Map(a.axis, tuple(segments), a.repeat)
        m, other_i = (a, 1) if a is not None else (b, 0)
        if m is None:
            return None
        tensor = node.input[1 - other_i]
        other = node.input[other_i]
        if op == "Pow" and other_i == 0:
            self.stop(m, node, "Pow with the channels as its exponent")
            return None
        if self.const(other) is not None:
            if self.per_channel_const(node, m, tensor, other):
                return m
            self.stop(m, node, f"{op} constant {other!r} is neither broadcast over nor sliced along the channels")
            return None
        shape = self.shapes.get(other)
        rank = self.rank(tensor)
        if shape is not None and rank is not None and len(shape) <= rank:
            lead = rank - len(shape)
            if m.axis < lead or shape[m.axis - lead] == 1:
                return m
        self.stop(m, node, f"{op} with {other!r}, a tensor computed elsewhere that spans the channels")
        return None

    def concat(self, node: onnx.NodeProto, maps: list[_Map | None]) -> _Map | None:
        rank = self.rank(node.output[0])
        mapped = [m for m in maps if m is not None]
        if not mapped or rank is None:
            for m in mapped:
                self.stop(m, node, "Concat of unknown rank")
            return None
        axis = int(self.attr(node, "axis")) % rank
        if axis == mapped[0].axis and all(m.axis == axis and m.repeat == 1 for m in mapped):
            segments = []
            for name, m in zip(node.input, maps):
                if m is not None:
                    segments += m.segments
                else:
                    shape = self.shapes.get(name)
                    if shape is None or not isinstance(shape[axis], int):
                        for mm in mapped:
                            self.stop(mm, node, f"Concat input {name!r} of unknown channel count")
                        return None
                    segments.append((None, int(shape[axis])))
            return _Map(axis, tuple(segments))
        first = mapped[0]
        if len(mapped) == len(maps) and all(m.axis == first.axis and m.repeat == first.repeat and
                                             [n for _, n in m.segments] == [n for _, n in first.segments]
                                             for m in mapped) and axis != first.axis:
            for m in mapped[1:]:
                for (sa, _), (sb, _) in zip(first.segments, m.segments):
                    if sa is not None and sb is not None:
                        self.union(sa, sb)
                    else:
                        self.stop(m, node, "Concat of tensors of which one has a fixed channel set")
                        self.stop(first, node, "Concat of tensors of which one has a fixed channel set")
            return first
        for m in mapped:
            self.stop(m, node, "Concat whose inputs' channels do not line up")
        return None

    def flatten(self, node: onnx.NodeProto, x: _Map | None, maps: list[_Map | None]) -> _Map | None:
        op = node.op_type
        for m in maps[1:]:
            self.stop(m, node, f"{op} shape computed from the channels")
        if x is None:
            return None
        in_shape = self.shapes.get(node.input[0])
        out_shape = self.shapes.get(node.output[0])
        if op == "Reshape" and (out_shape is None or not isinstance(out_shape[-1], int)) and in_shape is not None:
            out_shape = self.reshape_target(node.input[1], in_shape)
            if out_shape is not None:
                self.shapes[node.output[0]] = out_shape
        ok = (in_shape is not None and out_shape is not None and len(out_shape) == 2 and x.axis == 1
              and x.repeat == 1 and all(isinstance(d, int) for d in in_shape[1:]))
        if ok:
            inner = int(np.prod(in_shape[2:], dtype=np.int64)) if len(in_shape) > 2 else 1
            # rank 2 with C*inner columns: the element count forces the rows to be N, so this is a flatten
            ok = out_shape[1] == x.channels * inner
        if ok and op == "Flatten":
            ok = int(self.attr(node, "axis", 1)) == 1
        if not ok:
            self.stop(x, node, f"{op} that is not a flatten of [N, C, ...] into [N, C*...]")
            return None
        out = _Map(1, x.segments, inner)
        if op == "Reshape":
            edit = self.reshape_edit(node.input[1], x.channels * inner, node)
            if edit is False:
                self.stop(x, node, f"Reshape whose target shape {node.input[1]!r} cannot be rewritten")
                return None
            if edit is not None:
                for space, start, _ in x.offsets():
                    if space is not None:
                        self.space(space).shape_edits.append(ShapeEdit(edit[0], edit[1], inner))
        return out

    def shape_value(self, name: str, depth: int = 0) -> list | None:
        """The value of a small shape-computing subgraph (Shape, Gather, Slice, Unsqueeze, Concat of constants),
        entries int or a dimension's symbol; None when it cannot be followed."""
        value = self.const(name)
        if value is not None:
            return [int(v) for v in value.reshape(-1)] if value.ndim <= 1 else None
        producer = self.producer.get(name)
        if producer is None or depth > 8:
            return None
        op = producer.op_type
        if op == "Shape" and not producer.attribute:
            shape = self.shapes.get(producer.input[0])
            return list(shape) if shape is not None and all(d is not None for d in shape) else None
        parts = [self.shape_value(i, depth + 1) if i else None for i in producer.input]
        if op == "Concat" and all(p is not None for p in parts):
            return [d for p in parts for d in p]
        if op in ("Unsqueeze", "Squeeze", "Identity", "Cast") and parts and parts[0] is not None:
            return parts[0]
        if op == "Gather" and parts[0] is not None and parts[1] is not None \
                and int(self.attr(producer, "axis", 0)) == 0:
            return [parts[0][i] for i in parts[1]]
        plain_slice = (len(parts) >= 3 and all(p is not None and len(p) == 1 for p in parts[1:3])
                       and (len(parts) < 4 or parts[3] in (None, [0])) and (len(parts) < 5 or parts[4] in (None, [1])))
        if op == "Slice" and plain_slice and parts[0] is not None:
            return parts[0][parts[1][0]:parts[2][0]]
        return None

    def reshape_target(self, shape_name: str, in_shape: tuple) -> tuple | None:
        target = self.shape_value(shape_name)
        if target is None or len(target) != 2:
            return None
        rows = in_shape[0] if target[0] == 0 else target[0]
        if rows != in_shape[0]:
            return None
        cols = target[1]
        if cols == -1 and all(isinstance(d, int) for d in in_shape[1:]):
            cols = int(np.prod(in_shape[1:], dtype=np.int64))
        return (rows, cols)

    def reshape_edit(self, shape_name: str, columns: int, node: onnx.NodeProto):
        """Where the Reshape's second output dimension is stored: None (-1: inferred), (name, index) of the
        constant entry to rewrite, or False when it cannot be traced."""
        value = self.const(shape_name)
        if value is not None:
            if value.shape != (2,):
                return False
            if int(value[1]) == -1:
                return None
            return (shape_name, 1) if int(value[1]) == columns and self.single_use(shape_name) else False
        producer = self.producer.get(shape_name)
        if producer is None or producer.op_type != "Concat" or len(producer.input) != 2:
            return False
        last = self.const(producer.input[1])
        if last is None or last.shape != (1,):
            return False
        if int(last[0]) == -1:
            return None
        return (producer.input[1], 0) if int(last[0]) == columns and self.single_use(producer.input[1]) else False

    def reduce(self, node: onnx.NodeProto, x: _Map | None, maps: list[_Map | None]) -> _Map | None:
        if x is None:
            return None
        rank = self.rank(node.input[0])
        axes = self.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1])
        keep = int(self.attr(node, "keepdims", 1))
        if axes is None or rank is None or keep != 1 or x.repeat != 1:
            self.stop(x, node, f"{node.op_type} over unknown axes or without keepdims")
            return None
        if x.axis in {int(a) % rank for a in np.asarray(axes).reshape(-1)}:
            self.stop(x, node, f"{node.op_type} over the channel axis")
            return None
        return x

    def shape_of(self, node: onnx.NodeProto, x: _Map | None) -> None:
        """Shape reads no values; it is safe when only dimensions before the channel axis are used."""
        if x is None:
            return None
        users = self.uses.get(node.output[0], [])
        for user in users:
            if user.op_type == "Gather":
                idx = self.const(user.input[1])
                if (idx is not None and int(self.attr(user, "axis", 0)) == 0 and idx.size
                        and 0 <= int(idx.min()) and int(idx.max()) < x.axis):
                    continue
                self.stop(x, node, "Shape whose result reads the channel count")
                return None
            starts = self.const(user.input[1]) if user.op_type == "Slice" and len(user.input) > 2 else None
            ends = self.const(user.input[2]) if starts is not None else None
            axes = self.const(user.input[3]) if user.op_type == "Slice" and len(user.input) > 3 and user.input[3] \
                else np.zeros(1, np.int64)
            steps = self.const(user.input[4]) if user.op_type == "Slice" and len(user.input) > 4 and user.input[4] \
                else np.ones(1, np.int64)
            safe = (starts is not None and ends is not None and axes is not None and steps is not None
                    and starts.shape == (1,) and int(axes.reshape(-1)[0]) == 0 and int(steps.reshape(-1)[0]) == 1
                    and 0 <= int(starts[0]) <= int(ends[0]) <= x.axis)
            if not safe:
                self.stop(x, node, "Shape whose result reads the channel count")
                return None
        return None

    def resize(self, node: onnx.NodeProto, x: _Map | None, maps: list[_Map | None]) -> _Map | None:
        for m in maps[1:]:
            self.stop(m, node, f"{node.op_type} parameters computed from the channels")
        if x is None:
            return None
        if x.axis != 1 or x.repeat != 1:
            self.stop(x, node, f"{node.op_type} of flattened channels")
            return None
        op = node.op_type
        if op == "Pad":
            pads = self.const(node.input[1]) if len(node.input) > 1 else self.attr(node, "pads")
            rank = self.rank(node.input[0])
            if pads is None or rank is None or (len(node.input) > 3 and node.input[3]):
                self.stop(x, node, "Pad with computed pads or axes")
                return None
            pads = np.asarray(pads).reshape(-1)
            if pads[1] != 0 or pads[1 + rank] != 0:
                self.stop(x, node, "Pad along the channel axis")
                return None
            return x
        # Resize/Upsample: scales must be 1 on the channel axis; sizes would name the channel count
        if op == "Resize" and len(node.input) > 3 and node.input[3]:
            self.stop(x, node, "Resize with explicit sizes")
            return None
        scales_name = node.input[2] if op == "Resize" and len(node.input) > 2 else (
            node.input[1] if len(node.input) > 1 else "")
        scales = self.const(scales_name) if scales_name else self.attr(node, "scales")
        if scales is None or np.asarray(scales).reshape(-1)[1] != 1:
            self.stop(x, node, f"{op} scales unknown or not 1 on the channel axis")
            return None
        return x

    # -- result -------------------------------------------------------------------------------------------
    def result(self) -> ChannelAnalysis:
        roots: dict[int, int] = {}
        groups: list[ChannelGroup] = []
        for i in range(len(self.spaces)):
            r = self.find(i)
            if r in roots:
                continue
            roots[r] = len(groups)
            s = self.spaces[r]
            reason = s.reason
            if reason is None and not any(p.role == "consumer" for p in s.params):
                reason, s.stopped_by = "no consumer reads these channels", None
            groups.append(ChannelGroup(
                index=len(groups), channels=s.channels, producers=tuple(dict.fromkeys(s.producers)),
                params=tuple(s.params), taps=tuple(s.taps), group_convs=tuple(s.group_convs),
                shape_edits=tuple(s.shape_edits), prunable=reason is None, reason=reason, stopped_by=s.stopped_by,
            ))

        def seg(segments):
            if segments is None:
                return None
            return tuple((None if g is None else roots[self.find(g)], n) for g, n in segments)

        layers = [LayerMacs(node, op, w, int(macs), seg(out), seg(inp), dw)
                  for node, op, w, macs, out, inp, dw in self.layers]
        return ChannelAnalysis(groups, layers)


def analyse(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
            observed: dict[str, tuple[int, ...]] | None = None) -> ChannelAnalysis:
    """Channel dependency groups of ``model`` (with external data loaded) and its MACs per prunable layer.

    ``input_shapes`` binds symbolic input dimensions (e.g. a calibration sample's shape, batch 1) so that the
    MACs of layers behind a dynamic height/width are counted. ``observed``: tensor shapes seen in a run of the
    model on such an input, used where shape inference left a dimension unknown (dynamic reshapes).
    """
    walker = _Walker(model, input_shapes, observed)
    walker.run()
    analysis = walker.result()
    logger.info("%d channel group(s), %d prunable; %.3g MACs in %d layers", len(analysis.groups),
                len(analysis.prunable()), analysis.total_macs, len(analysis.layers))
    return analysis


def tensors_of(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor of ``model`` by the name its consumers read: initializers and Constant nodes."""
    found = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return found
