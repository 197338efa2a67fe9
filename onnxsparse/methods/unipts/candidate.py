"""UniPTS candidates: versions of the student held as values.

The search, the start choice, training (its rollback point) and the keep rule each produce candidates and
compare them; the student module is only ever set to one by :func:`materialise`, the one place its whole state
is loaded, and a candidate is only made by :meth:`Candidate.capture`, the one place that state is copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import PrunableLayer
from onnxsparse.metrics import Agreement
from onnxsparse.state import copy_state, load_state


@dataclass(frozen=True)
class Candidate:
    """One version of the student: its tensors by state-dict key, and what is known about it.

    ``zeros``: the allotted zeros per prunable layer; ``masks``: True where a weight is kept, per layer name;
    ``score``: its agreement with the dense model on the selection; ``correction``: the statistics correction
    it carries (the chooser's report)."""

    name: str
    state: Mapping[str, torch.Tensor]
    zeros: np.ndarray | None = None
    masks: Mapping[str, torch.Tensor] | None = None
    score: Agreement | None = None
    correction: dict | None = None

    @classmethod
    def capture(cls, student: nn.Module, name: str, **known) -> Candidate:
        """The student as it is now (its tensors copied, so later changes to the student leave it alone)."""
        return cls(name, copy_state(student), **known)

    def but(self, **changes) -> Candidate:
        """This candidate with ``changes`` (a new value; this one is left as it is)."""
        return dataclasses.replace(self, **changes)


def materialise(candidate: Candidate, student: nn.Module) -> None:
    """Set ``student`` to ``candidate``: its tensors are copied into the student's live ones, in place
    (parametrizations and optimizers keep pointing at the same tensors)."""
    load_state(student, candidate.state)


def weight_key(layer: PrunableLayer) -> str:
    """The state-dict key of ``layer``'s weight (on a module without mask parametrizations)."""
    return f"{layer.weight.module_path}.{layer.weight.attr}" if layer.weight.module_path else layer.weight.attr


@torch.no_grad()
def regrown(candidate: Candidate, dense: Candidate, layers: Sequence[PrunableLayer]) -> Candidate:
    """``candidate`` with its pruned weights (``candidate.masks`` False) given their values in ``dense`` back, the
    kept weights, biases and statistics unchanged: where dynamic sparse training starts from a magnitude-pruned
    model, so that a pruned weight can grow back."""
    if candidate.masks is None:
        raise OnnxSparseError(f"internal error: candidate {candidate.name!r} has no masks to regrow")
    state = dict(candidate.state)
    for layer in layers:
        key = weight_key(layer)
        state[key] = torch.where(candidate.masks[layer.name], state[key], dense.state[key])
    return candidate.but(state=state)
