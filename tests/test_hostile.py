"""Broken and hostile models: one clear error line each, nothing written, nothing read outside the folder."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsparse import OnnxSparseError
from onnxsparse.importer import import_model, load_model
from onnxsparse_cli.main import main


def _conv_model(op: str = "Relu", domain: str = "", opset: int = 13, extra_nodes=()) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), *extra_nodes,
             helper.make_node(op, ["c"], ["y"], name="tail", domain=domain)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def _cli_error(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_not_a_file(tmp_path):
    with pytest.raises(OnnxSparseError, match="is not a file"):
        load_model(tmp_path)


def test_not_onnx_and_truncated(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(OnnxSparseError):
        load_model(junk)
    data = graphs.export_torch(graphs.tiny_cnn()).SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxSparseError, match="not a readable ONNX model|has no graph"):
        load_model(cut)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(OnnxSparseError):
        load_model(empty)


def test_no_prunable_weights(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "relu.onnx")
    calib = tmp_path / "c.npy"
    np.save(calib, np.ones((4, 1, 4), np.float32))
    out = _cli_error("prune", path, "--sparsity", "0.5", "--calib", calib, "-o", tmp_path / "o.onnx")
    assert "has no prunable weights" in out
    assert not (tmp_path / "o.onnx").exists()


def test_unconvertible_op_names_op_node_and_opset():
    with pytest.raises(OnnxSparseError, match=r"cannot convert op Hardmax \(node 'tail', opset 13\)"):
        import_model(_conv_model("Hardmax"))


def test_custom_domain_op():
    with pytest.raises(OnnxSparseError, match="custom-domain op MyOp .*'com.example'"):
        import_model(_conv_model("MyOp", domain="com.example"))


def test_opset_newer_than_onnx_supports():
    with pytest.raises(OnnxSparseError, match="opset 99"):
        import_model(_conv_model(opset=99))


def test_control_flow_is_refused():
    branch = helper.make_graph([helper.make_node("Identity", ["c"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    cond = helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))
    node = helper.make_node("If", ["cond"], ["c2"], name="branch", then_branch=branch, else_branch=branch)
    with pytest.raises(OnnxSparseError, match=r"control-flow op If \(node 'branch'\)"):
        import_model(_conv_model(extra_nodes=[cond, node]))


def _external_model(tmp_path, location: str, offset: int = 0, length: int | None = None):
    model = _conv_model()
    w = model.graph.initializer[0]
    raw = numpy_helper.to_array(w).tobytes()
    w.ClearField("float_data")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length or len(raw)))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return _save(model, tmp_path / "model.onnx"), raw


def test_external_data_absolute_path_refused(tmp_path):
    secret = tmp_path.parent / f"{tmp_path.name}-secret.bin"
    secret.write_bytes(b"\0" * 16)
    path, _ = _external_model(tmp_path, str(secret))
    with pytest.raises(OnnxSparseError, match="absolute path"):
        load_model(path)


def test_external_data_dotdot_refused(tmp_path):
    inner = tmp_path / "m"
    inner.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    path, _ = _external_model(inner, "../outside.bin")
    with pytest.raises(OnnxSparseError, match="escapes the model's folder"):
        load_model(path)


def test_external_data_symlink_outside_refused(tmp_path):
    inner = tmp_path / "m"
    inner.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    (inner / "link.bin").symlink_to(tmp_path / "outside.bin")
    path, _ = _external_model(inner, "link.bin")
    with pytest.raises(OnnxSparseError, match="escapes the model's folder"):
        load_model(path)


def test_external_data_range_past_end_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    path, _ = _external_model(tmp_path, "w.bin", offset=4, length=16)
    with pytest.raises(OnnxSparseError, match="past the end"):
        load_model(path)


def test_external_data_inside_folder_loads(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"")
    path, raw = _external_model(tmp_path, "w.bin")
    (tmp_path / "w.bin").write_bytes(raw)
    model = load_model(path)
    assert numpy_helper.to_array(model.graph.initializer[0]).tobytes() == raw


def test_model_too_big_for_memory_is_refused_before_loading(tmp_path, monkeypatch):
    import onnxsparse.importer.load as load

    path = _save(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "m.onnx")
    monkeypatch.setattr(load, "physical_memory", lambda: 4096)
    with pytest.raises(OnnxSparseError, match=r"pruning it needs about .* GiB of memory and this machine has"):
        load_model(path)


def test_cuda_out_of_memory_names_the_batch_size(tmp_path, monkeypatch):
    import torch

    import onnxsparse.methods.magnitude as magnitude
    from onnxsparse import PruneConfig, prune

    def oom(self, ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(magnitude._Magnitude, "run", oom)
    feeds = [{"input": np.zeros((4, 1, 12, 12), np.float32)} for _ in range(4)]
    with pytest.raises(OnnxSparseError, match="out of memory .* --batch-size 16 .*lower --batch-size"):
        prune(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "o.onnx", feeds,
              PruneConfig(sparsity=0.5, method="magnitude", batch_size=16), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unusable_output_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = _save(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "m.onnx")
    out = _cli_error("prune", model, "--sparsity", "0.5", "--calib", tmp_path / "missing-calib",
                     "-o", blocker / "o.onnx")
    assert "output folder" in out and "does not exist" in out  # checked before the calibration path
