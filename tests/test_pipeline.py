"""The pipeline never writes a model it could not verify, and leaves nothing behind when stopped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphs
import onnxsparse.methods.magnitude as magnitude
import onnxsparse.pipeline as pipeline
from onnxsparse import OnnxSparseError, PruneConfig, prune


def _feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((8, 1, 12, 12)).astype(np.float32)} for _ in range(n)]


def _only_file(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_export_mismatch_writes_nothing(tmp_path, monkeypatch):
    real = pipeline.write_back

    def corrupt(imported, module, metadata=None, **kwargs):
        model, changed = real(imported, module, metadata, **kwargs)
        init = next(i for i in model.graph.initializer if i.name == imported.layers[-1].name)
        from onnx import numpy_helper

        array = numpy_helper.to_array(init).copy()
        array[array != 0] *= 2
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        return model, changed

    monkeypatch.setattr(pipeline, "write_back", corrupt)
    out = tmp_path / "o.onnx"
    with pytest.raises(OnnxSparseError, match="onnxruntime disagrees with the pruned torch model"):
        prune(graphs.export_torch(graphs.tiny_cnn()), out, _feeds(), PruneConfig(sparsity=0.5, method="magnitude"),
              progress=False)
    assert _only_file(tmp_path) == []


def test_diverged_weights_are_never_written(tmp_path, monkeypatch):
    real = magnitude._Magnitude.run

    def diverge(self, ctx):
        result = real(self, ctx)
        with torch.no_grad():
            ctx.layers[0].weight.get(ctx.student).fill_(float("nan"))
        return result

    monkeypatch.setattr(magnitude._Magnitude, "run", diverge)
    with pytest.raises(OnnxSparseError, match="NaN or Inf"):
        prune(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "o.onnx", _feeds(),
              PruneConfig(sparsity=0.5, method="magnitude"), progress=False)
    assert _only_file(tmp_path) == []


def test_interrupt_names_the_phase_and_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(self, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(magnitude._Magnitude, "run", interrupted)
    with pytest.raises(pipeline.Interrupted) as info:
        prune(graphs.export_torch(graphs.tiny_cnn()), tmp_path / "o.onnx", _feeds(),
              PruneConfig(sparsity=0.5, method="magnitude"), progress=False)
    assert info.value.phase == "method"
    assert _only_file(tmp_path) == []


def test_same_seed_same_result():
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    config = PruneConfig(sparsity=0.8, method="global-magnitude", seed=3)
    a = prune(model, None, _feeds(), config, progress=False).report
    b = prune(model, None, _feeds(), config, progress=False).report
    assert a["layers"] == b["layers"]
    assert a["verification"]["outputs"] == b["verification"]["outputs"]


def test_sparsity_zero_is_bit_identical_with_default_options(tmp_path):
    # Default method (UniPTS) and correction on a BatchNorm graph: nothing may move at sparsity 0.
    model = graphs.export_torch(graphs.tiny_cnn(), keep_bn=True)
    out = tmp_path / "same.onnx"
    result = prune(model, out, _feeds(), PruneConfig(sparsity=0.0), progress=False)
    assert result.report["method_info"]["skipped"].startswith("sparsity 0")
    before = graphs.all_tensors(model)
    after = graphs.all_tensors(onnx.load(out))
    assert before.keys() == after.keys()
    for name, array in before.items():
        assert array.dtype == after[name].dtype and np.array_equal(array, after[name]), name


def test_a_pruned_model_pruned_again_keeps_one_metadata_entry_per_key(tmp_path):
    """The documented two-step path (prune, then ``prune --sparsity 0 --quantize int8`` on the result) reads
    a model that already carries onnxsparse's metadata: the second run must update it, not duplicate it."""
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    prune(graphs.export_torch(graphs.tiny_cnn()), first, _feeds(), PruneConfig(sparsity=0.5, method="magnitude"),
          progress=False)
    prune(first, second, _feeds(), PruneConfig(sparsity=0.7, method="magnitude"), progress=False)
    keys = [p.key for p in onnx.load(str(second)).metadata_props]
    assert len(keys) == len(set(keys))
    props = {p.key: p.value for p in onnx.load(str(second)).metadata_props}
    assert float(props["onnxsparse.achieved_sparsity"]) == pytest.approx(0.7, abs=0.03)
