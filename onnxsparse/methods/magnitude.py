"""Baselines: magnitude pruning with a uniform or a global allocation, then statistics correction."""

from __future__ import annotations

import logging

import torch

from onnxsparse.methods.base import MethodResult, PruneContext, register_method
from onnxsparse.sparsity import allocation
from onnxsparse.sparsity.masks import apply_masks_inplace, magnitude_mask

logger = logging.getLogger(__name__)


class _Magnitude:
    name = "magnitude"

    def allocate(self, ctx: PruneContext) -> dict[str, float]:
        return allocation.uniform(ctx.layers, ctx.config.sparsity)

    @torch.no_grad()
    def run(self, ctx: PruneContext) -> MethodResult:
        sparsities = self.allocate(ctx)
        masks = {
            layer.name: magnitude_mask(layer.weight.get(ctx.student), sparsities[layer.name]) for layer in ctx.layers
        }
        apply_masks_inplace(ctx.student, ctx.layers, masks)
        report = ctx.correct()
        return MethodResult(sparsities, masks, {"correction": report.as_dict()})


@register_method("magnitude")
class UniformMagnitude(_Magnitude):
    """Every layer pruned to the target sparsity by weight magnitude."""


@register_method("global-magnitude")
class GlobalMagnitude(_Magnitude):
    """One magnitude threshold across all layers."""

    name = "global-magnitude"

    def allocate(self, ctx: PruneContext) -> dict[str, float]:
        return allocation.global_magnitude(ctx.student, ctx.layers, ctx.config.sparsity)
