"""The importer's own converters (consulted before onnx2torch's) and weights it reaches through
Transpose/Cast or cannot prune (reported, never silently dropped)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter import write_back
from onnxsparse.importer import import_model
from onnxsparse.importer.converters import REGISTRY, ConverterError, Registry, installed
from onnxsparse.importer.converters.batch_norm import AnyRankBatchNorm
from onnxsparse.sparsity.masks import apply_masks_inplace, magnitude_mask


def _run_unoptimised(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_batchnorm_of_unknown_rank_is_a_tracked_batchnorm():
    import onnx2torch

    model = graphs.batchnorm_unknown_rank()
    with pytest.raises(NotImplementedError, match="spatial rank"):
        onnx2torch.convert(model)  # what the registry exists for
    imported = import_model(model)
    bns = [m for m in imported.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 and isinstance(bns[0], AnyRankBatchNorm)
    assert imported.has_batchnorm
    assert {t.role for t in imported.tracked} >= {"bn_weight", "bn_bias", "bn_mean", "bn_var"}
    feeds = graphs.random_feeds(model)
    with torch.no_grad():
        out = imported.module(torch.from_numpy(feeds["x"]))
    np.testing.assert_allclose(out.numpy(), _run_unoptimised(model, feeds)[0], rtol=1e-5, atol=1e-6)
    # changed statistics are written back into the BatchNormalization's own tensors
    bns[0].running_mean.add_(1.0)
    out_model, changed = write_back(imported, imported.module)
    assert changed == ["bn.mean"]
    np.testing.assert_allclose(graphs.all_tensors(out_model)["bn.mean"], graphs.all_tensors(model)["bn.mean"] + 1.0)


def test_registry_is_installed_only_during_conversion():
    import onnx2torch.converter as o2t

    before = o2t.get_converter
    with installed():
        assert o2t.get_converter is not before
    assert o2t.get_converter is before
    import_model(graphs.batchnorm_unknown_rank())
    assert o2t.get_converter is before


def test_registry_keys_and_errors_name_the_key():
    registry = Registry()

    @registry.add("Foo", 9, 13)
    def broken(node, graph):
        raise ValueError("bad attribute")

    with pytest.raises(OnnxSparseError, match="overlaps"):
        registry.add("Foo", 13, 15)
    assert registry.find("Foo", 14) is None and registry.find("Foo", 11, domain="com.microsoft") is None
    key, _ = registry.find("Foo", 11)
    assert str(key) == "(Foo, opset 9-13)"
    assert {str(k) for k in REGISTRY.keys()} >= {
        f"(BatchNormalization, opset 9-{onnx.defs.onnx_opset_version()})",
        f"(DequantizeLinear, opset 10-{onnx.defs.onnx_opset_version()})",
    }

    class Node:
        name = "n0"

    import onnx2torch.converter as o2t

    with installed(registry):
        convert = o2t.get_converter("Foo", 11)
        with pytest.raises(ConverterError, match=r"converter \(Foo, opset 9-13\) failed on node 'n0': ValueError: bad attr"):
            convert(Node(), None)


def test_converter_refusal_names_the_key_and_the_original_node():
    model = graphs.dequantized_and_shared_weights()
    dq = model.graph.node[0]
    dq.attribute.append(helper.make_attribute("block_size", 2))
    model.opset_import[0].version = 21
    with pytest.raises(OnnxSparseError, match=(
        r"cannot convert DequantizeLinear node 'dq' \(opset 21.*\): onnxsparse converter "
        r"\(DequantizeLinear, opset 10-\d+\): blocked quantization \(block_size\) is not supported"
    )):
        import_model(model)


def test_transpose_and_cast_weights_are_written_back_in_their_stored_layout_and_dtype():
    model = graphs.weights_behind_transpose_and_cast()
    imported = import_model(model)
    layouts = {layer.name: layer.weight.layout for layer in imported.layers}
    assert set(layouts) == {"conv.w_hwio", "fc1.w_t", "fc2.w_fp16", "fc3.w_fp16_t"}
    assert layouts["conv.w_hwio"].perm == (3, 2, 0, 1)
    assert layouts["fc2.w_fp16"].onnx_dtype == TensorProto.FLOAT16
    assert layouts["fc3.w_fp16_t"].perm == (1, 0) and layouts["fc3.w_fp16_t"].onnx_dtype == TensorProto.FLOAT16
    assert imported.layer("fc1.w_t").bias.source.name == "fc1.b"
    student = imported.clone_module()
    masks = {layer.name: magnitude_mask(layer.weight.get(student), 0.5) for layer in imported.layers}
    apply_masks_inplace(student, imported.layers, masks)
    out, _ = write_back(imported, student)
    before, after = graphs.all_tensors(model), graphs.all_tensors(out)
    for layer in imported.layers:
        torch_mask = masks[layer.name].to(torch.float64)
        expected = layer.weight.layout.to_onnx(torch_mask) != 0  # the mask, in the stored layout
        np.testing.assert_array_equal(after[layer.name] != 0, expected & (before[layer.name] != 0))
        assert after[layer.name].dtype == before[layer.name].dtype
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def test_nm_groups_of_transposed_weights_lie_on_the_stored_axis():
    from onnxsparse.sparsity.patterns import check_nm, layer_onnx_axis, nm_mask, torch_group_axis

    model = graphs.weights_behind_transpose_and_cast()
    imported = import_model(model)
    student = imported.clone_module()
    masks = {layer.name: nm_mask(layer.weight.get(student), 2, 4, torch_group_axis(layer)) for layer in imported.layers}
    apply_masks_inplace(student, imported.layers, masks)
    out, _ = write_back(imported, student)
    after = graphs.all_tensors(out)
    axes = {layer.name: layer_onnx_axis(layer) for layer in imported.layers}
    # stored layouts: conv (kh, kw, cin, cout), fc1 (out, in), fc2 (in, out), fc3 stored (out, in) behind Cast+Transpose
    assert axes == {"conv.w_hwio": 2, "fc1.w_t": 1, "fc2.w_fp16": 0, "fc3.w_fp16_t": 1}
    for name, axis in axes.items():
        assert check_nm(after[name], 2, 4, axis), name


def test_dequantized_and_unpruned_weights_are_reported():
    model = graphs.dequantized_and_shared_weights()
    imported = import_model(model)
    assert [layer.name for layer in imported.layers] == ["fc2.w"]
    assert [(s.tensor, s.reason) for s in imported.skipped] == [
        ("fc1.w", "weight is computed at run time from constant tensors by DequantizeLinear")
    ]
    feeds = graphs.random_feeds(model)
    with torch.no_grad():
        out = imported.module(torch.from_numpy(feeds["x"]))
    np.testing.assert_allclose(out.numpy(), _run_unoptimised(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_qdq_model_prunes_and_verifies_against_the_graph_as_written(tmp_path):
    # onnxruntime's extended optimisations fuse DequantizeLinear into MatMul (0.2% off the float graph): the
    # export check compares with the graph as written (exact=True), so a QDQ model is not refused as a
    # write-back error
    from onnxsparse import PruneConfig, prune
    from onnxsparse.exporter.verify import ort_session

    model = graphs.dequantized_and_shared_weights()
    rng = np.random.default_rng(0)
    x = (20 * rng.standard_normal((16, 8))).astype(np.float32)  # outputs >> 1: relative errors show
    with torch.no_grad():
        reference = import_model(model).module(torch.from_numpy(x)).numpy()
    fused = ort_session(model).run(None, {"x": x})[0]
    exact = ort_session(model, exact=True).run(None, {"x": x})[0]
    assert np.abs(fused - reference).max() / np.abs(reference).max() > 1e-3
    assert np.abs(exact - reference).max() / np.abs(reference).max() < 1e-5
    result = prune(model, tmp_path / "q.onnx", [{"x": x}] * 4,
                   PruneConfig(sparsity=0.5, method="magnitude", min_agreement=0.0), progress=False)
    assert result.report["verification"]["export_max_rel_error"] < 1e-5
    assert [row["name"] for row in result.layers] == ["fc2.w"] and result.layers[0]["zeros"] == 9


def test_einsum_and_embedding_weights_are_reported():
    imported = import_model(graphs.einsum_and_embedding())
    assert [layer.name for layer in imported.layers] == ["fc.w"]
    assert [(s.node_name, s.tensor, s.reason) for s in imported.skipped] == [
        ("embedding", "embed", "embedding table read by Gather is not pruned"),
        ("einsum", "E", "Einsum weights are not pruned"),
    ]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opset_20_graph_without_down_conversion(approximate):
    """ConstantOfShape-20 has no down-adapter, so the copy stays at opset 20: Gelu-20, Shape-19, Reshape-19,
    Cast-19, ConstantOfShape-20 and IsNaN-20 convert through the registry."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((6, 4)) * 0.5).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([-1, 6], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Gelu", ["x"], ["g"], name="gelu", approximate=approximate),
        helper.make_node("Reshape", ["g", "flat"], ["g2"], name="reshape"),
        helper.make_node("Shape", ["g2"], ["s"], name="shape"),
        helper.make_node("ConstantOfShape", ["s"], ["ones"], name="ones",
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("IsNaN", ["g2"], ["nan"], name="isnan"),
        helper.make_node("Cast", ["nan"], ["nanf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["g2", "ones"], ["h0"], name="add"),
        helper.make_node("Sub", ["h0", "nanf"], ["h"], name="sub"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits,
    )
    graph.output[0].type.tensor_type.shape.dim.add()  # rank 2, sizes unknown
    graph.output[0].type.tensor_type.shape.dim.add()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    imported = import_model(model)
    assert imported.torch_opset == 20 and [layer.name for layer in imported.layers] == ["W"]
    feeds = graphs.random_feeds(model)
    with torch.no_grad():
        out = imported.module(torch.from_numpy(feeds["x"]))
    np.testing.assert_allclose(out.numpy(), _run_unoptimised(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_folded_weights_also_listed_as_graph_inputs():
    """Old exporters (IR < 4) list every initializer as a graph input too: folding must not turn it into one."""
    model = graphs.weights_behind_transpose_and_cast()
    feeds = graphs.random_feeds(model)
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    imported = import_model(model)
    assert imported.input_names == ("x",) and len(imported.layers) == 4
    with torch.no_grad():
        out = imported.module(torch.from_numpy(feeds["x"]))
    np.testing.assert_allclose(out.numpy(), _run_unoptimised(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_inspect_reports_transposed_weights_in_their_stored_layout():
    from onnxsparse.inspect import inspect_model
    from onnxsparse.sparsity.patterns import layer_onnx_axis

    model = graphs.weights_behind_transpose_and_cast()
    imported = import_model(model)
    rows = {row.tensor: row for row in inspect_model(model)}
    stored = graphs.all_tensors(model)
    assert set(rows) == {layer.name for layer in imported.layers}
    for layer in imported.layers:
        assert rows[layer.name].shape == stored[layer.name].shape
        assert rows[layer.name].nm_axis == layer_onnx_axis(layer), layer.name
