"""Static int8 quantization of a float ModelProto (QDQ), and the checks a quantized model must pass.

Weights are int8, per output channel, symmetric (zero point 0): a weight that is exactly zero is quantized to
exactly zero, so every pruned zero and every N:M group survives. Activations are uint8, asymmetric, with the
ranges of the chosen calibration method. :func:`check_int8_weights` proves the zeros on the integers of the
result; a model that fails it is refused.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from onnxsparse.errors import OnnxSparseError
from onnxsparse.inspect import constant_tensors, integer_parts, integer_source, weight_operand
from onnxsparse.quantize.calibrate import METHODS, Calibration
from onnxsparse.validate import one_of

logger = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Settings:
    """One candidate quantization of a model."""

    method: str = "minmax"  # activation calibration, a key of calibrate.METHODS
    op_types: tuple[str, ...] | None = None  # None: every op type onnxruntime's QDQ quantizer handles
    exclude: tuple[str, ...] = field(default=())  # names of nodes kept in float
    quantize_bias: bool = True  # False: biases stay float (onnxruntime's fusion quantizes them at load)

    def __post_init__(self) -> None:
        one_of(self.method, "calibration method", tuple(METHODS))

    def excluding(self, nodes) -> Int8Settings:
        return replace(self, exclude=tuple(dict.fromkeys((*self.exclude, *nodes))))


def named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every node has a name of its own (nodes are kept in float by name)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)
    return copy


class _QuantizerLog(logging.Filter):
    """onnxruntime's quantizer logs through the root logger on every call (advice to run its pre-processing,
    per-channel axes it skips for rank-1 BatchNorm tensors): kept here, at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger.debug("onnxruntime.quantization: %s", record.getMessage())
        return False


def quantize_int8(float_path: Path, calibration: Calibration, settings: Int8Settings,
                  out_path: Path) -> onnx.ModelProto:
    """Quantize the float model saved at ``float_path`` (a :func:`named_copy`) with ``settings``."""
    root = logging.getLogger()
    advice = _QuantizerLog()
    root.addFilter(advice)
    try:
        # the histogram calibrators print their progress on stdout
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(float_path), str(out_path), calibration.reader(settings.method),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
                nodes_to_exclude=list(settings.exclude),
                calibrate_method=METHODS[settings.method],
                calibration_cache_path=calibration.cache(settings.method),
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                               "QuantizeBias": settings.quantize_bias},
            )
    except (ValueError, RuntimeError, KeyError) as exc:
        raise OnnxSparseError(f"onnxruntime could not quantize the model to int8 ({settings}): {exc}") from None
    finally:
        root.removeFilter(advice)
    return onnx.load(str(out_path))


@dataclass(frozen=True)
class Int8Weight:
    """A weight stored as int8: ``(values - zero_point) * scale`` along ``axis``, behind a DequantizeLinear (int8
    compute) or a Cast -> Mul (float compute; zero point 0)."""

    tensor: str  # the float initializer it replaces
    node: str  # the node that consumes it
    initializer: str  # the int8 initializer
    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def _along_axis(self, t: np.ndarray) -> np.ndarray:
        if t.ndim == 1 and self.values.ndim > 1:
            return t.reshape([-1 if i == self.axis % self.values.ndim else 1 for i in range(self.values.ndim)])
        return t

    def centred(self) -> np.ndarray:
        """The integers minus the zero point: zero exactly where the dequantized weight is zero."""
        return self.values.astype(np.int32) - self._along_axis(self.zero_point.astype(np.int32))

    def dequantized(self) -> np.ndarray:
        """The float weight the runtime computes with."""
        return (self.centred() * self._along_axis(self.scale)).astype(np.float32)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def int8_weights(float_model: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, Int8Weight]:
    """The weights of Conv/ConvTranspose/Gemm/MatMul nodes of ``float_model`` that ``quantized`` (made from it,
    node names kept) stores as integers, by float tensor name. Weights left in float are absent."""
    f_inits = _initializers(float_model)
    q_inits = constant_tensors(quantized)  # a scale may be a float16 initializer behind a Cast
    q_nodes = {node.name: node for node in quantized.graph.node}
    producer = {out: node for node in quantized.graph.node for out in node.output}
    found: dict[str, Int8Weight] = {}
    for node in float_model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        tensor = weight_operand(node, f_inits)
        q_node = q_nodes.get(node.name)
        if tensor is None or q_node is None:
            continue
        value = q_node.input[list(node.input).index(tensor)]
        source = integer_source(value, q_inits, producer)  # None while the weight is a float initializer
        if source is None:
            continue
        integers, scale_name, zero_name, axis = integer_parts(source, q_inits, producer)
        values = numpy_helper.to_array(q_inits[integers])
        scale = numpy_helper.to_array(q_inits[scale_name])
        if axis is None:  # Cast -> Mul: the scale is shaped to broadcast along one axis
            axis = _broadcast_axis(scale, values.shape)
            scale = scale.reshape(-1)
        zero = (numpy_helper.to_array(q_inits[zero_name]) if zero_name is not None
                else np.zeros_like(scale, dtype=values.dtype))
        found[tensor] = Int8Weight(tensor, node.name, integers, values, scale, zero, axis)
    return found


def _broadcast_axis(scale: np.ndarray, shape: tuple[int, ...]) -> int:
    """The axis a broadcast scale runs along (0 for a single scale, which then counts as one channel's)."""
    if scale.ndim == len(shape):
        for axis, (s, n) in enumerate(zip(scale.shape, shape)):
            if s == n and scale.size == n:
                return axis
    return 0


def check_int8_weights(float_model: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, Int8Weight]:
    """:func:`int8_weights`, after proving each is int8, per-channel, symmetric, with every float zero still
    zero. Raises OnnxSparseError otherwise (the caller writes nothing)."""
    weights = int8_weights(float_model, quantized)
    f_inits = _initializers(float_model)
    for name, w in weights.items():
        where = f"int8 weight {w.initializer!r} of node {w.node!r}"
        if w.values.dtype != np.int8:
            raise OnnxSparseError(f"{where} is {w.values.dtype}, expected int8; nothing was written")
        if np.any(w.zero_point != 0):
            raise OnnxSparseError(f"{where} has a non-zero zero point (not symmetric); nothing was written")
        channels = w.values.shape[w.axis % w.values.ndim] if w.values.ndim else 1
        if w.scale.ndim != 1 or w.scale.size != channels:
            raise OnnxSparseError(f"{where} has {w.scale.size} scale(s) for {channels} channels along axis "
                                  f"{w.axis} (not per-channel); nothing was written")
        original = numpy_helper.to_array(f_inits[name])
        if original.shape != w.values.shape:
            raise OnnxSparseError(f"{where} has shape {w.values.shape}, the float weight {original.shape}; "
                                  "nothing was written")
        moved = int(np.count_nonzero((original == 0) & (w.centred() != 0)))
        if moved:
            raise OnnxSparseError(f"{where}: {moved} weight(s) that were exactly zero are not zero after int8 "
                                  "quantization; nothing was written")
    return weights


def peer_int8(model: onnx.ModelProto, calibration: Calibration, workdir: Path) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` alone on ``model`` (QDQ, per-channel int8 weights, MinMax, every op
    type): the baseline ``--quantize int8`` is compared with."""
    path = Path(workdir) / "peer-float.onnx"
    onnx.save_model(model, str(path))
    return quantize_int8(path, calibration, Int8Settings(), Path(workdir) / "peer-int8.onnx")
