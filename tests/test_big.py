"""Models stored with external data, up to one over 2 GB: pruned within 3x the weight bytes of memory,
written with the external-data layout kept, verified in onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter import ort_session
from onnxsparse.sparsity.masks import zeros_for

# The child records its own peak resident memory after the CLI returns: VmHWM, the high-water mark of its
# address space. (ru_maxrss would not do: a child started by vfork + exec inherits the high-water mark of the
# pytest process that built the model.)
_CHILD = """
import json, sys
from onnxsparse_cli.main import main
code = 0
try:
    main(sys.argv[2:], standalone_mode=False)
except SystemExit as exc:
    code = exc.code or 0
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
with open(sys.argv[1], "w") as fh:
    json.dump({"hwm_kib": int(hwm[0]), "code": code}, fh)
"""


def _matmul_chain(folder, dim: int, layers: int, *, seed: int = 0):
    """``x -> MatMul W0 -> Relu -> ... -> MatMul W(n-1)``, weights (dim, dim) float32 stored as external data
    in ``chain.onnx.data`` (written one weight at a time: the test process never holds the whole model)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    value = "x"
    with open(folder / "chain.onnx.data", "wb") as data:
        for i in range(layers):
            w = rng.random((dim, dim), dtype=np.float32)  # uniform, scaled so activations keep unit variance
            w -= np.float32(0.5)
            w *= np.float32(2.0 * np.sqrt(3.0 / dim))
            tensor = onnx.TensorProto(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=[dim, dim])
            for key, entry in (("location", "chain.onnx.data"), ("offset", data.tell()), ("length", w.nbytes)):
                tensor.external_data.add(key=key, value=str(entry))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            w.tofile(data)
            inits.append(tensor)
            del w
            out = "y" if i == layers - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [value, f"w{i}"], [out if i == layers - 1 else f"m{i}"],
                                          name=f"mm{i}"))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
            value = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", dim])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", dim])], inits)
    path = folder / "chain.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _calib(folder, dim: int, n: int = 24):
    calib = folder / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32))
    return calib


def _prune_in_child(model, out, calib, tmp_path, *extra):
    stats = tmp_path / "child.json"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(stats), "prune", str(model), "--method", "magnitude", "--sparsity", "0.5", "--min-agreement", "0",
         "--calib", str(calib), "-o", str(out), "--report", str(tmp_path / "report.json"), *map(str, extra)],
        capture_output=True, text=True, timeout=900,
    )
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(stats.read_text())
    assert data["code"] == 0, proc.stdout + proc.stderr
    return data["hwm_kib"] * 1024, wall, json.loads((tmp_path / "report.json").read_text())


def _external_locations(path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data}.get("location")
            for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def _check_output(src, out, layers: int, dim: int):
    assert _external_locations(out) == {f"w{i}": "chain.onnx.data" for i in range(layers)} or \
        _external_locations(out) == {f"w{i}": f"{out.name}.data" for i in range(layers)}
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [out.name, f"{out.name}.data"]
    model = onnx.load(str(out), load_external_data=False)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init, str(out.parent))
        assert int((array == 0).sum()) == zeros_for(0.5, dim * dim), init.name
        del array
    feeds = {"x": np.random.default_rng(2).standard_normal((4, dim)).astype(np.float32)}
    dense = ort_session(src, prepack=False).run(None, feeds)[0]
    sparse = ort_session(out, prepack=False).run(None, feeds)[0]
    assert np.isfinite(sparse).all() and not np.allclose(dense, sparse)
    cos = float((dense * sparse).sum() / np.linalg.norm(dense) / np.linalg.norm(sparse))
    assert cos > 0.5


def _resave_with_onnx(src, folder):
    """The same model saved by onnx itself, one data file per tensor over a forced 1 KiB threshold."""
    model = onnx.load(str(src))
    path = folder / "resaved.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)
    return path


@pytest.mark.parametrize("writer", ["direct", "onnx"])
def test_external_data_layout_is_kept(tmp_path, writer):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = _matmul_chain(src_dir, 256, 3)
    if writer == "onnx":
        (src_dir / "chain").mkdir()
        src = _resave_with_onnx(src, src_dir / "chain")
        assert len(list((src_dir / "chain").iterdir())) == 4  # the graph and one file per weight
    out = out_dir / "pruned.onnx"
    from onnxsparse.pipeline import prune
    from onnxsparse.config import PruneConfig

    result = prune(src, out, _calib(tmp_path, 256), PruneConfig(method="magnitude", sparsity=0.5, min_agreement=0.0), progress=False)
    assert result.report["verification"]["export_max_rel_error"] < 1e-4
    assert _external_locations(out) == {f"w{i}": "pruned.onnx.data" for i in range(3)}
    _check_output(src, out, 3, 256)
    # nothing staged is left behind
    assert sorted(p.name for p in out_dir.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]


def test_unchanged_external_tensors_are_copied_bit_identical(tmp_path):
    src = _matmul_chain(tmp_path, 128, 2)
    out = tmp_path / "same.onnx"
    from onnxsparse.pipeline import prune
    from onnxsparse.config import PruneConfig

    prune(src, out, _calib(tmp_path, 128), PruneConfig(method="magnitude", sparsity=0.5, exclude=("mm1",), min_agreement=0.0),
          progress=False)
    before = onnx.load(str(src))
    after = onnx.load(str(out))
    assert _external_locations(out) == {"w0": "same.onnx.data", "w1": "same.onnx.data"}
    assert after.graph.initializer[1].raw_data == before.graph.initializer[1].raw_data
    assert after.graph.initializer[0].raw_data != before.graph.initializer[0].raw_data


def test_inspect_has_a_lighter_memory_check_than_prune(tmp_path, monkeypatch):
    import onnxsparse.importer.load as load
    from onnxsparse.importer import import_model
    from onnxsparse.inspect import inspect_model

    src = _matmul_chain(tmp_path, 128, 2)
    weights = 2 * 128 * 128 * 4
    monkeypatch.setattr(load, "physical_memory", lambda: int(weights * 2))
    rows = inspect_model(src)
    assert [r.tensor for r in rows] == ["w0", "w1"] and all(r.zeros == 0 for r in rows)
    with pytest.raises(OnnxSparseError, match=r"pruning it needs about .* GiB of memory"):
        import_model(src)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak memory from /proc")
def test_model_over_2gb_prunes_within_3x_its_weight_bytes(tmp_path):
    dim, layers = 12288, 4  # 4 x 604 MB float32: 2.42 GB of weights, over protobuf's 2 GiB
    weight_bytes = layers * dim * dim * 4
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = _matmul_chain(src_dir, dim, layers)
    assert weight_bytes > 2**31
    out = out_dir / "pruned.onnx"
    peak, wall, report = _prune_in_child(src, out, _calib(tmp_path, dim), tmp_path, "--verify-size", 4)
    print(f"\n>2 GB run: peak RSS {peak / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB of weights "
          f"({peak / weight_bytes:.2f}x), {wall:.0f} s wall; phases {report['time_s']}")
    assert peak <= 3 * weight_bytes, f"peak RSS {peak} > 3 x {weight_bytes} weight bytes"
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert report["verification"]["export_max_rel_error"] < 1e-4
    _check_output(src, out, layers, dim)


def test_external_data_at_sparsity_0_is_bit_identical_and_dry_run_leaves_nothing(tmp_path):
    from onnxsparse.config import PruneConfig
    from onnxsparse.pipeline import prune

    src_dir = tmp_path / "in"
    src_dir.mkdir()
    src = _matmul_chain(src_dir, 128, 2)
    calib = _calib(tmp_path, 128)
    out = tmp_path / "same.onnx"
    prune(src, out, calib, PruneConfig(method="magnitude", sparsity=0.0), progress=False)
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert [t.raw_data for t in after.graph.initializer] == [t.raw_data for t in before.graph.initializer]
    assert _external_locations(out) == {"w0": "same.onnx.data", "w1": "same.onnx.data"}
    result = prune(src, None, calib, PruneConfig(method="magnitude", sparsity=0.5, min_agreement=0.0), progress=False)
    assert result.output is None and result.report["storage"]["saved_bytes"] > 2 * 128 * 128 * 4
    assert sorted(p.name for p in src_dir.iterdir()) == ["chain.onnx", "chain.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "in", "same.onnx", "same.onnx.data"]
