"""Checks before anything is written: ONNX checker, onnxruntime load, and output comparisons.

Two comparisons on the holdout feeds:
* export fidelity: the sparse model in onnxruntime against the torch student it was written from
  (a mismatch means a write-back bug: the file is refused);
* dense vs sparse in onnxruntime: top-1 agreement (class-logit outputs), cosine similarity and
  absolute differences per output (reported; quality, not correctness).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from onnxsparse.errors import OnnxSparseError

logger = logging.getLogger(__name__)


@dataclass
class OutputComparison:
    name: str
    cosine: float
    max_abs_diff: float
    mean_abs_diff: float


@dataclass
class Verification:
    samples: int = 0
    top1_agreement: float | None = None
    outputs: list[OutputComparison] = field(default_factory=list)
    export_max_rel_error: float | None = None
    checker: str = "not run"

    def as_dict(self) -> dict:
        return asdict(self)


def ort_session(model: onnx.ModelProto | str | os.PathLike, *, prepack: bool = True) -> ort.InferenceSession:
    """``prepack=False``: weights are used as loaded (external data stays memory-mapped) instead of copied
    into packed buffers; slower per run, and one copy of the weights less."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception hierarchy
        raise OnnxSparseError(f"onnxruntime cannot load the model: {exc}") from None


class _Replay:
    """The outputs of ``session`` on ``feeds``, computed at once; ``run`` hands them back in order.

    One onnxruntime session at a time holds the model's weights: a model over 2 GB would otherwise have
    the dense and the sparse copy in memory together.
    """

    def __init__(self, session: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> None:
        names = [o.name for o in session.get_outputs()]
        self._outputs = [dict(zip(names, session.run(names, feed))) for feed in feeds]
        self._next = 0

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self._outputs[self._next]
        self._next += 1
        return [outputs[name] for name in names]


def check_model_file(path: str | os.PathLike) -> str:
    """ONNX checker with full shape inference; returns what was checked.

    ONNX shape inference types a sparse initializer as a sparse tensor, which no Conv/Gemm/MatMul accepts:
    a model with sparse initializers gets the structural check as saved and the full check densified.
    """
    try:
        head = onnx.load(str(path), load_external_data=False)
        if not len(head.graph.sparse_initializer):
            del head
            onnx.checker.check_model(str(path), full_check=True)
            return "passed (full_check)"
        from onnxsparse.exporter.writeback import densify

        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=False)
        n_sparse = len(model.graph.sparse_initializer)
        onnx.checker.check_model(densify(model), full_check=True)
        return f"passed (structural check as saved with {n_sparse} sparse initializer(s); full_check densified)"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxSparseError(f"the pruned model fails the ONNX checker: {exc}") from None


@contextlib.contextmanager
def _exact_float32():
    """Disable TF32 so the torch reference is comparable with onnxruntime's float32."""
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(-1).astype(np.float64)
    b = b.reshape(-1).astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def compare_sessions(
    dense: ort.InferenceSession,
    sparse: ort.InferenceSession,
    feeds: Iterable[dict[str, np.ndarray]],
    student: nn.Module | None = None,
    input_names: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
) -> Verification:
    names = [o.name for o in sparse.get_outputs()]
    dense_out: list[list[np.ndarray]] = [[] for _ in names]
    sparse_out: list[list[np.ndarray]] = [[] for _ in names]
    fidelity = 0.0
    samples = 0
    for feed in feeds:
        d = dense.run(names, feed)
        s = sparse.run(names, feed)
        samples += next(iter(feed.values())).shape[0]
        for i in range(len(names)):
            dense_out[i].append(np.asarray(d[i]))
            sparse_out[i].append(np.asarray(s[i]))
        if student is not None:
            with torch.no_grad(), _exact_float32():
                out = student(*[torch.from_numpy(feed[n]).to(device) for n in input_names])
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for t, ref in zip(outs, s):
                t = t.detach().float().cpu().numpy()
                scale = max(1.0, float(np.abs(t).max()) if t.size else 1.0)
                fidelity = max(fidelity, float(np.abs(t - ref).max()) / scale if t.size else 0.0)
    result = Verification(samples=samples, export_max_rel_error=fidelity if student is not None else None)
    for i, name in enumerate(names):
        if not dense_out[i]:
            continue
        a = np.concatenate([x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1) for x in dense_out[i]])
        b = np.concatenate([x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1) for x in sparse_out[i]])
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        result.outputs.append(OutputComparison(name, _cosine(a, b), float(diff.max()), float(diff.mean())))
        if i == 0 and a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating):
            result.top1_agreement = float((a.argmax(1) == b.argmax(1)).mean())
    return result


def verify_file(
    path: Path,
    dense: onnx.ModelProto | str | os.PathLike,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    student: nn.Module | None,
    input_names: tuple[str, ...],
    device: torch.device | str,
    tolerance: float,
) -> Verification:
    checker = check_model_file(path)
    feeds = list(feeds)
    # The dense session runs now and is gone before the sparse one loads; a few samples need no prepacking.
    dense_sess = _Replay(ort_session(dense, prepack=False), feeds)
    sparse_sess = ort_session(path, prepack=False)
    result = compare_sessions(dense_sess, sparse_sess, feeds, student, input_names, device)
    result.checker = checker
    if result.export_max_rel_error is not None and result.export_max_rel_error > tolerance:
        raise OnnxSparseError(
            f"onnxruntime disagrees with the pruned torch model (max relative error "
            f"{result.export_max_rel_error:.3g} > tolerance {tolerance:g}); nothing was written"
        )
    return result
