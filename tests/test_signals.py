"""Which output is what: logits behind Softmax/Sigmoid, sequence and dense outputs; per-layer caps."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.importer import import_model
from onnxsparse.signals import describe_outputs
from onnxsparse.metrics import Agreement
from onnxsparse.methods.unipts.objective import Distillation, bernoulli_kl, sequence_kl
from onnxsparse.methods.unipts.search import fit_to_target, integer_zeros
from onnxsparse.sparsity.allocation import layer_caps

F32 = onnx.TensorProto.FLOAT


def _init(rng, name, *shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _heads() -> onnx.ModelProto:
    """x (N, 8, 6) -> MatMul -> Softmax(-1) -> Identity: a (N, T=8, C=5) sequence head;
    -> ReduceMean -> MatMul -> Softmax(1) -> Flatten: a class head; -> MatMul -> Sigmoid: binary;
    -> MatMul: a dense (N, 8, 3) output."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w_seq"], ["z_seq"], name="seq_fc"),
        helper.make_node("Softmax", ["z_seq"], ["p_seq"], name="seq_softmax", axis=-1),
        helper.make_node("Identity", ["p_seq"], ["seq"], name="seq_out"),
        helper.make_node("ReduceMean", ["x"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w_cls"], ["z_cls"], name="cls_fc"),
        helper.make_node("Softmax", ["z_cls"], ["p_cls"], name="cls_softmax", axis=1),
        helper.make_node("Flatten", ["p_cls"], ["cls"], name="cls_flat", axis=1),
        helper.make_node("MatMul", ["x", "w_bin"], ["z_bin"], name="bin_fc"),
        helper.make_node("Sigmoid", ["z_bin"], ["bin"], name="bin_sigmoid"),
        helper.make_node("MatMul", ["x", "w_dense"], ["dense"], name="dense_fc"),
    ]
    graph = helper.make_graph(
        nodes, "heads", [helper.make_tensor_value_info("x", F32, ["N", 8, 6])],
        [helper.make_tensor_value_info(n, F32, None) for n in ("seq", "cls", "bin", "dense")],
        [_init(rng, "w_seq", 6, 5), _init(rng, "w_cls", 6, 4), _init(rng, "w_bin", 6, 2), _init(rng, "w_dense", 6, 3)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_describe_outputs_finds_the_logits_of_every_head():
    imported = import_model(_heads())
    x = torch.randn(4, 8, 6)
    signals = describe_outputs(imported, imported.module, (x,))
    kinds = {s.output: s.kind for s in signals}
    assert kinds == {"seq": "sequence", "cls": "class", "bin": "binary", "dense": "dense"}
    by_name = {s.output: s for s in signals}
    assert "seq_softmax" in by_name["seq"].source and by_name["seq"].axis == 2
    assert "cls_softmax" in by_name["cls"].source and by_name["cls"].axis == 1
    compared = signals.forward(imported.module, (x,))
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in imported.proto.graph.initializer}
    torch.testing.assert_close(compared[0], x @ w["w_seq"])  # logits, not probabilities
    torch.testing.assert_close(compared[1], x.mean(1) @ w["w_cls"])
    torch.testing.assert_close(compared[2], x @ w["w_bin"])
    torch.testing.assert_close(compared[3], x @ w["w_dense"])


def test_losses_and_agreement_per_kind():
    torch.manual_seed(0)
    t = torch.randn(3, 7, 5)
    assert float(sequence_kl(t, t, 2, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(3, 7, 5)
    manual = sum(torch.nn.functional.kl_div(torch.log_softmax(s[i, j], 0), torch.softmax(t[i, j], 0),
                                            reduction="sum") for i in range(3) for j in range(7)) / 21
    torch.testing.assert_close(sequence_kl(s, t, 2, 1.0, 1.0), manual)
    assert float(bernoulli_kl(t, t)) == pytest.approx(0.0, abs=1e-6) and float(bernoulli_kl(s, t)) > 0
    imported = import_model(_heads())
    x = torch.randn(4, 8, 6)
    signals = describe_outputs(imported, imported.module, (x,))
    teacher = signals.forward(imported.module, (x,))
    loss = Distillation(signals, tau0=8.0, gamma=0.99, temperature=1.0)
    student = [o + 0.5 * torch.randn_like(o) for o in teacher]
    # the base-decayed KL is lowest at the teacher itself (its values are negative by construction)
    assert float(loss(student, teacher, 0).detach()) > float(loss(teacher, teacher, 0))
    same, other = Agreement(signals), Agreement(signals)
    same.add(teacher, teacher)
    other.add(student, teacher)
    assert same.top1 == 1.0 and same.score == pytest.approx(0.0, abs=1e-6)
    assert other.score < same.score and set(other.as_dict()) >= {"kl", "top1_agreement", "binary_kl", "nmse"}


def _chain() -> onnx.ModelProto:
    """x -> Conv(stem, 3x3x1->8) -> Conv(body, 8->32, 3x3) -> Conv(body2, 32->32) -> GAP -> Gemm(head)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "stem"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "body"], ["b"], name="body", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "body2"], ["c"], name="body2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "head"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", F32, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", F32, ["N", 10])],
                              [_init(rng, "stem", 8, 1, 3, 3), _init(rng, "body", 32, 8, 3, 3),
                               _init(rng, "body2", 32, 32, 3, 3), _init(rng, "head", 10, 32)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_first_last_and_small_layers_are_capped_at_the_target():
    imported = import_model(_chain())
    caps, protected = layer_caps(imported.proto, imported.layers, 0.9, 0.99)
    by_name = dict(zip([layer.name for layer in imported.layers], caps))
    assert set(protected) == {"stem", "head"}  # stem: first and small (72 weights); head: last; body: 2,304
    assert "first" in protected["stem"] or "small" in protected["stem"]
    assert "last" in protected["head"] or "small" in protected["head"]
    assert by_name["body"] == by_name["body2"] == 0.99 and by_name["stem"] == by_name["head"] == 0.9
    numels = [layer.numel for layer in imported.layers]
    # an allocation that would empty the head is clamped to the caps, the global total kept exact
    s = fit_to_target(np.array([0.5, 0.5, 0.92, 1.0]), numels, 0.9, caps)
    assert (s <= np.array(caps) + 1e-12).all()
    zeros = integer_zeros(s, numels, 0.9, caps)
    assert zeros.sum() == round(0.9 * sum(numels)) and (zeros <= np.floor(np.array(caps) * numels) + 1).all()


def test_caps_too_tight_for_the_target_are_raised_to_it():
    s = fit_to_target(np.array([0.0, 1.0]), [100, 100], 0.9, [0.5, 0.99])
    assert s.sum() * 100 == pytest.approx(180) and s.max() <= 0.99 + 1e-12


class _Head(torch.nn.Module):
    """Class logits from the left and right halves of the image: a mirror swaps them."""

    def forward(self, x):
        half = x.shape[3] // 2
        return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))], 1)


class _Pooled(torch.nn.Module):
    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3))], 1)


class _Columns(torch.nn.Module):
    """A sequence read along the width, (N, W, C): a mirror reverses it."""

    def forward(self, x):
        return x.mean(2).permute(0, 2, 1)


class _Nhwc(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.permute(0, 3, 1, 2))


def test_flip_agreement_tells_mirror_sensitive_outputs_apart():
    from onnxsparse.signals import OutputSignal, Signals
    from onnxsparse.methods.unipts.flip import FLIP_AGREEMENT, flip_agreement

    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(16, 3, 8, 12, generator=g),) for _ in range(4)]
    cls = Signals([OutputSignal("y", 0, "class", "test", None, 1)])
    seq = Signals([OutputSignal("y", 0, "sequence", "test", None, 2)])
    assert flip_agreement(_Pooled(), cls, batches, "nchw") == 1.0  # invariant
    # the left/right head changes its mind whenever the halves differ, i.e. on every sample
    assert flip_agreement(_Head(), cls, batches, "nchw") < 0.05
    assert flip_agreement(_Columns(), seq, batches, "nchw") == 1.0  # equivariant: compared mirrored
    nhwc = [(b[0].permute(0, 2, 3, 1),) for b in batches]
    assert flip_agreement(_Nhwc(_Head()), cls, nhwc, "nhwc") < FLIP_AGREEMENT
    dense = Signals([])
    assert flip_agreement(_Pooled(), dense, batches, "nchw") == pytest.approx(1.0)


@pytest.mark.parametrize("value", [True, False, None])
def test_signals_must_be_a_description_not_a_bool(value):
    with pytest.raises(OnnxSparseError, match=r"signals must be a Signals \(the per-output description .*got " + repr(value)):
        Agreement(value)
    with pytest.raises(OnnxSparseError, match="signals must be a Signals"):
        Distillation(value, tau0=8.0, gamma=0.99, temperature=1.0)
