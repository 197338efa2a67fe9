"""What a model declares about its inputs: name, shape, element type and image layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.validate import one_of

log = logging.getLogger(__name__)

LAYOUTS = ("nchw", "nhwc", "other")
_IMAGE_AXES = {"nchw": (1, 2, 3), "nhwc": (3, 1, 2)}  # (channel, height, width)

# Element types a calibration tensor may have; everything else is rejected by load_calibration.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# Integer and boolean inputs (token ids, attention masks, segment ids) are fed exactly, never normalised.
INTEGER_DTYPES = tuple(
    np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)
)


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the model declares it.

    ``shape`` has ``None`` for dynamic (symbolic or unknown) dimensions; ``has_shape`` is False when
    the model declares no shape at all (then ``shape`` is ``()`` and the rank is unknown).
    """

    name: str
    layout: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    has_shape: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise OnnxSparseError(f"input name must be a non-empty string, got {self.name!r}")
        one_of(self.layout, f"layout of input {self.name!r}", LAYOUTS)
        shape = tuple(self.shape)
        for dim in shape:
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
                raise OnnxSparseError(
                    f"shape of input {self.name!r} must hold non-negative ints or None, got {shape}"
                )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.layout != "other" and len(shape) != 4:
            raise OnnxSparseError(
                f"input {self.name!r} has layout {self.layout} but rank {len(shape)}; image layouts need rank 4"
            )

    @property
    def rank(self) -> int | None:
        return len(self.shape) if self.has_shape else None

    @property
    def is_image(self) -> bool:
        return self.layout in ("nchw", "nhwc")

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def is_integer(self) -> bool:
        """Integer or boolean input (ids, masks): fed as given, in the declared dtype."""
        return self.dtype in INTEGER_DTYPES

    def _image_axes(self, layout: str | None) -> tuple[int, int, int]:
        """(channel, height, width) axes of a batched tensor in ``layout`` (default: the detected one)."""
        layout = layout or self.layout
        if layout not in _IMAGE_AXES:
            raise OnnxSparseError(f"input {self.name!r} is not an image input (layout {layout})")
        return _IMAGE_AXES[layout]

    def channel_axis(self, layout: str | None = None) -> int:
        return self._image_axes(layout)[0]

    def spatial_dims(self, layout: str | None = None) -> tuple[int | None, int | None]:
        """Declared (height, width) for ``layout``; None where dynamic."""
        _, height, width = self._image_axes(layout)
        return self.shape[height], self.shape[width]

    def describe_shape(self) -> str:
        if not self.has_shape:
            return "[unknown shape]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def _is_channel_count(dim: int | None) -> bool:
    return dim is not None and 1 <= dim <= 4


def guess_layout(shape: tuple[int | None, ...], has_shape: bool = True) -> str:
    """Image layout of a declared shape: rank 4 with a small channel dim last means NHWC, else NCHW.

    A rank-4 input whose channel position cannot be told (both or neither of dims 1 and 3 look like
    a channel count) is taken as NCHW, the ONNX convention.
    """
    if not has_shape or len(shape) != 4:
        return "other"
    if _is_channel_count(shape[3]) and not _is_channel_count(shape[1]):
        return "nhwc"
    return "nchw"


def _dims(type_proto: onnx.TypeProto) -> tuple[tuple[int | None, ...], bool]:
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return (), False
    dims: list[int | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(None)
    return tuple(dims), True


_ELEM_TYPE_VALUES = frozenset(onnx.TensorProto.DataType.values())


def _np_dtype(name: str, elem_type: int) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError) as exc:
        type_name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in _ELEM_TYPE_VALUES else str(elem_type)
        raise OnnxSparseError(
            f"input {name!r} has element type {type_name}, which has no numpy equivalent"
        ) from exc


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers, in graph order."""
    if not isinstance(model, onnx.ModelProto):
        raise OnnxSparseError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    initializers = {init.name for init in model.graph.initializer}
    initializers.update(init.values.name for init in model.graph.sparse_initializer)
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            kind = value.type.WhichOneof("value") or "no type"
            raise OnnxSparseError(
                f"input {value.name!r} is a {kind.replace('_type', '')}, not a tensor; "
                "onnxsparse supports models whose inputs are float tensors"
            )
        shape, has_shape = _dims(value.type)
        dtype = _np_dtype(value.name, value.type.tensor_type.elem_type)
        specs.append(InputSpec(value.name, guess_layout(shape, has_shape), shape, dtype, has_shape))
    if not specs:
        raise OnnxSparseError("the model has no graph inputs (all inputs are initializers)")
    return specs
