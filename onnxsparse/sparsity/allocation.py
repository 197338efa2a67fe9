"""Per-layer sparsity as plain data: ``{tensor_name: sparsity}``."""

from __future__ import annotations

import onnx
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


# Layers under this many weights are cheap to keep and often a bottleneck (stems, small heads).
SMALL_LAYER = 2048


def _node_index(layer: PrunableLayer) -> int | None:
    head = layer.module_path.split(".")[0]
    return int(head[1:]) if head[:1] == "n" and head[1:].isdigit() else None


def protected_layers(model: onnx.ModelProto, layers: list[PrunableLayer]) -> dict[str, str]:
    """Layers no allocation may prune harder than the global target, with the reason: the first layers (they
    read a graph input), the last ones (no prunable layer after them: classifiers, heads) and small layers.

    Node positions come from the importer's naming of the converted copy (node ``n<i>`` is the i-th node of
    the original graph).
    """
    nodes = model.graph.node
    graph_inputs = {i.name for i in model.graph.input}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    index_of = {layer.name: _node_index(layer) for layer in layers}
    prunable_nodes = {i for i in index_of.values() if i is not None}
    out: dict[str, str] = {}
    for layer in layers:
        i = index_of[layer.name]
        if layer.numel < SMALL_LAYER:
            out[layer.name] = f"small layer ({layer.numel} weights < {SMALL_LAYER})"
            continue
        if i is None or i >= len(nodes):
            continue
        if any(name in graph_inputs for name in nodes[i].input[:1]):
            out[layer.name] = "first layer (reads a graph input)"
            continue
        seen, frontier, downstream = {i}, [i], False
        while frontier and not downstream:
            j = frontier.pop()
            for name in nodes[j].output:
                for k in consumers.get(name, ()):
                    if k in prunable_nodes:
                        downstream = True
                        break
                    if k not in seen:
                        seen.add(k)
                        frontier.append(k)
        if not downstream:
            out[layer.name] = "last layer (no prunable layer after it)"
    return out


def layer_caps(model: onnx.ModelProto, layers: list[PrunableLayer], target: float, s_max: float) -> tuple[
        list[float], dict[str, str]]:
    """Per-layer sparsity caps for every candidate allocation: ``s_max``, and at most ``target`` for the
    protected layers (see :func:`protected_layers`)."""
    protected = protected_layers(model, layers)
    caps = [min(s_max, target) if layer.name in protected else s_max for layer in layers]
    return caps, protected
