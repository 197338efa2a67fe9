"""What each model output is, computed once per run: the loss, the fitness, the correction chooser and the
quality gate all read the same description.

For every graph output the importer's ONNX graph is walked back through shape-only ops (``Identity``,
``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``, ``Transpose``) to a trailing ``Softmax``, ``LogSoftmax``
or ``Sigmoid``; where one is found, the tensor that feeds it (the logits) is what distillation compares, read
with a forward pre-hook on the converted module. Kinds:

* ``class``: ``(N, C > 1)`` logits (raw outputs of that shape count too): KL over C, top-1 agreement;
* ``sequence``: logits of any other rank with a class axis (CTC text recognition ``(N, T, C)``, token
  classification, per-pixel softmax): KL over the class axis averaged over every other position, per-position
  top-1 agreement;
* ``binary``: logits behind a ``Sigmoid`` (multi-label heads, probability maps): Bernoulli KL per element;
* ``dense``: anything else (embeddings, regression, feature maps): normalised MSE (1 - R^2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from torch import nn

from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import ImportedModel

logger = logging.getLogger(__name__)

_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
_ACTIVATIONS = {"Softmax": "softmax", "LogSoftmax": "log_softmax", "Sigmoid": "sigmoid"}
KINDS = ("class", "sequence", "binary", "dense")


@dataclass(frozen=True)
class OutputSignal:
    """How one graph output is distilled and measured."""

    output: str  # ONNX graph output name
    index: int  # position among the module's outputs
    kind: str  # one of KINDS
    source: str  # human-readable: where the compared tensor comes from
    module_path: str | None = None  # converted module whose first input is the compared tensor (None: the output)
    axis: int = -1  # class axis of the compared tensor (class / sequence)

    def as_dict(self) -> dict:
        return asdict(self)


def _activation_behind(model: onnx.ModelProto, output: str) -> tuple[int, onnx.NodeProto] | None:
    """(node index, node) of the Softmax/LogSoftmax/Sigmoid that ``output`` is reached from through shape-only ops."""
    producer = {out: (i, node) for i, node in enumerate(model.graph.node) for out in node.output}
    value = output
    for _ in range(16):
        found = producer.get(value)
        if found is None:
            return None
        i, node = found
        if node.op_type in _ACTIVATIONS and node.domain in ("", "ai.onnx"):
            return i, node
        if node.op_type not in _PASS_THROUGH or not node.input:
            return None
        value = node.input[0]
    return None


def _softmax_axis(node: onnx.NodeProto, opset: int, rank: int) -> int:
    axis = None
    for attr in node.attribute:
        if attr.name == "axis":
            axis = int(onnx.helper.get_attribute_value(attr))
    if axis is None:
        axis = 1 if opset < 13 else -1
    axis = axis % rank
    if opset < 13 and axis != rank - 1:
        # opset < 13 flattens the input to 2-D at ``axis``: a distribution over the trailing axes; only the
        # common case (one trailing axis) keeps a class axis we can name
        return -1
    return axis


def as_outputs(out) -> list[torch.Tensor]:
    """A module's output as a flat list of tensors (a GraphModule returns a tensor, tuple or list)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    flat: list[torch.Tensor] = []
    for item in out:
        flat.extend(as_outputs(item))
    return flat


class Signals:
    """The per-output description of one model, and the forward that returns the compared tensors."""

    def __init__(self, signals: Sequence[OutputSignal]):
        self.signals = tuple(signals)

    @staticmethod
    def of(value: Signals) -> Signals:
        """``value``, when it is a :class:`Signals`; anything else is refused."""
        if not isinstance(value, Signals):
            raise OnnxSparseError(
                f"signals must be a Signals (the per-output description from describe_outputs, or Signals([]) for "
                f"every output dense), got {value!r}"
            )
        return value

    def kind(self, index: int) -> str:
        """Kind of the ``index``-th compared tensor; outputs beyond the description are dense."""
        return self.signals[index].kind if index < len(self.signals) else "dense"

    def axis(self, index: int) -> int:
        return self.signals[index].axis if index < len(self.signals) else -1

    def __len__(self) -> int:
        return len(self.signals)

    def __iter__(self):
        return iter(self.signals)

    @property
    def logits(self) -> bool:
        """True when every compared tensor is a class or sequence distribution."""
        return bool(self.signals) and all(s.kind in ("class", "sequence") for s in self.signals)

    def as_list(self) -> list[dict]:
        return [s.as_dict() for s in self.signals]

    def forward(self, module: nn.Module, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run ``module`` on ``batch``; one compared tensor per output (captured logits where described)."""
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for i, signal in enumerate(self.signals):
            if signal.module_path is None:
                continue

            def hook(_module, args, i=i):
                captured[i] = args[0]

            handles.append(module.get_submodule(signal.module_path).register_forward_pre_hook(hook))
        try:
            outputs = as_outputs(module(*batch))
        finally:
            for h in handles:
                h.remove()
        if not self.signals:
            return outputs
        return [captured.get(i, outputs[s.index]) if s.module_path is not None else outputs[s.index]
                for i, s in enumerate(self.signals)]


def onnx_output_kinds(model: onnx.ModelProto, outputs: Sequence) -> list[tuple[str, int]]:
    """(kind, class axis) of every graph output of ``model`` from the graph and the dense model's ``outputs``
    (arrays, batch first), as the quality gate and ``compare`` measure them: behind a Sigmoid ``binary``; behind
    a Softmax/LogSoftmax ``class`` for ``(N, C > 1)`` outputs, else ``sequence`` over the softmax's axis when
    the softmax is the output's producer (its last axis otherwise); raw ``(N, C > 1)`` float outputs ``class``;
    everything else ``dense``."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    kinds = []
    for value, out in zip(model.graph.output, outputs):
        shape = tuple(getattr(out, "shape", ()))
        floating = np.issubdtype(np.asarray(out).dtype, np.floating) if shape else False
        behind = _activation_behind(model, value.name)
        two_d = floating and len(shape) == 2 and shape[1] > 1
        if behind is not None and floating and behind[1].op_type == "Sigmoid":
            kinds.append(("binary", -1))
        elif behind is not None and floating and len(shape) > 2:
            node = behind[1]
            axis = _softmax_axis(node, opset, len(shape)) if node.output[0] == value.name else len(shape) - 1
            kinds.append(("sequence", axis) if axis > 0 and shape[axis] > 1 else ("dense", -1))
        else:
            kinds.append(("class", 1) if two_d else ("dense", -1))
    return kinds


def raw_output_kind(t: torch.Tensor) -> str:
    """``class`` for a 2-D ``(N, C > 1)`` float output (taken as logits), ``dense`` for anything else."""
    return "class" if t.is_floating_point() and t.dim() == 2 and t.shape[1] > 1 else "dense"


@torch.no_grad()
def describe_outputs(imported: ImportedModel, teacher: nn.Module, batch: Sequence[torch.Tensor]) -> Signals:
    """Describe every output of ``imported`` using one teacher forward on ``batch``."""
    modules = dict(teacher.named_modules())
    model = imported.proto
    candidates: list[OutputSignal] = []
    for index, name in enumerate(imported.output_names):
        found = _activation_behind(model, name)
        if found is None:
            candidates.append(OutputSignal(name, index, "?", "the output itself"))
            continue
        i, node = found
        path = f"n{i}"  # the importer names the converted copy's nodes n0, n1, ... in the original order
        if path not in modules:
            candidates.append(OutputSignal(name, index, "?", "the output itself"))
            logger.debug("output %s: %s node %r has no converted module; distilling the output", name,
                         node.op_type, node.name)
            continue
        label = f"input of {node.op_type} node {node.name!r}"
        candidates.append(OutputSignal(name, index, _ACTIVATIONS[node.op_type], label, path))
    draft = Signals([OutputSignal(c.output, c.index, c.kind, c.source, c.module_path) for c in candidates])
    compared = draft.forward(teacher, batch)
    outputs = as_outputs(teacher(*batch))
    final = []
    for c, t, out in zip(candidates, compared, outputs):
        if c.module_path is None:
            kind = raw_output_kind(out)
            final.append(OutputSignal(c.output, c.index, kind, "class logits (the output itself)"
                                      if kind == "class" else c.source, None, 1 if kind == "class" else -1))
            continue
        if not t.is_floating_point() or t.dim() < 1:
            final.append(OutputSignal(c.output, c.index, raw_output_kind(out), "the output itself"))
            continue
        if c.kind == "sigmoid":
            final.append(OutputSignal(c.output, c.index, "binary", f"logits: {c.source}", c.module_path))
            continue
        node = model.graph.node[int(c.module_path[1:])]
        axis = _softmax_axis(node, imported.opset, t.dim())
        if axis < 0 or t.shape[axis] < 2:
            final.append(OutputSignal(c.output, c.index, raw_output_kind(out), "the output itself"))
            continue
        kind = "class" if t.dim() == 2 and axis == 1 else "sequence"
        final.append(OutputSignal(c.output, c.index, kind, f"logits: {c.source}", c.module_path, axis))
    signals = Signals(final)
    for s in signals:
        logger.info("output %s: %s (%s)", s.output, s.kind, s.source)
    return signals

