"""N:M structured sparsity: the group axis of every layer type, N:M masks and N:M checks.

The rule is TensorRT's: in every group of M consecutive *input channels* (the reduction dimension) at most
N weights are non-zero. In terms of the ONNX initializer the group axis is

* ``Conv`` weight ``(C_out, C_in/g, k...)``: axis 1, one run of groups per ``(o, k...)``;
* ``ConvTranspose`` weight ``(C_in, C_out/g, k...)``: axis 0;
* ``Gemm`` ``B``: axis 1 with ``transB=1`` (``(N, K)``), axis 0 with ``transB=0`` (``(K, N)``);
  constant ``A``: axis 0 with ``transA=1``, axis 1 otherwise;
* ``MatMul`` ``X @ W`` with ``W (K, N)``: axis 0; ``W @ X`` with ``W (M, K)``: axis 1.

The importer records the same axis on the torch side as the first entry of
:attr:`PrunableLayer.reduction_axes`; the weight's :class:`~onnxsparse.graph.Layout` maps it to the ONNX
axis (a transposed layout swaps the two axes of a rank-2 weight: Gemm ``transB=0`` becomes ``nn.Linear``).

A layer whose group axis is not a multiple of M stays dense (target sparsity 0), with a reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import PrunableLayer
from onnxsparse.sparsity.masks import magnitude_mask
from onnxsparse.validate import check, is_int

logger = logging.getLogger(__name__)

MaskFn = Callable[[torch.Tensor, float], torch.Tensor]

# Tightest first: lowest density N/M, then the shorter group (1:4 implies 2:8, 2:4 implies 4:8).
STANDARD_PATTERNS: tuple[tuple[int, int], ...] = ((1, 8), (1, 4), (2, 8), (2, 4), (4, 8))
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"unstructured"``/``None`` -> ``None``; ``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``."""
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, tuple) and len(pattern) == 2:
        n, m = pattern
    else:
        match = _NM.match(str(pattern))
        if match is None:
            raise OnnxSparseError(f"pattern must be 'unstructured' or N:M (e.g. 2:4), got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
    _check_nm_args(n, m)
    return int(n), int(m)


def format_pattern(nm: tuple[int, int] | None) -> str:
    return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


def _check_nm_args(n, m) -> None:
    check(is_int(n) and is_int(m) and 0 < n < m, f"N:M pattern needs integers 0 < N < M, got {n!r}:{m!r}")


def _check_axis(shape: tuple[int, ...], m: int, axis: int) -> int:
    rank = len(shape)
    if not -rank <= axis < rank:
        raise OnnxSparseError(f"group axis {axis} is out of range for a weight of shape {tuple(shape)}")
    axis %= rank
    if shape[axis] % m:
        raise OnnxSparseError(
            f"axis {axis} of a weight of shape {tuple(shape)} has {shape[axis]} entries, not a multiple of M={m}"
        )
    return axis


# -- masks and checks --------------------------------------------------------------------------------------
def nm_mask(weight: torch.Tensor, n: int, m: int, axis: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|weight|`` of every ``m`` consecutive entries along ``axis``.

    Ties keep the lower index. ``weight.shape[axis]`` must be a multiple of ``m``.
    """
    _check_nm_args(n, m)
    axis = _check_axis(tuple(weight.shape), m, axis)
    mag = weight.detach().abs().float().movedim(axis, -1)
    moved_shape = mag.shape
    groups = mag.reshape(-1, m)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(moved_shape).movedim(-1, axis).contiguous()


def check_nm(array: np.ndarray | torch.Tensor, n: int, m: int, axis: int) -> bool:
    """True when every ``m`` consecutive entries along ``axis`` hold at most ``n`` non-zeros.

    False when ``array.shape[axis]`` is not a multiple of ``m`` (the pattern cannot be laid out).
    """
    _check_nm_args(n, m)
    a = _numpy(array)
    if a.ndim == 0 or not -a.ndim <= axis < a.ndim or a.shape[axis] % m:
        return False
    return _groups_within(a != 0, n, m, axis % a.ndim)


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _groups_within(nonzero: np.ndarray, n: int, m: int, axis: int) -> bool:
    """Every ``m`` consecutive entries along ``axis`` of the boolean ``nonzero`` hold at most ``n`` True."""
    if nonzero.size == 0:
        return True
    # split the axis into (groups, m) in place of moving it last: no copy of a large tensor
    shape = nonzero.shape[:axis] + (nonzero.shape[axis] // m, m) + nonzero.shape[axis + 1:]
    return bool((nonzero.reshape(shape).sum(axis=axis + 1, dtype=np.int32) <= n).all())


def tightest_pattern(array: np.ndarray | torch.Tensor, axis: int | None,
                     candidates: Iterable[tuple[int, int]] = STANDARD_PATTERNS) -> tuple[int, int] | None:
    """The first of ``candidates`` (tightest first) that ``array`` satisfies along ``axis``; None if none."""
    if axis is None:
        return None
    a = _numpy(array)
    if a.ndim == 0 or not -a.ndim <= axis < a.ndim:
        return None
    nonzero = a != 0
    for n, m in candidates:
        _check_nm_args(n, m)
        if a.shape[axis] % m == 0 and _groups_within(nonzero, n, m, axis % a.ndim):
            return n, m
    return None


# -- where the groups lie ---------------------------------------------------------------------------------
def onnx_group_axis(node: onnx.NodeProto, operand: int, rank: int) -> int | None:
    """The TensorRT group axis of input ``operand`` (0 or 1) of ``node`` in the ONNX initializer; None if n/a."""
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Conv":
        return 1 if operand == 1 and rank >= 3 else None
    if op == "ConvTranspose":
        return 0 if operand == 1 and rank >= 3 else None
    if rank != 2:
        return None
    if op == "Gemm":
        if operand == 1:
            return 1 if attrs.get("transB", 0) else 0
        if operand == 0:
            return 0 if attrs.get("transA", 0) else 1
        return None
    if op == "MatMul":
        return {1: 0, 0: 1}.get(operand)
    return None


def torch_group_axis(layer: PrunableLayer) -> int:
    """The group axis in the torch weight: the input-channel axis, first of ``layer.reduction_axes``."""
    if not layer.reduction_axes:
        raise OnnxSparseError(f"layer {layer.name!r} ({layer.op_type}) has no reduction axis")
    return layer.reduction_axes[0]


def layer_onnx_axis(layer: PrunableLayer) -> int:
    """The group axis in the ONNX initializer of ``layer`` (torch axis through the weight's layout)."""
    return layer.weight.layout.onnx_axis(torch_group_axis(layer))


def dense_reason(layer: PrunableLayer, m: int) -> str | None:
    """Why ``layer`` cannot take an N:M pattern with group size ``m``; None if it can."""
    axis = torch_group_axis(layer)
    size = layer.shape[axis]
    if size % m:
        return (f"{layer.op_type} input-channel dimension (ONNX axis {layer_onnx_axis(layer)}) has {size} entries, "
                f"not a multiple of M={m}")
    return None


def nm_group_axis(layer: PrunableLayer, m: int) -> int | None:
    """Torch axis along which ``layer`` groups M weights, or None when that dimension is not a multiple of M."""
    return None if dense_reason(layer, m) is not None else torch_group_axis(layer)


# -- what methods use -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NMMaskFn:
    """``(weight, sparsity) -> mask`` for one layer's N:M pattern; ``sparsity`` is ignored (it is 1 - N/M)."""

    n: int
    m: int
    axis: int  # torch axis

    def __call__(self, weight: torch.Tensor, sparsity: float = 0.0) -> torch.Tensor:
        return nm_mask(weight, self.n, self.m, self.axis)


def _keep_all(weight: torch.Tensor, sparsity: float = 0.0) -> torch.Tensor:
    """The mask of a layer the N:M pattern leaves dense."""
    return torch.ones_like(weight, dtype=torch.bool)


def mask_fn_for(layer: PrunableLayer, pattern: str | tuple[int, int] | None) -> MaskFn:
    """The mask function of ``layer`` under ``pattern``, usable as ``SparseMask(mask_fn=...)``.

    Unstructured: :func:`magnitude_mask` (honours ``sparsity``). N:M: the N largest of every M along the
    input-channel axis (ignores ``sparsity``), or all-True where the layer stays dense.
    """
    nm = parse_pattern(pattern)
    if nm is None:
        return magnitude_mask
    n, m = nm
    axis = nm_group_axis(layer, m)
    return _keep_all if axis is None else NMMaskFn(n, m, axis)


def nm_sparsities(layers: Iterable[PrunableLayer], pattern: str | tuple[int, int]) -> dict[str, float]:
    """Per-layer sparsity under an N:M pattern: ``1 - N/M``, or 0 for layers left dense."""
    nm = parse_pattern(pattern)
    if nm is None:
        raise OnnxSparseError("nm_sparsities needs an N:M pattern, got 'unstructured'")
    n, m = nm
    return {layer.name: (0.0 if nm_group_axis(layer, m) is None else 1.0 - n / m) for layer in layers}


def dense_layers(layers: Iterable[PrunableLayer], pattern: str | tuple[int, int] | None) -> dict[str, str]:
    """``{layer name: reason}`` for the layers an N:M pattern leaves dense (empty when unstructured)."""
    nm = parse_pattern(pattern)
    if nm is None:
        return {}
    reasons = {layer.name: dense_reason(layer, nm[1]) for layer in layers}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def pattern_masks(module: torch.nn.Module, layers: Iterable[PrunableLayer], pattern: str | tuple[int, int] | None,
                  sparsities: dict[str, float]) -> dict[str, torch.Tensor]:
    """Masks of every layer from the current weights of ``module`` under ``pattern``."""
    return {
        layer.name: mask_fn_for(layer, pattern)(layer.weight.get(module), sparsities.get(layer.name, 0.0))
        for layer in layers
    }
