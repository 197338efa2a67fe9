"""Per-layer sparsity as plain data: ``{tensor_name: sparsity}``."""

from __future__ import annotations

import torch
from torch import nn

from onnxsparse.graph import PrunableLayer
from onnxsparse.sparsity.masks import zeros_for


def uniform(layers: list[PrunableLayer], sparsity: float) -> dict[str, float]:
    return {layer.name: float(sparsity) for layer in layers}


@torch.no_grad()
def global_magnitude(module: nn.Module, layers: list[PrunableLayer], sparsity: float) -> dict[str, float]:
    """One magnitude threshold across all layers; exactly ``round(sparsity * N)`` zeros in total."""
    if not layers:
        return {}
    mags = [layer.weight.get(module).detach().abs().flatten().float().cpu() for layer in layers]
    owner = torch.cat([torch.full((m.numel(),), i, dtype=torch.int32) for i, m in enumerate(mags)])
    values = torch.cat(mags)
    k = zeros_for(sparsity, values.numel())
    order = torch.argsort(values, stable=True)[:k]
    counts = torch.bincount(owner[order].long(), minlength=len(layers))
    return {layer.name: counts[i].item() / mags[i].numel() for i, layer in enumerate(layers)}
