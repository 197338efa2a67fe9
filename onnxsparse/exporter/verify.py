"""Checks before anything is written: ONNX checker, onnxruntime load, and output comparisons.

Two comparisons on the selection feeds:
* export fidelity: the sparse model in onnxruntime against the torch student it was written from
  (a mismatch means a write-back bug: the file is refused);
* dense vs sparse in onnxruntime, per output: the agreement of :mod:`onnxsparse.metrics` by the output's kind
  (:func:`onnxsparse.signals.onnx_output_kinds`), cosine similarity and absolute differences. ``agreement`` is
  the lowest of them: the figure the quality gate (``--min-agreement``) reads, as ``compare`` does.
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

from onnxsparse import metrics
from onnxsparse.errors import OnnxSparseError
from onnxsparse.signals import onnx_output_kinds
from onnxsparse.exporter.writeback import densify

logger = logging.getLogger(__name__)


@dataclass
class OutputComparison:
    name: str
    cosine: float
    max_abs_diff: float
    mean_abs_diff: float
    kind: str = "dense"
    agreement: float | None = None
    measure: str = ""


@dataclass
class Verification:
    samples: int = 0
    top1_agreement: float | None = None
    agreement: float | None = None  # the lowest per-output agreement
    measure: str = ""  # what ``agreement`` is, for the output that set it
    outputs: list[OutputComparison] = field(default_factory=list)
    export_max_rel_error: float | None = None
    checker: str = "not run"

    def as_dict(self) -> dict:
        return asdict(self)


def ort_providers(device: torch.device | str | None = None, available: list[str] | None = None) -> list:
    """onnxruntime providers for a run on ``device``: CUDA (device id, no TF32) then CPU when the run is on
    CUDA and the installed onnxruntime has the CUDA provider (``onnxsparse[gpu]``), else the CPU alone."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers() if available is None else available
    if "CUDAExecutionProvider" not in available:
        logger.warning("the run is on CUDA but onnxruntime has no CUDAExecutionProvider (install onnxsparse[gpu], "
                       "see README): onnxruntime runs on the CPU")
        return ["CPUExecutionProvider"]
    # TF32 off: verification compares against float32 results with a tolerance of 1e-3
    cuda = {"device_id": device.index or 0, "use_tf32": 0}
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def ort_device(spec: str | None) -> str:
    """``--device`` of the onnxruntime-only commands: "auto" is CUDA when onnxruntime has the CUDA provider."""
    if spec is None or spec == "cpu":
        return "cpu"
    if spec == "auto":
        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        return spec
    raise OnnxSparseError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def ort_session(model: onnx.ModelProto | str | os.PathLike, device: torch.device | str | None = None, *,
                prepack: bool = True, exact: bool = False) -> ort.InferenceSession:
    """An onnxruntime session for ``model``; on the CUDA provider when ``device`` is CUDA (see ort_providers).

    ``prepack=False``: weights are used as loaded (external data stays memory-mapped) instead of copied into
    packed buffers; slower per run, and one copy of the weights less. ``exact=True``: basic graph optimisations
    only, so onnxruntime computes the graph as written (the extended ones fuse DequantizeLinear into MatMul
    and quantise activations in QDQ models: 0.2% off the float graph the torch copy computes)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    providers = ort_providers(device)
    if providers != ["CPUExecutionProvider"]:
        try:
            session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception hierarchy
            logger.warning("onnxruntime's CUDA provider failed (%s): onnxruntime runs on the CPU", exc)
        else:
            if "CUDAExecutionProvider" not in session.get_providers():
                logger.warning("onnxruntime could not start its CUDA provider: running on the CPU")
            return session
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


def output_agreement(a: np.ndarray, b: np.ndarray, kind: str, axis: int = -1) -> tuple[float | None, str]:
    """Agreement of ONNX output ``b`` with the dense ``a`` (full arrays, batch first) by the output's kind
    (binary outputs are probabilities here: decided at 0.5)."""
    if a.size == 0:
        return None, ""
    return metrics.agreement(a, b, kind, axis, metrics.PROBABILITY_THRESHOLD)


def compare_sessions(
    dense: ort.InferenceSession,
    sparse: ort.InferenceSession,
    feeds: Iterable[dict[str, np.ndarray]],
    student: nn.Module | None = None,
    input_names: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
    kinds: list[tuple[str, int]] | None = None,
    model: onnx.ModelProto | None = None,
) -> Verification:
    """``kinds``: (kind, class axis) per output; without them they are read from the dense ``model``'s graph
    and outputs (:func:`onnxsparse.signals.onnx_output_kinds`), as ``compare`` reads them."""
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
    if kinds is None and model is not None and all(dense_out):
        kinds = onnx_output_kinds(model, [chunks[0] for chunks in dense_out])
    for i, name in enumerate(names):
        if not dense_out[i]:
            continue
        full_a = _concat(dense_out[i])
        full_b = _concat(sparse_out[i])
        a = full_a.reshape(full_a.shape[0], -1)
        b = full_b.reshape(full_b.shape[0], -1)
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if kinds is not None and i < len(kinds):
            kind, axis = kinds[i]
        else:
            kind, axis = ("class", 1) if (i == 0 and full_a.ndim == 2 and full_a.shape[1] > 1
                                          and np.issubdtype(full_a.dtype, np.floating)) else ("dense", -1)
        agreement, measure = output_agreement(full_a, full_b, kind, axis)
        result.outputs.append(OutputComparison(name, _cosine(a, b), float(diff.max()), float(diff.mean()),
                                               kind, agreement, measure))
        if kind == "class" and result.top1_agreement is None and measure == metrics.MEASURES["class"]:
            result.top1_agreement = agreement
        if agreement is not None and (result.agreement is None or agreement < result.agreement):
            result.agreement, result.measure = agreement, f"{measure} of output {name!r}"
    return result


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    """Batches of one output joined on the batch axis (a scalar output counts as one sample)."""
    return np.concatenate([x.reshape(1, 1) if x.ndim == 0 else x for x in chunks])


def verify_file(
    path: Path,
    dense: onnx.ModelProto | str | os.PathLike,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    student: nn.Module | None,
    input_names: tuple[str, ...],
    device: torch.device | str,
    tolerance: float,
    kinds: list[tuple[str, int]] | None = None,
    ort_device: torch.device | str | None = None,
    exact: bool = True,
) -> Verification:
    """``ort_device``: where onnxruntime runs (CUDA when the run was on CUDA and the provider is there);
    ``kinds`` as in :func:`compare_sessions` (default: read from the dense model's graph).
    ``exact=False``: the file runs with every onnxruntime optimisation (an int8 model as it is deployed)."""
    checker = check_model_file(path)
    result = file_agreement(path, dense, feeds, student=student, input_names=input_names, device=device,
                            kinds=kinds, ort_device=ort_device, exact=exact)
    result.checker = checker
    if result.export_max_rel_error is not None and result.export_max_rel_error > tolerance:
        raise OnnxSparseError(
            f"onnxruntime disagrees with the pruned torch model (max relative error "
            f"{result.export_max_rel_error:.3g} > tolerance {tolerance:g}); nothing was written"
        )
    return result


def file_agreement(path: Path, dense: onnx.ModelProto | str | os.PathLike, feeds: Iterable[dict[str, np.ndarray]],
                   *, student: nn.Module | None = None, input_names: tuple[str, ...] = (),
                   device: torch.device | str = "cpu", kinds: list[tuple[str, int]] | None = None,
                   ort_device: torch.device | str | None = None, exact: bool = True) -> Verification:
    """The model file at ``path`` against ``dense`` in onnxruntime on ``feeds`` (:func:`compare_sessions`),
    without the checker: :func:`verify_file` is this after the checker, with the export-error bound."""
    graph = dense if isinstance(dense, onnx.ModelProto) else onnx.load(str(dense), load_external_data=False)
    feeds = list(feeds)
    # The dense session runs now and is gone before the sparse one loads; a few samples need no prepacking.
    dense_sess = _Replay(ort_session(dense, ort_device, prepack=False, exact=True), feeds)
    sparse_sess = ort_session(path, ort_device, prepack=False, exact=exact)
    return compare_sessions(dense_sess, sparse_sess, feeds, student, input_names, device, kinds, graph)


def export_fidelity(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], student: nn.Module,
                    input_names: tuple[str, ...], tolerance: float) -> float:
    """Largest relative error between ``model`` in onnxruntime (CPU, as written) and the torch ``student`` it
    was written from; raises OnnxSparseError above ``tolerance``. For a model that is transformed further
    (int8) before it is saved: the saved file can then no longer be compared with the student."""
    feeds = list(feeds)
    session = ort_session(model, "cpu", prepack=False, exact=True)
    result = compare_sessions(_Replay(session, feeds), session, feeds, student, input_names, "cpu")
    error = result.export_max_rel_error or 0.0
    if error > tolerance:
        raise OnnxSparseError(
            f"onnxruntime disagrees with the pruned torch model (max relative error {error:.3g} > tolerance "
            f"{tolerance:g}); nothing was written"
        )
    return error
