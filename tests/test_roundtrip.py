"""Import -> prune -> write back -> onnxruntime, on every graph shape the importer must handle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphs
from onnxsparse.exporter import ort_session, save_atomic, tensor_arrays, write_back
from onnxsparse.importer import import_model
from onnxsparse.sparsity.masks import apply_masks_inplace, magnitude_mask, zeros_for

CASES = {
    "conv_bn_relu": graphs.conv_bn_relu,
    "conv_bn_relu_opset11": lambda: graphs.conv_bn_relu(11),
    "conv_bn_relu_opset18": lambda: graphs.conv_bn_relu(18),
    "grouped_depthwise": graphs.grouped_convs,
    "gemm_transB0_alpha": lambda: graphs.gemm(0, alpha=0.5, beta=2.0),
    "gemm_transB1": lambda: graphs.gemm(1),
    "gemm_transA": lambda: graphs.gemm(1, alpha=1.5, trans_a=1),
    "matmul_weight_second": lambda: graphs.matmul(False),
    "matmul_weight_first": lambda: graphs.matmul(True),
    "conv_transpose": graphs.conv_transpose,
    "identity_and_constant": graphs.weights_behind_identity_and_constant,
    "batchnorm_unknown_rank": graphs.batchnorm_unknown_rank,
    "transpose_and_cast": graphs.weights_behind_transpose_and_cast,
    "torch_bn_folded": lambda: graphs.export_torch(graphs.tiny_cnn()),
    "torch_bn_kept": lambda: graphs.export_torch(graphs.tiny_cnn(), keep_bn=True),
}


def _graph_signature(model: onnx.ModelProto):
    g = model.graph
    return (
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in g.node],
        [i.name for i in g.input],
        [o.name for o in g.output],
        [(o.domain, o.version) for o in model.opset_import],
        model.producer_name,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparsity_zero_is_a_no_op(case):
    model = CASES[case]()
    imported = import_model(model)
    assert imported.layers, "every case has prunable weights"
    out, changed = write_back(imported, imported.clone_module())
    assert changed == []
    before, after = graphs.all_tensors(model), graphs.all_tensors(out)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name
    feeds = graphs.random_feeds(model)
    for a, b in zip(ort_session(model).run(None, feeds), ort_session(out).run(None, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_half_sparsity_round_trip(case):
    model = CASES[case]()
    imported = import_model(model)
    student = imported.clone_module()
    masks = {layer.name: magnitude_mask(layer.weight.get(student), 0.5) for layer in imported.layers}
    apply_masks_inplace(student, imported.layers, masks)
    out, changed = write_back(imported, student, {"onnxsparse.method": "test"})
    onnx.checker.check_model(out, full_check=True)
    assert _graph_signature(out) == _graph_signature(model)
    assert {p.key: p.value for p in out.metadata_props}["onnxsparse.method"] == "test"
    prunable = {layer.name for layer in imported.layers}
    assert set(changed) == prunable
    before, after = graphs.all_tensors(model), graphs.all_tensors(out)
    for name, array in after.items():
        assert array.dtype == before[name].dtype and array.shape == before[name].shape
        if name in prunable:
            assert int((array == 0).sum()) == zeros_for(0.5, array.size), name
            kept = array != 0
            np.testing.assert_allclose(array[kept], before[name][kept], rtol=1e-6)
        else:
            assert array.tobytes() == before[name].tobytes(), f"non-prunable {name} changed"
    feeds = graphs.random_feeds(model)
    ort_out = ort_session(out).run(None, feeds)
    with torch.no_grad():
        torch_out = student(*[torch.from_numpy(feeds[n]) for n in imported.input_names])
    np.testing.assert_allclose(ort_out[0], torch_out.numpy(), rtol=1e-4, atol=1e-5)


def test_torch_exported_resnet_block_with_shared_identity():
    """PyTorch's exporter routes shared initializers through Identity nodes (onnx2torch KeyError otherwise)."""
    torch.manual_seed(0)

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(2, 4, 3, padding=1)
            self.b = torch.nn.Conv2d(2, 4, 3, padding=1)
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight)  # identical values: the exporter dedups them

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = graphs.export_torch(Shared(), shape=(1, 2, 6, 6))
    imported = import_model(model)
    feeds = graphs.random_feeds(model)
    with torch.no_grad():
        out = imported.module(*[torch.from_numpy(feeds[n]) for n in imported.input_names])
    np.testing.assert_allclose(out.numpy(), ort_session(model).run(None, feeds)[0], rtol=1e-4, atol=1e-5)
    shared = [s for s in imported.skipped if "shared" in s.reason]
    names = {layer.name for layer in imported.layers}
    # a weight feeding two convs is either deduplicated (skipped as shared) or kept separate (prunable)
    assert shared or len(names) == 2


def test_exclude_patterns_are_reported():
    model = graphs.export_torch(graphs.tiny_cnn())
    imported = import_model(model, exclude=["Gemm", "*features.0*"])
    ops = {layer.op_type for layer in imported.layers}
    assert "Gemm" not in ops
    reasons = {s.reason for s in imported.skipped}
    assert "excluded by pattern 'Gemm'" in reasons
    assert "excluded by pattern '*features.0*'" in reasons
    assert len(imported.layers) == 2


def test_external_data_round_trip(tmp_path):
    model = graphs.export_torch(graphs.tiny_cnn())
    src = tmp_path / "ext.onnx"
    staged = onnx.ModelProto()
    staged.CopyFrom(model)  # save_model(save_as_external_data=True) rewrites the proto it is given
    onnx.save_model(staged, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    imported = import_model(src)
    student = imported.clone_module()
    masks = {layer.name: magnitude_mask(layer.weight.get(student), 0.5) for layer in imported.layers}
    apply_masks_inplace(student, imported.layers, masks)
    out, _ = write_back(imported, student)
    dst = tmp_path / "out" / "pruned.onnx"
    dst.parent.mkdir()
    save_atomic(out, dst, external_data=True)
    assert (dst.parent / "pruned.onnx.data").is_file()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    reloaded = onnx.load(str(dst))
    arrays = tensor_arrays(reloaded, [layer.weight.source for layer in imported.layers])
    for layer in imported.layers:
        array = arrays[layer.name]
        assert int((array == 0).sum()) == zeros_for(0.5, array.size)
    feeds = graphs.random_feeds(model)
    np.testing.assert_allclose(
        ort_session(dst).run(None, feeds)[0], ort_session(out).run(None, feeds)[0], rtol=1e-6
    )
