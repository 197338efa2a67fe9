"""Magnitude masks and the mask parametrization used by every method.

Invariant: a mask for sparsity ``s`` over ``n`` weights has exactly ``round(s * n)`` zeros, whatever the
ties in magnitude (ties go to the lower flat index being pruned first).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from onnxsparse.graph import PrunableLayer


# Tensors of at least this many elements are thresholded by a radix select on the float bits (CPU): no |W|
# copy, which matters for the multi-GB weights of models over 2 GB. Smaller ones use kthvalue (any device).
_SELECT_ON_BITS = 1 << 24


def zeros_for(sparsity: float, numel: int) -> int:
    return min(numel, max(0, int(round(sparsity * numel))))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``numel - round(sparsity * numel)`` largest ``|weight|``."""
    n = weight.numel()
    k = zeros_for(sparsity, n)
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    if k == n:
        return torch.zeros_like(weight, dtype=torch.bool)
    if n >= _SELECT_ON_BITS and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64,
                                                                                    torch.float16):
        return _magnitude_mask_select(weight.detach(), k)  # no |W| copy of a huge tensor
    return _kth_mask(weight.detach().abs().flatten(), k).view_as(weight)


def _kth_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` smallest of a flat ``magnitude``, ties pruned from the lowest index up.

    The same mask as the first ``k`` of a stable ascending argsort, from one selection (``kthvalue``) and
    elementwise work: O(n) instead of a sort, and no host synchronisation (the tie count stays on the device).
    """
    threshold = magnitude.kthvalue(k).values
    below = magnitude < threshold
    tied = magnitude == threshold
    room = k - below.sum()  # ties at the threshold still to prune, lowest flat index first
    return ~(below | (tied & (tied.cumsum(0) <= room)))


_CHUNK = 1 << 22
_UINT = {torch.float16: np.uint16, torch.float32: np.uint32, torch.float64: np.uint64}


def _kth_smallest_magnitude(flat: torch.Tensor, k: int) -> float:
    """The ``k``-th smallest ``|w|`` (1-based) by radix selection on the float bits, 16 bits a pass.

    For non-negative floats the bit patterns sort like the values (NaN above infinity), so the k-th value
    is found from histograms over chunks: no sorted copy, no index array, memory of one chunk.
    """
    uint = _UINT[flat.dtype]
    bits = np.dtype(uint).itemsize * 8
    prefix, rank = 0, k  # rank: position of the k-th value among those sharing ``prefix``
    for shift in range(bits - 16, -1, -16):
        counts = np.zeros(1 << 16, dtype=np.int64)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start:start + _CHUNK].abs().numpy().view(uint)
            if shift + 16 < bits:
                chunk = chunk[(chunk >> uint(shift + 16)) == uint(prefix)]
            counts += np.bincount(((chunk >> uint(shift)) & uint(0xFFFF)).astype(np.int64), minlength=1 << 16)
        cumulative = np.cumsum(counts)
        digit = int(np.searchsorted(cumulative, rank))
        rank -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    return float(np.array([prefix], dtype=uint).view(flat.numpy().dtype)[0])


def _magnitude_mask_select(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The mask of :func:`magnitude_mask` (the first ``k`` of a stable ascending sort of ``|w|`` pruned)
    from the k-th smallest ``|w|`` by selection: chunk-sized temporaries instead of a sort's values and int64
    indices (which cost 5x the weight for a float32 tensor over 2 GB)."""
    flat = weight.reshape(-1)
    threshold = _kth_smallest_magnitude(flat, k)
    if np.isnan(threshold):  # NaNs sort last: fall back to the sort, which places them exactly
        order = torch.argsort(flat.abs(), stable=True)
        mask = torch.ones(flat.numel(), dtype=torch.bool)
        mask[order[:k]] = False
        return mask.view_as(weight)
    mask = torch.empty(flat.numel(), dtype=torch.bool)
    ties = k
    for start in range(0, flat.numel(), _CHUNK):
        below = flat[start:start + _CHUNK].abs() < threshold
        torch.logical_not(below, out=mask[start:start + _CHUNK])
        ties -= int(torch.count_nonzero(below))
    # Ties at the threshold: a stable sort prunes the first ones in index order.
    for start in range(0, flat.numel(), _CHUNK):
        if ties <= 0:
            break
        at = torch.nonzero(flat[start:start + _CHUNK].abs() == threshold).reshape(-1)[:ties] + start
        mask[at] = False
        ties -= at.numel()
    return mask.view_as(weight)


class _MaskedWeight(torch.autograd.Function):
    """``W * M`` forward; straight-through backward with a decay on the pruned part:

    ``dL/dW = g + decay * (1 - M) * W`` (UniPTS, following the dynamic-sparse-training literature).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        weight, mask = ctx.saved_tensors
        g = grad
        if ctx.decay:
            g = grad + ctx.decay * (1 - mask) * weight
        return g, None, None


class SparseMask(nn.Module):
    """Parametrization ``weight -> weight * mask``.

    ``dynamic=False``: the stored mask is fixed; gradients reach kept weights only.
    ``dynamic=True``: the mask is recomputed from ``|weight|`` at ``sparsity`` on every training forward
    (pruned weights can come back) and stored; gradients are straight-through with ``decay``.
    """

    def __init__(self, mask: torch.Tensor, sparsity: float, *, dynamic: bool = False, decay: float = 0.0,
                 mask_fn=None):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.sparsity = float(sparsity)
        self.dynamic = dynamic
        self.decay = float(decay)
        self.mask_fn = mask_fn or magnitude_mask  # swappable for N:M patterns

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return weight * self.mask.to(weight.dtype)
        if self.training:
            with torch.no_grad():
                self.mask.copy_(self.mask_fn(weight, self.sparsity))
        return _MaskedWeight.apply(weight, self.mask.to(weight.dtype), self.decay)


def attach_masks(
    module: nn.Module,
    layers: list[PrunableLayer],
    masks: dict[str, torch.Tensor],
    sparsities: dict[str, float],
    *,
    dynamic: bool = False,
    decay: float = 0.0,
    mask_fn=None,
) -> None:
    for layer in layers:
        if layer.name not in masks:
            continue
        owner = layer.weight.owner(module)
        parametrize.register_parametrization(
            owner,
            layer.weight.attr,
            SparseMask(masks[layer.name], sparsities[layer.name], dynamic=dynamic, decay=decay, mask_fn=mask_fn),
            unsafe=True,
        )


def _attached(module: nn.Module, layers: list[PrunableLayer]) -> list[tuple[PrunableLayer, nn.Module, torch.Tensor]]:
    """(layer, module owning its weight, mask) of every layer with a :class:`SparseMask` attached."""
    found = []
    for layer in layers:
        owner = layer.weight.owner(module)
        if parametrize.is_parametrized(owner, layer.weight.attr):
            found.append((layer, owner, owner.parametrizations[layer.weight.attr][0].mask))
    return found


def current_masks(module: nn.Module, layers: list[PrunableLayer]) -> dict[str, torch.Tensor]:
    return {layer.name: mask.clone() for layer, _, mask in _attached(module, layers)}


@torch.no_grad()
def bake_masks(module: nn.Module, layers: list[PrunableLayer]) -> None:
    """Remove the parametrizations, leaving ``weight * mask`` in the plain parameter for good."""
    for layer, owner, mask in _attached(module, layers):
        parametrize.remove_parametrizations(owner, layer.weight.attr, leave_parametrized=False)
        getattr(owner, layer.weight.attr).mul_(mask.to(getattr(owner, layer.weight.attr).dtype))


@torch.no_grad()
def apply_masks_inplace(module: nn.Module, layers: list[PrunableLayer], masks: dict[str, torch.Tensor]) -> None:
    for layer in layers:
        if layer.name in masks:
            w = layer.weight.get(module)
            mask = masks[layer.name].to(w.device)
            if not w.is_contiguous():
                w.mul_(mask.to(w.dtype))
                continue
            # in chunks: the mask's float copy stays small for a weight of several GB
            flat_w, flat_m = w.view(-1), mask.reshape(-1)
            for start in range(0, flat_w.numel(), _CHUNK):
                flat_w[start:start + _CHUNK].mul_(flat_m[start:start + _CHUNK].to(w.dtype))
