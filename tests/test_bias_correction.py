"""Bias correction of int8 weights: the shift measured per output channel is the mean change the weight deltas make
to the layer's output, and the corrected bias takes it out; weights without a bias of their own are listed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxsparse.quantize.bias_correction import apply_shifts, output_shifts

RNG = np.random.default_rng(0)


def _model(node: onnx.NodeProto, inits: dict[str, np.ndarray], x_shape, y_shape, extra=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node, *extra], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(extra[-1].output[0] if extra else node.output[0], onnx.TensorProto.FLOAT,
                                       y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _with(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = next(i for i in out.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def _run(model: onnx.ModelProto, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _channel_mean(y: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1).mean(axis=1)


CASES = {
    # asymmetric pads, stride 2, dilation, two groups, a bias
    "conv": (lambda: (helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 0, 2, 1], strides=[2, 1],
                                       dilations=[1, 2], group=2),
                      {"w": RNG.standard_normal((6, 2, 3, 3)), "b": RNG.standard_normal(6)}, (3, 4, 9, 8), None, 1)),
    "gemm": (lambda: (helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0),
                      {"w": RNG.standard_normal((5, 7)), "b": RNG.standard_normal(5)}, (6, 7), None, 1)),
    "matmul": (lambda: (helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        {"w": RNG.standard_normal((7, 5)), "b": RNG.standard_normal(5)}, (2, 3, 7),
                        [helper.make_node("Add", ["h", "b"], ["y"], name="add")], 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_shift_is_the_mean_output_change_and_the_corrected_bias_removes_it(case):
    node, inits, x_shape, extra, axis = CASES[case]()
    model = _model(node, inits, x_shape, None, extra or ())
    feeds = [{"x": (1.5 + RNG.standard_normal(x_shape)).astype(np.float32)} for _ in range(3)]
    delta = (0.05 * RNG.standard_normal(inits["w"].shape)).astype(np.float32)
    moved = _with(model, "w", inits["w"] + delta)
    shifts, skipped = output_shifts(model, {"w": delta}, feeds)
    assert not skipped and set(shifts) == {"w"}
    change = _channel_mean(_run(moved, feeds) - _run(model, feeds), axis)
    np.testing.assert_allclose(shifts["w"], change, rtol=1e-4, atol=1e-5)
    assert np.abs(change).max() > 1e-3  # the inputs' mean of 1.5 makes the shift visible
    corrected = apply_shifts(moved, shifts)
    left = _channel_mean(_run(corrected, feeds) - _run(model, feeds), axis)
    np.testing.assert_allclose(left, 0, atol=1e-5)
    # only the bias moved
    before = {i.name: numpy_helper.to_array(i) for i in moved.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in corrected.graph.initializer}
    assert before.keys() == after.keys() and np.array_equal(before["w"], after["w"])


def test_weights_without_a_bias_of_their_own_are_listed_and_the_file_does_not_grow():
    w = RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)
    conv = _model(helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), {"w": w}, (2, 3, 5, 5), None)
    feeds = [{"x": (1.0 + RNG.standard_normal((2, 3, 5, 5))).astype(np.float32)}]
    shifts, skipped = output_shifts(conv, {"w": (0.1 * RNG.standard_normal(w.shape)).astype(np.float32)}, feeds)
    assert not shifts and "no bias" in skipped["w"]
    assert apply_shifts(conv, {"w": np.ones(4)}).SerializeToString() == conv.SerializeToString()
    # a MatMul without a bias Add, and a bias two Convs share: no correction, and the reason
    mm = _model(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), {"w": RNG.standard_normal((3, 4))}, (2, 3),
                None)
    shifts, skipped = output_shifts(mm, {"w": np.ones((3, 4), np.float32)}, [{"x": np.ones((2, 3), np.float32)}])
    assert not shifts and "no bias Add" in skipped["w"]
    shared = _model(helper.make_node("Conv", ["x", "w", "b"], ["h"], name="c1"),
                    {"w": RNG.standard_normal((3, 3, 1, 1)), "w2": RNG.standard_normal((3, 3, 1, 1)),
                     "b": np.zeros(3)}, (1, 3, 2, 2), None,
                    [helper.make_node("Conv", ["h", "w2", "b"], ["y"], name="c2")])
    shifts, skipped = output_shifts(shared, {"w": np.ones((3, 3, 1, 1), np.float32)},
                                    [{"x": np.ones((1, 3, 2, 2), np.float32)}])
    assert not shifts and "shared" in skipped["w"]
