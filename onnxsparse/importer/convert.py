"""onnx2torch conversion and the map from torch tensors back to ONNX tensors."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import onnx
import torch
from torch import fx, nn

from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import (
    ImportedModel,
    Layout,
    PrunableLayer,
    SkippedLayer,
    TensorSource,
    TrackedTensor,
)
from onnxsparse.importer.load import has_external_data, load_model, model_opset
from onnxsparse.importer.normalize import NormalizedGraph, normalize_for_torch

logger = logging.getLogger(__name__)

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})
# Ops that hold weight matrices the tool does not prune: their constant weights are reported as skipped.
_UNPRUNED_WEIGHT_OPS = frozenset({
    "LSTM", "GRU", "RNN", "Einsum", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "Attention",
})
_CONVERTER_MISSING = re.compile(r"operation_type='([^']*)', version=(\d+)")


def _check_supported(model: onnx.ModelProto) -> None:
    opset = model_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise OnnxSparseError(f"the model uses opset {opset}; the installed onnx supports opsets up to {newest}")
    for node in model.graph.node:
        label = f"{node.op_type} (node {node.name!r})"
        if node.domain not in ("", "ai.onnx"):
            raise OnnxSparseError(
                f"custom-domain op {label} in domain {node.domain!r} is not supported; only ai.onnx ops are"
            )
        if node.op_type in CONTROL_FLOW_OPS:
            raise OnnxSparseError(f"control-flow op {label} is not supported (opset {opset})")


@contextlib.contextmanager
def _working_folder(path: Path):
    """``contextlib.chdir`` (Python 3.11+) for Python 3.10."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _convert(norm: NormalizedGraph, base_dir: Path | None = None) -> fx.GraphModule:
    # onnx2torch and our converters (torchvision behind them) load on the first conversion, not at import
    from onnx2torch import convert

    from onnxsparse.importer.converters import ConverterError, installed

    try:
        with installed():
            if base_dir is None:
                return convert(norm.model, attach_onnx_mapping=True)
            # The copy is weightless: tensors stored as external data stay on disk, so onnx2torch's shape
            # inference serialises a small proto (a >2 GB one cannot be serialised) and each tensor is read
            # straight into torch when its module is built. onnx reads external data relative to the working
            # folder only (absolute and escaping locations are refused), hence the change of folder for the
            # conversion alone; the locations were checked to stay inside ``base_dir`` when the model was loaded.
            with _working_folder(base_dir):
                return convert(norm.model, attach_onnx_mapping=True)
    except ConverterError as exc:
        original, op_type = norm.original_nodes.get(exc.node, (exc.node, "?"))
        raise OnnxSparseError(
            f"cannot convert {op_type} node {original!r} (opset {norm.opset}"
            + (f", converted to {norm.torch_opset}" if norm.torch_opset != norm.opset else "")
            + f"): onnxsparse converter {exc.key}: {exc.reason}"
        ) from None
    except NotImplementedError as exc:
        match = _CONVERTER_MISSING.search(str(exc))
        if match:
            op = match.group(1)
            nodes = [orig for orig, op_type in norm.original_nodes.values() if op_type == op]
            node = nodes[0] if nodes else "?"
            raise OnnxSparseError(
                f"onnx2torch cannot convert op {op} (node {node!r}, opset {norm.opset}"
                + (f", converted to {norm.torch_opset}" if norm.torch_opset != norm.opset else "")
                + f"): {exc}"
            ) from None
        raise OnnxSparseError(f"onnx2torch cannot convert this model (opset {norm.opset}): {exc}") from None
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as exc:
        raise OnnxSparseError(
            f"onnx2torch failed to convert this model (opset {norm.opset}): {type(exc).__name__}: {exc}"
        ) from None


def _owner_path(gm: fx.GraphModule, name: str) -> str:
    module = gm.get_submodule(name)  # onnx2torch wraps asymmetric padding as Sequential(pad, conv)
    return f"{name}.{len(module) - 1}" if isinstance(module, nn.Sequential) else name


def _buffer_args(gm: fx.GraphModule) -> dict[str, dict[str, str]]:
    """For every call_module node: ONNX input value name -> dotted path of the buffer passed for it."""
    result: dict[str, dict[str, str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is None:
            continue
        args = list(node.args) + list(node.kwargs.values())
        by_value: dict[str, str] = {}
        for value_name, arg in zip(mapping.inputs, args):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                by_value[value_name] = arg.target
        result[node.target] = by_value
    return result


def _promote_to_parameter(gm: fx.GraphModule, path: str) -> tuple[str, str]:
    owner_path, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if attr in owner._buffers:  # noqa: SLF001 - onnx2torch keeps MatMul/Gemm constants as buffers
        tensor = owner._buffers.pop(attr)  # noqa: SLF001
        # the buffer is gone from the module: the parameter takes over its storage (no copy)
        owner.register_parameter(attr, nn.Parameter(tensor.detach(), requires_grad=tensor.is_floating_point()))
    return owner_path, attr


# Snapshots of tensors at least this large share the dense module's storage instead of copying it: the
# dense module (the teacher) is never modified in place, and a model's weights are not held twice.
# Smaller ones (BatchNorm statistics, biases) are copied: cheap, and safe from any in-place update.
_SHARED_SNAPSHOT_BYTES = 1 << 20


def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    return t if t.numel() * t.element_size() >= _SHARED_SNAPSHOT_BYTES else t.clone()


def _matches(patterns: Sequence[str], *candidates: str) -> str | None:
    for pattern in patterns:
        for candidate in candidates:
            if candidate and fnmatch.fnmatchcase(candidate, pattern):
                return pattern
    return None


class _Builder:
    def __init__(self, norm: NormalizedGraph, gm: fx.GraphModule, exclude: Sequence[str]):
        self.norm = norm
        self.gm = gm
        self.exclude = exclude
        self.buffers = _buffer_args(gm)
        self.layers: list[PrunableLayer] = []
        self.tracked: list[TrackedTensor] = []
        self.skipped: list[SkippedLayer] = []
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        g = norm.model.graph
        for node in g.node:
            for i, name in enumerate(node.input):
                self.consumers[name].append((node, i))
        self.initializers = {init.name: init for init in g.initializer}
        self.graph_outputs = {o.name for o in g.output}
        self.producers = {out: node for node in g.node for out in node.output}
        self._derived: dict[str, str | None] = {}

    # -- helpers -------------------------------------------------------------------------------------
    def source(self, value: str) -> TensorSource | None:
        return self.norm.sources.get(value)

    def rank(self, value: str) -> int | None:
        init = self.initializers.get(value)
        return None if init is None else len(init.dims)

    def track(self, value: str, owner_path: str, attr: str, layout: Layout, role: str) -> TrackedTensor | None:
        source = self.source(value)
        if source is None:
            return None
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        tensor = getattr(owner, attr)
        stored = self.norm.layouts.get(value)
        tracked = TrackedTensor(
            source=source,
            module_path=owner_path,
            attr=attr,
            layout=layout if stored is None else stored.then(transpose=layout.transpose, scale=layout.scale),
            role=role,
            original=_snapshot(tensor),
            shared=self.norm.consumers[source] > 1,
        )
        if tracked.shared and isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(False)
        self.tracked.append(tracked)
        return tracked

    def buffer_path(self, node: onnx.NodeProto, value: str) -> tuple[str, str] | None:
        path = self.buffers.get(node.name, {}).get(value)
        if path is None:
            return None
        return _promote_to_parameter(self.gm, path)

    def derived_from_constants(self, value: str) -> str | None:
        """The op type of the node computing ``value`` when every input it depends on is a constant tensor
        (a weight computed at run time: ``DequantizeLinear`` over int8 weights, a ``Reshape`` of a
        weight, ...); None when ``value`` depends on a graph input or is itself a stored tensor."""
        if value in self._derived:
            return self._derived[value]
        self._derived[value] = None  # a cycle cannot occur in a valid graph; guard anyway
        node = self.producers.get(value)
        result = None
        if node is not None and node.input:
            inputs = [name for name in node.input if name]
            if inputs and all(self.source(name) is not None or self.derived_from_constants(name) for name in inputs):
                result = node.op_type
        self._derived[value] = result
        return result

    def embedding_table(self, value: str) -> bool:
        init = self.initializers.get(value)
        return self.source(value) is not None and init is not None and len(init.dims) == 2 and (
            init.data_type in _FLOAT_TYPES)

    def original(self, node: onnx.NodeProto) -> str:
        return self.norm.original_nodes.get(node.name, ("", node.op_type))[0]

    def skip(self, node: onnx.NodeProto, tensor: str, reason: str) -> None:
        self.skipped.append(SkippedLayer(self.original(node), node.op_type, tensor, reason))

    def feeds_batchnorm(self, node: onnx.NodeProto) -> bool:
        users = self.consumers.get(node.output[0], [])
        return (
            len(users) == 1
            and users[0][0].op_type == "BatchNormalization"
            and users[0][1] == 0
            and node.output[0] not in self.graph_outputs
        )

    def add_bias(self, node: onnx.NodeProto, out_channels: int) -> TrackedTensor | None:
        """A following ``Add`` with a constant of shape (N,) acts as the bias of a MatMul/Gemm without C."""
        users = self.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0][0].op_type != "Add" or node.output[0] in self.graph_outputs:
            return None
        add = users[0][0]
        other = add.input[1 - users[0][1]]
        init = self.initializers.get(other)
        if init is None or list(init.dims) != [out_channels]:
            return None
        path = self.buffer_path(add, other)
        if path is None:
            return None
        return self.track(other, path[0], path[1], Layout(), "bias")

    # -- per-op rules --------------------------------------------------------------------------------
    def prunable(self, node: onnx.NodeProto, value: str, weight: TrackedTensor, *, bias: TrackedTensor | None,
                 module_path: str, out_axis_weight: int | None, out_axis_act: int, reduction_axes: tuple[int, ...],
                 bias_inside: bool = True) -> None:
        """Record the layer unless it is excluded or unusable."""
        original = self.original(node)
        pattern = _matches(self.exclude, original, node.op_type, value)
        if pattern is not None:
            self.skip(node, value, f"excluded by pattern {pattern!r}")
            return
        if weight.shared:
            self.skip(node, value, f"weight is shared by {self.norm.consumers[weight.source]} nodes")
            return
        if not weight.original.is_floating_point():
            self.skip(node, value, f"weight has non-float dtype {weight.original.dtype}")
            return
        if bias is not None and bias.shared:
            bias = None
        self.layers.append(
            PrunableLayer(
                name=weight.source.name,
                node_name=original,
                op_type=node.op_type,
                weight=weight,
                bias=bias,
                bias_inside=bias_inside,
                feeds_batchnorm=self.feeds_batchnorm(node),
                module_path=module_path,
                out_axis_weight=out_axis_weight,
                out_axis_act=out_axis_act,
                reduction_axes=reduction_axes,
            )
        )

    def conv(self, node: onnx.NodeProto) -> None:
        value = node.input[1]
        if self.source(value) is None:
            op = self.derived_from_constants(value)
            self.skip(node, value, "weight is computed at run time" + (
                f" from constant tensors by {op}" if op else " from the graph inputs"))
            return
        path = _owner_path(self.gm, node.name)
        module = self.gm.get_submodule(path)
        weight = self.track(value, path, "weight", Layout(), "weight")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self.track(node.input[2], path, "bias", Layout(), "bias")
        rank = module.weight.dim()
        if node.op_type == "Conv":
            out_axis, reduction = 0, tuple(range(1, rank))
        else:  # ConvTranspose: weight (C_in, C_out / group, k...)
            out_axis = 1 if module.groups == 1 else None
            reduction = (0,) + tuple(range(2, rank))
        self.prunable(
            node, value, weight, bias=bias, module_path=path, out_axis_weight=out_axis, out_axis_act=1,
            reduction_axes=reduction,
        )

    def gemm(self, node: onnx.NodeProto) -> None:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        alpha = float(attrs.get("alpha", 1.0))
        beta = float(attrs.get("beta", 1.0))
        trans_a = bool(attrs.get("transA", 0))
        trans_b = bool(attrs.get("transB", 0))
        module = self.gm.get_submodule(node.name)
        if isinstance(module, nn.Linear):
            value = node.input[1]
            weight = self.track(value, node.name, "weight", Layout(transpose=not trans_b, scale=alpha), "weight")
            bias = None
            if len(node.input) > 2 and node.input[2]:
                bias = self.track(node.input[2], node.name, "bias", Layout(scale=beta), "bias")
            self.prunable(
                node, value, weight, bias=bias, module_path=node.name, out_axis_weight=0, out_axis_act=-1,
                reduction_axes=(1,),
            )
            return
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        operand = self.constant_operand(node, trans_a, trans_b)
        if operand is None:
            op = next((op for op in map(self.derived_from_constants, node.input[:2]) if op), None)
            self.skip(node, node.input[1], f"weight is computed at run time from constant tensors by {op}" if op
                      else "no constant rank-2 operand (or both operands constant)")
            return
        value, out_axis, reduction, act_axis = operand
        weight = self.operand_weight(node, value)
        if weight is None:
            return
        bias = None
        if act_axis == -1 and c is not None and beta == 1.0 and self.rank(c) == 1:
            cpath = self.buffer_path(node, c)
            if cpath is not None:
                bias = self.track(c, cpath[0], cpath[1], Layout(), "bias")
        self.prunable(
            node, value, weight, bias=bias, module_path=node.name, out_axis_weight=out_axis, out_axis_act=act_axis,
            reduction_axes=reduction,
        )

    def constant_operand(
        self, node: onnx.NodeProto, trans_a: bool = False, trans_b: bool = False
    ) -> tuple[str, int, tuple[int, ...], int] | None:
        """The one constant rank-2 operand of ``A @ B`` (Gemm or MatMul) with its axes.

        Returns (value, output-channel axis of the weight, reduction axes of the weight, output-channel axis
        of the product), or None when neither or both operands are constant.
        """
        a, b = node.input[0], node.input[1]
        if self.source(b) is not None and self.rank(b) == 2 and self.source(a) is None:
            return b, (0 if trans_b else 1), ((1,) if trans_b else (0,)), -1
        if self.source(a) is not None and self.rank(a) == 2 and self.source(b) is None:
            return a, (1 if trans_a else 0), ((0,) if trans_a else (1,)), -2
        return None

    def operand_weight(self, node: onnx.NodeProto, value: str) -> TrackedTensor | None:
        path = self.buffer_path(node, value)
        if path is None:
            self.skip(node, value, "onnx2torch did not keep the operand as a tensor")
            return None
        return self.track(value, path[0], path[1], Layout(), "weight")

    def matmul(self, node: onnx.NodeProto) -> None:
        a, b = node.input[0], node.input[1]
        operand = self.constant_operand(node)
        if operand is None:
            if self.source(a) is None and self.source(b) is None:
                for value in (b, a):
                    op = self.derived_from_constants(value)
                    if op is not None:
                        self.skip(node, value, f"weight is computed at run time from constant tensors by {op}")
                        return
                return  # activation x activation (attention scores): nothing to prune
            self.skip(node, b if self.source(b) else a, "constant operand is not rank 2 (or both are constant)")
            return
        value, out_axis, reduction, act_axis = operand
        weight = self.operand_weight(node, value)
        if weight is None:
            return
        init = self.initializers[value]
        bias = self.add_bias(node, int(init.dims[out_axis])) if act_axis == -1 else None
        self.prunable(
            node, value, weight, bias=bias, module_path=node.name, out_axis_weight=out_axis, out_axis_act=act_axis,
            reduction_axes=reduction, bias_inside=False,
        )

    def batchnorm(self, node: onnx.NodeProto) -> bool:
        module = self.gm.get_submodule(node.name)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
            return False
        for value, attr, role in zip(
            node.input[1:5],
            ("weight", "bias", "running_mean", "running_var"),
            ("bn_weight", "bn_bias", "bn_mean", "bn_var"),
        ):
            self.track(value, node.name, attr, Layout(), role)
        return True

    def build(self) -> bool:
        has_bn = False
        for node in self.norm.model.graph.node:
            if node.op_type in ("Conv", "ConvTranspose"):
                self.conv(node)
            elif node.op_type == "Gemm":
                self.gemm(node)
            elif node.op_type == "MatMul":
                self.matmul(node)
            elif node.op_type == "BatchNormalization":
                has_bn = self.batchnorm(node) or has_bn
            elif node.op_type == "Gather" and self.embedding_table(node.input[0]):
                self.skip(node, node.input[0], "embedding table read by Gather is not pruned")
            elif node.op_type in _UNPRUNED_WEIGHT_OPS:
                for value in node.input:
                    if value and self.source(value) is not None and (self.rank(value) or 0) >= 2:
                        self.skip(node, value, f"{node.op_type} weights are not pruned")
        return has_bn


def _graph_inputs(model: onnx.ModelProto) -> tuple[str, ...]:
    inits = {init.name for init in model.graph.initializer}
    return tuple(i.name for i in model.graph.input if i.name not in inits)


def import_model(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    exclude: Iterable[str] = (),
) -> ImportedModel:
    """Load (if needed), normalise and convert ``model``; map every prunable weight back to its tensor."""
    if isinstance(model, onnx.ModelProto):
        proto, base_dir = model, None
    else:
        proto = load_model(model, external_data=False)
        base_dir = Path(model).resolve().parent if has_external_data(proto) else None
    _check_supported(proto)
    norm = normalize_for_torch(proto)
    gm = _convert(norm, base_dir)
    gm.eval()
    builder = _Builder(norm, gm, tuple(exclude))
    has_bn = builder.build()
    for param in gm.parameters():
        if not param.is_floating_point():
            param.requires_grad_(False)
    imported = ImportedModel(
        proto=proto,
        module=gm,
        layers=builder.layers,
        tracked=builder.tracked,
        skipped=builder.skipped,
        input_names=_graph_inputs(proto),
        output_names=tuple(o.name for o in proto.graph.output),
        opset=norm.opset,
        torch_opset=norm.torch_opset,
        has_batchnorm=has_bn,
        notes=list(norm.notes),
        base_dir=base_dir,
    )
    logger.info(
        "imported %d prunable layer(s) (%d weights), %d skipped, batchnorm=%s",
        len(imported.layers),
        sum(layer.numel for layer in imported.layers),
        len(imported.skipped),
        has_bn,
    )
    return imported

