"""Types shared by the importer, the core and the exporter.

An :class:`ImportedModel` pairs the untouched original ``ModelProto`` with a trainable torch copy and a
map from every torch tensor the tool may change back to the ONNX tensor it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import helper
from torch import fx, nn

SourceKind = Literal["initializer", "constant"]


@dataclass(frozen=True)
class TensorSource:
    """Where an ONNX tensor lives in the *original* graph.

    ``kind="initializer"``: ``name`` is the initializer name. ``kind="constant"``: ``name`` is the output
    value name of the ``Constant`` node that holds the tensor in its ``value`` attribute.
    """

    kind: SourceKind
    name: str


@dataclass(frozen=True)
class Layout:
    """The exact transform between a torch tensor and its ONNX tensor.

    ``torch = T(cast(permute(onnx, perm))) * scale``: ``perm`` is the permutation of a ``Transpose`` node
    between the stored tensor and its consumer, ``onnx_dtype`` the element type (``onnx.TensorProto``
    enum) of the stored tensor when a ``Cast`` node stands between it and the consumer (None: the same
    type as the torch copy), ``transpose`` swaps the two axes of a rank-2 tensor (Gemm/Linear) and
    ``scale`` is Gemm's alpha/beta. Zeros map to zeros in both directions.
    """

    transpose: bool = False
    scale: float = 1.0
    perm: tuple[int, ...] | None = None
    onnx_dtype: int | None = None

    def then(self, *, transpose: bool = False, scale: float = 1.0) -> Layout:
        """This layout (a Transpose/Cast chain) followed by the consumer's own transpose and scale."""
        return replace(self, transpose=transpose, scale=scale)

    def onnx_axis(self, torch_axis: int) -> int:
        """The axis of the stored ONNX tensor that axis ``torch_axis`` of the torch tensor runs along."""
        axis = 1 - torch_axis if self.transpose else torch_axis
        return self.perm[axis] if self.perm is not None else axis

    def to_onnx(self, t: torch.Tensor) -> np.ndarray:
        if (self.scale == 1.0 and self.perm is None and self.onnx_dtype is None
                and t.dtype in (torch.float32, torch.float64, torch.float16)):
            # exact in the tensor's own dtype: no float64 copy (a transpose moves values, it computes none)
            a = t.detach().to("cpu")
            return (a.T if self.transpose else a).contiguous().numpy()
        a = t.detach().to("cpu", torch.float64)
        a = a / self.scale
        if self.transpose:
            a = a.T
        array = a.contiguous().numpy()
        if self.perm is not None:
            array = np.ascontiguousarray(array.transpose(np.argsort(self.perm)))
        if self.onnx_dtype is not None:
            array = array.astype(helper.tensor_dtype_to_np_dtype(self.onnx_dtype))
        return array

    def to_torch(self, a: np.ndarray) -> torch.Tensor:
        if self.perm is not None:
            a = a.transpose(self.perm)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
        if self.transpose:
            t = t.T
        if self.scale != 1.0:
            t = t * self.scale
        return t.contiguous()


@dataclass
class TrackedTensor:
    """A torch tensor of the converted module that maps back to one ONNX tensor."""

    source: TensorSource
    module_path: str  # dotted path of the owning module inside the GraphModule
    attr: str  # attribute name on that module ("weight", "bias", "onnx_initializer_3", ...)
    layout: Layout
    role: str  # "weight", "bias", "bn_weight", "bn_bias", "bn_mean", "bn_var"
    # value right after conversion, for change detection; a large one shares storage with the dense module
    # (never modified in place), so the snapshot costs no memory
    original: torch.Tensor = field(repr=False)
    shared: bool = False  # the ONNX tensor feeds several nodes: never changed

    def owner(self, module: nn.Module) -> nn.Module:
        return module.get_submodule(self.module_path) if self.module_path else module

    def get(self, module: nn.Module) -> torch.Tensor:
        return getattr(self.owner(module), self.attr)


@dataclass
class PrunableLayer:
    """One prunable weight: a Conv, ConvTranspose, Gemm or MatMul operand held as a constant."""

    name: str  # key used everywhere (sparsity dicts, reports): the ONNX tensor name
    node_name: str  # original ONNX node name ("" when the node had none)
    op_type: str
    weight: TrackedTensor
    bias: TrackedTensor | None  # tensor a per-output-channel shift can be folded into
    bias_inside: bool  # True: the bias is part of the module output (Conv, Linear, Gemm C); False: added after
    module_path: str  # module whose output is the layer's output (for hooks)
    out_axis_weight: int | None  # axis of the torch weight that indexes output channels; None: no correction
    out_axis_act: int  # axis of the module output that indexes output channels
    feeds_batchnorm: bool  # output goes straight into a BatchNormalization node
    reduction_axes: tuple[int, ...]  # axes of the torch weight summed over by the layer (for N:M)

    @property
    def numel(self) -> int:
        return int(self.weight.original.numel())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.original.shape)


@dataclass(frozen=True)
class SkippedLayer:
    node_name: str
    op_type: str
    tensor: str
    reason: str


@dataclass
class ImportedModel:
    proto: onnx.ModelProto  # the original model, never modified
    module: fx.GraphModule | None  # trainable torch copy (dense, eval mode); None after release_dense()
    layers: list[PrunableLayer]
    tracked: list[TrackedTensor]  # every tensor that may be written back (weights, biases, BN)
    skipped: list[SkippedLayer]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    torch_opset: int  # opset of the copy onnx2torch converted (differs when the importer converted it)
    has_batchnorm: bool
    notes: list[str] = field(default_factory=list)
    # folder the external data of ``proto`` lives in: tensors stored outside the file are left on disk
    # (``proto`` holds only their locations); None when every tensor is in ``proto``
    base_dir: Path | None = None

    def layer(self, name: str) -> PrunableLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def release_dense(self) -> None:
        """Drop the dense torch module and the values of the change-detection snapshots (kept: shape and
        dtype, as meta tensors). Call once the changed tensors are written back."""
        import gc

        for tracked in self.tracked:
            tracked.original = tracked.original.to("meta")
        self.module = None
        gc.collect()  # a GraphModule and its fx graph reference each other: only the cycle collector frees them

    def clone_module(self) -> fx.GraphModule:
        import copy

        return copy.deepcopy(self.module)
