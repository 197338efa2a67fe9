"""onnxsim 0.8's ONNX-to-ONNX pruning functions as benchmark methods beside ours.

A peer gets the same model file and the same calibration samples as our methods of the same cell (the training
split of the calibration set ``prune`` loads with the cell's configuration: the samples our methods fit weights
on), prunes the ONNX graph directly, and its output is checked and scored like ours. Whatever goes wrong (the
peer raises, or onnxruntime cannot load or run its output) is a result, not a crash. Its achieved sparsity is
counted over the prunable weights our importer finds (the report's ``layers``), so both columns are measured on
the same weights.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxsparse.errors import OnnxSparseError

logger = logging.getLogger(__name__)

Feeds = Sequence[dict[str, np.ndarray]]

# method name in the tables -> (onnxsim function, whether it reads calibration data)
PEERS: dict[str, tuple[str, bool]] = {
    "onnxsim-magnitude": ("apply_magnitude_pruning", False),
    "onnxsim-wanda": ("apply_wanda_pruning", True),
    "onnxsim-sparsegpt": ("apply_sparsegpt_pruning", True),
}
# A peer below the target by more than this (absolute) is flagged: per-row rounding of a few small layers moves
# the whole model's fraction by far less.
SPARSITY_TOLERANCE = 1e-3


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxsim") is not None


def peer_function(method: str) -> Callable[..., onnx.ModelProto]:
    if method not in PEERS:
        raise OnnxSparseError(f"unknown peer {method!r}; known: {', '.join(PEERS)}")
    import onnxsim

    return getattr(onnxsim, PEERS[method][0])


def peer_config(method: str, sparsity: float, n_samples: int | None, batch_size: int) -> dict:
    """The peer's full call: the function, every keyword argument it runs with (defaults included), and the
    calibration it gets."""
    function = peer_function(method)
    bound = inspect.signature(function).bind_partial(sparsity=sparsity)
    bound.apply_defaults()
    kwargs = {k: v for k, v in bound.arguments.items() if k not in ("model", "calibration_data")}
    config = {"method": method, "function": f"onnxsim.{PEERS[method][0]}", "sparsity": sparsity,
              "pattern": "unstructured", "kwargs": kwargs}
    if PEERS[method][1]:
        # num_samples and seed only shape the random data a peer draws when it gets none: it gets ours
        config["calibration"] = {"split": "train", "samples": n_samples, "batch_size": batch_size}
    return config


def run_peer(method: str, model: onnx.ModelProto, sparsity: float, feeds: Feeds) -> onnx.ModelProto:
    """The peer's pruned copy of ``model`` (``model`` itself is not modified)."""
    function = peer_function(method)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if PEERS[method][1]:
        if not feeds:
            raise OnnxSparseError(f"{method} needs calibration samples, got none")
        return function(copy, calibration_data=list(feeds), sparsity=sparsity)
    return function(copy, sparsity=sparsity)


def check_runs(path: Path, feeds: Feeds, threads: int) -> None:
    """Raise unless onnxruntime loads ``path`` and runs it on the first calibration batch to finite outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if feeds:
        for value in session.run(None, dict(feeds[0])):
            array = np.asarray(value)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise OnnxSparseError(f"{path.name}: onnxruntime output has non-finite values")


@dataclass(frozen=True)
class Sparsity:
    """Zeros of a model's prunable weights, as our importer finds them."""

    zeros: int
    params: int
    layers: int
    below_target: int  # layers whose own zero fraction is under the target

    @property
    def achieved(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def reaches(self, target: float) -> bool:
        return self.achieved >= target - SPARSITY_TOLERANCE

    def as_dict(self, target: float) -> dict:
        return {"achieved_sparsity": self.achieved, "prunable_params": self.params, "zeros": self.zeros,
                "layers": self.layers, "layers_below_target": self.below_target,
                "reaches_target": self.reaches(target)}


def prunable_sparsity(dense: onnx.ModelProto, pruned: onnx.ModelProto, target: float,
                      exclude: Sequence[str] = ()) -> Sparsity:
    """Zeros of ``pruned``'s weights over the layers our importer finds prunable in ``dense``.

    A peer may write a pruned weight to a new initializer and rewire its node (onnxsim's magnitude pruning
    does): layers are paired by position, node and shape, not by tensor name.
    """
    from onnxsparse.exporter import tensor_arrays
    from onnxsparse.importer import import_model

    ours = import_model(dense, exclude=exclude).layers
    theirs = import_model(pruned, exclude=exclude).layers
    if len(ours) != len(theirs):
        raise OnnxSparseError(f"the pruned model has {len(theirs)} prunable layers, the dense one {len(ours)}")
    for a, b in zip(ours, theirs):
        if (a.op_type, a.node_name, a.numel) != (b.op_type, b.node_name, b.numel):
            raise OnnxSparseError(f"prunable layer {a.name!r} ({a.op_type} {a.node_name!r}, {a.numel} weights) "
                                  f"became {b.name!r} ({b.op_type} {b.node_name!r}, {b.numel} weights)")
    arrays = tensor_arrays(pruned, [layer.weight.source for layer in theirs])
    zeros = params = below = 0
    for layer in theirs:
        array = arrays.get(layer.name)
        if array is None:
            raise OnnxSparseError(f"weight {layer.name!r} of the pruned model could not be read")
        count = int((np.asarray(array) == 0).sum())
        zeros += count
        params += layer.numel
        below += count < np.floor(target * layer.numel)
    return Sparsity(zeros, params, len(theirs), int(below))
