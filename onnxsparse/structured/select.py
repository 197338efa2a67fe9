"""Which channels go: importance per channel, keep counts per group for a MACs target, least-squares refit.

Everything works on the ONNX model's own tensors (numpy, by name) and on activations read with onnxruntime at
the groups' taps (where consumers read the channels). The result of a selection is a :class:`ChannelPlan`: the
removed channels per group and the new values of the consumer weights (zeros in the removed columns, the kept
columns refitted); applied to the dense-shaped model it is the masked model that :func:`exporter.shrink.shrink`
must reproduce.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.structured.groups import ChannelAnalysis, ChannelGroup, tensors_of
from onnxsparse.validate import one_of

logger = logging.getLogger(__name__)

IMPORTANCE = ("l1", "activation")
# positions of a Conv consumer's input used per batch for its Gram matrix (a random subset beyond this)
_POSITIONS_PER_BATCH = 8192


@dataclass
class ChannelPlan:
    removed: dict[int, list[int]]  # group index -> removed channels
    updates: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name -> new (dense-shaped) value
    info: dict = field(default_factory=dict)

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` with the updated tensors (the masked model, dense shapes)."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        tensors = tensors_of(out)
        for name, array in self.updates.items():
            dtype = helper.tensor_dtype_to_np_dtype(tensors[name].data_type)
            tensors[name].CopyFrom(numpy_helper.from_array(array.astype(dtype), tensors[name].name))
        return out


# ---------------------------------------------------------------------------------------------------------
# activations at the taps
# ---------------------------------------------------------------------------------------------------------
def _session(model: onnx.ModelProto, outputs: Iterable[str]) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in existing:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tap computed
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def observe_shapes(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of every node output in one onnxruntime run on ``feed``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for name in node.output:
            if name and name not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=name))  # onnxruntime infers the type
                have.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = sess.run(None, dict(feed))
    return {o.name: tuple(np.shape(v)) for o, v in zip(sess.get_outputs(), values)}


@dataclass
class _Consumer:
    node: onnx.NodeProto
    tensor: str
    weight: str
    bias: str | None
    kind: str  # "conv", "gemm", "gemmT" (B stored [out, in]), "matmul"
    gram: np.ndarray | None = None  # (D + bias, D + bias), float64
    rows: int = 0


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumers(model: onnx.ModelProto, groups: Iterable[ChannelGroup]) -> dict[str, _Consumer]:
    """The refittable consumers of ``groups`` (Conv without auto_pad, Gemm with alpha = beta = 1, MatMul)."""
    nodes = {n.output[0]: n for n in model.graph.node if n.output}
    out: dict[str, _Consumer] = {}
    for g in groups:
        for p in g.params:
            if p.role != "consumer" or p.node in out:
                continue
            node = nodes[p.node]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if node.op_type == "Conv":
                kind = "conv" if _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") else None
            elif node.op_type == "Gemm":
                kind = "gemmT" if int(_attr(node, "transB", 0)) else "gemm"
                if float(_attr(node, "alpha", 1.0)) != 1.0 or (bias and float(_attr(node, "beta", 1.0)) != 1.0):
                    kind = None
            else:
                kind, bias = "matmul", None
            if kind is not None:
                out[p.node] = _Consumer(node, node.input[0], node.input[1], bias, kind)
    return out


def _columns(c: _Consumer, x: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """(rows, D) inputs of consumer ``c`` in the order of its canonical weight (out, D)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64)
    if c.kind != "conv":
        return t.reshape(-1, t.shape[-1])
    kernel = tuple(_attr(c.node, "kernel_shape") or ())
    if len(kernel) != 2 or t.ndim != 4:
        raise ValueError("refit handles 2-d convolutions")
    pads = list(_attr(c.node, "pads", [0, 0, 0, 0]))
    t = torch.nn.functional.pad(t, (pads[1], pads[3], pads[0], pads[2]))
    cols = torch.nn.functional.unfold(t, kernel, dilation=tuple(_attr(c.node, "dilations", [1, 1])),
                                      stride=tuple(_attr(c.node, "strides", [1, 1])))  # (N, C*kh*kw, L)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if cols.shape[0] > _POSITIONS_PER_BATCH:
        cols = cols[torch.from_numpy(rng.choice(cols.shape[0], _POSITIONS_PER_BATCH, replace=False))]
    return cols


@dataclass
class TapStats:
    energy: dict[str, np.ndarray]  # tap tensor -> mean square per index of its channel axis
    consumers: dict[str, _Consumer]


def collect(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: Iterable[Mapping[str, np.ndarray]], *,
            gram: bool = True, seed: int = 0) -> TapStats:
    """Mean squares at every tap and (``gram``) the Gram matrix of every refittable consumer's input."""
    groups = analysis.prunable()
    axes = {t.tensor: t.axis for g in groups for t in g.taps}
    consumers = _consumers(model, groups) if gram else {}
    if not axes:
        return TapStats({}, consumers)
    names = sorted(axes)
    sess = _session(model, names)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    for feed in feeds:
        values = dict(zip(names, sess.run(names, dict(feed))))
        for name, x in values.items():
            axis = axes[name]
            sq = np.square(x.astype(np.float64)).sum(axis=tuple(i for i in range(x.ndim) if i != axis))
            sums[name] = sums.get(name, 0) + sq
            counts[name] = counts.get(name, 0) + x.size // x.shape[axis]
        for c in consumers.values():
            cols = _columns(c, values[c.tensor], rng)
            if c.bias is not None:
                cols = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype)], 1)
            g = (cols.T @ cols).numpy()
            c.gram = g if c.gram is None else c.gram + g
            c.rows += cols.shape[0]
    return TapStats({n: sums[n] / max(counts[n], 1) for n in sums}, consumers)


# ---------------------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------------------
def _per_channel(group: ChannelGroup, param, array: np.ndarray, reduce) -> np.ndarray:
    """``reduce`` of each channel's entries of ``array`` along ``param``'s axis, one value per channel."""
    moved = np.moveaxis(array, param.axis, 0)
    idx = group.indices(param, range(group.channels)).reshape(group.channels, param.repeat)
    flat = moved.reshape(moved.shape[0], -1)
    return np.array([reduce(flat[i]) for i in idx])


def importance(model: onnx.ModelProto, analysis: ChannelAnalysis, kind: str = "l1",
               stats: TapStats | None = None) -> dict[int, np.ndarray]:
    """A score per channel of every prunable group; low scores go first.

    ``l1``: L1 norm of each producer filter (each producer normalised by its mean, summed over producers).
    ``activation``: for every consumer, ``||W[:, c]|| * rms(x_c)`` over the calibration data (the consumer's
    output that channel carries), normalised by the consumer's total, summed over consumers.
    """
    one_of(kind, "channel importance", IMPORTANCE)
    tensors = tensors_of(model)
    arrays: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(tensors[name]).astype(np.float64)
        return arrays[name]

    out: dict[int, np.ndarray] = {}
    for g in analysis.prunable():
        score = np.zeros(g.channels)
        if kind == "l1":
            for p in g.params:
                if p.role == "producer" and value(p.name).ndim > 1:
                    s = _per_channel(g, p, value(p.name), lambda v: np.abs(v).sum())
                    score += s / max(s.mean(), 1e-12)
        else:
            if stats is None:
                raise OnnxSparseError("internal error: activation importance needs tap statistics")
            taps = {t.consumer: t for t in g.taps}
            for p in g.params:
                if p.role != "consumer":
                    continue
                tap = taps[p.node]
                w = _per_channel(g, p, value(p.name), lambda v: float(np.sum(v * v)))
                e = stats.energy[tap.tensor]
                idx = g.indices(tap, range(g.channels)).reshape(g.channels, tap.repeat)
                x = e[idx].mean(axis=1)
                s = np.sqrt(w * x)
                score += s / max(s.sum(), 1e-12)
        out[g.index] = score
    return out


# ---------------------------------------------------------------------------------------------------------
# keep counts
# ---------------------------------------------------------------------------------------------------------
def kept_for_ratios(analysis: ChannelAnalysis, ratios: Mapping[int, float], multiple: int = 1) -> dict[int, int]:
    """Channels kept per group; a group whose size is a multiple of ``multiple`` keeps a multiple of it."""
    out = {}
    for i, r in ratios.items():
        c = analysis.groups[i].channels
        m = multiple if multiple > 1 and c % multiple == 0 else 1
        out[i] = int(min(c, max(m, m * round(r * c / m))))
    return out


def scale_to_target(analysis: ChannelAnalysis, weights: Mapping[int, float], target: float,
                    multiple: int = 1) -> dict[int, int]:
    """Keep counts ``round(clip(a * w_i, 0, 1) * C_i)`` with the common ``a`` that removes ``target`` of the
    model's MACs (as near as whole channels allow; at least one channel per group is kept). ``multiple``: keep
    counts rounded to multiples of it where the group's size is one (CPU kernels block channels by 8 or 16)."""
    total = analysis.total_macs
    if total == 0 or not weights:
        return {i: analysis.groups[i].channels for i in weights}

    def removed(a: float) -> float:
        kept = kept_for_ratios(analysis, {i: min(1.0, max(0.0, a * w)) for i, w in weights.items()}, multiple)
        return 1.0 - analysis.macs_after(kept) / total

    lo, hi = 0.0, 1.0 / max(min(weights.values()), 1e-6)
    if removed(lo) < target:
        logger.warning("channel pruning reaches %.3f of the MACs at most (target %.3f)", removed(lo), target)
        hi = lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if removed(mid) > target:
            lo = mid
        else:
            hi = mid
    a = lo  # the largest scale that still removes at least ``target`` (or all it can)
    kept = kept_for_ratios(analysis, {i: min(1.0, max(0.0, a * w)) for i, w in weights.items()}, multiple)
    return _give_back(analysis, kept, target, multiple)


def _give_back(analysis: ChannelAnalysis, kept: dict[int, int], target: float, multiple: int) -> dict[int, int]:
    """Channels given back one step (``multiple`` or one) at a time while the model still loses ``target`` of its
    MACs, cheapest step first: with few, small groups one scale step can overshoot the target by 10 points."""
    total = analysis.total_macs
    kept = dict(kept)
    while True:
        best, best_removed = None, None
        for i, k in kept.items():
            c = analysis.groups[i].channels
            step = multiple if multiple > 1 and c % multiple == 0 else 1
            if k + step > c:
                continue
            trial = {**kept, i: k + step}
            r = 1.0 - analysis.macs_after(trial) / total
            if r >= target and (best_removed is None or r > best_removed):
                best, best_removed = trial, r
        if best is None:
            return kept
        kept = best


def choose(scores: Mapping[int, np.ndarray], kept: Mapping[int, int]) -> dict[int, list[int]]:
    """The lowest-scoring channels of each group, leaving ``kept[i]``."""
    out = {}
    for i, s in scores.items():
        n = len(s) - kept.get(i, len(s))
        out[i] = sorted(np.argsort(s, kind="stable")[:n].tolist()) if n > 0 else []
    return out


# ---------------------------------------------------------------------------------------------------------
# masking and refit
# ---------------------------------------------------------------------------------------------------------
def _consumer_removed_columns(analysis: ChannelAnalysis, removed: Mapping[int, list[int]]
                              ) -> dict[tuple[str, str, int], set[int]]:
    """(node, weight, axis) -> indices of the consumer's weight read from removed channels."""
    out: dict[tuple[str, str, int], set[int]] = {}
    for i, channels in removed.items():
        g = analysis.groups[i]
        for p in g.params:
            if p.role == "consumer":
                key = (p.node, p.name, p.axis)
                out.setdefault(key, set()).update(g.indices(p, channels).tolist() if channels else [])
    return out


def _canonical(kind: str, w: np.ndarray) -> np.ndarray:
    """Weight as (out, D) matching :func:`_columns`."""
    if kind == "conv":
        return w.reshape(w.shape[0], -1)
    if kind == "gemmT":
        return w
    return w.T  # gemm / matmul: B is (in, out)


def _from_canonical(kind: str, w2: np.ndarray, shape: tuple) -> np.ndarray:
    if kind == "conv":
        return w2.reshape(shape)
    return w2 if kind == "gemmT" else w2.T


def plan(model: onnx.ModelProto, analysis: ChannelAnalysis, removed: dict[int, list[int]], *,
         stats: TapStats | None = None, damp: float = 1e-3, writable: set[str] | None = None) -> ChannelPlan:
    """The masked model's new tensors: consumer columns of removed channels zeroed; with ``stats`` (Gram
    matrices), the kept columns (and a bias, where the consumer has one in ``writable``) refitted by least
    squares to the dense consumer's output on the calibration data."""
    tensors = tensors_of(model)
    updates: dict[str, np.ndarray] = {}
    refitted, kept_rel = [], []
    for (node, name, axis), idx in _consumer_removed_columns(analysis, removed).items():
        if not idx:
            continue
        w = updates.get(name)
        if w is None:
            w = numpy_helper.to_array(tensors[name]).astype(np.float64)
        c = stats.consumers.get(node) if stats is not None else None
        if c is not None and c.gram is not None:
            shape = w.shape
            W = _canonical(c.kind, w)
            per_col = int(np.prod(shape[2:])) if c.kind == "conv" else 1  # kernel entries per input column
            drop = np.zeros(W.shape[1], bool)
            for i in idx:
                drop[i * per_col:(i + 1) * per_col] = True
            bias = (numpy_helper.to_array(tensors[c.bias]).astype(np.float64)
                    if c.bias and (writable is None or c.bias in writable) else None)
            if bias is not None:
                b = bias.reshape(-1) if bias.size == W.shape[0] else None
                if b is None:
                    bias = None
            H = c.gram / max(c.rows, 1)
            if bias is None and H.shape[0] == W.shape[1] + 1:
                H = H[:-1, :-1]
            Wa = np.concatenate([W, b[:, None]], 1) if bias is not None else W
            keep = np.concatenate([~drop, [True]]) if bias is not None else ~drop
            K = np.flatnonzero(keep)
            Hkk = H[np.ix_(K, K)]
            lam = damp * max(float(np.mean(np.diag(H))), 1e-12)
            target = Wa @ H[:, K]
            try:
                new_k = np.linalg.solve(Hkk + lam * np.eye(len(K)), target.T).T
            except np.linalg.LinAlgError:
                new_k = None
            if new_k is not None and np.isfinite(new_k).all():
                err_before = _err(Wa, Wa * keep, H)
                new = np.zeros_like(Wa)
                new[:, K] = new_k
                err_after = _err(Wa, new, H)
                if err_after <= err_before:
                    if bias is not None:
                        updates[c.bias] = new[:, -1].reshape(numpy_helper.to_array(tensors[c.bias]).shape)
                        new = new[:, :-1]
                    updates[name] = _from_canonical(c.kind, new, shape)
                    refitted.append(node)
                    kept_rel.append(err_after / max(err_before, 1e-30))
                    continue
        index = [slice(None)] * w.ndim
        index[axis] = sorted(idx)
        w = w.copy()
        w[tuple(index)] = 0
        updates[name] = w
    info = {"refitted_consumers": len(refitted),
            "refit_error_ratio_median": float(np.median(kept_rel)) if kept_rel else None}
    return ChannelPlan(removed, updates, info)


def _err(W: np.ndarray, W2: np.ndarray, H: np.ndarray) -> float:
    """Mean squared output difference ``tr((W - W2) H (W - W2)^T)`` (H: second moment of the inputs)."""
    d = W - W2
    return float(np.einsum("ij,jk,ik->", d, H, d))
