"""Baselines: magnitude pruning with a uniform or a global allocation, then statistics correction.

With an N:M ``--pattern`` there is no allocation: every layer keeps the N largest of each M input
channels (sparsity ``1 - N/M``), layers whose input-channel dimension is not a multiple of M stay dense.
"""

from __future__ import annotations

import logging

import torch

from onnxsparse.methods.base import MethodResult, PruneContext, register_method
from onnxsparse.sparsity import allocation
from onnxsparse.sparsity import patterns
from onnxsparse.sparsity.masks import apply_masks_inplace

logger = logging.getLogger(__name__)


class _Magnitude:
    name = "magnitude"

    def allocate(self, ctx: PruneContext) -> dict[str, float]:
        return allocation.uniform(ctx.layers, ctx.config.sparsity)

    @torch.no_grad()
    def run(self, ctx: PruneContext) -> MethodResult:
        pattern = ctx.config.pattern
        info: dict = {"pattern": pattern}
        if ctx.config.nm is None:
            sparsities = self.allocate(ctx)
        else:
            sparsities = patterns.nm_sparsities(ctx.layers, pattern)
            info["dense_layers"] = patterns.dense_layers(ctx.layers, pattern)
            logger.info("pattern %s: no allocation, %d layer(s) left dense", pattern, len(info["dense_layers"]))
        masks = patterns.pattern_masks(ctx.student, ctx.layers, pattern, sparsities)
        apply_masks_inplace(ctx.student, ctx.layers, masks)
        report = ctx.correct()
        info["correction"] = report.as_dict()
        return MethodResult(sparsities, masks, info)


@register_method("magnitude")
class UniformMagnitude(_Magnitude):
    """Every layer pruned to the target sparsity by weight magnitude."""


@register_method("global-magnitude")
class GlobalMagnitude(_Magnitude):
    """One magnitude threshold across all layers."""

    name = "global-magnitude"

    def allocate(self, ctx: PruneContext) -> dict[str, float]:
        return allocation.global_magnitude(ctx.student, ctx.layers, ctx.config.sparsity)
