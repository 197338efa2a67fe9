"""Copies of a module's parameters and buffers, and putting them back: the one mechanism under everything that
tries something and may undo it. UniPTS reaches it only through its candidates
(:mod:`onnxsparse.methods.unipts.candidate`: captured once, materialised once); the statistics-correction
chooser and structured distillation use it directly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def copy_state(module: nn.Module, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s state-dict entries (those whose key ``keep`` accepts)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if keep is None or keep(k)}


@torch.no_grad()
def load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` back into ``module``'s live tensors, in place (parametrizations and optimizers keep
    pointing at the same tensors)."""
    live = module.state_dict()
    for key, value in state.items():
        live[key].copy_(value)
