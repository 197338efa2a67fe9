"""Tiny ONNX graphs built with onnx.helper or exported from tiny torch modules, for the tests."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

OPSET = 13


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = OPSET, name: str = "g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = min(model.ir_version, 8)
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_bn_relu(opset: int = OPSET) -> onnx.ModelProto:
    rng = _rng(1)
    inits = [
        numpy_helper.from_array(_w(rng, 8, 3, 3, 3), "conv1.weight"),
        numpy_helper.from_array(_w(rng, 8), "conv1.bias"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(_w(rng, 8), "bn.bias"),
        numpy_helper.from_array(_w(rng, 8), "bn.mean"),
        numpy_helper.from_array((1 + rng.random(8)).astype(np.float32), "bn.var"),
        numpy_helper.from_array(_w(rng, 4, 8, 1, 1), "conv2.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"], name="bn"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["y"], name="conv2"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
        opset,
    )


def grouped_convs() -> onnx.ModelProto:
    rng = _rng(2)
    inits = [
        numpy_helper.from_array(_w(rng, 8, 1, 3, 3), "dw.weight"),
        numpy_helper.from_array(_w(rng, 8), "dw.bias"),
        numpy_helper.from_array(_w(rng, 8, 4, 1, 1), "gc.weight"),
        numpy_helper.from_array(_w(rng, 8), "gc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw.weight", "dw.bias"], ["a"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "gc.weight", "gc.bias"], ["y"], name="gc", group=2),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        inits,
    )


def gemm(trans_b: int, alpha: float = 1.0, beta: float = 1.0, trans_a: int = 0) -> onnx.ModelProto:
    rng = _rng(3 + trans_b)
    b = _w(rng, 6, 10) if trans_b else _w(rng, 10, 6)
    inits = [numpy_helper.from_array(b, "fc.weight"), numpy_helper.from_array(_w(rng, 6), "fc.bias")]
    x_shape = [10, "N"] if trans_a else ["N", 10]
    nodes = [
        helper.make_node(
            "Gemm", ["x", "fc.weight", "fc.bias"], ["h"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha,
            beta=beta,
        ),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )


def matmul(weight_first: bool) -> onnx.ModelProto:
    rng = _rng(5)
    if weight_first:
        inits = [numpy_helper.from_array(_w(rng, 6, 10), "W")]
        nodes = [helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, "N"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, "N"])
    else:
        inits = [numpy_helper.from_array(_w(rng, 10, 6), "W"), numpy_helper.from_array(_w(rng, 6), "b")]
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["y"], name="add"),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6])
    return _model(nodes, [x], [y], inits)


def conv_transpose() -> onnx.ModelProto:
    rng = _rng(6)
    inits = [numpy_helper.from_array(_w(rng, 4, 6, 3, 3), "ct.weight"), numpy_helper.from_array(_w(rng, 6), "ct.bias")]
    nodes = [helper.make_node("ConvTranspose", ["x", "ct.weight", "ct.bias"], ["y"], name="ct", strides=[2, 2])]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 11, 11])],
        inits,
    )


def weights_behind_identity_and_constant() -> onnx.ModelProto:
    """Conv weight through an Identity; Gemm weight and bias held in Constant nodes (Paddle style)."""
    rng = _rng(7)
    inits = [numpy_helper.from_array(_w(rng, 4, 2, 3, 3), "conv.weight_src")]
    nodes = [
        helper.make_node("Identity", ["conv.weight_src"], ["conv.weight"], name="ident"),
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node(
            "Constant", [], ["fc_w"], name="const_w", value=numpy_helper.from_array(_w(rng, 16, 5), "fc_w_value")
        ),
        helper.make_node("Constant", [], ["fc_b"], name="const_b", value=numpy_helper.from_array(_w(rng, 5), "v")),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )


def batchnorm_unknown_rank() -> onnx.ModelProto:
    """Conv1d -> Squeeze (no axes: shape inference loses the rank) -> BatchNormalization -> MatMul."""
    rng = _rng(8)
    inits = [
        numpy_helper.from_array(_w(rng, 6, 4, 3), "conv.weight"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(6)).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(_w(rng, 6), "bn.bias"),
        numpy_helper.from_array(_w(rng, 6), "bn.mean"),
        numpy_helper.from_array((1 + rng.random(6)).astype(np.float32), "bn.var"),
        numpy_helper.from_array(_w(rng, 5, 2), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv"),
        helper.make_node("Squeeze", ["c"], ["s"], name="squeeze"),
        helper.make_node("BatchNormalization", ["s", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], name="bn"),
        helper.make_node("MatMul", ["b", "fc.weight"], ["y"], name="fc"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", 2])],
        inits,
    )


def weights_behind_transpose_and_cast() -> onnx.ModelProto:
    """Transformer-export weight paths: W -> Transpose -> MatMul (+ Add bias), fp16 W -> Cast -> MatMul,
    fp16 W -> Cast -> Transpose -> Gemm, and a Conv weight stored (kh, kw, cin, cout) behind a Transpose."""
    rng = _rng(9)
    inits = [
        numpy_helper.from_array(_w(rng, 3, 3, 4, 4), "conv.w_hwio"),
        numpy_helper.from_array(_w(rng, 8, 16), "fc1.w_t"),
        numpy_helper.from_array(_w(rng, 8), "fc1.b"),
        numpy_helper.from_array(_w(rng, 8, 8).astype(np.float16), "fc2.w_fp16"),
        numpy_helper.from_array(_w(rng, 4, 8).astype(np.float16), "fc3.w_fp16_t"),
    ]
    nodes = [
        helper.make_node("Transpose", ["conv.w_hwio"], ["conv.w"], name="t_conv", perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Transpose", ["fc1.w_t"], ["fc1.w"], name="t_fc1"),
        helper.make_node("MatMul", ["f", "fc1.w"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "fc1.b"], ["h1b"], name="fc1_bias"),
        helper.make_node("Cast", ["fc2.w_fp16"], ["fc2.w"], name="cast_fc2", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h1b", "fc2.w"], ["h2"], name="fc2"),
        helper.make_node("Cast", ["fc3.w_fp16_t"], ["fc3.w_t"], name="cast_fc3", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["fc3.w_t"], ["fc3.w"], name="t_fc3", perm=[1, 0]),
        helper.make_node("Gemm", ["h2", "fc3.w"], ["y"], name="fc3"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )


def dequantized_and_shared_weights() -> onnx.ModelProto:
    """A MatMul weight behind DequantizeLinear (int8) and a Conv weight computed by Mul from two constants:
    neither is prunable, both must be reported; one plain MatMul weight is prunable."""
    rng = _rng(10)
    inits = [
        numpy_helper.from_array(rng.integers(-100, 100, (8, 6)).astype(np.int8), "fc1.w_q"),
        numpy_helper.from_array(np.float32(0.01), "fc1.scale"),
        numpy_helper.from_array(np.int8(0), "fc1.zp"),
        numpy_helper.from_array(_w(rng, 6, 3), "fc2.w"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["fc1.w_q", "fc1.scale", "fc1.zp"], ["fc1.w"], name="dq"),
        helper.make_node("MatMul", ["x", "fc1.w"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "fc2.w"], ["y"], name="fc2"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )


def einsum_and_embedding() -> onnx.ModelProto:
    """Token ids -> Gather (embedding table) -> Einsum with a constant -> MatMul: only the MatMul is prunable."""
    rng = _rng(11)
    inits = [
        numpy_helper.from_array(_w(rng, 20, 4), "embed"),
        numpy_helper.from_array(_w(rng, 4, 3), "E"),
        numpy_helper.from_array(_w(rng, 3, 2), "fc.w"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["e"], name="embedding"),
        helper.make_node("Einsum", ["e", "E"], ["h"], name="einsum", equation="bsi,ij->bsj"),
        helper.make_node("MatMul", ["h", "fc.w"], ["y"], name="fc"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 2])],
        inits,
    )


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10, channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.mean(dim=(2, 3)))


def tiny_cnn(seed: int = 0, channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCNN(channels=channels)
    # non-trivial BN statistics, as after training
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def export_torch(model: nn.Module, shape=(1, 1, 12, 12), keep_bn: bool = False, opset: int = 13) -> onnx.ModelProto:
    buf = io.BytesIO()
    kwargs = {}
    if keep_bn:
        kwargs = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    torch.onnx.export(
        model.eval(), torch.randn(*shape), buf, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=opset, dynamo=False, **kwargs,
    )
    return onnx.load_from_string(buf.getvalue())


def all_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor of ``model``: initializers and Constant-node values, by name."""
    out = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs for ``model``, dynamic dimensions set to 3."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return {
        i.name: rng.standard_normal([d if isinstance(d, int) else 3 for d in i.shape]).astype(np.float32)
        for i in session.get_inputs()
    }
