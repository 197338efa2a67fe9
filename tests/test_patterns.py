"""N:M patterns: the mask rule on hand-made tensors, every layer type end to end through write-back
(checked on the ONNX initializer along TensorRT's axis), inspect, and sparse-initializer storage."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsparse.config import PruneConfig
from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter import ort_session, write_back
from onnxsparse.exporter.save import zip_size
from onnxsparse.exporter.verify import check_model_file
from onnxsparse.exporter.writeback import densify, sparse_to_array, to_sparse_initializers
from onnxsparse.importer import import_model
from onnxsparse.inspect import inspect_model
from onnxsparse.sparsity import patterns
from onnxsparse.sparsity.masks import SparseMask, apply_masks_inplace, magnitude_mask


# -- hand-made tensors -------------------------------------------------------------------------------------
def test_nm_mask_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[1.0, -5.0, 3.0, 2.0, 0.1, 0.2, -0.3, 4.0]])
    mask = patterns.nm_mask(w, 2, 4, axis=1)
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]
    assert patterns.nm_mask(w, 1, 4, axis=1).tolist() == [[False, True, False, False, False, False, False, True]]
    # ties keep the lower index, and the mask has exactly N per group whatever the values
    assert patterns.nm_mask(torch.ones(1, 4), 2, 4, 1).tolist() == [[True, True, False, False]]
    assert patterns.nm_mask(torch.zeros(2, 8), 2, 4, 1).sum().item() == 8


def test_nm_mask_groups_run_along_the_given_axis():
    w = torch.tensor([[4.0, 0.0], [3.0, 9.0], [-2.0, 8.0], [1.0, 7.0]])  # (4, 2): groups down each column
    assert patterns.nm_mask(w, 2, 4, axis=0).tolist() == [[True, False], [True, True], [False, True], [False, False]]
    with pytest.raises(OnnxSparseError, match="not a multiple of M=4"):
        patterns.nm_mask(w, 2, 4, axis=1)


def _reference_nm(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Slow, obvious N:M rule: for every position of the other axes, walk the axis in steps of m."""
    moved = np.moveaxis(np.abs(w), axis, -1)
    keep = np.zeros(moved.shape, dtype=bool)
    for idx in np.ndindex(*moved.shape[:-1]):
        for start in range(0, moved.shape[-1], m):
            group = moved[idx][start:start + m]
            order = sorted(range(m), key=lambda i: (-group[i], i))
            for i in order[:n]:
                keep[idx + (start + i,)] = True
    return np.moveaxis(keep, -1, axis)


@pytest.mark.parametrize("shape,axis,nm", [((6, 8, 3, 3), 1, (2, 4)), ((8, 5, 2, 2), 0, (2, 4)),
                                           ((12, 16), 1, (4, 8)), ((10, 12), 1, (1, 3)), ((16, 3), 0, (3, 8))])
def test_nm_mask_matches_the_reference_rule(shape, axis, nm):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    mask = patterns.nm_mask(w, *nm, axis=axis)
    np.testing.assert_array_equal(mask.numpy(), _reference_nm(w.numpy(), *nm, axis))
    assert mask.sum().item() == w.numel() * nm[0] // nm[1]
    assert patterns.check_nm(w * mask, *nm, axis)


def test_check_nm_and_tightest_pattern():
    a = np.array([[1, 0, 0, 0, 0, 0, 2, 0]], dtype=np.float32)
    assert patterns.check_nm(a, 1, 4, 1) and patterns.check_nm(a, 2, 4, 1)
    assert not patterns.check_nm(a, 1, 8, 1)
    assert patterns.tightest_pattern(a, 1) == (1, 4)
    b = np.array([[1, 2, 0, 0, 0, 0, 0, 0]], dtype=np.float32)  # 2:8 but not 1:4
    assert patterns.tightest_pattern(b, 1) == (2, 8) and patterns.check_nm(b, 2, 4, 1)
    c = np.array([[1, 2, 3, 0, 0, 0, 0, 0]], dtype=np.float32)  # 4:8 only
    assert patterns.tightest_pattern(c, 1) == (4, 8) and not patterns.check_nm(c, 2, 4, 1)
    assert patterns.tightest_pattern(np.ones((2, 8)), 1) is None
    assert not patterns.check_nm(np.zeros((2, 6)), 2, 4, 1)  # 6 is not a multiple of 4
    assert patterns.tightest_pattern(a, None) is None


def test_parse_pattern():
    assert patterns.parse_pattern("unstructured") is None
    assert patterns.parse_pattern("2:4") == (2, 4) and patterns.parse_pattern((4, 8)) == (4, 8)
    for bad in ("4:4", "0:4", "3:2", "2-4", "x"):
        with pytest.raises(OnnxSparseError):
            patterns.parse_pattern(bad)
    for bad in ("4:4", "2:4:8", "dense"):
        with pytest.raises(OnnxSparseError, match="--pattern"):
            PruneConfig(sparsity=0.5, pattern=bad)
    with pytest.raises(OnnxSparseError, match="--save-format must be one of dense, sparse-initializer"):
        PruneConfig(sparsity=0.5, save_format="csr")


def test_dynamic_sparse_mask_with_nm_mask_fn_recomputes_groups():
    layer = import_model(graphs.conv_transpose()).layers[0]  # (C_in=4, C_out=6, 3, 3): groups along axis 0
    fn = patterns.mask_fn_for(layer, "2:4")
    assert isinstance(fn, patterns.NMMaskFn) and fn.axis == 0
    assert patterns.mask_fn_for(layer, "unstructured") is magnitude_mask
    w = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    param = SparseMask(fn(w, 0.5), 0.5, dynamic=True, mask_fn=fn).train()
    out = param(w.flip(0))  # magnitudes moved: the mask must follow
    assert patterns.check_nm(out.detach(), 2, 4, 0)
    assert torch.equal(param.mask, fn(w.flip(0), 0.5))


# -- every layer type, end to end --------------------------------------------------------------------------
def _gemm(trans_b: int, alpha: float = 1.0, trans_a: int = 0, k: int = 8, n: int = 12) -> onnx.ModelProto:
    rng = np.random.default_rng(11 + trans_b + 2 * trans_a)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "fc.weight"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32),
                                                                              "fc.bias")]
    node = helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], name="fc", transA=trans_a,
                            transB=trans_b, alpha=alpha)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, "N"] if trans_a else ["N", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])
    return graphs._model([node], [x], [y], inits)  # noqa: SLF001


def _gemm_weight_first(trans_a: int) -> onnx.ModelProto:
    """Gemm(A=constant, B=x): A is (M, K) or, with transA, (K, M)."""
    rng = np.random.default_rng(21 + trans_a)
    a = rng.standard_normal((8, 12) if trans_a else (12, 8)).astype(np.float32)
    node = helper.make_node("Gemm", ["W", "x"], ["y"], name="fc", transA=trans_a)
    return graphs._model(  # noqa: SLF001
        [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, "N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, "N"])], [numpy_helper.from_array(a, "W")],
    )


def _matmul(weight_first: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(31 + weight_first)
    if weight_first:
        w = rng.standard_normal((12, 8)).astype(np.float32)  # W @ x: (M=12, K=8)
        node = helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, "N"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, "N"])
    else:
        w = rng.standard_normal((8, 12)).astype(np.float32)  # x @ W: (K=8, N=12)
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 12])
    return graphs._model([node], [x], [y], [numpy_helper.from_array(w, "W")])  # noqa: SLF001


# case -> (builder, {weight: expected ONNX group axis or None when left dense at M=4})
LAYER_CASES = {
    "conv": (graphs.conv_bn_relu, {"conv1.weight": None, "conv2.weight": 1}),  # C_in 3 stays dense
    "grouped_depthwise": (graphs.grouped_convs, {"dw.weight": None, "gc.weight": 1}),  # C_in/g = 1 and 4
    "conv_transpose": (graphs.conv_transpose, {"ct.weight": 0}),
    "gemm_transB1": (lambda: _gemm(1), {"fc.weight": 1}),
    "gemm_transB0_alpha": (lambda: _gemm(0, alpha=0.5), {"fc.weight": 0}),
    "gemm_transA": (lambda: _gemm(1, alpha=1.5, trans_a=1), {"fc.weight": 1}),
    "gemm_weight_first": (lambda: _gemm_weight_first(0), {"W": 1}),
    "gemm_weight_first_transA": (lambda: _gemm_weight_first(1), {"W": 0}),
    "matmul_x_at_w": (lambda: _matmul(False), {"W": 0}),
    "matmul_w_at_x": (lambda: _matmul(True), {"W": 1}),
    "graphs_gemm_k10": (lambda: graphs.gemm(0, alpha=0.5, beta=2.0), {"fc.weight": None}),  # K = 10
    "constant_node_gemm": (graphs.weights_behind_identity_and_constant, {"conv.weight_src": None, "fc_w": 0}),
    "torch_cnn": (lambda: graphs.export_torch(graphs.tiny_cnn()), None),
}


def _consumer_axis(model: onnx.ModelProto, name: str, rank: int) -> int | None:
    """The TensorRT group axis of tensor ``name`` from the node that reads it (Identity followed)."""
    alias = {name}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in alias:
            alias.add(node.output[0])
    for node in model.graph.node:
        for i, value in enumerate(node.input[:2]):
            if value in alias and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                return patterns.onnx_group_axis(node, i, rank)
    raise AssertionError(f"{name} feeds no prunable node")


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_every_layer_type_pruned_2_4_along_the_tensorrt_axis(case):
    build, expected = LAYER_CASES[case]
    model = build()
    imported = import_model(model)
    student = imported.clone_module()
    sparsities = patterns.nm_sparsities(imported.layers, "2:4")
    masks = patterns.pattern_masks(student, imported.layers, "2:4", sparsities)
    apply_masks_inplace(student, imported.layers, masks)
    out, _ = write_back(imported, student)
    before, after = graphs.all_tensors(model), graphs.all_tensors(out)
    dense = patterns.dense_layers(imported.layers, "2:4")
    if expected is not None:
        assert {layer.name for layer in imported.layers} == set(expected)
        assert set(dense) == {name for name, axis in expected.items() if axis is None}
    for layer in imported.layers:
        array = after[layer.name]
        axis = _consumer_axis(out, layer.name, array.ndim)
        assert patterns.layer_onnx_axis(layer) == axis, "importer layout and ONNX rule disagree"
        if expected is not None and expected[layer.name] is not None:
            assert axis == expected[layer.name]
        if layer.name in dense:
            assert sparsities[layer.name] == 0.0 and array.tobytes() == before[layer.name].tobytes()
            assert "not a multiple of M=4" in dense[layer.name]
            continue
        assert sparsities[layer.name] == 0.5
        assert patterns.check_nm(array, 2, 4, axis), f"{layer.name} is not 2:4 along ONNX axis {axis}"
        assert int((array == 0).sum()) == array.size // 2
        kept = array != 0
        np.testing.assert_allclose(array[kept], before[layer.name][kept], rtol=1e-6)
        # the kept weights are the two largest of each group of the *original* ONNX tensor
        np.testing.assert_array_equal(kept, _reference_nm(before[layer.name], 2, 4, axis))
        other = [a for a in range(array.ndim) if a != axis and array.shape[a] % 4 == 0]
        if other and array.ndim == 2:  # a transposed layout would show up as groups along the other axis
            assert not patterns.check_nm(array, 2, 4, other[0])
    feeds = graphs.random_feeds(model)
    with torch.no_grad():
        ref = student(*[torch.from_numpy(feeds[n]) for n in imported.input_names])
    np.testing.assert_allclose(ort_session(out).run(None, feeds)[0], ref.numpy(), rtol=1e-4, atol=1e-5)
    rows = {r.tensor: r for r in inspect_model(out)}
    for layer in imported.layers:
        assert rows[layer.name].satisfies_2_4 == (layer.name not in dense)
        assert rows[layer.name].nm == ("-" if layer.name in dense else "2:4")


def test_other_nm_patterns_on_a_k10_gemm():
    imported = import_model(graphs.gemm(1))  # B (6, 10), transB=1: groups along axis 1 of 10
    assert patterns.dense_layers(imported.layers, "2:4")
    assert not patterns.dense_layers(imported.layers, "2:5")
    student = imported.clone_module()
    masks = patterns.pattern_masks(student, imported.layers, "2:5", patterns.nm_sparsities(imported.layers, "2:5"))
    apply_masks_inplace(student, imported.layers, masks)
    out, _ = write_back(imported, student)
    array = graphs.all_tensors(out)["fc.weight"]
    assert patterns.check_nm(array, 2, 5, 1) and int((array == 0).sum()) == 36


# -- pipeline, inspect, storage ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    path = folder / "tiny.onnx"
    onnx.save(graphs.export_torch(graphs.tiny_cnn()), str(path))
    calib = folder / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((80, 1, 12, 12)).astype(np.float32))
    return path, calib


def test_pipeline_magnitude_2_4_reports_dense_layers_and_sizes(tiny, tmp_path):
    from onnxsparse.pipeline import prune

    model, calib = tiny
    out = tmp_path / "p24.onnx"
    for method in ("magnitude", "global-magnitude"):  # no allocation under N:M: both give the same layers
        result = prune(model, out, calib, PruneConfig(sparsity=0.5, method=method, pattern="2:4"), force=True,
                       progress=False)
        rows = {r["name"]: r for r in result.layers}
        dense = [r for r in rows.values() if r["pattern"] == "dense"]
        assert len(dense) == 1 and dense[0]["shape"] == [8, 1, 3, 3] and dense[0]["achieved_sparsity"] == 0.0
        assert result.report["dense_layers"][0]["reason"].startswith("Conv input-channel dimension")
        for r in rows.values():
            if r["pattern"] == "2:4":
                assert r["nm"] == "2:4" and r["achieved_sparsity"] == 0.5 and r["target_sparsity"] == 0.5
        storage = result.report["storage"]
        assert storage["format"] == "dense" and storage["saved_bytes"] == out.stat().st_size
        assert storage["dense"]["zip_bytes"] < storage["input_zip_bytes"]
    saved = {r.tensor: r for r in inspect_model(out)}
    assert sum(r.satisfies_2_4 for r in saved.values()) == 3


def test_pipeline_warns_when_sparsity_disagrees_with_the_pattern(tiny):
    from onnxsparse.pipeline import prune

    model, calib = tiny
    result = prune(model, None, calib, PruneConfig(sparsity=0.9, method="magnitude", pattern="1:4"), progress=False)
    assert any("--sparsity 0.9 ignored" in note for note in result.report["notes"])
    assert {r["nm"] for r in result.layers if r["pattern"] != "dense"} == {"1:4"}


def test_sparse_initializer_save_loads_in_onnxruntime_with_identical_outputs(tiny, tmp_path):
    from onnxsparse.pipeline import prune

    model, calib = tiny
    dense_out, sparse_out = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    cfg = dict(sparsity=0.9, method="magnitude")
    prune(model, dense_out, calib, PruneConfig(**cfg), progress=False)
    result = prune(model, sparse_out, calib, PruneConfig(**cfg, save_format="sparse-initializer"), progress=False)
    storage = result.report["storage"]
    assert storage["sparse_tensors"] == 4
    assert storage["saved_bytes"] == sparse_out.stat().st_size < dense_out.stat().st_size
    assert storage["sparse-initializer"]["bytes"] < storage["dense"]["bytes"]
    assert "sparse initializer" in result.report["verification"]["checker"]
    saved = onnx.load(str(sparse_out))
    assert len(saved.graph.sparse_initializer) == 4
    assert all(s.indices.data_type == TensorProto.INT64 and len(s.indices.dims) == 1
               for s in saved.graph.sparse_initializer)
    feeds = {"input": np.random.default_rng(3).standard_normal((5, 1, 12, 12)).astype(np.float32)}
    for a, b in zip(ort_session(dense_out).run(None, feeds), ort_session(sparse_out).run(None, feeds)):
        np.testing.assert_array_equal(a, b)
    # inspect reads sparse initializers as their dense values
    assert [(r.tensor, r.zeros) for r in inspect_model(sparse_out)] == [
        (r.tensor, r.zeros) for r in inspect_model(dense_out)]
    dense_weights = graphs.all_tensors(onnx.load(str(dense_out)))
    for sparse in saved.graph.sparse_initializer:
        np.testing.assert_array_equal(sparse_to_array(sparse), dense_weights[sparse.values.name])


def test_to_sparse_initializers_only_where_smaller():
    model = graphs.conv_bn_relu()
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sparse_w = w["conv1.weight"].copy()
    sparse_w.reshape(-1)[np.arange(sparse_w.size) % 10 != 0] = 0  # 90% zeros: smaller as COO
    half = w["conv2.weight"].copy()
    half.reshape(-1)[::2] = 0  # 50% zeros: int64 indices make it larger
    for init in model.graph.initializer:
        if init.name in ("conv1.weight", "conv2.weight"):
            init.CopyFrom(numpy_helper.from_array(sparse_w if init.name == "conv1.weight" else half, init.name))
    out, converted = to_sparse_initializers(model, ["conv1.weight", "conv2.weight"])
    assert converted == ["conv1.weight"]
    assert {i.name for i in out.graph.initializer} == set(w) - {"conv1.weight"}
    assert out.ByteSize() < model.ByteSize() and len(model.graph.sparse_initializer) == 0
    feeds = graphs.random_feeds(model)
    for a, b in zip(ort_session(model).run(None, feeds), ort_session(out).run(None, feeds)):
        np.testing.assert_array_equal(a, b)
    restored = densify(out)
    np.testing.assert_array_equal(graphs.all_tensors(restored)["conv1.weight"], sparse_w)


def test_check_model_file_accepts_sparse_initializers(tmp_path):
    model = graphs.gemm(1)
    for init in model.graph.initializer:
        if init.name == "fc.weight":
            a = numpy_helper.to_array(init).copy()
            a[np.abs(a) < 0.6] = 0
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    out, converted = to_sparse_initializers(model, ["fc.weight"])
    assert converted
    path = tmp_path / "s.onnx"
    onnx.save(out, str(path))
    assert "full_check densified" in check_model_file(path)


def test_zip_size_counts_a_real_archive(tmp_path):
    import zipfile

    data = np.zeros(10_000, np.float32).tobytes() + np.random.default_rng(0).bytes(1000)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.writestr("member0", data)
    assert zip_size(data) == archive.stat().st_size < len(data)


def test_inspect_cli_shows_the_nm_column(tiny, tmp_path):
    from onnxsparse_cli.main import main

    model, calib = tiny
    out = tmp_path / "cli24.onnx"
    runner = CliRunner()
    res = runner.invoke(main, ["prune", str(model), "--sparsity", "0.5", "--pattern", "2:4", "--method", "magnitude",
                               "--calib", str(calib), "-o", str(out), "--save-format", "sparse-initializer"])
    assert res.exit_code == 0, res.output
    assert "left dense" in res.output and "storage:" in res.output
    res = runner.invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[-2:] == ["2:4", "N:M"]
    assert [line.split()[-2:] for line in lines[1:5]] == [["no", "-"]] + [["yes", "2:4"]] * 3
    data = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)
    assert [layer["nm"] for layer in data["layers"]] == ["-", "2:4", "2:4", "2:4"]
    assert data["layers_2_4"] == 3 and data["layers"][3]["nm_axis"] == 1
    res = runner.invoke(main, ["prune", str(model), "--sparsity", "0.5", "--pattern", "4:4", "--method", "magnitude",
                               "--calib", str(calib), "--dry-run"])
    assert res.exit_code == 2 and "--pattern N:M needs 0 < N < M, got '4:4'" in res.output


def test_speed_benchmark_runs_and_skips_cuda_cleanly(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("bench_speed", path)
    speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_speed", speed)  # dataclasses look their module up there
    spec.loader.exec_module(speed)
    model, calib = tiny
    assert speed.main([str(model), "--calib", str(calib), "--seconds", "0.05", "--rounds", "1", "--batch", "4",
                       "--json", str(tmp_path / "speed.json")]) == 0
    out = capsys.readouterr().out
    assert "| magnitude 2:4 | sparse-initializer |" in out and "| magnitude 0.9 unstructured |" in out
    report = json.loads((tmp_path / "speed.json").read_text())
    assert len(report["cpu"]) == 5 and report["machine"]["cores"]
    if not torch.cuda.is_available():
        assert "CUDA 2:4 GEMMs: skipped" in out and report["cuda"] == []
    # the GEMM operands of a 2:4 model are 2:4 along K (Conv K laid out (kh, kw, C_in))
    pruned = tmp_path / "p.onnx"
    from onnxsparse.pipeline import prune

    prune(model, pruned, calib, PruneConfig(sparsity=0.5, method="magnitude", pattern="2:4"), progress=False)
    ops = speed.gemm_operands(pruned, 2)
    assert ops and all(patterns.check_nm(op["A"], 2, 4, 1) for op in ops if op["A"].shape[1] % 4 == 0)
    assert [op["A"].shape for op in ops] == [(8, 9), (16, 72), (10, 16)]  # the grouped conv is not one GEMM


def test_speed_benchmark_prunes_its_variants_without_the_quality_gate(tmp_path, monkeypatch):
    """Timing needs the pruned files whatever their accuracy: magnitude at 0.9 reads 40% agreement on the bundled
    sample, under the default --min-agreement, and used to stop the benchmark before its first table."""
    import importlib.util
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import onnxsparse.pipeline

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("bench_speed", path)
    speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_speed", speed)
    spec.loader.exec_module(speed)
    seen = []

    def fake_prune(model, out, calib, config, **kwargs):
        seen.append(config)
        return SimpleNamespace(achieved_sparsity=config.sparsity)

    monkeypatch.setattr(onnxsparse.pipeline, "prune", fake_prune)
    variants = speed.prune_variants(tmp_path / "m.onnx", "calib", ["0.9", "2:4"], tmp_path, seed=0)
    assert [v.label for v in variants][1:] == ["magnitude 0.9 unstructured", "magnitude 2:4"]
    assert len(seen) == 4 and all(c.min_agreement == 0.0 and c.method == "magnitude" for c in seen)
